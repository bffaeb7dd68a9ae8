"""A COPY's data bytes read straight into the caller's buffer: the compiled loop over libpq, or psycopg's calls."""
from __future__ import annotations

import functools
import os
from typing import Optional

from psycopg import pq

from walrus.log import log

FULL, EVENT, END, ERROR, WAIT = range(5)  # what stopped a fill (walrus_copy_fill's statuses)
_FUNCTIONS = ("PQgetCopyData", "PQconsumeInput", "PQfreemem", "PQsocket")


@functools.cache
def _libpq_functions() -> Optional[tuple[int, ...]]:
    """The addresses of _FUNCTIONS in the one libpq this process has loaded (psycopg's: the binary
    wheel's own copy, or the system's), or None when that cannot be told (none, or two loaded)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {fields[5].strip() for line in f if len(fields := line.split(None, 5)) == 6}
    except OSError:
        return None
    libpq = {p for p in paths if os.path.basename(p).startswith("libpq") and ".so" in os.path.basename(p)}
    if len(libpq) != 1:
        return None
    try:
        lib = ctypes.CDLL(libpq.pop(), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the copy loaded: no second one
        return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _FUNCTIONS)
    except (OSError, AttributeError):
        return None


def _compiled():
    try:
        from walrus._uring._liburing import ffi, lib
    except ImportError:
        return None
    return ffi, lib


class CopyReader:
    """The data ('d') messages of a COPY in progress on `pgconn` (nonblocking) as one byte stream, read
    into caller buffers by fill(); any other message stops a fill and is taken with take(). The
    compiled loop when libpq's functions can be found, else psycopg's get_copy_data: same results."""

    def __init__(self, pgconn: pq.PGconn):
        self._pg = pgconn
        self._c = None
        compiled = _compiled()
        functions = _libpq_functions() if compiled is not None else None
        if compiled is not None and functions is not None and hasattr(pgconn, "pgconn_ptr"):
            self._ffi, self._lib = compiled
            c = self._c = self._ffi.new("struct walrus_copy *")
            c.conn = self._ffi.cast("void *", pgconn.pgconn_ptr)
            c.get_copy_data, c.consume_input, c.freemem, c.socket = (self._ffi.cast("void *", f) for f in functions)
            self._status = self._ffi.new("int *")
        else:
            log.debug("reading the COPY through psycopg: libpq's functions were not found in this process")
        self._msg: memoryview | None = None  # the fallback's message being read
        self._pos = 0
        self.bytes = 0  # data bytes handed out
        self._ended = False  # libpq reported the copy's end once; asking again is an error there

    @property
    def compiled(self) -> bool:
        return self._c is not None

    def fill(self, view: memoryview, timeout: float) -> tuple[int, int]:
        """(bytes copied into view, status): FULL, or EVENT (take() it), END (the copy ended), ERROR
        (libpq's error message says why), WAIT (nothing came for `timeout` seconds, or a signal)."""
        if self._ended:
            return 0, END
        if self._c is not None:
            n = self._lib.walrus_copy_fill(self._c, self._ffi.from_buffer(view), len(view),
                                           max(1, int(timeout * 1000)), self._status)
            self.bytes += n
            status = self._status[0]
        else:
            n, status = self._fill(view, timeout)
        self._ended = status == END
        return n, status

    def kind(self) -> bytes:
        """The type byte of the message that stopped a fill with EVENT."""
        if self._c is not None:
            return bytes(self._ffi.buffer(self._c.msg, 1))
        assert self._msg is not None
        return bytes(self._msg[:1])

    def take(self) -> bytes:
        """The message that stopped a fill with EVENT, whole (type byte first); the next fill reads on."""
        if self._c is not None:
            c = self._c
            msg = bytes(self._ffi.buffer(c.msg, c.len))
            self._lib.walrus_copy_drop(c)
            return msg
        assert self._msg is not None
        msg, self._msg = bytes(self._msg), None
        return msg

    def close(self) -> None:
        """Frees a message still held (a copy abandoned); idempotent."""
        if self._c is not None:
            self._lib.walrus_copy_drop(self._c)
        self._msg = None

    def _fill(self, view: memoryview, timeout: float) -> tuple[int, int]:
        import select

        got = 0
        cap = len(view)
        pg = self._pg
        while got < cap:
            msg = self._msg
            if msg is not None:
                if msg[:1] != b"d":
                    return got, EVENT
                k = min(len(msg) - self._pos, cap - got)
                view[got:got + k] = msg[self._pos:self._pos + k]
                got += k
                self._pos += k
                self.bytes += k
                if self._pos == len(msg):
                    self._msg = None
                continue
            try:
                n, data = pg.get_copy_data(1)
            except Exception:
                return got, ERROR
            if n > 0:
                self._msg, self._pos = memoryview(data), 1 if data[:1] == b"d" else 0
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
