"""The download chain, upload_buffers' mirror: a stored object read as plaintext on a worker thread.

storage.get's async byte stream -> SyncReader (a blocking view, for the worker thread) -> decrypt
(walrus.crypto, when a key is configured) -> decompress (walrus.codec, by the object's extension)
-> the caller's work: copy to a file, extract a tar, compare with a local segment.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import AsyncIterator, Callable, TypeVar

from walrus import codec
from walrus.codec import Reader
from walrus.crypto import Crypter, decrypting
from walrus.pull import READ_SIZE
from walrus.storage.base import ByteStream

T = TypeVar("T")


async def consume_decoded(stream: ByteStream, ext: str, key: str, crypter: Crypter | None,
                          work: Callable[[Reader], T], executor: Executor | None = None) -> T:
    """work(plaintext) on a worker thread, `plaintext` the pull reader of object `key` (stored with
    compression extension `ext`) decrypted and decompressed; its result.

    The work blocks on the event loop for every chunk (SyncReader), and the storage may need the
    loop's default executor to produce that chunk (file reads go through asyncio.to_thread), so it
    never runs on a default-executor thread: without `executor` it gets a thread of its own. (Ten
    decodes waiting inside the default pool at once, a prefetch window, starved the reads they
    waited for, and everything hung.)"""

    def run(raw: SyncReader) -> T:
        return work(codec.open_reader(ext, decrypting(raw, crypter, key), name=key))

    own = None
    if executor is None:
        own = executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="walrus-decode")
    try:
        return await consume_in_thread(stream, run, executor)
    finally:
        if own is not None:
            own.shutdown(wait=False)


async def copy_decoded(stream: ByteStream, ext: str, key: str, crypter: Crypter | None,
                       sink: Callable[[bytes], None], executor: Executor | None = None) -> None:
    """Hand object `key`'s plaintext to `sink` chunk by chunk, on the worker thread."""

    def copy(plaintext: Reader) -> None:
        while chunk := plaintext.read(READ_SIZE):
            sink(chunk)

    await consume_decoded(stream, ext, key, crypter, copy, executor)


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

