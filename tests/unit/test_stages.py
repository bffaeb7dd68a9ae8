"""walrus.stream.stages: block-parallel compression keeps order, bounds its work, and never frees a buffer in use."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import lz4.frame
import pytest

from walrus.codec import new_compressor
from walrus.codec.lz4 import Lz4Compressor
from walrus.fileio import BufferPool
from walrus.stream.stages import blocks_in_flight, compressed

SIZE = 64 << 10


def _chunks(n: int) -> list[bytes]:
    rnd = random.Random(5)
    return [rnd.randbytes(SIZE // 2) + bytes([i]) * (SIZE // 2) for i in range(n)]


async def _filled(pool: BufferPool, chunks: list[bytes], held: list[int] | None = None):
    for chunk in chunks:
        buf = await pool.acquire()
        if held is not None:  # buffers out of the pool, this one included
            held.append(pool.count - pool.available())
        buf.view[:len(chunk)] = chunk
        buf.length = len(chunk)
        yield buf


class _Jittery(Lz4Compressor):
    """Encodes slowly and unevenly, so jobs end out of order; records how many ran at once."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self.running = self.most = 0
        self._rnd = random.Random(9)

    def encode(self, data):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            pause = self._rnd.uniform(0, 0.02)
        time.sleep(pause)
        try:
            return super().encode(data)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("parallel", [2, 4])
def test_parallel_blocks_make_the_sequential_frame(parallel):
    chunks = _chunks(12)
    reference = new_compressor("lz4")
    expected = b"".join(reference.compress(c) for c in chunks) + reference.finish()

    async def run():
        pool = BufferPool(16, SIZE)
        compressor = _Jittery()
        held: list[int] = []
        with ThreadPoolExecutor(parallel) as executor:
            out = [c async for c in compressed(_filled(pool, chunks, held), compressor, executor, parallel)]
        return b"".join(out), compressor.most, max(held), pool.available()

    blob, most, held, free = asyncio.run(run())
    assert blob == expected
    assert lz4.frame.decompress(blob) == b"".join(chunks)
    assert most == parallel  # blocks of one object were encoded on every thread at once
    # a queued job per core besides the running one, and never more buffers than that
    assert held == blocks_in_flight(parallel) == 2 * parallel
    assert free == 16


def test_an_abandoned_stream_frees_each_buffer_only_after_its_job_ends():
    gate = threading.Event()

    class Held(Lz4Compressor):
        def encode(self, data):
            gate.wait(10)
            return super().encode(data)

    async def run():
        pool = BufferPool(4, SIZE)
        with ThreadPoolExecutor(3) as executor:
            stream = compressed(_filled(pool, _chunks(4)), Held(), executor, parallel=2)
            assert await stream.__anext__() == bytes.fromhex("04224D18607073")  # header
            reading = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.1)  # four jobs in flight: three encodes blocked on the gate, one queued
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            await stream.aclose()
            held_while_jobs_ran = 4 - pool.available()
            gate.set()
            for _ in range(100):
                if pool.available() == 4:
                    break
                await asyncio.sleep(0.01)
            return held_while_jobs_ran, pool.available()

    held, free = asyncio.run(run())
    assert held == 4  # the buffers of running and queued jobs stayed out of the pool
    assert free == 4  # and came back once their jobs ended
