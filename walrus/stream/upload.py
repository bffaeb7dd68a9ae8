"""The upload chain shared by wal-push and backup-push: pool buffers -> compress -> encrypt -> count -> storage."""
from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import AsyncIterable

from walrus.codec import new_compressor
from walrus.config import Settings
from walrus.fileio import Buffer
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
