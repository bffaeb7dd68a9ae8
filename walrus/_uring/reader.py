"""The io_uring implementation of the FileReader interface: one ring, on one thread, shared by all batches."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import resource
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import mmap
from typing import Protocol, Sequence

from walrus._uring import ring as ring_module
from walrus._uring._liburing import ffi, lib
from walrus._uring.ring import Ring
from walrus.log import log


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


def _read_error(r: _Request, done: int, err: int) -> OSError:
    return OSError(err, f"read of fd {r.fd} at offset {r.offset + done}: {os.strerror(err)}")


class _Batch:
    """One read_batch call: its requests, the engine's records of them, the exports pinning their
    views, its future. The records and exports live until the engine reports the batch finished
    (the kernel writes through the addresses in them until then)."""

    __slots__ = ("requests", "loop", "future", "record", "reqs", "done", "bufs", "error", "counts")

    def __init__(self, requests: list[_Request], loop: asyncio.AbstractEventLoop):
        self.requests = requests
        self.loop = loop
        self.future: asyncio.Future[list[int]] = loop.create_future()
        self.record = self.reqs = self.done = None  # struct walrus_rbatch, its requests, its byte counts
        self.bufs: list = []  # per request, the cffi export of its view (NULL for an empty one)
        self.error: BaseException | None = None
        self.counts: list[int] = []

    def settle(self) -> None:
        """On the ring thread, once none of the batch's reads is in flight: the counts, then unpin."""
        self.counts = [0] * len(self.requests)
        if self.record is not None:
            self.counts = ffi.unpack(self.done, len(self.requests))
            if self.record.error and self.error is None:
                i = self.record.failed
                self.error = _read_error(self.requests[i], self.counts[i], self.record.error)
        for buf in self.bufs:
            if buf:  # not NULL: the export of a non-empty view
                ffi.release(buf)
        self.bufs = []
        self.record = self.reqs = self.done = None

    def resolve(self) -> None:
        """On the loop: the caller's result."""
        if self.future.done():  # the caller was cancelled
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.counts)


def _wake(batches: list[_Batch]) -> None:
    """Settles finished batches and resolves them on their loops: one call_soon_threadsafe (a write
    to the loop's self-pipe, and a wake-up of it) per loop, however many finished together."""
    loops: dict[asyncio.AbstractEventLoop, list[_Batch]] = {}
    for batch in batches:
        batch.settle()
        loops.setdefault(batch.loop, []).append(batch)
    for loop, own in loops.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits these batches any more
            loop.call_soon_threadsafe(_resolve, own)


def _resolve(batches: list[_Batch]) -> None:
    for batch in batches:
        batch.resolve()


class UringReader:
    """Reads batches through io_uring, with READ_FIXED into a registered buffer pool.

    One dedicated thread owns the ring and calls io_uring_submit_and_wait, rather than the event
    loop submitting and reaping through a registered eventfd: reads that hit the page cache
    complete inline inside io_uring_enter, so submitting from the loop copies whole batches on the
    loop thread (long stalls of the loop), and forcing IOSQE_ASYNC to avoid that was no faster.

    Batches from concurrent read_batch calls share the ring: the thread admits whatever is queued
    each time it wakes, keeps reads in flight across all of them, and resolves each batch's future
    as soon as its own reads are done. In flight at once: up to `depth` reads and `inflight` bytes
    (at least one read). The rest wait in submission order, so concurrent parts get the disk in
    turn; without the byte cap a virtio disk served many parallel 1 MiB reads slower and unevenly
    (docs/DESIGN.md, io_uring).

    The per-read work is C (walrus_reads_* in build_uring.py): a batch is handed over in one call,
    and each wake-up of the thread is one call that issues, submits, waits, settles every completion
    (short reads, EINTR/EAGAIN, end of file, errors) and names the batches that finished. cffi drops
    the GIL around both, so the loop runs while the thread waits or copies.
    """

    name = "io_uring"

    def __init__(self, depth: int, inflight: int):
        self._ring = Ring(depth)
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
        self._engine = ffi.new("struct walrus_reads *")
        lib.walrus_reads_init(self._engine, self._ring._ring, depth, max(1, inflight))
        self._admitted: dict[int, _Batch] = {}  # id -> batch the engine holds
        self._ids = itertools.count(1)
        # finished batch ids per wake-up; more finished than this are named by the next wake-up
        self._finished = ffi.new("uint64_t[]", max(64, 2 * depth))
        # the pool registered with the ring (the engine knows its buffers and picks READ_FIXED for a
        # read that one of them holds whole)
        self._fixed: _Pool | None = None
        self._closed = False

    @property
    def completions(self) -> int:
        """CQEs reaped so far: proof that the bytes came through the ring."""
        return self._engine.completions

    @property
    def fixed_reads(self) -> int:
        """Reads issued as READ_FIXED so far."""
        return self._engine.fixed_reads

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
        self._fixed = pool
        lib.walrus_reads_fixed(self._engine, ffi.cast("char *", base), pool.size, count)
        return True

    def _unregister(self) -> None:
        if self._fixed is not None:
            self._fixed = None
            lib.walrus_reads_fixed(self._engine, ffi.NULL, 0, 0)
            self._ring.unregister_buffers()

    def _check_fixed(self) -> None:
        # A closed pool's address range may be reused by a new mapping, which the ring's pinned pages
        # no longer back: stop using them.
        if self._fixed is not None and self._fixed.mapping.closed:
            self._unregister()

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
        engine, finished, room = self._engine, self._finished, len(self._finished)
        stalled_since: float | None = None  # when the waits began to time out with nothing done
        try:
            while True:
                with self._lock:
                    batches = list(self._queue)
                    self._queue.clear()
                    if not batches and not (engine.pending or engine.inflight or engine.finished):
                        self._serving = False
                        return
                for batch in batches:
                    self._admit(batch)
                if not (engine.pending or engine.inflight or engine.finished):
                    continue  # what was admitted failed at once (read-only views, bad offsets)
                n = lib.walrus_reads_step(engine, 1, int(ring_module.STALL_POLL * 1000), finished, room)
                if n == lib.WALRUS_READS_TIMED_OUT:
                    # no completion for STALL_LIMIT: a stuck device or a lost completion becomes an
                    # error the command reports instead of a hung process
                    now = time.monotonic()
                    if stalled_since is None:
                        stalled_since = now - ring_module.STALL_POLL
                    elif now - stalled_since >= ring_module.STALL_LIMIT:
                        raise TimeoutError(errno.ETIMEDOUT,
                                           f"io_uring: no completion for {ring_module.STALL_LIMIT:.0f} s")
                    continue
                if n < 0:
                    raise OSError(-n, f"io_uring_enter: {os.strerror(-n)}")
                stalled_since = None
                if n:
                    _wake([self._admitted.pop(batch_id) for batch_id in ffi.unpack(finished, n)])
        except BaseException as e:  # the ring itself failed: fail every batch rather than hang them
            self._abandon(e)

    def _admit(self, batch: _Batch) -> None:
        """Hands the batch to the engine: one record per request, filled once (from tuples: cffi
        fills the array in C, several times faster than setting fields one by one)."""
        requests = batch.requests
        try:
            for r in requests:
                if r.offset < 0:
                    raise OSError(errno.EINVAL, f"negative read offset {r.offset}")
            # the exports pin the views (and give their addresses) until the batch is finished
            batch.bufs = [ffi.from_buffer("char[]", r.view, require_writable=True) if len(r.view) else ffi.NULL
                          for r in requests]
        except Exception as e:  # a bad request (read-only view, negative offset) fails its own batch
            batch.error = e
            _wake([batch])
            return
        self._check_fixed()
        reqs = ffi.new("struct walrus_rreq[]", [(r.fd, buf, r.offset, len(buf) if buf else 0)
                                                 for r, buf in zip(requests, batch.bufs)])
        record = ffi.new("struct walrus_rbatch *")
        record.reqs, record.n, record.id = reqs, len(requests), next(self._ids)
        record.done = batch.done = ffi.new("uint64_t[]", len(requests))
        batch.record, batch.reqs = record, reqs
        self._admitted[record.id] = batch
        lib.walrus_reads_add(self._engine, record)

    def _abandon(self, error: BaseException) -> None:
        """The ring failed: every batch fails, and the reader takes no more (the engine's state, and
        what the kernel still does with the reads it has, are unknown)."""
        with self._lock:
            self._broken = error
            self._serving = False
            batches = list(self._queue)
            self._queue.clear()
        batches += self._admitted.values()
        self._admitted.clear()
        for batch in batches:
            batch.error = batch.error or error
        _wake(batches)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._thread.shutdown(wait=True)  # a running _serve first drains every queued batch
        self._unregister()
        self._ring.close()
