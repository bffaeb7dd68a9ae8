"""Chunked transfer, storage-neutral: a stream stored as numbered parts uploaded a few at a time, and
an object read as byte ranges with the next ones fetched ahead.

S3 uses it for multipart uploads and ranged GETs; GCS (resumable or composed uploads) and Azure
(block blobs) are the same shape. A backend supplies the requests (put a whole object, start a
part upload and send, complete or abort it; open a range), this module the splitting, the
concurrency, the ordering, the retries of a broken read, the clean-up on failure, and the memory:
parts are fixed buffers from one PartPool per storage, prefetched ranges hold one of a fixed number
of slots, and both are sized by buffer_plan out of the storage's share of WALRUS_MEMORY_BUDGET.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Protocol

from walrus.aio import TaskWindow
from walrus.errors import StorageError
from walrus.storage.retry import Progress, RetryPolicy, TransientError, gave_up, is_transient

READ_CHUNK = 1 << 20  # bytes asked of a range's body per read
# Request bodies are handed to the HTTP client in slices of this size: one large bytes-like body
# would be copied whole into the (TLS) transport's write buffer, a second copy of every part in
# flight; slices are written one at a time as the connection drains, each one progress.
SEND_SLICE = 256 << 10
# A cloud storage's part and range buffers take at most this share of WALRUS_MEMORY_BUDGET; the
# data path (read pool, restore sinks) keeps the rest (Storage.upload_memory, download_memory).
TRANSFER_SHARE = 0.5


def transfer_share(budget: int) -> int:
    return int(budget * TRANSFER_SHARE)


def buffer_plan(share: int, size: int, count: int, *, minimum: int, align: int) -> tuple[int, int]:
    """(size, count) of a storage's transfer buffers: `count` buffers of at most `size` bytes within
    `share`, made smaller first (in multiples of `align`, not below `minimum`), then fewer (not below
    one). `minimum` wins over `share`: a backend's smallest part is what it is."""
    count = max(1, count)
    fit = share // count // align * align
    size = max(minimum, min(size, fit))
    if size * count > share:
        count = max(1, share // size)
    return size, count


class PartPool:
    """The part buffers of every upload of one storage: `count` fixed buffers of `size` bytes,
    made on first use and reused, so uploads hold at most size x count bytes however many run.

    A put holds one buffer while it fills it, and each part it has sent off holds its own until
    the request is done; a put that waits for a buffer holds none, and every buffer held is either
    being filled from a stream or being sent, so waiting never deadlocks. Made inside the event loop
    that uses it (a storage makes its pool when it connects).
    """

    def __init__(self, size: int, count: int):
        self.size = size
        self.count = count
        self._slots = asyncio.Semaphore(count)
        self._free: list[bytearray] = []

    async def take(self) -> bytearray:
        await self._slots.acquire()
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        self._free.append(buffer)
        self._slots.release()


# -- uploads

async def md5_of(data: memoryview) -> bytes:
    """The MD5 digest of a part (Content-MD5), off the event loop: hashlib releases the GIL."""
    return await asyncio.to_thread(lambda: hashlib.md5(data).digest())


async def sliced(pieces: tuple[bytes | memoryview, ...], progress: Progress) -> AsyncIterator[memoryview]:
    """A request body (the pieces in order) in SEND_SLICE slices, each one touching `progress`."""
    for piece in pieces:
        view = memoryview(piece)
        for i in range(0, len(view), SEND_SLICE):
            yield view[i:i + SEND_SLICE]
            progress.touch()


class PartUpload(Protocol):
    """One object being uploaded in numbered parts (from 1), invisible until completed."""

    async def send(self, number: int, data: memoryview) -> Any:
        """Store part `number`, retried under the backend's policy; the token complete() needs."""
        ...

    async def complete(self, tokens: list[Any], exclusive: bool) -> str:
        """Make the object visible from its parts, in order; its ETag (or the backend's version)."""
        ...

    async def abort(self) -> None:
        """Drop the parts stored so far; never raises (the object was never visible anyway)."""
        ...


async def put_in_parts(stream: AsyncIterable[bytes], pool: PartPool, *, max_parts: int, concurrency: int,
                       put_whole: Callable[[memoryview], Awaitable[str]],
                       start: Callable[[], Awaitable[PartUpload]],
                       too_many: Callable[[], StorageError], exclusive: bool) -> tuple[int, str]:
    """Store `stream` in parts of pool.size bytes: one put_whole() when it fits in one part, else a
    part upload begun at the second part, with up to `concurrency` parts in flight (each holding its
    pool buffer until sent), completed once the stream ends. Returns (bytes stored, the object's
    ETag). Any failure or cancellation aborts the part upload, so nothing is ever visible under the
    key but a complete object."""
    part: bytearray | None = await pool.take()
    filled = 0
    parts: _Parts | None = None
    total = 0
    try:
        async for chunk in stream:
            view = memoryview(chunk)
            total += len(view)
            while view:
                if filled == pool.size:  # full, and more is coming: it is not the last part
                    if parts is None:
                        parts = _Parts(await start(), pool, concurrency, max_parts, too_many)
                    full, part = part, None
                    await parts.add(full, filled)
                    part, filled = await pool.take(), 0
                take = min(len(view), pool.size - filled)
                part[filled:filled + take] = view[:take]
                filled += take
                view = view[take:]
        if parts is None:
            return total, await put_whole(memoryview(part)[:filled])
        if filled:
            full, part = part, None
            await parts.add(full, filled)
        return total, await parts.complete(exclusive)
    except BaseException:
        if parts is not None:
            await parts.abort()
        raise
    finally:
        if part is not None:
            pool.give(part)


class _Parts:
    """The parts of one upload: at most `concurrency` in flight, the first failure surfacing at the
    next add() or at complete()."""

    def __init__(self, upload: PartUpload, pool: PartPool, concurrency: int, max_parts: int,
                 too_many: Callable[[], StorageError]):
        self.upload = upload
        self.pool = pool
        self.window = TaskWindow(concurrency)
        self.max_parts = max_parts
        self.too_many = too_many
        self._held: dict[int, bytearray] = {}  # part number -> its buffer, until the part's request ends

    async def add(self, buffer: bytearray, length: int) -> None:
        """Start sending the next part once a slot frees. The buffer goes back to the pool when its
        request ends, or at abort() for a task cancelled before it ran (its body never starts)."""
        number = len(self.window) + 1
        self._held[number] = buffer
        try:
            if number > self.max_parts:
                raise self.too_many()
            await self.window.start(self._send, number, length)
        except BaseException:
            self._give(number)
            raise

    async def _send(self, number: int, length: int) -> Any:
        try:
            return await self.upload.send(number, memoryview(self._held[number])[:length])
        finally:
            self._give(number)

    def _give(self, number: int) -> None:
        buffer = self._held.pop(number, None)
        if buffer is not None:
            self.pool.give(buffer)

    async def complete(self, exclusive: bool) -> str:
        return await self.upload.complete(await self.window.results(), exclusive)

    async def abort(self) -> None:
        """Cancel the parts in flight, then abort the upload; never raises."""
        await self.window.cancel()
        for number in list(self._held):
            self._give(number)
        await asyncio.shield(self.upload.abort())


# -- ranged reads

class Range(Protocol):
    """An open response for bytes first..last of an object of `total` bytes."""

    first: int
    last: int
    total: int
    etag: str | None  # the object's version: later ranges are pinned to it

    async def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at the range's end. Failures are StorageErrors (transient or not)."""
        ...

    def close(self) -> None: ...


# open_range(start, end, etag, progress): bytes start..end of the object, pinned to etag
OpenRange = Callable[[int, int, "str | None", Progress], Awaitable[Range]]


async def read_ranges(head: Range, open_range: OpenRange, *, range_size: int, ahead: int,
                      slots: asyncio.Semaphore, policy: RetryPolicy, what: str) -> AsyncIterator[bytes]:
    """The object's bytes in order: the `head` range streamed, the later ones fetched ahead.

    At most ahead + 1 ranges of one object are in flight: the one being read plus prefetched ones.
    A prefetched range is held in memory, so prefetching needs one of `slots`, shared by every
    download of the storage; the range being read needs none, so every reader always progresses.
    A prefetch still waiting for its slot when the reader reaches it is cancelled, and the range
    streamed directly instead. Every range is pinned to the head's ETag: an object replaced
    mid-read fails the read rather than mixing two versions.
    """
    ranges = [(s, min(s + range_size, head.total) - 1) for s in range(head.last + 1, head.total, range_size)]
    fetches: dict[int, _Prefetch] = {}
    scheduled = 0

    def schedule(reading: int) -> None:
        nonlocal scheduled
        while scheduled < len(ranges) and scheduled < reading + ahead:
            start, end = ranges[scheduled]
            fetches[scheduled] = _Prefetch(slots, functools.partial(_fetch, open_range, start, end, head.etag,
                                                                    policy, what))
            scheduled += 1

    try:
        schedule(0)
        async for chunk in _stream(open_range, head.first, head.last, head.etag, head, policy, what):
            yield chunk
        for i, (start, end) in enumerate(ranges):
            schedule(i + 1)
            fetch = fetches.pop(i)
            if fetch.holds_slot:
                try:
                    for chunk in await fetch.task:
                        yield chunk
                finally:
                    fetch.release()
            else:
                await fetch.cancel()
                async for chunk in _stream(open_range, start, end, head.etag, None, policy, what):
                    yield chunk
    finally:
        head.close()
        for fetch in fetches.values():
            await fetch.cancel()


async def _stream(open_range: OpenRange, start: int, end: int, etag: str | None, opened: Range | None,
                  policy: RetryPolicy, what: str) -> AsyncIterator[bytes]:
    """Bytes start..end as they arrive; a broken stream resumes from the last byte received."""
    offset, failures = start, 0
    current = opened
    try:
        while offset <= end:
            try:
                if current is None:
                    current = await policy.run(what, lambda p: open_range(offset, end, etag, p))
                chunk = await current.read(min(READ_CHUNK, end - offset + 1))
                if not chunk:
                    raise TransientError(f"{what} failed", detail=f"the stream ended at byte {offset} of {end + 1}")
            except StorageError as e:
                if current is not None:
                    current.close()
                    current = None
                if not is_transient(e):
                    raise
                failures += 1
                if failures >= policy.attempts:
                    raise gave_up(what, e, failures) from None
                await asyncio.sleep(policy.delay(failures))
                continue
            offset += len(chunk)
            yield chunk
    finally:
        if current is not None:
            current.close()


async def _fetch(open_range: OpenRange, start: int, end: int, etag: str | None, policy: RetryPolicy,
                 what: str) -> list[bytes]:
    """A whole range into memory (a prefetch), each try reading it from its start."""

    async def attempt(progress: Progress) -> list[bytes]:
        got = await open_range(start, end, etag, progress)
        chunks, n = [], 0
        try:
            while chunk := await got.read(READ_CHUNK):
                progress.touch()
                chunks.append(chunk)
                n += len(chunk)
        finally:
            got.close()
        if n != end - start + 1:
            raise TransientError(f"{what} failed", detail=f"range {start}-{end} returned {n} bytes")
        return chunks

    return await policy.run(what, attempt)


class _Prefetch:
    """A range fetched ahead into memory, holding one of the storage's slots while it does."""

    def __init__(self, slots: asyncio.Semaphore, fetch: Callable[[], Awaitable[list[bytes]]]):
        self._slots = slots
        self.holds_slot = False
        self.task = asyncio.ensure_future(self._run(fetch))

    async def _run(self, fetch: Callable[[], Awaitable[list[bytes]]]) -> list[bytes]:
        await self._slots.acquire()
        self.holds_slot = True
        return await fetch()

    def release(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self._slots.release()

    async def cancel(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        self.release()
