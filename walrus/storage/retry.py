"""Retrying transient storage failures with bounded backoff, and abandoning requests that stall."""
from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence, TypeVar

from walrus.errors import StorageError
from walrus.log import log
from walrus.storage.base import ByteStream, ObjectInfo, Storage, Upload

T = TypeVar("T")


class TransientError(StorageError):
    """A failure the same request may not meet again: 5xx, throttling, a timeout, a dropped connection."""


def is_transient(exc: BaseException) -> bool:
    """The one rule every retry follows. A policy that gives up raises a plain StorageError, which
    is not transient: retries nested in two layers therefore never multiply."""
    return isinstance(exc, (TransientError, TimeoutError, ConnectionError))


class Progress:
    """Touched by a request each time its bytes move; a request untouched for the timeout is abandoned.

    `touch` may be called from a worker thread (a request body read by the HTTP client's executor):
    it only stores a float.
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


@dataclass(frozen=True)
class RetryPolicy:
    """At most `attempts` tries per request, each abandoned after `timeout` seconds without progress."""

    attempts: int = 16
    timeout: float = 60.0
    base_delay: float = 0.25
    max_delay: float = 20.0

    def delay(self, failures: int) -> float:
        """Exponential backoff with jitter: half of the step fixed, half random, capped at max_delay."""
        step = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return step / 2 + random.uniform(0, step / 2)

    async def run(self, what: str, attempt: Callable[[Progress], Awaitable[T]], *,
                  timeout: float | None = None, bounded: bool = True) -> T:
        """Await attempt(progress) until it succeeds, fails for good, or the attempts run out.

        Each try is abandoned after `timeout` (default: the policy's) seconds without progress;
        `bounded=False` drops that limit, for calls whose own requests are bounded further down.
        """
        idle = (timeout or self.timeout) if bounded else None
        failures = 0
        while True:
            try:
                if idle is None:
                    return await attempt(Progress())
                return await watched(what, attempt, idle)
            except Exception as e:
                if not is_transient(e):
                    raise
                failures += 1
                if failures >= self.attempts:
                    raise gave_up(what, e, failures) from None
                pause = self.delay(failures)
                log.warning(f"{what}: {describe(e)}; retrying in {pause:.1f} s ({failures}/{self.attempts - 1})")
                await asyncio.sleep(pause)


async def watched(what: str, attempt: Callable[[Progress], Awaitable[T]], idle: float) -> T:
    """Run one attempt, cancelling it once it has made no progress for `idle` seconds."""
    progress = Progress()
    task = asyncio.ensure_future(attempt(progress))
    try:
        while True:
            left = progress.last + idle - time.monotonic()
            if left <= 0:
                raise TransientError(f"{what} timed out", detail=f"no progress for {idle:g} s",
                                     hint="the storage endpoint stopped responding; check it and the network")
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def describe(exc: BaseException) -> str:
    """Why a try failed, for logs and the final DETAIL (a StorageError's detail is the storage's own word)."""
    if isinstance(exc, StorageError):
        return exc.detail or exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def gave_up(what: str, last: BaseException, attempts: int) -> StorageError:
    hint = last.hint if isinstance(last, StorageError) and last.hint else \
        "the storage kept failing; check the endpoint and the network, then run the command again"
    return StorageError(f"{what} failed after {attempts} attempts", detail=describe(last), hint=hint)


class RetryingStorage(Storage):
    """Any backend with its whole calls retried under one policy.

    Retried here: stat and get (until the stream opens) with the policy's timeout; list (until its
    first entry), delete and put_bytes without one, since their duration grows with their size and
    the backend bounds each of its own requests. A streamed put cannot be replayed from here: a
    backend retries its pieces itself (S3 retries each part from that part's buffer), as it does
    for the later pages of a listing or the later ranges of a download.
    """

    def __init__(self, inner: Storage, policy: RetryPolicy):
        self.inner = inner
        self.policy = policy
        self.name = inner.name
        self.upload_memory = inner.upload_memory
        self.download_memory = inner.download_memory

    def describe(self) -> str:
        return self.inner.describe()

    async def put(self, key: str, stream: AsyncIterable[bytes], *, exclusive: bool = False) -> int:
        return await self.inner.put(key, stream, exclusive=exclusive)

    async def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> int:
        return await self.policy.run(f"upload of {key}", lambda _: self.inner.put_bytes(key, data, exclusive=exclusive),
                                     bounded=False)

    async def get(self, key: str) -> ByteStream:
        return await self.policy.run(f"download of {key}", lambda _: self.inner.get(key))

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self.policy.run(f"stat of {key}", lambda _: self.inner.stat(key))

    # Optional capabilities, unbounded here: the backend bounds and retries each of its own requests,
    # and a watchdog here would cancel its back-off sleeps as "no progress" and multiply its retries.

    async def keys_with_prefix(self, prefix: str) -> set[str] | None:
        return await self.policy.run(f"listing of {prefix}*", lambda _: self.inner.keys_with_prefix(prefix),
                                     bounded=False)

    async def abandoned_uploads(self, folder: str, started_before: datetime) -> Sequence[Upload]:
        return await self.policy.run(f"listing of the uploads under {folder or '/'}",
                                     lambda _: self.inner.abandoned_uploads(folder, started_before), bounded=False)

    async def discard_uploads(self, uploads: Iterable[Upload]) -> None:
        uploads = list(uploads)
        await self.policy.run(f"abort of {len(uploads)} uploads", lambda _: self.inner.discard_uploads(uploads),
                              bounded=False)

    @property
    def lists_in_key_order(self) -> bool:
        return self.inner.lists_in_key_order

    async def list(self, folder: str, *, recursive: bool = False, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        opened: list[AsyncIterator[ObjectInfo]] = []

        async def first(_: Progress) -> ObjectInfo | None:
            entries = self.inner.list(folder, recursive=recursive, start_after=start_after)
            try:
                entry = await anext(entries)
            except StopAsyncIteration:
                return None
            except BaseException:
                await entries.aclose()
                raise
            opened.append(entries)
            return entry

        entry = await self.policy.run(f"listing of {folder or '/'}", first, bounded=False)
        if entry is None:
            return
        entries = opened[0]
        try:
            yield entry
            async for entry in entries:
                yield entry
        finally:
            await entries.aclose()

    async def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        await self.policy.run("delete", lambda _: self.inner.delete(keys), bounded=False)

    def check_writer(self) -> None:
        self.inner.check_writer()

    def object_owner(self, key: str) -> tuple[int, int, int] | None:
        return self.inner.object_owner(key)

    async def close(self) -> None:
        await self.inner.close()
