"""Batched positional reads into pool buffers: the reader interface, its plain preadv implementation,
and a file read ahead as a stream of filled buffers."""
from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from walrus.fileio.buffers import Buffer, BufferPool
from walrus.fileio.direct import dio_length


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

    def register(self, pool: BufferPool) -> bool:
        """Pin the pool for faster reads into it (io_uring's fixed buffers); False where the reader
        reads as fast without (preadv), or the kernel refused. Reads work either way."""
        ...

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

    def register(self, pool: BufferPool) -> bool:
        return False  # preadv copies into any memory alike

    def close(self) -> None:
        self._pool.shutdown(wait=True)


async def file_buffers(fd: int, size: int, pool: BufferPool, reader: FileReader, depth: int,
                       direct: bool = False, all_issued: Callable[[], None] | None = None):
    """A file's first `size` bytes as filled pool buffers, with up to `depth` reads in flight.

    A short read (EOF before `size`) ends the stream early; the caller checks the total. With
    `direct` (fd opened O_DIRECT) reads ask for whole blocks and keep only the file's bytes.
    `all_issued` is called once the last read is in flight (the stream may still yield buffers).
    """
    pending: asyncio.Queue = asyncio.Queue(maxsize=max(1, depth))

    async def read_one(buf: Buffer, offset: int, n: int) -> Buffer:
        (got,) = await reader.read_batch([ReadRequest(fd, offset, buf.view[:dio_length(n, direct)])])
        buf.length = min(got, n)
        return buf

    async def produce() -> None:
        offset = 0
        while offset < size:
            buf = await pool.acquire()
            n = min(pool.size, size - offset)
            await pending.put(asyncio.ensure_future(read_one(buf, offset, n)))
            offset += n
        if all_issued is not None:
            all_issued()
        await pending.put(None)

    producer = asyncio.create_task(produce())
    try:
        while True:
            item = await pending.get()
            if item is None:
                break
            buf = await item
            if buf.length == 0:
                buf.release()
                break
            yield buf
        await producer
    finally:
        producer.cancel()
        while not pending.empty():
            item = pending.get_nowait()
            if item is not None:
                try:
                    (await item).release()
                except BaseException:
                    pass
