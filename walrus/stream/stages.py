"""Byte-stream stages (compress, count, pipe) chained between the disk reader and the storage."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections import deque
from concurrent.futures import Executor
from typing import AsyncIterable, AsyncIterator, Callable, TypeVar

from walrus.stream.buffers import Buffer

_DONE = object()
T = TypeVar("T")


async def compressed(buffers: AsyncIterable[Buffer], compressor, executor: Executor,
                     parallel: int = 1) -> AsyncIterator[bytes]:
    """Compress pool buffers on worker threads (the codecs release the GIL) and release each one.

    A codec with independent blocks (lz4 and zstd: start/checksum/encode, see walrus.codec.lz4) gets
    up to blocks_in_flight(parallel) buffers in encode jobs at once, so one object keeps `parallel`
    cores busy; its output still comes out in input order and its running checksum is fed in input
    order. Any other codec is a stream and runs one buffer at a time. With compression 'none' the
    compressor returns its input as bytes: the stage is then a copy out of the pool, which is what
    lets the buffer go back.
    """
    if parallel > 1 and hasattr(compressor, "encode"):
        async for out in _compressed_blocks(buffers, compressor, executor, parallel):
            yield out
        return
    loop = asyncio.get_running_loop()
    async for buf in buffers:
        try:
            out = await loop.run_in_executor(executor, compressor.compress, buf.data)
        finally:
            buf.release()
        if out:
            yield out if isinstance(out, bytes) else bytes(out)  # never a view into a released buffer
    tail = await loop.run_in_executor(executor, compressor.finish)
    if tail:
        yield tail


def blocks_in_flight(parallel: int) -> int:
    """Buffers of one object handed to compression jobs at once (the buffers it holds there).

    Twice `parallel` for block codecs: each core has a job running and one queued, so it never
    waits for the event loop to collect the oldest block and hand it the next buffer (a lone zstd
    part of 428 MiB on 2 cores: 1.28 s with one job per core, 1.01 s with two).
    """
    return 2 * parallel if parallel > 1 else 1


async def _compressed_blocks(buffers: AsyncIterable[Buffer], compressor, executor: Executor,
                             parallel: int) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    # (buffer, the job reading it) in input order. Invariant: a buffer goes back to the pool only
    # once no job reads it any more, even when the stream is abandoned half way.
    jobs: deque[tuple[Buffer, concurrent.futures.Future]] = deque()
    in_flight = blocks_in_flight(parallel)
    summed = threading.Event()  # the previous chunk is in the checksum (none yet: go)
    summed.set()

    async def next_block() -> bytes:
        buf, job = jobs[0]
        out = await asyncio.wrap_future(job)
        jobs.popleft()
        buf.release()
        return out

    try:
        if head := compressor.start():
            yield head
        async for buf in buffers:
            mine = threading.Event()
            job = executor.submit(_sum_then_encode, compressor, buf.data, summed, mine)
            # A job that never runs (cancelled by an executor shutdown) must not hold up the next one.
            job.add_done_callback(lambda _job, event=mine: event.set())
            jobs.append((buf, job))
            summed = mine
            if len(jobs) >= in_flight:
                yield await next_block()
        while jobs:
            yield await next_block()
        yield await loop.run_in_executor(executor, compressor.finish)
    finally:
        while jobs:
            _release_after(*jobs.popleft(), loop)


def _sum_then_encode(compressor, data, before: threading.Event, mine: threading.Event) -> bytes:
    """One chunk's job: add it to the running checksum after the chunk before it, then encode it.

    The checksums follow the input order while the encodes overlap. Jobs start in submission
    order (the executor's queue is FIFO), so the job waited for has started or was cancelled;
    either way it sets its event, and no worker waits forever.
    """
    before.wait()
    try:
        compressor.checksum(data)
    finally:
        mine.set()
    return compressor.encode(data)


def _release_after(buf: Buffer, job: concurrent.futures.Future, loop: asyncio.AbstractEventLoop) -> None:
    """Return `buf` to its pool (a loop-thread object) once `job` has stopped reading it."""
    if job.done():
        buf.release()
        return

    def on_loop(_job) -> None:
        try:
            loop.call_soon_threadsafe(buf.release)
        except RuntimeError:  # the loop is closed: the pool is gone with it
            pass

    job.add_done_callback(on_loop)


async def encrypted(chunks: AsyncIterable[bytes], encryptor, executor: Executor) -> AsyncIterator[bytes]:
    """Encrypt a byte stream chunk by chunk on a worker thread; the encryptor keeps the framing."""
    loop = asyncio.get_running_loop()
    async for chunk in chunks:
        if not chunk:
            continue  # WAL-G ignores empty writes too: no empty secretstream chunk or PGP packet
        out = await loop.run_in_executor(executor, encryptor.encrypt, chunk)
        if out:
            yield out
    tail = await loop.run_in_executor(executor, encryptor.finish)
    if tail:
        yield tail


class Counter:
    """Counts the bytes that flow through it (CompressedSize in the sentinel)."""

    def __init__(self) -> None:
        self.bytes = 0

    async def count(self, stream: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        async for chunk in stream:
            self.bytes += len(chunk)
            yield chunk


async def piped(stream: AsyncIterable, depth: int) -> AsyncIterator:
    """Run the upstream in its own task through a bounded queue, so two stages overlap.

    The queue holds at most `depth` items: the upstream waits when the downstream is slow.
    An upstream error is re-raised downstream; closing the downstream cancels the upstream.
    """
    queue: asyncio.Queue = asyncio.Queue(maxsize=depth)

    async def pump() -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except asyncio.CancelledError:
            raise  # the consumer cancelled us: it is not reading the queue any more
        except BaseException as e:  # handed to the consumer, which re-raises it
            await queue.put(_Failure(e))
            return
        await queue.put(_DONE)

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class SyncReader:
    """A blocking read(n) over an async byte stream, for code running on a worker thread.

    Each refill asks the event loop for the next chunk; the loop must not be blocked by the caller.
    Invariant: never use it from a thread of the loop's default executor. Storage backends produce
    chunks through that pool (asyncio.to_thread), so readers waiting inside it can starve it and
    hang (ten concurrent prefetches did). Give the work its own executor (consume_in_thread).
    `abort()`, called from the loop, makes the reading thread stop at once: a read in flight and
    every later one raise ReadAborted.
    """

    def __init__(self, stream: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop):
        self._stream = stream
        self._loop = loop
        self._chunk = memoryview(b"")
        self._eof = False
        self._aborted = False
        self.pending: concurrent.futures.Future | None = None  # the refill in flight on the loop

    def abort(self) -> None:
        self._aborted = True
        pending = self.pending
        if pending is not None:
            pending.cancel()

    def _next(self) -> bytes | None:
        if self._aborted or self._loop.is_closed():
            raise ReadAborted()
        fut = self.pending = asyncio.run_coroutine_threadsafe(_anext_or_none(self._stream), self._loop)
        while True:
            try:
                return fut.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if self._aborted or self._loop.is_closed() or not self._loop.is_running():
                    fut.cancel()  # the loop is gone (shutdown), or the owner gave up: never wait for it
                    raise ReadAborted() from None
            except concurrent.futures.CancelledError:
                raise ReadAborted() from None

    def read(self, n: int = -1) -> bytes:
        while not self._chunk and not self._eof:
            chunk = self._next()
            if chunk is None:
                self._eof = True
            else:
                self._chunk = memoryview(chunk)
        if n < 0:
            parts = [bytes(self._chunk)]
            self._chunk = memoryview(b"")
            while (chunk := self._next()) is not None:
                parts.append(chunk)
            self._eof = True
            return b"".join(parts)
        out = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return bytes(out)


class ReadAborted(Exception):
    """Raised in a worker thread reading a SyncReader whose owner stopped waiting for it."""


async def _anext_or_none(stream: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


# How long a cancelled consume_in_thread waits for its thread to notice. A thread notices at its
# next read, which comes within one chunk's work; one stuck in a system call (a hung disk) is
# abandoned after this, and the command still ends (cli.main does not wait for such threads).
STOP_GRACE = 5.0


async def consume_in_thread(stream: AsyncIterator[bytes], work: Callable[[SyncReader], T],
                            executor: Executor) -> T:
    """work(reader) on an executor thread, `reader` a blocking view of `stream`; its result.

    Cancelled (SIGTERM, or a sibling's failure in gather_all), it aborts the reader, so the thread
    stops at its next read, and waits for that without blocking the loop: the loop must keep
    running, since the thread may be waiting on it. The stream is closed once nothing reads it.
    """
    loop = asyncio.get_running_loop()
    reader = SyncReader(stream, loop)
    done = asyncio.wrap_future(executor.submit(work, reader))
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        reader.abort()
        await asyncio.wait({done}, timeout=STOP_GRACE)
        raise
    finally:
        if done.done():
            if not done.cancelled():
                done.exception()  # retrieved: a cancelled caller's thread may also have failed
        else:
            # abandoned: cancelled, this future never takes the thread's outcome, which might
            # otherwise arrive once the loop is closing and be logged as never retrieved
            done.cancel()
        pending = reader.pending
        if pending is not None and not pending.done():  # a refill the loop is still running
            await asyncio.wait({asyncio.wrap_future(pending)}, timeout=STOP_GRACE)
        with contextlib.suppress(RuntimeError):  # still being read after all: left to the loop's end
            await stream.aclose()


async def gather_all(coros) -> list:
    """Run all concurrently; on the first failure cancel the others, wait for them, re-raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
