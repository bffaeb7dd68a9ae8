"""The FileSink of restores: payloads copied into a few aligned buffers, written asynchronously through
a write queue (io_uring's ring, or pwrite(2) on threads where io_uring is refused)."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import mmap
import os
from collections import deque
from typing import Protocol

from walrus.fsutil import ask_huge_pages, unmap
from walrus.fsutil import fallocate as _fallocate
from walrus.pull import Payload

ALIGN = 4096  # O_DIRECT alignment of buffer address, file offset and length: safe on 512-byte and 4Kn disks
_MAX_BUFFER = 1 << 30  # one buffer is one write; the kernel moves at most ~2 GiB per request
_RETRY = (errno.EINTR, errno.EAGAIN)
_ZEROS = memoryview(bytes(ALIGN))
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)




class WriteQueue(Protocol):
    """io_uring's shape, which both queues have: writes are prepared, submitted together, completed
    in any order and reaped as (user_data, result) pairs, a result < 0 being -errno.

    Not thread safe: the sink's one thread prepares, submits and reaps. The sink keeps at most
    `entries` writes queued or in flight.
    """

    name: str  # what the sink reports it wrote with
    entries: int
    completions: int  # results reaped over the queue's life

    def register_buffers(self, base: int, size: int, count: int) -> bool:
        """Pin `count` buffers of `size` bytes from address `base`; False where the queue writes
        from unpinned memory (a refusal is the queue's to log)."""
        ...

    def unregister_buffers(self) -> None: ...

    def prep_write(self, user_data: int, fd: int, address: int, nbytes: int, offset: int,
                   buf_index: int = -1) -> None:
        """Queue a write of `nbytes` from memory at `address`; `buf_index` >= 0 names its pinned buffer."""
        ...

    def submit_and_wait(self, wait_nr: int) -> None:
        """Start every prepared write; then wait (bounded) until `wait_nr` results are ready."""
        ...

    def reap(self) -> list[tuple[int, int]]: ...

    def close(self) -> None: ...


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _write_error(fd: int, offset: int, err: int) -> OSError:
    return OSError(err, f"{os.strerror(err)} (writing at offset {offset})", _path_of(fd))


def _preallocate(fd: int, length: int) -> int:
    """Allocates [0, length) of an O_DIRECT file up front; returns length, or 0 where the filesystem cannot.

    Aligned writes inside the file size to allocated blocks are overwrites: ext4 and XFS then issue
    them from io_uring_enter itself without blocking, where each allocating write would go to an
    io-wq worker thread that blocks on it. A full disk also shows here, before any byte is copied.
    """
    err = _fallocate(fd, length)
    if not err:
        return length
    if err in _NO_FALLOCATE:
        return 0
    raise OSError(err, f"{os.strerror(err)} (allocating {length} bytes)", _path_of(fd))


def _fill(data: Payload, view: memoryview) -> int:
    """Reads into view until it is full or data ends; returns the bytes read."""
    got = 0
    while got < len(view):
        n = data.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class _Slab:
    """One buffer of the pool: bytes [0, fill) belong to writes queued or in flight (`writes` of them)."""

    __slots__ = ("index", "view", "fill", "writes")

    def __init__(self, index: int, view: memoryview):
        self.index = index
        self.view = view
        self.fill = 0
        self.writes = 0


class _File:
    """A descriptor the sink owns until its last write completed; `length` payload bytes copied so far."""

    __slots__ = ("fd", "direct", "length", "allocated", "padded", "writes", "complete")

    def __init__(self, fd: int, direct: bool):
        self.fd = fd
        self.direct = direct
        self.length = 0
        self.allocated = 0  # bytes preallocated, which set the file size
        self.padded = False  # the last O_DIRECT write ran past `length`
        self.writes = 0  # queued or in flight
        self.complete = False  # every byte of the payload is in a slab


class _Write:
    """`length` bytes at `start` of `slab`, going to file offset `offset`; `done` of them written so far."""

    __slots__ = ("file", "slab", "start", "length", "offset", "done")

    def __init__(self, file: _File, slab: _Slab, start: int, length: int, offset: int):
        self.file = file
        self.slab = slab
        self.start = start
        self.length = length
        self.offset = offset
        self.done = 0


class SlabSink:
    """A FileSink writing through one write queue, for one extraction on one thread.

    write() copies the payload into slabs of one page-aligned mapping and queues each chunk as one
    write (from a pinned buffer where the queue could register the mapping), so the files of many
    members are in flight while the tar stream moves on; it blocks only when no slab is free, reaping
    completions meanwhile. A slab holds the chunks of several small files and is reused once all of
    them completed, so memory is `buffers * buffer_size` whatever the file sizes.

    O_DIRECT files (`direct`) are preallocated, and get chunks whose address, offset and length are
    multiples of ALIGN: the last one is padded with zeros and the file is cut back to its size once
    every write landed.

    Errors: a failed write is raised, as OSError naming the file, from the next write() or finish().
    Lifecycle: finish() waits for every write, closes every file and releases the queue and the
    mapping, then raises the first error; close() releases the same without raising, for callers
    whose extraction failed elsewhere, and does nothing after finish(). Any exception out of write()
    releases everything too: the extraction is over. The sink owns the queue from construction on.
    """

    def __init__(self, queue: WriteQueue, direct_threshold: int, buffer_size: int = 1 << 20,
                 buffers: int = 8):
        if buffers < 1 or not ALIGN <= buffer_size <= _MAX_BUFFER or buffer_size % ALIGN:
            queue.close()
            raise ValueError(f"a file sink needs buffers >= 1 and a buffer size that is a "
                             f"multiple of {ALIGN} up to {_MAX_BUFFER}")
        self.name = queue.name
        self.direct_threshold = direct_threshold
        self._size = buffer_size
        # A chunk never starts in the last sliver of a slab: large files are written in big requests.
        self._min_chunk = max(ALIGN, buffer_size // 4 // ALIGN * ALIGN)
        self._queue = queue
        try:
            self._map = mmap.mmap(-1, buffers * buffer_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            ask_huge_pages(self._map)
        except BaseException:
            queue.close()
            raise
        # Writes carry raw addresses, not buffer exports: the mapping stays closable at all times,
        # and the sink itself never lets it go while a write from it is in flight.
        whole = (ctypes.c_char * len(self._map)).from_buffer(self._map)
        self._base = ctypes.addressof(whole)
        del whole  # releases its export of the mapping
        self._whole = memoryview(self._map)
        self._slabs = [_Slab(i, self._whole[i * buffer_size:(i + 1) * buffer_size]) for i in range(buffers)]
        # the slab freed last is taken first (its memory is still in the caches), as in BufferPool
        self._free: deque[_Slab] = deque(reversed(self._slabs))
        self._current: _Slab | None = None  # the slab being filled
        self._files: set[_File] = set()  # every descriptor the sink still owns
        self._writes: dict[int, _Write] = {}  # user_data -> write, queued or in flight
        self._tokens = itertools.count()
        self._error: OSError | None = None
        self._stopping = False  # after an error or on close(): nothing more is (re)submitted
        self._closed = False
        self.fixed_writes = 0  # writes issued from a pinned buffer (io_uring's WRITE_FIXED)
        self.registered = queue.register_buffers(self._base, buffer_size, buffers)

    @property
    def completions(self) -> int:
        """Results reaped so far: proof that the bytes went through the queue."""
        return self._queue.completions

    def write(self, fd: int, data: Payload, size: int, direct: bool) -> None:
        """Takes fd (opened for writing, empty) and queues `size` bytes of data at offsets 0..size."""
        if self._closed:
            os.close(fd)
            raise RuntimeError("the file sink is closed") from self._error
        file = _File(fd, direct)
        self._files.add(file)
        try:
            self._raise_error()
            align = ALIGN if direct else 1
            if direct and size:
                file.allocated = _preallocate(fd, -(-size // ALIGN) * ALIGN)
            while file.length < size:
                slab, start, room = self._room(size - file.length, align)
                with slab.view[start:start + room] as view:
                    got = _fill(data, view)
                if not got:
                    break
                end = start + got
                if direct and got % ALIGN:
                    pad = -got % ALIGN
                    slab.view[end:end + pad] = _ZEROS[:pad]
                    end += pad
                    file.padded = True
                slab.fill = end
                self._submit(_Write(file, slab, start, end - start, file.length))
                file.length += got
                if got < room:
                    break  # data ended early: the file is as long as what came
            file.complete = True
            if not file.writes:
                self._close_file(file)
            self._raise_error()
        except BaseException:
            self._release()
            raise

    def finish(self) -> None:
        """Waits for every write, closes every file, releases the queue and buffers; raises the first error."""
        try:
            while self._writes and not self._closed:
                self._pump(wait=True)
        finally:
            self._release()
        self._raise_error()

    def close(self) -> None:
        """Releases everything without raising write errors: for extractions that failed elsewhere."""
        self._release()

    # --- slabs ---

    def _room(self, want: int, align: int) -> tuple[_Slab, int, int]:
        """Where the next chunk of a file goes: (slab, start, payload bytes that fit, at most want)."""
        slab = self._current
        if slab is not None:
            start = -(-slab.fill // align) * align
            room = self._size - start
            if room >= -(-want // align) * align:
                return slab, start, want
            if room >= self._min_chunk:
                return slab, start, room
            self._retire(slab)
        while not self._free:
            if not self._writes:
                raise RuntimeError("file sink: no free buffer and no write in flight")
            self._pump(wait=True)
            self._raise_error()
        slab = self._current = self._free.pop()
        return slab, 0, min(want, self._size)

    def _retire(self, slab: _Slab) -> None:
        self._current = None
        if not slab.writes:
            slab.fill = 0
            self._free.append(slab)

    # --- the queue ---

    def _submit(self, w: _Write) -> None:
        while len(self._writes) >= self._queue.entries:
            self._pump(wait=True)
            self._raise_error()
        w.slab.writes += 1
        w.file.writes += 1
        self._issue(w)
        self._pump(wait=False)

    def _issue(self, w: _Write) -> None:
        token = next(self._tokens)
        index = w.slab.index if self.registered else -1
        address = self._base + w.slab.index * self._size + w.start + w.done
        self._queue.prep_write(token, w.file.fd, address, w.length - w.done, w.offset + w.done, index)
        self._writes[token] = w
        if index >= 0:
            self.fixed_writes += 1

    def _pump(self, wait: bool) -> None:
        """Submits every queued SQE, waits for one completion if asked, and handles all that are ready."""
        self._queue.submit_and_wait(1 if wait else 0)
        for user_data, res in self._queue.reap():
            self._complete(self._writes.pop(user_data), res)

    def _complete(self, w: _Write, res: int) -> None:
        """Handles one CQE. Never raises: the CQEs after it in the batch are already consumed."""
        file = w.file
        try:
            if res < 0:
                if -res in _RETRY and not self._stopping:
                    self._issue(w)
                    return
                raise _write_error(file.fd, w.offset + w.done, -res)
            if res == 0:
                raise _write_error(file.fd, w.offset + w.done, errno.EIO)  # no progress: never loop on it
            w.done += res
            if w.done < w.length and not self._stopping:
                if not file.direct or w.done % ALIGN == 0:
                    self._issue(w)  # short write: the rest, still aligned when it was
                    return
                self._pwrite_rest(w)
        except OSError as e:
            self._record(e)
        w.slab.writes -= 1
        if not w.slab.writes and w.slab is not self._current:
            w.slab.fill = 0
            self._free.append(w.slab)
        file.writes -= 1
        if not file.writes and file.complete:
            self._close_file(file)

    def _pwrite_rest(self, w: _Write) -> None:
        """The rest of a write that O_DIRECT left unaligned, with O_DIRECT cleared: it cannot resume aligned.

        The file's later requests then go through the page cache too, which is coherent with the
        direct writes already done; the padding it may write is cut by the final ftruncate.
        """
        fd = w.file.fd
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            with w.slab.view[w.start:w.start + w.length] as chunk:
                while w.done < w.length:
                    n = os.pwrite(fd, chunk[w.done:], w.offset + w.done)
                    if not n:
                        raise OSError(errno.EIO, "pwrite made no progress")
                    w.done += n
        except OSError as e:
            raise _write_error(fd, w.offset + w.done, e.errno or errno.EIO) from None

    # --- errors and release ---

    def _record(self, error: OSError) -> None:
        if self._error is None:
            self._error = error
        self._stopping = True

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _close_file(self, file: _File) -> None:
        self._files.discard(file)
        try:
            if (file.padded or file.allocated > file.length) and file.complete and not file.writes:
                os.ftruncate(file.fd, file.length)  # cut padding and preallocation back to the payload
        except OSError as e:
            self._record(_write_error(file.fd, file.length, e.errno))
        finally:
            try:
                os.close(file.fd)
            except OSError as e:  # delayed write errors (NFS) surface here
                self._record(OSError(e.errno, e.strerror, f"fd {file.fd}"))

    def _release(self) -> None:
        """Waits for the writes in flight (they read their slabs), closes every fd, frees the queue."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        try:
            while self._writes:
                self._pump(wait=True)
        except OSError as e:  # the queue itself failed: nothing more will complete
            self._record(e)
        finally:
            for file in list(self._files):
                self._close_file(file)
            try:
                if self.registered:
                    self._queue.unregister_buffers()  # unpins now, not when the ring's teardown runs
            finally:
                self._queue.close()
                self._unmap()

    def _unmap(self) -> None:
        # a traceback may still hold a view of a slab (a failed read into it): the GC unmaps it then
        unmap(self._map, [*(slab.view for slab in self._slabs), self._whole])

