"""The io_uring implementation of the FileReader interface: one ring, on one thread, shared by all batches."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import resource
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import mmap
from typing import Protocol, Sequence

from walrus._uring._liburing import ffi, lib
from walrus._uring.ring import MAX_IO, Ring
from walrus.log import log

_RETRY = (errno.EINTR, errno.EAGAIN)


# What the reader takes, by shape: walrus.fileio's ReadRequest and BufferPool (_uring imports
# nothing above it).
class _Request(Protocol):
    fd: int
    offset: int
    view: memoryview  # filled from the file at `offset`


class _Pool(Protocol):
    mapping: mmap.mmap  # `count` buffers of `size` bytes, back to back
    size: int
    count: int


@dataclass(frozen=True, slots=True)
class _FixedBuffers:
    """The pool registered with the ring: buffer i spans [base + i*size, base + (i+1)*size)."""

    pool: _Pool
    base: int
    size: int
    count: int

    def index_of(self, address: int, length: int) -> int:
        """The fixed-buffer index holding [address, address+length), or -1 if no single one does."""
        rel = address - self.base
        if rel < 0:
            return -1
        index = rel // self.size
        if index >= self.count or rel + length > (index + 1) * self.size:
            return -1
        return index


def _read_error(r: _Request, done: int, err: int) -> OSError:
    return OSError(err, f"read of fd {r.fd} at offset {r.offset + done}: {os.strerror(err)}")


class _Batch:
    """One read_batch call: its requests' progress, the exports pinning their views, its future."""

    __slots__ = ("requests", "loop", "future", "done", "bufs", "index", "left", "error")

    def __init__(self, requests: list[_Request], loop: asyncio.AbstractEventLoop):
        self.requests = requests
        self.loop = loop
        self.future: asyncio.Future[list[int]] = loop.create_future()
        self.done = [0] * len(requests)  # bytes landed per request
        self.bufs: dict = {}  # request index -> cffi export of its view, for non-empty views
        self.index: dict[int, int] = {}  # request index -> fixed buffer index, -1 for plain READ
        self.left = 0  # requests queued or in flight
        self.error: BaseException | None = None

    def finish(self) -> None:
        """On the ring thread, once none of the batch's reads is in flight: unpin, then wake the caller."""
        for buf in self.bufs.values():
            ffi.release(buf)
        self.bufs.clear()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits this batch any more
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():  # the caller was cancelled
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.done)


class UringReader:
    """Reads batches through io_uring, with READ_FIXED into a registered buffer pool.

    One dedicated thread owns the ring and calls io_uring_submit_and_wait, rather than the event
    loop submitting and reaping through a registered eventfd: reads that hit the page cache
    complete inline inside io_uring_enter, so submitting from the loop copies whole batches on the
    loop thread (long stalls of the loop), and forcing IOSQE_ASYNC to avoid that was no faster.
    cffi drops the GIL around each liburing call, so the loop runs while the thread copies.

    Batches from concurrent read_batch calls share the ring: the thread admits whatever is queued
    each time it wakes, keeps reads in flight across all of them, and resolves each batch's future
    as soon as its own reads are done. In flight at once: up to `depth` reads and `inflight` bytes
    (at least one read). The rest wait in submission order, so concurrent parts get the disk in
    turn; without the byte cap a virtio disk served many parallel 1 MiB reads slower and unevenly
    (docs/DESIGN.md, io_uring).
    """

    name = "io_uring"

    def __init__(self, depth: int, inflight: int):
        self._ring = Ring(depth)
        self._inflight_cap = max(1, inflight)
        if not self._ring.supports(lib.IORING_OP_READ, lib.IORING_OP_READ_FIXED):
            self._ring.close()
            raise OSError(errno.ENOSYS, "this kernel's io_uring lacks IORING_OP_READ (needs Linux 5.6)")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="walrus-uring")
        # shared between the loop and the ring thread, under _lock
        self._lock = threading.Lock()
        self._queue: deque[_Batch] = deque()
        self._serving = False  # a _serve call is scheduled or running
        self._broken: BaseException | None = None
        # the ring thread's own state
        self._pending: deque[tuple[_Batch, int]] = deque()  # (batch, request index) to (re)submit
        self._in_flight: dict[int, tuple[_Batch, int, int]] = {}  # user_data -> (batch, request index, bytes)
        self._inflight_bytes = 0  # sum of the bytes asked for by the reads in flight
        self._tokens = itertools.count()
        self._fixed: _FixedBuffers | None = None
        self._closed = False
        self.fixed_reads = 0  # SQEs issued as READ_FIXED

    @property
    def completions(self) -> int:
        """CQEs reaped so far: proof that the bytes came through the ring."""
        return self._ring.completions

    @property
    def registered(self) -> bool:
        return self._fixed is not None

    def register(self, pool: _Pool) -> bool:
        """Registers the pool's buffers as fixed buffers; returns False when reads stay unregistered.

        Optional: without it (or when the kernel refuses) every read is a plain IORING_OP_READ into
        the same memory. The kernel enforces RLIMIT_MEMLOCK itself (and exempts CAP_IPC_LOCK), so
        it is asked: when the whole pool does not fit under the limit, as many leading buffers as
        fit are registered and the others read plainly. Either outcome is one log line.
        """
        return self._thread.submit(self._register, pool).result()

    def _register(self, pool: _Pool) -> bool:
        self._unregister()
        with ffi.from_buffer(pool.mapping) as whole:
            base = int(ffi.cast("uintptr_t", whole))
        count, refusal = pool.count, None
        while count > 0:
            try:
                self._ring.register_buffers(base, pool.size, count)
                break
            except OSError as e:
                refusal = e
                if e.errno != errno.ENOMEM:  # not the memlock limit: fewer buffers would not help
                    count = 0
                else:
                    count = count * 3 // 4 if count > 4 else count - 1
        if count < pool.count:
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft >> 10} KiB"
            if count == 0:
                log.debug("io_uring: cannot register the %d KiB buffer pool as fixed buffers "
                         "(%s; RLIMIT_MEMLOCK %s); using unregistered reads",
                         (pool.count * pool.size) >> 10, refusal.strerror, limit)
                return False
            log.debug("io_uring: registered %d of %d pool buffers (%d KiB) as fixed buffers, as many as "
                     "RLIMIT_MEMLOCK %s allows; the others use unregistered reads",
                     count, pool.count, (count * pool.size) >> 10, limit)
        self._fixed = _FixedBuffers(pool, base, pool.size, count)
        return True

    def _unregister(self) -> None:
        if self._fixed is not None:
            self._fixed = None
            self._ring.unregister_buffers()

    def _current_fixed(self) -> _FixedBuffers | None:
        # A closed pool's address range may be reused by a new mapping, which the ring's pinned pages
        # no longer back: stop using them.
        if self._fixed is not None and self._fixed.pool.mapping.closed:
            self._unregister()
        return self._fixed

    async def read_batch(self, requests: Sequence[_Request]) -> list[int]:
        if not requests:
            return []
        batch = _Batch(list(requests), asyncio.get_running_loop())
        with self._lock:
            if self._closed or self._broken is not None:
                raise RuntimeError("io_uring reader is closed") from self._broken
            self._queue.append(batch)
            start = not self._serving
            self._serving = True
        if start:
            self._thread.submit(self._serve)
        return await batch.future

    # --- the ring thread ---

    def _serve(self) -> None:
        """Admits queued batches and keeps reads in flight until nothing is left, then goes idle."""
        try:
            while True:
                with self._lock:
                    batches = list(self._queue)
                    self._queue.clear()
                    if not batches and not self._pending and not self._in_flight:
                        self._serving = False
                        return
                for batch in batches:
                    self._admit(batch)
                if not self._pending and not self._in_flight:
                    continue  # what was admitted finished at once (empty views, bad offsets)
                self._issue()
                self._ring.submit_and_wait(1)
                for user_data, res in self._ring.reap():
                    self._complete(user_data, res)
        except BaseException as e:  # the ring itself failed: fail every batch rather than hang them
            self._abandon(e)

    def _admit(self, batch: _Batch) -> None:
        try:
            for r in batch.requests:
                if r.offset < 0:
                    raise OSError(errno.EINVAL, f"negative read offset {r.offset}")
            for i, r in enumerate(batch.requests):
                if len(r.view):
                    batch.bufs[i] = ffi.from_buffer("char[]", r.view, require_writable=True)
        except Exception as e:  # a bad request (read-only view, negative offset) fails its own batch
            batch.error = e
            batch.finish()
            return
        fixed = self._current_fixed()
        for i, buf in batch.bufs.items():
            batch.index[i] = fixed.index_of(int(ffi.cast("uintptr_t", buf)), len(buf)) if fixed else -1
        batch.left = len(batch.bufs)
        if batch.left:
            self._pending.extend((batch, i) for i in batch.bufs)
        else:
            batch.finish()

    def _issue(self) -> None:
        while self._pending and len(self._in_flight) < self._ring.entries and (
                not self._in_flight or self._inflight_bytes < self._inflight_cap):
            batch, i = self._pending.popleft()
            r, got, index = batch.requests[i], batch.done[i], batch.index[i]
            token = next(self._tokens)
            nbytes = min(len(r.view) - got, MAX_IO)
            self._ring.prep_read(token, r.fd, batch.bufs[i] + got, nbytes, r.offset + got, index)
            self._in_flight[token] = (batch, i, nbytes)
            self._inflight_bytes += nbytes
            if index >= 0:
                self.fixed_reads += 1

    def _complete(self, user_data: int, res: int) -> None:
        batch, i, nbytes = self._in_flight.pop(user_data)
        self._inflight_bytes -= nbytes
        if res == -errno.EINVAL and batch.done[i] % 512:
            res = 0  # see walrus.fileio.reader: O_DIRECT remainder after a short read is end of file
        if res < 0 and -res not in _RETRY and batch.error is None:
            batch.error = _read_error(batch.requests[i], batch.done[i], -res)
            self._drop_pending(batch)  # let its reads in flight land, then fail it
        elif res != 0 and batch.error is None:
            batch.done[i] += max(res, 0)
            if batch.done[i] < len(batch.requests[i].view):  # short read, EINTR or EAGAIN: ask for the rest
                self._pending.append((batch, i))
                return
        batch.left -= 1  # this request is over: view full, end of file (res 0), or its batch failed
        if batch.left == 0:
            batch.finish()

    def _drop_pending(self, batch: _Batch) -> None:
        kept = deque(p for p in self._pending if p[0] is not batch)
        batch.left -= len(self._pending) - len(kept)
        self._pending = kept

    def _abandon(self, error: BaseException) -> None:
        with self._lock:
            self._broken = error
            self._serving = False
            batches = set(self._queue)
            self._queue.clear()
        batches.update(b for b, _ in self._pending)
        batches.update(b for b, _, _ in self._in_flight.values())
        self._pending.clear()
        self._in_flight.clear()
        self._inflight_bytes = 0
        for batch in batches:
            batch.error = batch.error or error
            batch.finish()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._thread.shutdown(wait=True)  # a running _serve first drains every queued batch
        self._unregister()
        self._ring.close()
