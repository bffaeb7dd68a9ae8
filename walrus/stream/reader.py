"""Batched positional reads into pool buffers; the plain preadv implementation of the reader interface."""
from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(slots=True)
class ReadRequest:
    fd: int
    offset: int
    view: memoryview  # a slice of a pool buffer; filled from the file at `offset`


class FileReader(Protocol):
    """Reads many (fd, offset, buffer slice) requests in one batch.

    read_batch returns, per request, the bytes read: less than len(view) only at end of file (a file
    that shrank while PostgreSQL runs). Hard I/O errors raise OSError. The io_uring reader implements
    the same interface with one submission per batch.
    """

    name: str

    async def read_batch(self, requests: Sequence[ReadRequest]) -> list[int]: ...

    def close(self) -> None: ...


def _fill(fd: int, offset: int, view: memoryview) -> int:
    done = 0
    want = len(view)
    while done < want:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            # O_DIRECT: a short read that ends off a block boundary is the file's end (it shrank);
            # asking for the rest at that unaligned offset can only give EINVAL.
            if e.errno == errno.EINVAL and done % 512:
                break
            raise
        if n == 0:
            break
        done += n
    return done


class PreadReader:
    """preadv(2) on a small thread pool; Python retries EINTR for us."""

    name = "preadv"

    def __init__(self, threads: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="walrus-read")

    def _run(self, requests: Sequence[ReadRequest]) -> list[int]:
        return [_fill(r.fd, r.offset, r.view) for r in requests]

    async def read_batch(self, requests: Sequence[ReadRequest]) -> list[int]:
        if not requests:
            return []
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, requests)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def open_reader(mode: str = "auto", inflight: int | None = None) -> FileReader:
    """The reader for `mode`: "io_uring", "preadv", or "auto" (io_uring when this process may use it).

    `inflight`: bytes of reads io_uring keeps in flight at once (WALRUS_READ_INFLIGHT)."""
    from walrus._uring import DEFAULT_INFLIGHT, UringUnavailable, open_uring_reader
    from walrus.errors import ConfigError
    from walrus.log import log

    modes = ("auto", "io_uring", "preadv")
    if mode not in modes:
        raise ConfigError(f"unknown file reader {mode!r}", hint=f"use one of {', '.join(modes)}")
    if mode == "preadv":
        return PreadReader()
    try:
        return open_uring_reader(inflight=DEFAULT_INFLIGHT if inflight is None else inflight)
    except UringUnavailable as e:
        if mode == "io_uring":
            raise ConfigError("the io_uring file reader is unavailable", detail=e.reason,
                              hint='choose the "preadv" reader, or allow io_uring on this host') from e
        log.info("io_uring unavailable (%s); using preadv", e.reason)
        return PreadReader()
