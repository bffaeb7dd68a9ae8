"""A COPY's data bytes read straight into the caller's buffer: the compiled loop over libpq, or psycopg's calls."""
from __future__ import annotations

import functools
import os
import select
from typing import Optional

from psycopg import pq

from walrus.log import log

FULL, EVENT, END, ERROR, WAIT = range(5)  # what stopped a fill (walrus_copy_fill's statuses)
_FUNCTIONS = ("PQgetCopyData", "PQconsumeInput", "PQfreemem", "PQsocket")


@functools.cache
def _libpq_functions() -> Optional[tuple[int, ...]]:
    """The addresses of _FUNCTIONS in the libpq psycopg has loaded (the binary wheel's own copy, or
    the system's), or None when that cannot be told."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {fields[5].strip() for line in f if len(fields := line.split(None, 5)) == 6}
    except OSError:
        return None
    libpq = {p for p in paths if os.path.basename(p).startswith("libpq") and ".so" in os.path.basename(p)}
    if len(libpq) > 1:  # walrus's SQL session (pg/libpq.py) loads the distribution's beside the wheel's
        libpq = _psycopgs(libpq)
    if len(libpq) != 1:
        return None
    try:
        lib = ctypes.CDLL(libpq.pop(), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the copy loaded: no second one
        return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _FUNCTIONS)
    except (OSError, AttributeError):
        return None


def _psycopgs(paths: set[str]) -> set[str]:
    """Of the libpq files mapped, psycopg's: its binary wheel's own copy (in psycopg_binary.libs),
    else the distribution's (the pure-Python and C implementations load that one)."""
    bundled = {p for p in paths if os.path.basename(os.path.dirname(p)) == "psycopg_binary.libs"}
    return bundled if pq.__impl__ == "binary" else paths - bundled


def _compiled():
    try:
        from walrus._uring._liburing import ffi, lib
    except ImportError:
        return None
    return ffi, lib


class CopyReader:
    """The data messages of a COPY in progress on `pgconn` (nonblocking) as one byte stream, read into
    caller buffers by fill(); any other message stops a fill and is taken with take(). Data messages
    are those of type `kind` ('d': BASE_BACKUP's archives; 'w': XLogData), whose first `skip` bytes
    are their header; with `check_lsn` (XLogData) one counts only if it starts at `lsn`, the position
    of the next byte, which fills advance. The compiled loop when libpq's functions can be found, else
    psycopg's get_copy_data: same results."""

    def __init__(self, pgconn: pq.PGconn, *, kind: bytes = b"d", skip: int = 1, check_lsn: bool = False):
        self._pg = pgconn
        self._kind, self._skip, self._check_lsn = kind, skip, check_lsn
        self._c = None
        compiled = _compiled()
        functions = _libpq_functions() if compiled is not None else None
        if compiled is not None and functions is not None and hasattr(pgconn, "pgconn_ptr"):
            self._ffi, self._lib = compiled
            c = self._c = self._ffi.new("struct walrus_copy *")
            c.conn = self._ffi.cast("void *", pgconn.pgconn_ptr)
            c.get_copy_data, c.consume_input, c.freemem, c.socket = (self._ffi.cast("void *", f) for f in functions)
            c.kind, c.skip, c.check_lsn = kind, skip, int(check_lsn)
            self._status = self._ffi.new("int *")
        else:
            log.debug("reading the COPY through psycopg: libpq's functions were not found in this process")
        self._msg: memoryview | None = None  # the fallback's message held
        self._pos = 0  # its bytes copied out; -1: an event
        self._lsn = 0  # the fallback's position
        self._ended = False  # libpq reported the copy's end once; asking again is an error there

    @property
    def compiled(self) -> bool:
        return self._c is not None

    @property
    def lsn(self) -> int:
        return self._c.lsn if self._c is not None else self._lsn

    @lsn.setter
    def lsn(self, value: int) -> None:
        if self._c is not None:
            self._c.lsn = value
        else:
            self._lsn = value

    def fill(self, view: memoryview, timeout: float) -> tuple[int, int]:
        """(bytes copied into view, status): FULL, or EVENT (take() it), END (the copy ended), ERROR
        (libpq's error message says why), WAIT (nothing came for `timeout` seconds, or a signal;
        with 0, nothing more is waiting now)."""
        if self._ended:
            return 0, END
        if self._c is not None:
            n = self._lib.walrus_copy_fill(self._c, self._ffi.from_buffer(view), len(view),
                                           max(0, int(timeout * 1000)), self._status)
            status = self._status[0]
        else:
            n, status = self._fill(view, timeout)
        self._ended = status == END
        return n, status

    @property
    def ended(self) -> bool:
        """A fill met the copy's end: libpq's results follow."""
        return self._ended

    def holding(self) -> bool:
        """A message is held: an event that stopped a fill, or data a fill left part of."""
        return (self._c.msg != self._ffi.NULL) if self._c is not None else self._msg is not None

    def kind(self) -> bytes:
        """The type byte of the message held."""
        if self._c is not None:
            return bytes(self._ffi.buffer(self._c.msg, 1))
        assert self._msg is not None
        return bytes(self._msg[:1])

    def take(self) -> bytes:
        """The message held, whole (type byte first), and the next fill reads on after it. Data a
        fill left part of comes as a message of the rest (an XLogData's header then says so)."""
        if self._c is not None:
            c = self._c
            msg, pos = bytes(self._ffi.buffer(c.msg, c.len)), c.pos
            self._lib.walrus_copy_drop(c)
        else:
            assert self._msg is not None
            msg, pos = bytes(self._msg), self._pos
            self._msg = None
        if pos > self._skip:  # data a fill took part of
            head = msg[:self._skip]
            if self._check_lsn:  # XLogData: its start moves to the rest's first byte
                head = head[:1] + self.lsn.to_bytes(8, "big") + head[9:]
            msg = head + msg[pos:]
        return msg

    def close(self) -> None:
        """Frees a message still held (a copy abandoned); idempotent."""
        if self._c is not None:
            self._lib.walrus_copy_drop(self._c)
        self._msg = None

    __del__ = close

    def _fill(self, view: memoryview, timeout: float) -> tuple[int, int]:
        got = 0
        cap = len(view)
        pg = self._pg
        while got < cap:
            msg = self._msg
            if msg is not None:
                if self._pos < 0:
                    return got, EVENT
                k = min(len(msg) - self._pos, cap - got)
                view[got:got + k] = msg[self._pos:self._pos + k]
                got += k
                self._pos += k
                self._lsn += k
                if self._pos == len(msg):
                    self._msg = None
                continue
            try:
                n, data = pg.get_copy_data(1)
            except Exception:
                return got, ERROR
            if n > 0:
                data = memoryview(data)
                ok = (data[:1] == self._kind and n >= self._skip
                      and (not self._check_lsn or int.from_bytes(data[1:9], "big") == self._lsn))
                self._msg, self._pos = data, self._skip if ok else -1
                continue
            if n == -1:
                return got, END
            if not select.select([pg.socket], [], [], timeout)[0]:
                return got, WAIT
            try:
                pg.consume_input()
            except Exception:
                return got, ERROR
        return got, FULL
