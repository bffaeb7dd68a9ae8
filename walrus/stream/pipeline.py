"""The upload chain shared by wal-push and backup-push: pool buffers -> compress -> encrypt -> count -> storage."""
from __future__ import annotations

import asyncio
import os
import resource
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import AsyncIterable, Callable

from walrus.archive.tar_write import dio_length
from walrus.codec import new_compressor
from walrus.config import Settings
from walrus.storage.base import Storage
from walrus.stream.buffers import Buffer, BufferPool
from walrus.stream.reader import FileReader, ReadRequest
from walrus.stream.stages import Counter, blocks_in_flight, compressed, encrypted, piped

# Compressed chunks queued between the compressor thread and the storage writer.
UPLOAD_QUEUE_DEPTH = 4


@dataclass(frozen=True)
class PoolPlan:
    """How the memory budget splits: `lanes` parts in flight, each with `depth` buffers read ahead
    and blocks_in_flight(parallel) buffers in compression jobs, keeping `parallel` cores busy."""

    buffer_size: int
    count: int
    depth: int
    parallel: int

    @classmethod
    def for_settings(cls, settings: Settings, lanes: int, parallel: int = 1) -> "PoolPlan":
        size = buffer_size(settings)
        affordable = settings.memory_budget // size // max(1, lanes)
        # a lane needs its compression jobs plus two buffers; fewer cores compress a part than the
        # machine has when the budget cannot hold two jobs for each
        parallel = max(1, min(parallel, (affordable - 2) // 2))
        compressing = blocks_in_flight(parallel)
        per_lane = max(compressing + 2, affordable)
        # a lane holds its read-ahead queue, the buffer being filled and the ones being compressed
        depth = per_lane - 1 - compressing
        return cls(size, lanes * per_lane, depth, parallel)


def buffer_size(settings: Settings) -> int:
    """WALRUS_BUFFER_SIZE as a pool can hold it: whole pages (O_DIRECT and fixed buffers need that)."""
    return max(4096, settings.buffer_size - settings.buffer_size % 4096)


def upload_threads(parallel: int) -> int:
    """Executor threads one upload_buffers call can keep busy: its compression jobs and its encryption."""
    return max(1, parallel) + 1


async def upload_buffers(storage: Storage, key: str, buffers: AsyncIterable[Buffer], settings: Settings,
                         executor: Executor, counter: Counter | None = None, parallel: int = 1, *,
                         exclusive: bool = False) -> int:
    """Compress pool buffers into one object, encrypted if a key is configured; returns bytes stored.

    `parallel`: buffers of this object compressed at once by codecs with independent blocks (lz4,
    zstd); the executor needs upload_threads(parallel) threads for this object. `exclusive`: see
    Storage.put.
    """
    compressor = new_compressor(settings.compression_method, zstd_level=settings.zstd_level)
    stream = compressed(buffers, compressor, executor, parallel)
    if settings.crypter is not None:
        stream = encrypted(stream, settings.crypter.new_encryptor(), executor)
    stream = piped(stream, UPLOAD_QUEUE_DEPTH)
    if counter is not None:
        stream = counter.count(stream)
    return await storage.put(key, stream, exclusive=exclusive)


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


def raise_nofile_limit() -> None:
    """Parts keep the files of their in-flight buffers open; lift the soft fd limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
