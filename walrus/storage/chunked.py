"""Chunked transfer, storage-neutral: a stream stored as numbered parts uploaded a few at a time, and
an object read as byte ranges with the next ones fetched ahead.

S3 uses it for multipart uploads and ranged GETs; GCS (resumable or composed uploads) and Azure
(block blobs) are the same shape. A backend supplies the requests (put a whole object, start a
part upload and send, complete or abort it; open a range), this module the splitting, the
concurrency, the ordering, the retries of a broken read and the clean-up on failure.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Protocol

from walrus.aio import TaskWindow
from walrus.errors import StorageError
from walrus.storage.retry import Progress, RetryPolicy, TransientError, gave_up, is_transient

READ_CHUNK = 1 << 20  # bytes asked of a range's body per read


# -- uploads

class PartUpload(Protocol):
    """One object being uploaded in numbered parts (from 1), invisible until completed."""

    async def send(self, number: int, data: bytearray) -> Any:
        """Store part `number`, retried under the backend's policy; the token complete() needs."""
        ...

    async def complete(self, tokens: list[Any], exclusive: bool) -> str:
        """Make the object visible from its parts, in order; its ETag (or the backend's version)."""
        ...

    async def abort(self) -> None:
        """Drop the parts stored so far; never raises (the object was never visible anyway)."""
        ...


async def put_in_parts(stream: AsyncIterable[bytes], part_size: int, *, max_parts: int, concurrency: int,
                       put_whole: Callable[[bytearray], Awaitable[str]],
                       start: Callable[[], Awaitable[PartUpload]],
                       too_many: Callable[[], StorageError], exclusive: bool) -> tuple[int, str]:
    """Store `stream`: one put_whole() when it fits in one part, else a part upload begun at the
    second part, with up to `concurrency` parts in flight (each held in memory until sent), completed
    once the stream ends. Returns (bytes stored, the object's ETag). Any failure or cancellation
    aborts the part upload, so nothing is ever visible under the key but a complete object."""
    part = bytearray()
    parts: _Parts | None = None
    total = 0
    try:
        async for chunk in stream:
            view = memoryview(chunk)
            total += len(view)
            while view:
                if len(part) == part_size:  # full, and more is coming: it is not the last part
                    if parts is None:
                        parts = _Parts(await start(), concurrency, max_parts, too_many)
                    await parts.add(part)
                    part = bytearray()
                take = min(len(view), part_size - len(part))
                part += view[:take]
                view = view[take:]
        if parts is None:
            return total, await put_whole(part)
        if part:
            await parts.add(part)
        return total, await parts.complete(exclusive)
    except BaseException:
        if parts is not None:
            await parts.abort()
        raise


class _Parts:
    """The parts of one upload: at most `concurrency` in flight, the first failure surfacing at the
    next add() or at complete()."""

    def __init__(self, upload: PartUpload, concurrency: int, max_parts: int, too_many: Callable[[], StorageError]):
        self.upload = upload
        self.window = TaskWindow(concurrency)
        self.max_parts = max_parts
        self.too_many = too_many

    async def add(self, data: bytearray) -> None:
        """Start sending the next part once a slot frees; the caller then fills a new buffer."""
        number = len(self.window) + 1
        if number > self.max_parts:
            raise self.too_many()
        await self.window.start(self.upload.send, number, data)

    async def complete(self, exclusive: bool) -> str:
        return await self.upload.complete(await self.window.results(), exclusive)

    async def abort(self) -> None:
        """Cancel the parts in flight, then abort the upload; never raises."""
        await self.window.cancel()
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
