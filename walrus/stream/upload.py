"""The upload chain shared by wal-push and backup-push: pool buffers -> compress -> encrypt -> count -> storage."""
from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterable

from walrus.codec import new_compressor
from walrus.config import Settings
from walrus.fileio import Buffer, BufferPool, FileReader, open_reader
from walrus.storage.base import Storage
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
    def for_settings(cls, settings: Settings, lanes: int, parallel: int = 1, *, reserved: int = 0) -> "PoolPlan":
        """`reserved`: bytes of the budget the storage holds for its uploads (Storage.upload_memory)."""
        size = buffer_size(settings)
        affordable = max(0, settings.memory_budget - reserved) // size // max(1, lanes)
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


class Uploader:
    """What uploading local files holds for a whole run: the buffer pool, the file reader that fills
    it, and the threads that compress and encrypt. backup-push opens one per backup, wal-push one
    per file, the daemon one for its lifetime (so a segment pays for its bytes only).

    `threads`: upload_threads(parallel) for each object uploaded at once. `register` pins the pool
    for the reader once (io_uring's fixed buffers), which pays off when the run is long.
    """

    def __init__(self, settings: Settings, buffers: int, buffer_size: int, threads: int, *, register: bool,
                 name: str):
        self.settings = settings
        self.pool = BufferPool(buffers, buffer_size)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        try:
            self.reader: FileReader = open_reader(settings.io_method, settings.read_inflight)
        except BaseException:
            self.executor.shutdown(wait=False)
            self.pool.close()
            raise
        if register:
            self.reader.register(self.pool)

    async def upload(self, storage: Storage, key: str, buffers: AsyncIterable[Buffer], counter: Counter | None = None,
                     parallel: int = 1, *, exclusive: bool = False) -> int:
        """upload_buffers on this run's threads."""
        return await upload_buffers(storage, key, buffers, self.settings, self.executor, counter, parallel,
                                    exclusive=exclusive)

    def close(self) -> None:
        """The reader first (its reads in flight land in the pool), then the threads (queued jobs are
        dropped; a running one keeps its buffer mapped until it ends), then the pool."""
        self.reader.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()

    def __enter__(self) -> "Uploader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
