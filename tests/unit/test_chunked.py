"""storage.chunked on its own, with in-memory requests: what every backend that uses it inherits
(S3 today; its requests are tested against moto in test_s3_faults.py)."""
from __future__ import annotations

import asyncio
import os

import pytest

from walrus.errors import StorageError
from walrus.storage.chunked import PartPool, buffer_plan, put_in_parts, read_ranges
from walrus.storage.retry import RetryPolicy, TransientError

PART = 1000


class MemoryUpload:
    """Parts kept in memory; optionally one part fails for good, and sends are slow enough to overlap."""

    def __init__(self, fail_part: int | None = None):
        self.parts: dict[int, bytes] = {}
        self.in_flight = self.peak = 0
        self.fail_part = fail_part
        self.completed = self.aborted = False

    async def send(self, number: int, data: memoryview) -> int:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            if number == self.fail_part:
                raise StorageError(f"part {number} failed", detail="injected")
            self.parts[number] = bytes(data)
            return number
        finally:
            self.in_flight -= 1

    async def complete(self, tokens: list[int], exclusive: bool) -> str:
        assert tokens == list(range(1, len(tokens) + 1))
        self.completed = True
        return "etag"

    async def abort(self) -> None:
        self.aborted = True


def put(data: bytes, upload: MemoryUpload, *, chunk: int = 333, concurrency: int = 3, max_parts: int = 100,
        buffers: int = 4):
    """One put_in_parts through a pool of `buffers` part buffers; every buffer must be back in the
    pool afterwards, whether the put succeeded or failed."""
    whole: list[bytes] = []
    pools: list[PartPool] = []

    async def stream():
        for i in range(0, len(data), chunk):
            yield data[i:i + chunk]

    async def put_whole(buf: memoryview) -> str:
        whole.append(bytes(buf))
        return "single"

    async def start() -> MemoryUpload:
        return upload

    async def main():
        pools.append(PartPool(PART, buffers))
        return await put_in_parts(stream(), pools[0], max_parts=max_parts, concurrency=concurrency,
                                  put_whole=put_whole, start=start,
                                  too_many=lambda: StorageError("too many parts"), exclusive=False)

    try:
        return asyncio.run(main()), whole
    finally:
        assert pools[0]._slots._value == buffers, "a part buffer was not given back"


def test_a_stream_that_fits_one_part_is_one_put():
    data = os.urandom(PART)
    upload = MemoryUpload()
    (total, etag), whole = put(data, upload)
    assert (total, etag, whole, upload.parts) == (PART, "single", [data], {})


def test_a_longer_stream_is_parts_in_order_a_few_at_a_time():
    data = os.urandom(10 * PART + 7)
    upload = MemoryUpload()
    (total, etag), whole = put(data, upload)
    assert total == len(data) and etag == "etag" and whole == [] and upload.completed
    assert b"".join(upload.parts[n] for n in sorted(upload.parts)) == data and len(upload.parts) == 11
    assert 1 < upload.peak <= 3


def test_a_failed_part_aborts_the_upload_and_nothing_completes():
    upload = MemoryUpload(fail_part=4)
    with pytest.raises(StorageError, match="part 4"):
        put(os.urandom(10 * PART), upload)
    assert upload.aborted and not upload.completed and upload.in_flight == 0


def test_too_many_parts_is_an_error_that_aborts():
    upload = MemoryUpload()
    with pytest.raises(StorageError, match="too many parts"):
        put(os.urandom(10 * PART), upload, max_parts=5)
    assert upload.aborted and not upload.completed


class MemoryRange:
    def __init__(self, data: bytes, first: int, last: int, etag: str, break_after: int | None):
        self.first, self.last, self.total, self.etag = first, last, len(data), etag
        self._body = data[first:last + 1]
        self._break_after = break_after  # bytes served before the connection "breaks"
        self.closed = False

    async def read(self, n: int) -> bytes:
        if self._break_after is not None and self._break_after <= 0:
            raise TransientError("the connection broke")
        n = min(n, len(self._body), *(() if self._break_after is None else (self._break_after,)))
        out, self._body = self._body[:n], self._body[n:]
        if self._break_after is not None:
            self._break_after -= n
        return out

    def close(self) -> None:
        self.closed = True


def test_ranges_come_in_order_and_broken_ones_are_read_again():
    data = os.urandom(10_000)
    opened: list[tuple[int, int]] = []
    ranges: list[MemoryRange] = []

    async def open_range(start, end, etag, progress):
        assert etag == "v1"  # every later range is pinned to the head's version
        opened.append((start, end))
        # the first open of bytes 4000.. breaks after 500 bytes
        breaks = 500 if start == 4000 and not any(s == 4000 for s, _ in opened[:-1]) else None
        ranges.append(MemoryRange(data, start, end, "v1", breaks))
        return ranges[-1]

    async def main():
        head = MemoryRange(data, 0, 1999, "v1", 700)  # the range being streamed breaks after 700 bytes
        slots = asyncio.Semaphore(2)
        chunks = [c async for c in read_ranges(head, open_range, range_size=2000, ahead=2, slots=slots,
                                                policy=RetryPolicy(attempts=3, timeout=5), what="download of x")]
        return b"".join(chunks), head.closed

    got, head_closed = asyncio.run(main())
    assert got == data and head_closed
    assert (700, 1999) in opened  # a streamed range resumes from the byte after the last one received
    assert opened.count((4000, 5999)) == 2  # a prefetched range is fetched again from its start
    assert all(r.closed for r in ranges)


def test_a_range_that_keeps_failing_gives_up():
    data = os.urandom(4000)

    async def open_range(start, end, etag, progress):
        return MemoryRange(data, start, end, etag, 0)  # breaks before its first byte, every time

    async def main():
        head = MemoryRange(data, 0, 1999, "v1", None)
        return [c async for c in read_ranges(head, open_range, range_size=2000, ahead=0, slots=asyncio.Semaphore(1),
                                             policy=RetryPolicy(attempts=2, timeout=5), what="download of x")]

    with pytest.raises(StorageError):
        asyncio.run(main())


def test_puts_side_by_side_share_the_pool_and_never_hold_more():
    """Four uploads at once through a pool of three buffers: all complete, byte-exact, and at no
    instant are more than three part buffers out (filling or in flight)."""
    pool_size = 3
    out = {"peak": 0}

    async def main():
        pool = PartPool(PART, pool_size)
        take, give = pool.take, pool.give

        async def counted_take():
            buffer = await take()
            out["peak"] = max(out["peak"], pool_size - pool._slots._value)
            return buffer

        pool.take = counted_take
        pool.give = give
        datas = [os.urandom(7 * PART + i) for i in range(4)]
        uploads = [MemoryUpload() for _ in datas]

        async def one(data, upload):
            async def stream():
                for i in range(0, len(data), 100):
                    yield data[i:i + 100]
                    await asyncio.sleep(0)

            async def start():
                return upload

            return await put_in_parts(stream(), pool, max_parts=100, concurrency=2, put_whole=None, start=start,
                                      too_many=lambda: StorageError("too many"), exclusive=False)

        await asyncio.gather(*(one(d, u) for d, u in zip(datas, uploads)))
        for data, upload in zip(datas, uploads):
            assert b"".join(upload.parts[n] for n in sorted(upload.parts)) == data
        assert pool._slots._value == pool_size

    asyncio.run(asyncio.wait_for(main(), 30))
    assert out["peak"] == pool_size


def test_a_cancelled_put_gives_every_buffer_back():
    async def main():
        pool = PartPool(PART, 3)
        upload = MemoryUpload()

        async def stream():
            while True:
                yield os.urandom(PART // 2)
                await asyncio.sleep(0.001)

        async def start():
            return upload

        task = asyncio.ensure_future(put_in_parts(stream(), pool, max_parts=1000, concurrency=2, put_whole=None,
                                                  start=start, too_many=lambda: StorageError("too many"),
                                                  exclusive=False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert upload.aborted and pool._slots._value == 3

    asyncio.run(main())


def test_buffer_plan_shrinks_then_thins_within_the_share():
    mib = 1 << 20
    # 16 MiB for two lanes and one part in flight: three 5 MiB parts (not 20 MiB ones)
    assert buffer_plan(16 * mib, 20 * mib, 3, minimum=5 * mib, align=mib) == (5 * mib, 3)
    # one lane: two 8 MiB parts
    assert buffer_plan(16 * mib, 20 * mib, 2, minimum=5 * mib, align=mib) == (8 * mib, 2)
    # many lanes: parts stay at the backend's minimum, fewer of them
    assert buffer_plan(16 * mib, 20 * mib, 5, minimum=5 * mib, align=mib) == (5 * mib, 3)
    # a share too small for even one: one buffer of the minimum
    assert buffer_plan(2 * mib, 20 * mib, 3, minimum=5 * mib, align=mib) == (5 * mib, 1)
    # what is asked fits: asked as is
    assert buffer_plan(64 * mib, 8 * mib, 4, minimum=4 * mib, align=mib) == (8 * mib, 4)
    # a configured size below the alignment stays (the tests' 256 KiB parts)
    assert buffer_plan(16 * mib, 256 << 10, 3, minimum=256 << 10, align=mib) == (256 << 10, 3)
