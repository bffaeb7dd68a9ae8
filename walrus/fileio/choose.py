"""The one place that chooses io_uring or plain I/O, for reads (backups) and writes (restores)."""
from __future__ import annotations

import threading

from walrus._uring.support import UringUnavailable
from walrus.config import DEFAULT_READ_INFLIGHT, IO_METHODS
from walrus.errors import ConfigError
from walrus.fileio.pwrite import PwriteQueue
from walrus.fileio.reader import FileReader, PreadReader
from walrus.fileio.sink import FileSink
from walrus.fileio.slabsink import SlabSink, WriteQueue
from walrus.log import log

# WALRUS_IO_METHOD (config.IO_METHODS): "auto" takes io_uring where this process may use it, else
# plain I/O with one log line; "io_uring" refuses to run without it; "preadv" is plain I/O.
__all__ = ["open_reader", "open_sink"]

_told: set[str] = set()  # fallbacks already logged: one line per process, however many sinks open
_told_lock = threading.Lock()  # restores open a sink per extraction thread


def open_reader(mode: str = "auto", inflight: int | None = None) -> FileReader:
    """The reader for `mode`; `inflight`: bytes of reads io_uring keeps in flight (WALRUS_READ_INFLIGHT)."""
    _check(mode)
    if mode == "preadv":
        return PreadReader()
    from walrus._uring.support import open_uring_reader

    try:
        return open_uring_reader(DEFAULT_READ_INFLIGHT if inflight is None else inflight)
    except UringUnavailable as e:
        _fall_back(mode, "reader", e)
        return PreadReader()


def open_sink(mode: str = "auto", *, direct_threshold: int, buffer_size: int = 1 << 20,
              buffers: int = 8) -> FileSink:
    """The sink for `mode`: the same aligned buffers, direct I/O and preallocation whichever queue
    writes them, io_uring's ring or pwrite on threads."""
    _check(mode)
    return SlabSink(_write_queue(mode), direct_threshold, buffer_size, buffers)


def _write_queue(mode: str) -> WriteQueue:
    if mode == "preadv":
        return PwriteQueue()
    from walrus._uring.writer import open_write_ring

    try:
        return open_write_ring()
    except UringUnavailable as e:
        _fall_back(mode, "writer", e)
        return PwriteQueue()


def _check(mode: str) -> None:
    if mode not in IO_METHODS:
        raise ConfigError(f"unknown file I/O method {mode!r}", hint=f"use one of {', '.join(IO_METHODS)}")


def _fall_back(mode: str, what: str, e: UringUnavailable) -> None:
    if mode == "io_uring":
        raise ConfigError(f"the io_uring file {what} is unavailable", detail=e.reason,
                          hint='choose "preadv" (plain I/O), or allow io_uring on this host') from e
    with _told_lock:
        if what in _told:
            return
        _told.add(what)
    log.info("io_uring unavailable (%s); using %s", e.reason, "preadv" if what == "reader" else "pwrite")
