"""A fixed pool of page-aligned buffers: the data path's whole memory for file bytes."""
from __future__ import annotations

import asyncio
import mmap

from walrus.fsutil import ask_huge_pages, unmap


class Buffer:
    """One slot of the pool. `length` bytes of `view` are valid; release() returns it to the pool."""

    __slots__ = ("index", "view", "length", "_pool")

    def __init__(self, pool: "BufferPool", index: int, view: memoryview):
        self._pool = pool
        self.index = index
        self.view = view
        self.length = 0

    @property
    def data(self) -> memoryview:
        return self.view[: self.length]

    def release(self) -> None:
        self.length = 0
        self._pool._free.put_nowait(self)


class BufferPool:
    """`count` buffers of `size` bytes carved from one anonymous mapping.

    The mapping is page aligned (O_DIRECT and io_uring fixed buffers need that) and allocated
    once; acquire() waits when every buffer is in use, which is the backpressure that keeps
    memory flat whatever the size of the database.

    Free buffers are handed out last released first, so a pipeline that is not using the whole
    pool keeps cycling the same few buffers, whose memory is still in the CPU caches (a device
    copying or DMAing into it, then the compressor reading it, both run faster than on memory
    cold for 32 buffers). The mapping asks for huge pages (fsutil.ask_huge_pages).
    """

    def __init__(self, count: int, size: int):
        if count < 1 or size < 4096 or size % 4096:
            raise ValueError("buffer pool needs count >= 1 and a size that is a multiple of 4096")
        self.count = count
        self.size = size
        self._map = mmap.mmap(-1, count * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        ask_huge_pages(self._map)
        self._whole = memoryview(self._map)
        self._free: asyncio.LifoQueue[Buffer] = asyncio.LifoQueue()
        self.buffers = [Buffer(self, i, self._whole[i * size:(i + 1) * size]) for i in range(count)]
        for b in reversed(self.buffers):  # buffer 0 first
            self._free.put_nowait(b)

    @property
    def mapping(self) -> mmap.mmap:
        return self._map

    async def acquire(self) -> Buffer:
        return await self._free.get()

    def available(self) -> int:
        return self._free.qsize()

    def close(self) -> None:
        """Unmap now; if a slice of a buffer is still referenced somewhere, leave it to the GC."""
        unmap(self._map, [*(b.view for b in self.buffers), self._whole])
