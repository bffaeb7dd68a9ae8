"""Byte-stream stages (compress, count, meter, pipe) chained between the disk reader and the storage."""
from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from concurrent.futures import Executor
from typing import AsyncIterable, AsyncIterator, Callable, TypeVar

from walrus.fileio import Buffer

_DONE = object()
T = TypeVar("T")


async def compressed(buffers: AsyncIterable[Buffer], compressor, executor: Executor,
                     parallel: int = 1) -> AsyncIterator[bytes]:
    """Compress pool buffers on worker threads (the codecs release the GIL) and release each one.

    A codec with independent blocks (lz4 and zstd: start/encode/digest, see walrus.codec.base) gets
    up to blocks_in_flight(parallel) buffers in encode jobs at once, so one object keeps `parallel`
    cores busy; its output still comes out in input order and its running checksum is fed in input
    order. Any other codec is a stream and runs one buffer at a time. With compression 'none' the
    compressor returns its input as bytes: the stage is then a copy out of the pool, which is what
    lets the buffer go back.
    """
    if parallel > 1 and compressor.independent_blocks:
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
    waits for the event loop to collect the oldest block and hand it the next buffer.
    """
    return 2 * parallel if parallel > 1 else 1


async def _compressed_blocks(buffers: AsyncIterable[Buffer], compressor, executor: Executor,
                             parallel: int) -> AsyncIterator[bytes]:
    """Encode jobs on `executor`, in any order; each job's blocks go to the running checksum (a no-op
    for codecs without one) here, in input order, as they are handed on. The checksum is the one serial part
    of the codec, and it is cheap (lz4's seal: XXH3 of the encoded bytes): a thread of its own for
    it cost each buffer two more hand-offs than it saved (a part ~15% slower)."""
    loop = asyncio.get_running_loop()
    # (buffer, its encode job) in input order. Invariant: a buffer goes back to the pool only once
    # its encode job no longer reads it, even when the stream is abandoned half way.
    jobs: deque[tuple[Buffer, concurrent.futures.Future]] = deque()
    in_flight = blocks_in_flight(parallel)

    async def next_block() -> bytes:
        buf, encoding = jobs[0]
        out = await asyncio.wrap_future(encoding)
        jobs.popleft()
        buf.release()
        compressor.digest(out)
        return out

    try:
        if head := compressor.start():
            yield head
        async for buf in buffers:
            jobs.append((buf, executor.submit(compressor.encode, buf.data)))
            if len(jobs) >= in_flight:
                yield await next_block()
        while jobs:
            yield await next_block()
        yield compressor.finish()
    finally:
        while jobs:
            _release_after(*jobs.popleft(), loop)


def _release_after(buf: Buffer, job: concurrent.futures.Future, loop: asyncio.AbstractEventLoop) -> None:
    """Return `buf` to its pool (a loop-thread object) once `job` has stopped reading it."""
    if job.done():
        buf.release()
        return

    def on_done(_job) -> None:
        try:
            loop.call_soon_threadsafe(buf.release)
        except RuntimeError:  # the loop is closed: the pool is gone with it
            pass

    job.add_done_callback(on_done)


# Chunks up to this size are encrypted on the event loop itself; larger ones on a worker thread.
# Encryption is serial within an object, so a thread buys no parallelism for it, only hand-offs: two
# per chunk, which cost more than sealing a compressed buffer's output (~0.2 ms for 256 KiB). The
# ciphers run in C with the GIL released, so the compress threads go on meanwhile.
INLINE_ENCRYPT = 256 << 10


async def encrypted(chunks: AsyncIterable[bytes], encryptor, executor: Executor) -> AsyncIterator[bytes]:
    """Encrypt a byte stream chunk by chunk; the encryptor keeps the framing."""
    loop = asyncio.get_running_loop()
    async for chunk in chunks:
        if not chunk:
            continue  # WAL-G ignores empty writes too: no empty secretstream chunk or PGP packet
        if len(chunk) <= INLINE_ENCRYPT:
            out = encryptor.encrypt(chunk)
        else:
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


async def metered(items: AsyncIterable[T], add: Callable[[int], None],
                  size: Callable[[T], int] = len) -> AsyncIterator[T]:
    """Pass items through, telling `add` the size of each (a progress line's bytes): one call per
    pool buffer or stored chunk, never per page. The upstream is closed with this stage."""
    upstream = aiter(items)
    try:
        async for item in upstream:
            add(size(item))
            yield item
    finally:
        aclose = getattr(upstream, "aclose", None)
        if aclose is not None:
            await aclose()


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
