"""Tar parts laid out straight into pool buffers: headers copied, file bodies read in place, padding zeroed."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import grp
import os
import pwd
import tarfile
import time
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

from walrus.errors import BackupError
from walrus.fileio import Buffer, BufferPool, FileReader, ReadRequest, dio_length, open_for_backup
from walrus.fileio.direct import DIO_ALIGN
from walrus.log import log
from walrus.pg.pages import BLOCK_SIZE, FileChecker, increment_head, select_pages
from walrus.ratelimit import RateLimiter

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)  # Go's archive/tar ends with two zero blocks and no record padding
SCAN_WINDOW = 16  # buffers of a page scan's reads in flight ahead of a lane


@dataclass(slots=True)
class Entry:
    """One tar member to write: a directory, a file on disk (path) or in memory (data)."""

    name: str
    kind: str  # "file" | "dir"
    size: int = 0
    mode: int = 0o600
    mtime_ns: int = 0
    uid: int = 0
    gid: int = 0
    path: str | None = None
    data: bytes | None = None
    # a delta's paged file: written as a `wi1` increment of `blocks` (the block map's), else of the
    # pages a scan finds changed since `delta_lsn`; `incremented` tells which way it went
    delta_lsn: int | None = None
    blocks: array | None = None
    incremented: bool = False


class _Header(tarfile.TarInfo):
    def get_info(self):
        info = super().get_info()
        info["name"] = self.name  # WAL-G writes directory names without tarfile's trailing '/'
        return info


@lru_cache(maxsize=256)
def _uname(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@lru_cache(maxsize=256)
def _gname(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def header_bytes(entry: Entry, size: int | None = None) -> bytes:
    """USTAR header, with a PAX record first only where USTAR cannot hold a field (long names).
    `size`: the member's, where it is not the file's (an increment)."""
    return member_header(entry.name, entry.kind, entry.size if size is None else size, entry.mode,
                         entry.mtime_ns // 1_000_000_000,  # Go writes ModTime in whole seconds
                         uid=entry.uid, gid=entry.gid)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}


def member_header(name: str, kind: str, size: int, mode: int, mtime: int, *, uid: int = 0, gid: int = 0,
                  uname: str | None = None, gname: str | None = None, linkname: str = "") -> bytes:
    """The header of a file, directory or symlink member (`kind` "file", "dir" or "symlink"); `uname` and
    `gname` default to the local names of `uid` and `gid`."""
    h = _Header(name)
    h.type = _TYPES[kind]
    h.size = size if kind == "file" else 0
    h.mode = mode & 0o7777
    h.mtime = mtime
    h.linkname = linkname
    h.uid, h.gid = uid, gid
    h.uname = _uname(uid) if uname is None else uname
    h.gname = _gname(gid) if gname is None else gname
    return h.tobuf(tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def padding(size: int) -> int:
    return -size % BLOCK


@dataclass
class _OpenFile:
    entry: Entry
    fd: int
    direct: bool = False
    pending: int = 0  # read requests not yet completed
    laid_out: bool = False  # every request of the file has been issued
    shrank: bool = False
    checker: FileChecker | None = None  # its pages checked as their reads land (backup-push --verify)


@dataclass
class _Fill:
    buf: Buffer
    requests: list[ReadRequest] = field(default_factory=list)
    owners: list[_OpenFile] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # bytes of file data in each request's view


class TarPartStream:
    """Produces the bytes of one tar part as a sequence of filled pool buffers, in order.

    Entries are pulled from `entries` (shared between parts) until the part's data size exceeds
    `threshold` (WAL-G's rule: check after each file, so parts are 'at least threshold' and an
    oversize file sits alone). Reads of up to `depth` buffers are in flight ahead of the consumer;
    with a `limiter` (WALG_DISK_RATE_LIMIT) each buffer's file bytes are taken from it before its
    reads are issued, so the disk sees the rate, and an abandoned part stops waiting at once.
    A file that shrank is zero padded to its walked size, a file that grew is cut at it, a file
    that vanished is skipped: all three are normal while PostgreSQL runs.
    """

    def __init__(self, entries: Iterator[Entry], pool: BufferPool, reader: FileReader, *,
                 threshold: int | None = None, depth: int = 4, direct_min: int | None = None,
                 on_member: Callable[[Entry], None] | None = None, limiter: RateLimiter | None = None,
                 windows: asyncio.Semaphore | None = None,
                 checker: Callable[[Entry], FileChecker | None] | None = None):
        self._entries = entries
        self._pool = pool
        # buffers the page scans' reads may hold at once, shared by every
        # part of the backup: window_quota() leaves the parts' fills and compression jobs enough of
        # the pool to go on, so a window waiting for a fill can never hold the last buffers (one
        # buffer at a time where the caller does not say how the pool is shared)
        self._windows = windows if windows is not None else asyncio.Semaphore(1)
        self._reader = reader
        self._threshold = threshold
        self._direct_min = direct_min
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, depth))
        self._on_member = on_member
        self._limiter = limiter
        self._checker = checker  # a checker of the pages of a file, where they are to be checked
        self._open: set[int] = set()
        self.data_size = 0
        self.members: list[str] = []
        self.exhausted = False  # the shared entry iterator ran out while filling this part

    # -- consumer side -------------------------------------------------------------------
    async def __aiter__(self):
        producer = asyncio.create_task(self._produce())
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield await self._complete(*item)
            await producer
        finally:
            if not producer.done():
                producer.cancel()
                try:
                    await producer
                except BaseException:
                    pass
            await self._drain()
            for fd in list(self._open):
                os.close(fd)
            self._open.clear()

    async def _drain(self) -> None:
        """Buffers still queued back to the pool once their reads have landed (before the files
        they read from are closed)."""
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, tuple):
                fill, reads = item
                await asyncio.gather(reads, return_exceptions=True)
                fill.buf.release()

    # -- producer side -------------------------------------------------------------------
    async def _produce(self) -> None:
        self._fill: _Fill | None = None
        try:
            for entry in self._entries:
                await self._add(entry)
                if self._threshold is not None and self.data_size > self._threshold:
                    break
            else:
                self.exhausted = True
            await self._lay_bytes(END_OF_ARCHIVE)
            await self._submit()
        except asyncio.CancelledError:
            self._drop_fill()
            raise  # the consumer is going away: nobody to tell, and its queue may be full
        except BaseException as e:  # the consumer re-raises it when it reaches this item
            self._drop_fill()
            await self._queue.put(e)
            return
        await self._queue.put(None)

    def _drop_fill(self) -> None:
        """The buffer being filled back to the pool: not submitted, so no read lands in it."""
        fill, self._fill = self._fill, None
        if fill is not None:
            fill.buf.release()

    async def _add(self, entry: Entry) -> None:
        if entry.kind == "file" and entry.path is not None and entry.size > 0:
            direct = self._direct_min is not None and entry.size >= self._direct_min
            found = open_for_backup(entry.path, direct)
            if found is None:
                log.warning(f"{entry.path} vanished during the backup; skipped")
                return
            fd, direct = found
            self._open.add(fd)
            opened = _OpenFile(entry, fd, direct, checker=self._checker(entry) if self._checker else None)
            if entry.delta_lsn is not None or entry.blocks is not None:
                began = time.monotonic()
                blocks = entry.blocks if entry.blocks is not None else await self._scan(opened, entry.delta_lsn)
                if entry.blocks is None:
                    log.debug(f"{entry.path}: scanned {entry.size // BLOCK_SIZE} pages in "
                              f"{time.monotonic() - began:.2f} s: "
                              + (f"{len(blocks)} changed" if blocks is not None else "an invalid page"))
                if blocks is not None:
                    await self._add_increment(opened, blocks)
                    return
        else:
            opened = None
        await self._lay_bytes(header_bytes(entry))
        if entry.kind == "file":
            if entry.data is not None:
                await self._lay_bytes(entry.data)
            elif opened is not None:
                await self._lay_file(opened)
            await self._lay_bytes(bytes(padding(entry.size)))
            self.data_size += entry.size
        self._added(entry)

    def _added(self, entry: Entry) -> None:
        self.members.append(entry.name)
        if self._on_member:
            self._on_member(entry)

    async def _add_increment(self, f: _OpenFile, blocks: array) -> None:
        """The file as a `wi1` member: WAL-G's head, then the pages of `blocks`, read into the part's
        buffers in place."""
        entry = f.entry
        entry.incremented, entry.blocks = True, blocks
        head = increment_head(entry.size, blocks)
        size = len(head) + BLOCK_SIZE * len(blocks)
        await self._lay_bytes(header_bytes(entry, size))
        await self._lay_bytes(head)
        began = time.monotonic()
        await self._lay_pages(f, blocks)
        if blocks:
            log.debug(f"{entry.path}: {len(blocks)} pages read and laid in {time.monotonic() - began:.2f} s")
        await self._lay_bytes(bytes(padding(size)))
        self.data_size += size
        self._added(entry)

    async def _scan(self, f: _OpenFile, lsn: int) -> array | None:
        """The blocks of f's pages changed since `lsn` (WAL-G's page scan, over pool buffers the
        reader fills a window at a time), or None when a page is not a valid PostgreSQL page: the
        file is then copied whole, as WAL-G does. Pages past a shrunk file's end are not carried:
        its increment still restores the walked size, and WAL replay brings the truth."""
        blocks = array("I")
        chunk = self._pool.size // BLOCK_SIZE * BLOCK_SIZE
        pieces = [(offset, min(chunk, f.entry.size - offset)) for offset in range(0, f.entry.size, chunk)]
        async with contextlib.aclosing(self._read_pieces(f, pieces)) as read:
            async for offset, view, got in read:
                invalid = select_pages(view[:got], offset // BLOCK_SIZE, lsn, blocks)
                if invalid is not None:
                    log.info(f"{f.entry.path}: block {invalid} is not a valid page; copied whole")
                    return None
                if got < len(view):
                    break  # the file shrank
        return blocks

    async def _lay_pages(self, f: _OpenFile, blocks: array) -> None:
        """Lay the pages of `blocks` after an increment's head, read straight into the part's buffers
        as a whole file's bytes are, a run of consecutive pages at a time. A page past a shrunk
        file's end is laid as zeros."""
        for offset, length in _extents(blocks):
            await self._lay_range(f, offset, length)
        self._laid_out(f)

    async def _read_pieces(self, f: _OpenFile, pieces: list[tuple[int, int]]):
        """(offset, buffer view, bytes read into it) of each (offset, length) piece of f, in order:
        whole pages, at most a buffer each, packed into pool buffers; fewer bytes where the file
        ended. A view is valid until the next item.

        Up to SCAN_WINDOW buffers' reads are in flight ahead of the caller, so the disk and the
        caller (page selection) overlap, and each buffer goes back to the
        pool once the caller is past it. Only a lane with nothing in flight waits for a buffer: one
        that holds some reads ahead with the buffers free at once (see window_quota)."""
        i = 0
        flight: collections.deque[_Window] = collections.deque()
        try:
            while flight or i < len(pieces):
                while i < len(pieces) and len(flight) < SCAN_WINDOW:
                    window, i = await self._window(f, pieces, i, wait=not flight)
                    if window is None:
                        break
                    flight.append(window)
                try:
                    counts = await asyncio.shield(flight[0].reads)
                except OSError as e:
                    raise BackupError("read failed during the backup", detail=f"{e.strerror or e}",
                                      hint="check the data directory's disk and permissions") from None
                for req, got in zip(flight[0].requests, counts):
                    yield req.offset, req.view, min(got, len(req.view))
                flight.popleft().done()
        finally:
            for window in flight:
                window.done()

    async def _window(self, f: _OpenFile, pieces: list[tuple[int, int]], i: int,
                      wait: bool) -> tuple["_Window | None", int]:
        """A pool buffer holding pieces i.. (as many as fit), their reads submitted, and the index of
        the first piece left out. With `wait` false, None unless a buffer is free at once."""
        if not wait and (not self._pool.available() or self._windows.locked()):
            return None, i
        await self._windows.acquire()
        try:
            buf = await self._pool.acquire()
        except BaseException:
            self._windows.release()
            raise
        requests: list[ReadRequest] = []
        used = 0
        try:
            while i < len(pieces) and used + pieces[i][1] <= self._pool.size:
                offset, n = pieces[i]
                if self._limiter is not None:
                    await self._limiter.take(n)
                requests.append(ReadRequest(f.fd, offset, buf.view[used:used + n]))
                used += n
                i += 1
        except BaseException:
            buf.release()
            self._windows.release()
            raise
        return _Window(buf, requests, asyncio.ensure_future(self._reader.read_batch(requests)), self._windows), i

    async def _current(self) -> _Fill:
        if self._fill is None:
            self._fill = _Fill(await self._pool.acquire())
        return self._fill

    async def _lay_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            fill = await self._current()
            room = self._pool.size - fill.buf.length
            n = min(room, len(view))
            fill.buf.view[fill.buf.length:fill.buf.length + n] = view[:n]
            fill.buf.length += n
            view = view[n:]
            if fill.buf.length == self._pool.size:
                await self._submit()

    async def _lay_file(self, f: _OpenFile) -> None:
        """Lay the file's bytes, as reads straight into the buffers."""
        await self._lay_range(f, 0, f.entry.size)
        self._laid_out(f)

    async def _lay_range(self, f: _OpenFile, offset: int, length: int) -> None:
        """Lay `length` bytes of f from `offset` (a page boundary), as reads into the buffers being
        filled. O_DIRECT reads into block-aligned memory only: a buffer whose fill ends off a block
        (an increment's head, or the padding after an increment's pages) goes out short first, so
        the bytes start a fresh buffer."""
        if f.direct and self._fill is not None and self._fill.buf.length % DIO_ALIGN:
            await self._submit()
        while length:
            fill = await self._current()
            start = fill.buf.length
            n = min(self._pool.size - start, length)
            # fits: the buffer ends on a block boundary, and what follows the range's last byte is
            # tar padding (a whole file) or the next page (an increment)
            ask = dio_length(n, f.direct)
            fill.requests.append(ReadRequest(f.fd, offset, fill.buf.view[start:start + ask]))
            fill.owners.append(f)
            fill.lengths.append(n)
            f.pending += 1
            fill.buf.length += n
            offset += n
            length -= n
            if fill.buf.length == self._pool.size:
                await self._submit()

    def _laid_out(self, f: _OpenFile) -> None:
        f.laid_out = True
        if f.pending == 0:
            self._close(f.fd)

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    async def _submit(self) -> None:
        """The buffer being filled to the consumer, its reads issued at once."""
        fill, self._fill = self._fill, None
        if fill is None:
            return
        if self._limiter is not None:
            try:
                await self._limiter.take(sum(fill.lengths))
            except BaseException:
                fill.buf.release()
                raise
        reads = asyncio.ensure_future(self._reader.read_batch(fill.requests))
        try:
            await self._queue.put((fill, reads))
        except BaseException:  # cancelled while the queue was full: the buffer returns once its reads land
            reads.add_done_callback(functools.partial(_landed, buf=fill.buf))
            raise

    async def _complete(self, fill: _Fill, reads: asyncio.Future) -> Buffer:
        try:
            counts = await asyncio.shield(reads)
        except asyncio.CancelledError:  # the part was given up: as in _submit
            reads.add_done_callback(functools.partial(_landed, buf=fill.buf))
            raise
        except OSError as e:
            fill.buf.release()
            raise BackupError("read failed during the backup", detail=f"{e.strerror or e}",
                              hint="check the data directory's disk and permissions") from None
        for req, owner, want, got in zip(fill.requests, fill.owners, fill.lengths, counts):
            end = min(got, want)
            if owner.checker is not None:
                owner.checker.feed(req.offset, req.view[:end])
            if end < len(req.view):
                req.view[end:] = bytes(len(req.view) - end)  # zero fill: a shrunk file, or tar padding
            if got < want:
                if not owner.shrank:
                    owner.shrank = True
                    log.info(f"{owner.entry.path} shrank during the backup; zero padded to its walked size")
            owner.pending -= 1
            if owner.laid_out and owner.pending == 0:
                self._close(owner.fd)
        return fill.buf


def _landed(reads: asyncio.Future, buf: Buffer) -> None:
    if not reads.cancelled():
        reads.exception()  # retrieved: an abandoned read's error is not reported as never retrieved
    buf.release()


class _Window:
    """A pool buffer of a delta read and the reads into it. The buffer goes back to the pool only
    once the caller is done with it and no read can still land in it: reads in flight when the
    caller gives up (an error, a cancelled backup) keep it until they complete."""

    def __init__(self, buf: Buffer, requests: list[ReadRequest], reads: asyncio.Future, windows: asyncio.Semaphore):
        self.buf, self.requests, self.reads, self._windows = buf, requests, reads, windows

    def done(self) -> None:
        if self.reads.done():
            self._give_back()
        else:
            self.reads.add_done_callback(lambda _: self._give_back())

    def _give_back(self) -> None:
        _landed(self.reads, self.buf)
        self._windows.release()


def window_quota(pool_buffers: int, lanes: int, compressing: int) -> int:
    """Pool buffers the delta's read windows of `lanes` parts may hold together. A lane that holds a
    window waits for a fill buffer, and meanwhile its compression stage keeps up to `compressing`
    buffers (blocks_in_flight: it frees its oldest only when the next one comes), so the rest of
    the pool is at least that plus a fill per lane, and one more: a fill is then always free or
    freed by a queued buffer's compression, whatever the windows hold."""
    return max(1, pool_buffers - lanes * (compressing + 1) - 1)


def _extents(blocks: array) -> list[tuple[int, int]]:
    """(offset, length) of each run of consecutive blocks."""
    out: list[tuple[int, int]] = []
    for block in blocks:
        offset = block * BLOCK_SIZE
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + BLOCK_SIZE)
        else:
            out.append((offset, BLOCK_SIZE))
    return out
