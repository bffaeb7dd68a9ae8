"""wal-push: compress one WAL file (segment, .history, .backup, .partial) into wal_005/ durably, and
further .ready segments in the background (WAL-G's background uploader)."""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from walrus import codec
from walrus.aio import TaskWindow
from walrus.config import WAL_BLOCK_MIN, Settings
from walrus.errors import CorruptObject, ObjectExists, StorageError, StorageMissing, WalOverwriteError, WalrusError
from walrus.fileio import file_buffers, open_for_backup
from walrus.log import log
from walrus.pg.xlog import classify_wal_name, parse_wal_file_name
from walrus.storage import layout
from walrus.storage.base import ByteStream, Storage
from walrus.stream.download import copy_decoded
from walrus.stream.upload import Uploader, buffer_size, upload_threads
from walrus.stream.stages import Counter, blocks_in_flight
from walrus.wal import ready
from walrus.wal.stored import open_archived

if TYPE_CHECKING:
    from walrus.pg.walmap import SegmentParser

# Cores a lone push compresses on (lz4 blocks or zstd frames at once). Concurrent pushes (the
# daemon) use the cores by running side by side, one core each.
PUSH_PARALLEL = 2
# WAL is read and compressed in blocks of this size (WALRUS_BUFFER_SIZE if larger), the largest lz4
# frame block. A 16 MiB segment is then 4 reads, 4 compression jobs and 4 writes: per block, the
# thread hand-offs and event-loop steps cost about what the codec does (docs/DESIGN.md, WAL).
WAL_BLOCK = WAL_BLOCK_MIN
# Blocks a push reads ahead of its compression jobs.
PUSH_READ_AHEAD = 2
# Once the asked file is stored, background uploads get this long to finish; any still running are
# then cancelled (nothing partial is published) and left to PostgreSQL, which archives them as usual.
BACKGROUND_GRACE = 60.0


@dataclass
class WalPushResult:
    name: str
    key: str
    size: int
    stored: int
    status: str  # "uploaded" | "already archived" | "archived in background" (key then unknown: "")
    seconds: float
    background: list[str] = field(default_factory=list)  # further segments this call stored durably

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "size": self.size, "stored_bytes": self.stored,
                "status": self.status, "seconds": round(self.seconds, 3), "background": self.background}


class _Comparer:
    """Compares decompressed archive bytes with the local file, chunk by chunk."""

    def __init__(self, fd: int):
        self.fd = fd
        self.offset = 0
        self.same = True

    def feed(self, chunk: bytes) -> None:
        if self.same:
            local = os.pread(self.fd, len(chunk), self.offset)
            self.same = local == chunk
            self.offset += len(chunk)


class WalPusher:
    """What pushing WAL needs besides the file: a buffer pool, the file reader and a compression thread
    per concurrent push. `wal-push` makes one for its single file; the daemon keeps one for its lifetime,
    so each segment pays for its bytes only (no ring, mapping or thread set up per segment).

    Invariant: at most `slots` pushes read at once (WALG_UPLOAD_CONCURRENCY), each holding at most
    buffers_per_push() buffers (its read-ahead and its compression jobs); the pool holds slots times
    that. A push gives its slot back as soon as its last read is issued, so the next segment's first
    (cold) read overlaps this one's last compression jobs instead of leaving a core idle. The next
    push may then wait for a buffer, never
    for long: a push whose reads are all issued needs no more buffers and frees its own as each one
    is compressed. Making a segment durable (fsync, rename) holds no buffer.
    """

    def __init__(self, settings: Settings, slots: int = 1, register: bool | None = None):
        self.settings = settings
        self._slots = asyncio.Semaphore(slots)
        self.parallel = PUSH_PARALLEL if slots == 1 else 1
        if blocks_in_flight(self.parallel) > self.buffers_per_push(settings, self.parallel):
            # segments of fewer blocks than the parallel jobs hold: one job at a time, which needs one
            # buffer whatever the file's size (a file larger than a segment must not wait forever)
            self.parallel = 1
        # long-lived when it serves several pushes at once (the daemon): pinning the pool pays off.
        # wal-push's background uploads are several pushes in a short-lived process: register=False.
        register = slots > 1 if register is None else register
        self.uploader = Uploader(settings, self.buffers_per_push(settings, self.parallel) * slots, wal_block(settings),
                                 slots * upload_threads(self.parallel), register=register, name="walrus-wal")

    @staticmethod
    def buffers_per_push(settings: Settings, parallel: int) -> int:
        """Its compression jobs and read-ahead, but never more blocks than a whole segment has: a WAL
        file is at most one segment, so a push never waits for more."""
        whole = -(-settings.segment_size // wal_block(settings))
        return min(blocks_in_flight(parallel) + PUSH_READ_AHEAD, whole)

    @classmethod
    def slots_for(cls, settings: Settings, storage: Storage) -> int:
        """WALG_UPLOAD_CONCURRENCY pushes at once (WAL-G's default is 16), as many as the memory budget
        holds besides the storage's part buffers (at least one: a push's blocks are the budget's floor)."""
        per_push = cls.buffers_per_push(settings, 1) * wal_block(settings)  # side by side, one core each
        return max(1, min(settings.upload_concurrency, (settings.memory_budget - storage.upload_memory) // per_push))

    def close(self) -> None:
        self.uploader.close()

    async def push(self, storage: Storage, path: str) -> WalPushResult:
        """Phases: open the file; probe the archive, where a copy already archived decides (a retry
        after a crash, or a second cluster on the same prefix: identical bytes are success,
        different bytes are never overwritten); upload, exclusively, where a copy that appeared
        meanwhile decides the same way."""
        began = time.monotonic()
        name = os.path.basename(path)
        fd = _open_wal(path, name)
        try:
            size = os.fstat(fd).st_size
            mapper = self._mapper(name, size)
            try:
                existing = await open_archived(storage, name, self.settings)
            except StorageMissing:  # nothing is archived in a storage not made yet; the put makes it
                existing = None
            if existing is None:
                key = layout.wal_key(layout.with_extension(name, codec.extension(self.settings.compression_method)))
                try:
                    stored = await self._upload(storage, key, path, fd, size, mapper)
                except ObjectExists:
                    existing = await open_archived(storage, name, self.settings)
                    if existing is None:
                        raise StorageError(f"{key} appeared and vanished while {name} was being archived",
                                           detail=f"another process is writing and deleting in {storage.describe()}",
                                           hint="run wal-push again (PostgreSQL retries archive_command by itself)"
                                           ) from None
                else:
                    log.info(f"archived {name} as {key} ({size} -> {stored} bytes)")
                    await _store_block_map(storage, name, mapper)
                    return WalPushResult(name, key, size, stored, "uploaded", time.monotonic() - began)
            result = await self._compare(existing, fd, size, path, storage, began, mapper)
            await _store_block_map(storage, name, mapper)  # the same bytes: a map a crash cut off is written now
            return result
        finally:
            os.close(fd)

    def _mapper(self, name: str, size: int) -> SegmentParser | None:
        """A parser for the segment's block map, where deltas may use one (WALRUS_BLOCK_MAP and
        WALG_DELTA_MAX_STEPS above 0); None for other files, or without the compiled module."""
        settings = self.settings
        if not (settings.block_map and settings.delta_max_steps > 0) or classify_wal_name(name) != "segment" \
                or size != settings.segment_size:
            return None
        from walrus.pg.walmap import MapError, SegmentParser  # here: only where deltas may use maps

        timeline, segno = parse_wal_file_name(name, settings.segment_size)
        try:
            return SegmentParser(timeline, settings.segment_size, segno * settings.segment_size)
        except MapError as e:
            log.debug(f"{name}: no block map: {e}")
            return None

    async def _upload(self, storage: Storage, key: str, path: str, fd: int, size: int,
                      mapper: SegmentParser | None) -> int:
        """Compress the file into `key`, published only if nothing is there (else ObjectExists);
        returns the bytes stored."""
        settings = self.settings
        read_total = 0
        direct_fd = None
        await self._slots.acquire()
        holding = True

        def free_slot() -> None:
            nonlocal holding
            if holding:
                holding = False
                self._slots.release()

        async def counted():
            nonlocal read_total
            source = direct_fd if direct_fd is not None else fd
            async for buf in file_buffers(source, size, self.uploader.pool, self.uploader.reader, PUSH_READ_AHEAD,
                                          direct_fd is not None, all_issued=free_slot):
                read_total += buf.length
                if mapper is not None:
                    mapper.feed(buf.data)  # from the buffer the upload compresses: no second read
                yield buf
            free_slot()  # already freed once the last read was issued, unless the file ended early
            if read_total != size:  # raising here aborts the put: nothing lands under the key
                raise WalrusError(f"{path} shrank while it was being archived",
                                  detail=f"read {read_total} of {size} bytes")

        try:
            if settings.direct_io and size >= settings.direct_io_min:
                found = open_for_backup(path, direct=True)  # a segment is read once: keep it out of the cache
                if found is not None and found[1]:
                    direct_fd = found[0]
                elif found is not None:
                    os.close(found[0])
            # exclusive: the probe and this publish are not one step, so another writer may have
            # stored the name in between; the storage then refuses to replace its object
            stored = await self.uploader.upload(storage, key, counted(), Counter(), self.parallel, exclusive=True)
        finally:
            free_slot()
            if direct_fd is not None:
                os.close(direct_fd)
        return stored

    async def _compare(self, existing: tuple[str, str, ByteStream], fd: int, size: int, path: str,
                       storage: Storage, began: float, mapper: SegmentParser | None) -> WalPushResult:
        """The archived copy decides: the same bytes are success, anything else an error that keeps it."""
        name = os.path.basename(path)
        key, ext, stream = existing
        comparer = _Comparer(fd)

        def feed(chunk: bytes) -> None:
            comparer.feed(chunk)
            if mapper is not None and comparer.same:
                mapper.feed(chunk)

        try:
            await copy_decoded(stream, ext, key, self.settings.crypter, feed, self.uploader.executor)
        except CorruptObject as e:
            raise WalOverwriteError(
                f"{name} is already archived, but the archived copy cannot be read",
                detail=f"{key} in {storage.describe()}: {e.message}" + (f" ({e.detail})" if e.detail else ""),
                hint=f"the archived copy is damaged or was written with another key; walrus never replaces it. "
                     f"If {key} is damaged, move it aside in the storage: PostgreSQL's next try then archives "
                     f"{name} again") from None
        if comparer.same and comparer.offset == size:
            log.info(f"{name} is already archived with identical contents ({key}); not uploaded again")
            return WalPushResult(name, key, size, 0, "already archived", time.monotonic() - began)
        raise WalOverwriteError(f"{name} is already archived with different contents",
                                detail=f"{key} in {storage.describe()} differs from {path}",
                                hint="two clusters may be archiving into the same prefix; give each its "
                                     "own WALG_*_PREFIX, and keep the archived copy")


async def _store_block_map(storage: Storage, name: str, mapper: SegmentParser | None) -> None:
    """The segment's block map beside it (blockmap_005/), once the segment itself is durable. The map
    is an optimisation: failing to make or store it is a warning, and a delta over this segment then
    scans pages instead."""
    if mapper is None:
        return
    from walrus.pg.walmap import MapError

    try:
        encoded = mapper.finish().encode()
        await storage.put_bytes(layout.blockmap_key(name), encoded)
    except MapError as e:
        log.warning(f"{name} is archived, but its block map cannot be made: {e}; deltas over it scan pages")
    except WalrusError as e:  # the storage's errors, whatever the backend
        log.warning(f"{name} is archived, but its block map was not stored: {e.message}; deltas over it scan pages")


def wal_block(settings: Settings) -> int:
    """Bytes of WAL read and compressed as one block: WAL_BLOCK, or the pool buffer size if larger."""
    return max(WAL_BLOCK, buffer_size(settings))


async def wal_push(settings: Settings, storage: Storage, path: str) -> WalPushResult:
    """Push the file PostgreSQL asks for (%p) and, as WAL-G's background uploader does, up to
    TOTAL_BG_UPLOADED_LIMIT - 1 other .ready segments of its pg_wal, WALG_UPLOAD_CONCURRENCY at once
    with it. A segment a background upload stored earlier returns at once. Only the asked file decides
    the result: a background failure is a warning, and that segment is archived as usual later."""
    done = pushed_in_background(path)
    if done is not None:
        return done
    wal_dir, name = os.path.split(os.path.abspath(path))  # WAL-G's pg_wal: the directory of %p
    backlog = _backlog(settings, wal_dir, name)
    # WAL-G runs WALG_UPLOAD_CONCURRENCY - 1 background uploads beside the asked one; walrus as many
    # as the memory budget holds besides it (WalPusher.slots_for), never more than there are segments.
    # Where it holds none (cloud storage's part buffers take their share), the backlog is still
    # stored, one at a time in the asked push's slot once that is done: the call's start-up (imports,
    # credentials, a connection) is then paid once for many segments instead of once each.
    workers = min(len(backlog), WalPusher.slots_for(settings, storage) - 1)
    pusher = WalPusher(settings, slots=1 + workers, register=False)
    try:
        if not backlog:
            return await pusher.push(storage, path)
        return await _push_with_background(pusher, storage, path, wal_dir, backlog, workers)
    finally:
        pusher.close()


async def store_for_backup(settings: Settings, storage: Storage, wal_dir: str, names: list[str]) -> None:
    """Store WAL files a backup-push needs (its segments and history file, complete in pg_wal) as the
    archiver's wal-push would, before the backup's sentinel. The archiver still archives them as
    usual, with its own settings: its call finds them stored with identical bytes (and records a
    segment's block map if this call did not). A file the archiver stored meanwhile is found
    identical too; different bytes are never overwritten (an error, as in wal-push). Two files are
    in hand at once, in order, and the one slot lets one of them read: a file's durable write
    overlaps the next one's probe and reads (a first failure cancels the other)."""
    pusher = WalPusher(settings, slots=1, register=False)
    window = TaskWindow(2)
    try:
        for name in names:
            await window.start(pusher.push, storage, os.path.join(wal_dir, name))
        await window.results()
    except BaseException:
        await window.cancel()
        raise
    finally:
        pusher.close()


def pushed_in_background(path: str) -> WalPushResult | None:
    """The result for a segment an earlier call stored in the background (its marker taken), else
    None. Needs no storage: the command answers such a call without opening one."""
    began = time.monotonic()
    wal_dir, name = os.path.split(os.path.abspath(path))
    if classify_wal_name(name) == "segment" and ready.take_marker(wal_dir, name):
        log.info(f"{name} was archived by an earlier wal-push in the background; not uploaded again")
        return WalPushResult(name, "", os.stat(path).st_size, 0, "archived in background", time.monotonic() - began)
    return None


def _backlog(settings: Settings, wal_dir: str, asked: str) -> list[str]:
    """The .ready segments this call may store besides the asked file: at most
    TOTAL_BG_UPLOADED_LIMIT - 1, lowest names first (the order PostgreSQL's archiver asks in, so the
    next ones it asks for are stored first), none that a marker says is stored already."""
    limit = settings.total_bg_uploaded_limit - 1
    if settings.upload_concurrency < 2 or limit < 1 or classify_wal_name(asked) == "other":
        return []  # off, or the asked file is refused anyway
    chosen: list[str] = []
    for name in ready.ready_segments(ready.status_dir(wal_dir)):
        if len(chosen) == limit:
            break
        if name != asked and not ready.is_marked(wal_dir, name):
            chosen.append(name)
    return chosen


async def _push_with_background(pusher: WalPusher, storage: Storage, path: str, wal_dir: str,
                                backlog: list[str], workers: int) -> WalPushResult:
    """The asked push beside `workers` background ones (0: none until it is stored) that work through
    `backlog`.

    Invariant: each worker runs one push at a time, so background pushes hold at most `workers` of
    the pusher's 1 + workers slots and their buffers while the asked push runs: it never waits for
    them. Once it is stored, one more worker takes its slot. They stop
    when it fails (PostgreSQL retries the whole call), when the command is cancelled (SIGTERM), or
    BACKGROUND_GRACE after it succeeded; a cancelled upload publishes nothing and leaves no marker."""
    names = iter(backlog)  # shared: each name is taken by one worker
    stored: list[str] = []

    async def worker() -> None:
        for name in names:
            if await _push_background(pusher, storage, wal_dir, name):
                stored.append(name)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        result = await pusher.push(storage, path)
        tasks.append(asyncio.create_task(worker()))  # the asked push's slot is free: one more works on the rest
        _, running = await asyncio.wait(tasks, timeout=BACKGROUND_GRACE)
        if running:
            log.warning(f"background uploads still running {BACKGROUND_GRACE:.0f} s after {result.name} was "
                        "archived were stopped; PostgreSQL archives those segments as usual")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result.background = sorted(stored)
    if stored:
        log.info(f"archived {len(stored)} further .ready segment(s) in the background "
                 f"({result.background[0]}..{result.background[-1]})")
    return result


async def _push_background(pusher: WalPusher, storage: Storage, wal_dir: str, name: str) -> bool:
    """Store one .ready segment ahead of PostgreSQL's call for it; True once it is durable and marked.

    Marked means, once durable (never before): with PG_READY_RENAME its .ready renamed to .done, so
    PostgreSQL never calls for it (safe: the archiver waits in this archive_command meanwhile); else,
    or if the rename fails, WAL-G's marker, which the call for it then takes. A failure is a warning:
    the segment stays .ready and PostgreSQL archives it as usual."""
    try:
        await pusher.push(storage, os.path.join(wal_dir, name))
    except Exception as e:  # whatever fails here, the asked file's result stands
        why = (e.message + (f" ({e.detail})" if e.detail else "") if isinstance(e, WalrusError)
               else f"{type(e).__name__}: {e}")
        log.warning(f"background upload of {name} failed: {why}; PostgreSQL archives it as usual")
        return False
    settings = pusher.settings
    if not (settings.pg_ready_rename and ready.mark_done(ready.status_dir(wal_dir), name, "wal-push")):
        ready.mark_uploaded(wal_dir, name)
    return True


def _open_wal(path: str, name: str) -> int:
    if classify_wal_name(name) == "other":
        raise WalrusError(f"{path} is not a WAL file",
                          detail="wal-push archives WAL segments and .history, .backup and .partial files",
                          hint="archive_command must pass %p, the file PostgreSQL asks to archive")
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise WalrusError(f"cannot open WAL file {path}", detail=e.strerror,
                          hint="archive_command must pass %p, relative to the data directory") from None
