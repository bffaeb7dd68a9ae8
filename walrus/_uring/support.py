"""Whether io_uring works in this process, why not, and the constructor that checks first."""
from __future__ import annotations

import errno
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from walrus._uring.reader import UringReader

DEFAULT_DEPTH = 64  # ring entries: the most reads in flight at once (small files)


class UringUnavailable(Exception):
    """io_uring cannot be used here; `reason` says why (kernel, sysctl, seccomp, build)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _proc_line(path: str, prefix: str = "") -> str | None:
    """The first line of `path` that starts with `prefix`, stripped; None when unreadable or absent."""
    try:
        with open(path) as f:
            return next((line.strip() for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def _seccomp_filtered() -> bool:
    line = _proc_line("/proc/self/status", "Seccomp:")
    return line is not None and line.split()[-1] == "2"


def _explain(err: int) -> str:
    """A reason for io_uring_queue_init failing with `err`, naming the setting that causes it."""
    name = errno.errorcode.get(err, str(err))
    if err == errno.ENOSYS:
        if _seccomp_filtered():
            return "ENOSYS: io_uring_setup is blocked by a seccomp filter"
        return "ENOSYS: the kernel is built without io_uring"
    if err == errno.EPERM:
        disabled = _proc_line("/proc/sys/kernel/io_uring_disabled")
        if disabled == "2":
            return "EPERM: kernel.io_uring_disabled=2"
        if disabled == "1":
            return "EPERM: kernel.io_uring_disabled=1 and this user is not in kernel.io_uring_group"
        if _seccomp_filtered():
            return "EPERM: io_uring_setup is blocked by a seccomp filter (container runtime policy)"
        return "EPERM: io_uring_setup not permitted"
    if err == errno.ENOMEM:
        return "ENOMEM: the ring does not fit in RLIMIT_MEMLOCK (kernels before 5.12 count rings there)"
    return f"{name}: io_uring_setup failed"


@functools.cache
def probe() -> str | None:
    """None when io_uring can run reads here, else why not. Sets up one tiny ring, once per process."""
    try:
        from walrus._uring._liburing import lib
        from walrus._uring.ring import Ring
    except ImportError as e:
        return f"module not built ({e}); reinstall walrus with liburing-dev present"
    try:
        ring = Ring(2)
    except OSError as e:
        return _explain(e.errno)
    try:
        if not ring.supports(lib.IORING_OP_READ, lib.IORING_OP_READ_FIXED):
            return "the kernel's io_uring lacks IORING_OP_READ (needs Linux 5.6)"
    finally:
        ring.close()
    return None


def open_uring_reader(inflight: int, depth: int = DEFAULT_DEPTH) -> "UringReader":
    """A UringReader with a ring of `depth` entries and at most `inflight` bytes of reads in flight;
    raises UringUnavailable when io_uring cannot work."""
    reason = probe()
    if reason is not None:
        raise UringUnavailable(reason)
    from walrus._uring.reader import UringReader

    try:
        return UringReader(depth, inflight)
    except OSError as e:
        raise UringUnavailable(_explain(e.errno)) from e
