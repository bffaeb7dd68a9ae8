"""The io_uring write queue of restores: one ring of WRITE/WRITE_FIXED requests for walrus.fileio's sink."""
from __future__ import annotations

import resource
import threading

from walrus._uring.support import UringUnavailable, _explain, probe
from walrus.log import log

DEFAULT_DEPTH = 64  # writes queued or in flight per sink; also bounds the descriptors a sink keeps open

_log_lock = threading.Lock()
_logged: set[str] = set()  # the once-per-process notices already given


def _log_once(key: str, message: str, *args: object) -> None:
    """One DEVEL log line per process for `key` (routine facts of the host, not failures): every
    extraction thread opens its own sink per tar part."""
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.debug(message, *args)


class WriteRing:
    """A Ring in the shape of walrus.fileio.slabsink's WriteQueue: addresses as integers, pinned
    buffers registered where RLIMIT_MEMLOCK allows."""

    name = "io_uring"

    def __init__(self, depth: int = DEFAULT_DEPTH):
        from walrus._uring._liburing import ffi, lib
        from walrus._uring.ring import Ring

        self._ffi = ffi
        self._ring = Ring(depth)
        if not self._ring.supports(lib.IORING_OP_WRITE, lib.IORING_OP_WRITE_FIXED):
            self._ring.close()
            raise UringUnavailable("the kernel's io_uring lacks IORING_OP_WRITE (needs Linux 5.6)")
        self.entries = depth
        # the Ring's own methods, bound once: the sink calls them per write
        self.submit_and_wait = self._ring.submit_and_wait
        self.reap = self._ring.reap

    @property
    def completions(self) -> int:
        """CQEs reaped so far: proof that the bytes went through the ring."""
        return self._ring.completions

    @property
    def closed(self) -> bool:
        return self._ring.closed

    def register_buffers(self, base: int, size: int, count: int) -> bool:
        try:
            # The kernel enforces RLIMIT_MEMLOCK per user (every sink of the process counts) and
            # exempts CAP_IPC_LOCK, so ask it rather than predict.
            self._ring.register_buffers(base, size, count)
        except OSError as e:
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft >> 10} KiB"
            _log_once("unregistered", "io_uring: cannot register the %d KiB write buffers as fixed buffers "
                      "(%s; RLIMIT_MEMLOCK %s); using unregistered writes", (count * size) >> 10,
                      e.strerror, limit)
            return False
        return True

    def unregister_buffers(self) -> None:
        self._ring.unregister_buffers()

    def prep_write(self, user_data: int, fd: int, address: int, nbytes: int, offset: int,
                   buf_index: int = -1) -> None:
        self._ring.prep_write(user_data, fd, self._ffi.cast("char *", address), nbytes, offset, buf_index)

    def close(self) -> None:
        self._ring.close()


def open_write_ring(depth: int = DEFAULT_DEPTH) -> WriteRing:
    """A WriteRing; raises UringUnavailable when io_uring cannot work here."""
    reason = probe()
    if reason is not None:
        raise UringUnavailable(reason)
    try:
        return WriteRing(depth)
    except OSError as e:
        raise UringUnavailable(_explain(e.errno)) from e
