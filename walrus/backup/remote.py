"""backup-push without a data directory: WAL-G's remote mode, a BASE_BACKUP streamed over a replication connection."""
from __future__ import annotations

import asyncio
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator, Callable, Iterator

from walrus import codec
from walrus.backup.dto import ExtendedMetadata, FileDescription, FilesMetadata, Sentinel, TablespaceSpec, now_utc_micro
from walrus.backup.common import BackupPushResult, archiving_applies, backup_wal_files, check_server_settings
from walrus.config import Settings
from walrus.aio import gather_all
from walrus.errors import BackupError
from walrus.fileio import Buffer, BufferPool
from walrus.log import log
from walrus.pg.client import PgSession, ServerInfo
from walrus.pg.replication import (MAX_RATE_KB, ArchiveData, ArchiveStarted, BackupEnded, BackupEvent,
                                   BackupStarted, ReplicationConnection, ReplicationError, ReplicationInterrupted,
                                   SystemIdentity, Tablespace, Tablespaces, replication_conninfo)
from walrus.pg.xlog import BACKUP_NAME_PREFIX, format_lsn, wal_file_name
from walrus.progress import Progress
from walrus.runtime import cpu_count
from walrus.storage import layout
from walrus.storage.base import Storage
from walrus.stream.stages import Counter, metered
from walrus.stream.upload import PoolPlan, Uploader, upload_threads
from walrus.tar.read import Member, iter_members
from walrus.tar.write import END_OF_ARCHIVE, Entry, TarPartStream, member_header, padding

LABEL = "wal-g"  # WAL-G's BASE_BACKUP label
PG_CONTROL = "global/pg_control"
# A standby's BASE_BACKUP carries its standby.signal; a backup keeps none (as the data directory walk
# excludes it, WAL-G's list), so a restore does not come up as a standby waiting forever for WAL
STANDBY_SIGNAL = "standby.signal"
CONNECT_TIMEOUT = 60.0  # seconds the server may take to answer the connection and IDENTIFY_SYSTEM
AHEAD = 4  # items (a filled pool buffer each, or an event) the thread may be ahead of the loop
SLICE = 0.2  # seconds between the thread's looks at its stop flag while the uploads are behind
SUPPLY_AHEAD = 2  # free pool buffers kept waiting for the thread

END = object()  # the replication thread's last item after BackupEnded


@dataclass(frozen=True)
class _PartStarted:
    object_name: str


@dataclass(frozen=True)
class _PartEnded:
    object_name: str
    data_size: int  # the part's file bytes


# The archived objects a WAL file may be stored as, in probe order (walrus.wal.stored.candidate_keys,
# handed down by the command: an engine does not import another)
Candidates = Callable[[str, str], list[tuple[str, str]]]


@dataclass
class _Remote:
    """One remote backup in the making: what each phase leaves for the next."""

    settings: Settings
    storage: Storage
    conn: ReplicationConnection
    identity: SystemIdentity
    info: ServerInfo
    stop: threading.Event
    start_time: datetime
    ext: str
    started: BackupStarted | None = None
    tablespaces: list[Tablespace] = field(default_factory=list)
    ended: BackupEnded | None = None
    name: str = ""
    files: dict[str, FileDescription] = field(default_factory=dict)
    parts: list[str] = field(default_factory=list)
    part_sizes: dict[str, int] = field(default_factory=dict)  # each part's file bytes, for the log
    counter: Counter = field(default_factory=Counter)
    pg_control: tuple[Member, bytes] | None = None  # teed from the base archive into pg_control.tar
    feed: _Feed | None = None


async def remote_backup_push(settings: Settings, storage: Storage, *, permanent: bool = False, user_data: Any = None,
                             archive_check: bool = True, candidates: Candidates,
                             progress: Progress | None = None,
                             server_info: Callable[[Settings], ServerInfo] | None = None) -> BackupPushResult:
    """Phases: connect (the replication connection, then the SQL session's facts about the server),
    start (BASE_BACKUP), stream parts (the server's archives re-tarred into WAL-G's parts as they
    arrive, the stream stalled while an upload is behind), pg_control (pg_control.tar, teed from the
    stream), WAL (the WAL from the backup's start to its end is in storage), finish (metadata, then
    the sentinel, last)."""
    began = time.monotonic()
    storage.check_writer()
    stop = threading.Event()
    remote: _Remote | None = None
    try:
        remote = await _connect(settings, storage, stop, archive_check, server_info or _server_info)
        plan = PoolPlan.for_settings(settings, 1, parallel=cpu_count(), reserved=storage.upload_memory)
        with Uploader(settings, plan.count, plan.buffer_size, upload_threads(plan.parallel), register=False,
                      name="walrus-compress") as uploader:
            items = await _start(remote, uploader.pool)
            await _stream_parts(remote, items, uploader, plan, progress)
            await _upload_pg_control(remote, uploader, plan)
        await remote.feed.finished()
        if progress is not None:
            progress.note = "waiting for the backup's WAL"
        await _await_wal(remote, candidates)
        await _finish(remote, permanent, user_data)
    finally:
        stop.set()  # the thread, if still running (a failure, SIGTERM), ends its connection: the server aborts
        if remote is not None:
            if remote.feed is not None:
                await remote.feed.joined()
            await asyncio.to_thread(remote.conn.close)
    assert remote.started is not None and remote.ended is not None
    return BackupPushResult(name=remote.name, start_lsn=remote.started.lsn, finish_lsn=remote.ended.lsn,
                            uncompressed_size=remote.feed.raw_bytes, compressed_size=remote.counter.bytes,
                            parts=remote.parts, files=len(remote.files), seconds=time.monotonic() - began,
                            reader="replication", storage=storage.describe())


# --- connect ------------------------------------------------------------------------------------------

def _server_info(settings: Settings) -> ServerInfo:
    session = PgSession(settings)
    try:
        return session.server_info()
    finally:
        session.close()


async def _connect(settings: Settings, storage: Storage, stop: threading.Event, archive_check: bool,
                   server_info: Callable[[Settings], ServerInfo]) -> _Remote:
    """The replication connection first (a role that may not replicate is told so at once), then the
    facts a replication connection cannot give (data_directory, archiving) from an SQL session."""
    conninfo = replication_conninfo(settings)

    def connect() -> tuple[ReplicationConnection, SystemIdentity]:
        conn = ReplicationConnection.open(conninfo, CONNECT_TIMEOUT, stop=stop)
        try:
            return conn, conn.identify_system()
        except BaseException:
            conn.close()
            raise

    opening = asyncio.ensure_future(asyncio.to_thread(connect))
    try:
        conn, identity = await asyncio.shield(opening)
    except asyncio.CancelledError:
        stop.set()  # the thread stops within a slice; a connection it made meanwhile is closed
        opening.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result()[0].close())
        raise
    try:
        if conn.server_version < 150000:
            raise BackupError(f"backup-push without a data directory needs PostgreSQL 15 or later (the server "
                              f"is {conn.server_version // 10000})",
                              hint="run backup-push on the database host with the data directory as its argument")
        info = await asyncio.to_thread(server_info, settings)
        if info.system_identifier & ((1 << 64) - 1) != identity.system_id & ((1 << 64) - 1):
            raise BackupError("the SQL and the replication connections reached different servers",
                              detail=f"system identifiers {info.system_identifier} and {identity.system_id}",
                              hint="check PGHOST/PGPORT (and any connection service or pooler)")
        check_server_settings(info, settings, archive_check)
    except BaseException:
        await asyncio.to_thread(conn.close)
        raise
    return _Remote(settings, storage, conn, identity, info, stop, now_utc_micro(),
                   codec.extension(settings.compression_method))


def max_rate_kb(disk_rate_limit: int | None) -> int | None:
    """WALG_DISK_RATE_LIMIT (bytes a second) as BASE_BACKUP's MAX_RATE: the server reads the files, so
    it throttles its own reads and sends. None (no limit) above the most MAX_RATE takes (1 GiB/s); a
    limit below its least (32 kB/s) is raised to it, with a warning."""
    if disk_rate_limit is None:
        return None
    low, high = MAX_RATE_KB
    kb = disk_rate_limit // 1024
    if kb > high:
        return None
    if kb < low:
        log.warning(f"WALG_DISK_RATE_LIMIT {disk_rate_limit} B/s is below the {low} kB/s least a base backup "
                    f"over a replication connection takes (MAX_RATE); the server reads at {low} kB/s")
        return low
    return kb


# --- start: the replication thread --------------------------------------------------------------------

class _Feed:
    """The BASE_BACKUP on a thread of its own: it reads the server's archives (tar streams) and lays
    their members, re-tarred into WAL-G's parts (_Parts), straight into pool buffers, handing each
    full buffer to the loop, at most AHEAD items ahead of it. The loop only routes buffers to their
    part's upload: per pool buffer, not per server message. When the uploads are behind, the pool is empty
    and the thread stops reading, so the server's sends stall: backpressure, never a growing buffer.
    Items: BackupStarted, Tablespaces, then per part _PartStarted, its buffers, _PartEnded, and
    BackupEnded."""

    def __init__(self, remote: _Remote, pool: BufferPool):
        self._remote = remote
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue = asyncio.Queue()  # bounded by the slots (the last item takes none)
        self._slots = threading.Semaphore(AHEAD)
        self._last: object = None  # END or the exception that ended the thread, once next() reached it
        self._parts = _Parts(self, remote)
        self._supplied: queue.SimpleQueue[Buffer] = queue.SimpleQueue()  # free buffers for the thread
        self._room = asyncio.Event()  # the thread took one
        self._supplier: asyncio.Task | None = None
        self._done = self._loop.create_future()
        self.raw_bytes = 0  # the stream's archive bytes: WAL-G's UncompressedSize
        self._thread = threading.Thread(target=self._run, name="walrus-basebackup", daemon=True)

    def start(self) -> None:
        self._supplier = asyncio.ensure_future(self._supply())
        self._thread.start()

    # -- the thread
    def _run(self) -> None:
        r = self._remote
        s = r.settings
        events = None
        try:
            # each silence of the server is bounded: the checkpoint before the first answer, the stream
            # (WALG_STOP_BACKUP_TIMEOUT, at least CONNECT_TIMEOUT; 0: no bound). WAIT false: the server's
            # end does not wait for its archiver (a second between looks); _await_wal sees the backup's
            # WAL in storage itself, a stronger test, before the sentinel
            timeout = max(s.stop_backup_timeout, CONNECT_TIMEOUT) if s.stop_backup_timeout else 1e9
            events = r.conn.base_backup(LABEL, fast_checkpoint=True, tablespace_map=True,
                                        verify_checksums=s.verify_page_checksums,
                                        max_rate_kb=max_rate_kb(s.disk_rate_limit), wait=False, timeout=timeout)
            event: BackupEvent | None = next(events)
            while event is not None:
                if isinstance(event, ArchiveStarted):
                    event = self._archive(event, events)
                    continue
                if isinstance(event, BackupEnded):
                    self._parts.close()
                if isinstance(event, (BackupStarted, Tablespaces, BackupEnded)):
                    self._emit(event)
                event = next(events, None)
        except BaseException as e:
            self._parts.drop()
            if events is not None:
                events.close()  # a backup left half way: the connection is closed, and the server aborts it
            self._hand_over(e)  # the loop raises it when it reaches it
        else:
            self._hand_over(None)

    def _archive(self, started: ArchiveStarted, events: Iterator[BackupEvent]) -> BackupEvent | None:
        """Lay one archive's members into the parts, tablespaces' under pg_tblspc/<oid>/; the event
        after it."""
        prefix = "" if not started.location else f"pg_tblspc/{started.name.removesuffix('.tar')}/"
        source = _ArchiveSource(events, self)
        log.info(f"streaming {'the data directory' if not prefix else 'tablespace ' + started.location}")
        for member, data in iter_members(source, name=f"BASE_BACKUP's {started.name}"):
            name = member.name
            while name.startswith("./"):
                name = name[2:]
            name = prefix + name.lstrip("/")
            if member.kind == "symlink":
                name = name.rstrip("/")  # PostgreSQL ends a link's name with '/', as a directory's
            if member.kind not in ("file", "dir", "symlink"):
                raise BackupError(f"BASE_BACKUP sent {name!r}, a {member.kind} member walrus cannot store",
                                  hint="report it: PostgreSQL sends files, directories and symlinks only")
            if name == STANDBY_SIGNAL:
                continue  # left unread: the reader skips it
            self._parts.add(name, member, data)
        return source.next_event

    def _emit(self, item: object) -> None:
        """Hand one item to the loop, waiting while AHEAD are not taken yet."""
        while not self._slots.acquire(timeout=SLICE):  # the loop is behind: stall the server
            self._stalled()
        self._call(self._items.put_nowait, item)

    def _buffer(self) -> Buffer:
        """A free pool buffer, waited for while the uploads hold them all (the stream's backpressure)."""
        self._stopped()  # a failed upload stops the stream even while buffers are free
        while True:
            try:
                buf = self._supplied.get(timeout=SLICE)
            except queue.Empty:
                self._stalled()
                continue
            self._call(_Feed._taken, self)
            return buf

    # -- the loop's side
    async def _supply(self) -> None:
        """Keep SUPPLY_AHEAD pool buffers waiting for the thread, so taking one costs it a queue's get,
        not a round trip through the loop."""
        while True:
            while self._supplied.qsize() >= SUPPLY_AHEAD:
                self._room.clear()
                await self._room.wait()
            self._supplied.put(await self._pool.acquire())

    def _taken(self) -> None:
        self._room.set()

    def _unsupply(self) -> None:
        """The supplier stopped, and the buffers it left for the thread back to the pool."""
        if self._supplier is not None:
            self._supplier.cancel()
        while True:
            try:
                self._supplied.get_nowait().release()
            except queue.Empty:
                return

    def _stopped(self) -> None:
        if self._remote.stop.is_set():
            raise ReplicationInterrupted("replication interrupted", detail="the backup was abandoned")

    def _stalled(self) -> None:
        """A look, while the stream is stalled behind the uploads, at what would end it: a stop, or the
        server gone (seen at once, not after the storage has taken what is held)."""
        self._stopped()
        self._remote.conn.check_peer("BASE_BACKUP")

    def _hand_over(self, end: BaseException | None) -> None:
        self._call(self._items.put_nowait, end if end is not None else END)
        self._call(self._finish, end)

    def _finish(self, end: BaseException | None) -> None:
        self._unsupply()
        if not self._done.done():
            self._done.set_result(end)

    def _call(self, fn, arg) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            pass  # the loop is gone (the command ended): nobody to tell

    async def next(self) -> object:
        """The next item; END once the thread ended after BackupEnded; raises what ended it otherwise."""
        item = self._last
        if item is None:
            item = await self._items.get()
            self._slots.release()
            if item is END or isinstance(item, BaseException):
                self._last = item  # the thread is gone: every later call gets the same
        if isinstance(item, BaseException):
            raise item
        return item

    @property
    def over(self) -> asyncio.Future:
        """Done once the thread has ended, whatever ended it (its result: None, or the exception)."""
        return self._done

    async def finished(self) -> None:
        """The thread ended after BackupEnded (every byte was consumed); raises what ended it otherwise."""
        end = await asyncio.shield(self._done)
        if end is not None:
            raise end

    async def joined(self) -> None:
        """The thread is gone (a stopped one leaves within a slice; bounded, in case libpq hangs)."""
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 5.0)
        self._unsupply()


class _ArchiveSource:
    """One archive's bytes as a pull reader (walrus.pull.Source, with readinto) over the backup's
    events: read straight from the connection into the caller's buffer; the events go on once it
    has ended, at next_event (None: the events ended)."""

    def __init__(self, events: Iterator[BackupEvent], feed: _Feed):
        self._events = events
        self._feed = feed
        self._conn = feed._remote.conn
        self._ended = False  # the next event was taken: what the connection reads now is not this archive's
        self.next_event: BackupEvent | None = None

    def readinto(self, view: memoryview) -> int:
        if self._ended:
            return 0
        n = self._conn.read_archive(view)
        self._feed.raw_bytes += n
        return n

    def read(self, n: int) -> bytes:
        """Headers and padding (and anything the events carry after the connection's reads): as bytes."""
        if self._ended:
            return b""
        buf = bytearray(n)
        got = self.readinto(memoryview(buf))
        if got:
            return bytes(buf[:got])
        while True:  # the archive's data ended: the next event that is not its data
            event = next(self._events, None)
            if isinstance(event, ArchiveData):  # read_archive() takes every byte of an archive
                raise ReplicationError("BASE_BACKUP: archive data after the archive's end")
            if isinstance(event, (ArchiveStarted, BackupEnded)) or event is None:
                self.next_event = event
                self._ended = True
                return b""
            # progress and manifest messages carry nothing for the parts


async def _start(r: _Remote, pool: BufferPool) -> _Feed:
    """BASE_BACKUP: the checkpoint, then the start position, which names the backup."""
    r.feed = feed = _Feed(r, pool)
    feed.start()
    first = await feed.next()
    if not isinstance(first, BackupStarted):
        raise ReplicationError("BASE_BACKUP: unexpected first answer", detail=repr(first))
    r.started = first
    spaces = await feed.next()
    if not isinstance(spaces, Tablespaces):
        raise ReplicationError("BASE_BACKUP: no tablespace list", detail=repr(spaces))
    r.tablespaces = [t for t in spaces.tablespaces if t.oid is not None]
    segment_size = r.info.segment_size
    # WAL-G's remote name: the segment of the start LSN itself (local mode names the one of LSN - 1)
    r.name = BACKUP_NAME_PREFIX + wal_file_name(first.timeline, first.lsn // segment_size, segment_size)
    log.info(f"backup {r.name} started at {format_lsn(first.lsn)} (timeline {first.timeline}), streamed from "
             f"the server" + (f" with {len(r.tablespaces)} tablespace(s)" if r.tablespaces else ""))
    return feed


# --- stream parts -------------------------------------------------------------------------------------

class _Parts:
    """The replication thread's re-tarring: members laid as WAL-G's parts into pool buffers, each
    full buffer handed to the loop. A part ends before the member that would take its file bytes
    above WALG_TAR_SIZE_THRESHOLD (WAL-G's remote rule: rotate before the member, so only a file
    larger than the threshold makes a part larger), and at the end of the backup; parts are numbered
    across all archives. It also records each member for files_metadata.json and tees
    global/pg_control, both read by the loop once the stream has ended."""

    def __init__(self, feed: _Feed, remote: _Remote):
        self._feed = feed
        self._remote = remote
        self._size = feed._pool.size
        self._number = 0
        self._name: str | None = None  # the open part's object name
        self._data_size = 0  # its file bytes
        self._buf: Buffer | None = None  # the buffer being filled

    def add(self, name: str, member: Member, data) -> None:
        r = self._remote
        if self._name is not None and self._data_size and self._data_size + member.size > r.settings.tar_size_threshold:
            self.close()
        if self._name is None:
            self._number += 1
            self._name, self._data_size = layout.part_object_name(self._number, r.ext), 0
            self._feed._emit(_PartStarted(self._name))
        self._lay(member_header(name, member.kind, member.size, member.mode, member.mtime, uid=member.uid,
                                gid=member.gid, uname=member.uname, gname=member.gname, linkname=member.linkname))
        if member.kind == "file":
            teed = bytearray() if name == PG_CONTROL else None
            left = member.size
            while left:  # the file's bytes, read from the connection straight into the pool's buffers
                room = self._room(left)
                data.readinto(room)  # all of it, or it raises (a truncated archive)
                if teed is not None:
                    teed += room
                self._laid(len(room))
                left -= len(room)
            self._lay(bytes(padding(member.size)))
            self._data_size += member.size
            if teed is not None:
                r.pg_control = (member, bytes(teed))
        if member.kind != "dir":  # WAL-G lists every member but directories, by its name in the part
            r.files[name] = FileDescription.for_mtime_ns(member.mtime * 1_000_000_000)

    def close(self) -> None:
        """End the open part: the end-of-archive blocks, its last buffer, _PartEnded."""
        if self._name is None:
            return
        self._lay(END_OF_ARCHIVE)
        buf, self._buf = self._buf, None
        if buf is not None:
            self._feed._emit(buf)
        self._feed._emit(_PartEnded(self._name, self._data_size))
        self._name = None

    def drop(self) -> None:
        """The buffer being filled back to the pool (the backup failed)."""
        buf, self._buf = self._buf, None
        if buf is not None:
            self._feed._call(Buffer.release, buf)

    def _lay(self, data) -> None:
        view = memoryview(data)
        while view:
            room = self._room(len(view))
            room[:] = view[:len(room)]
            self._laid(len(room))
            view = view[len(room):]

    def _room(self, most: int) -> memoryview:
        """Up to `most` free bytes of the buffer being filled (a new one from the pool when none is)."""
        buf = self._buf
        if buf is None:
            buf = self._buf = self._feed._buffer()
        return buf.view[buf.length:buf.length + min(most, self._size - buf.length)]

    def _laid(self, n: int) -> None:
        """n bytes of the room were filled: a full buffer goes to the loop."""
        buf = self._buf
        buf.length += n
        if buf.length == self._size:
            self._buf = None
            self._feed._emit(buf)


async def _queued(queue: asyncio.Queue) -> AsyncIterator[Buffer]:
    """A part's buffers as the loop routes them to it; None ends the part."""
    while (buf := await queue.get()) is not None:
        yield buf


async def _make_room(uploads: list[asyncio.Task], feed: _Feed) -> None:
    """Before a part starts, wait until at most one earlier part is still uploading. Each upload holds
    chunks queued outside the pool (copies of whole buffers without compression), so parts left to pile
    up behind a slow storage held memory the budget does not bound, and let the server stream the whole
    backup ahead of the storage. Waiting here stalls the stream: the thread runs out of pool buffers and
    stops reading. A stream that ends meanwhile (the server gone) ends the wait, so its error comes
    through at once."""
    while len(pending := [t for t in uploads if not t.done()]) > 1 and not feed.over.done():
        await asyncio.wait([pending[0], feed.over], return_when=asyncio.FIRST_COMPLETED)


async def _stream_parts(r: _Remote, feed: _Feed, uploader: Uploader, plan: PoolPlan,
                        progress: Progress | None) -> None:
    """The parts' uploads, started as the thread starts each part and fed the buffers it fills. A
    part's upload finishes (its tail compressed, written and made durable) while the next part is
    already streaming, so the server never waits for a part's end; both draw on the one buffer pool,
    and no more than those two run at once (_make_room), so memory stays bounded. A failed upload
    stops the stream, and its error is the backup's."""
    uploads: list[asyncio.Task] = []
    queue: asyncio.Queue | None = None

    async def upload(object_name: str, buffers: AsyncIterator[Buffer]) -> None:
        await uploader.upload(r.storage, layout.part_key(r.name, object_name), buffers, r.counter, plan.parallel)
        log.info(f"uploaded {object_name} ({r.part_sizes.get(object_name, 0)} bytes of files)")
        if progress is not None:
            progress.part_done()

    def stop_on_failure(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            r.stop.set()  # the thread leaves within a slice; feed.next() then raises, and the upload's error is reported

    try:
        while True:
            try:
                item = await feed.next()
            except ReplicationInterrupted:
                for task in uploads:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise task.exception() from None
                raise
            if isinstance(item, Buffer):
                if queue is None:
                    item.release()
                    raise ReplicationError("BASE_BACKUP: data outside a part")
                queue.put_nowait(item)
            elif isinstance(item, _PartStarted):
                await _make_room(uploads, feed)
                queue = asyncio.Queue()  # bounded by the pool: the thread fills only buffers it took from it
                buffers: AsyncIterator[Buffer] = _queued(queue)
                if progress is not None:
                    buffers = metered(buffers, progress.add, lambda b: b.length)
                task = asyncio.create_task(upload(item.object_name, buffers))
                task.add_done_callback(stop_on_failure)
                uploads.append(task)
                r.parts.append(item.object_name)
            elif isinstance(item, _PartEnded) and queue is not None:
                r.part_sizes[item.object_name] = item.data_size
                queue.put_nowait(None)
                queue = None
            elif isinstance(item, BackupEnded):
                r.ended = item
                break
            elif item is END:
                raise ReplicationError("BASE_BACKUP: the stream ended without the backup's end")
            else:
                raise ReplicationError("BASE_BACKUP: unexpected event in the stream", detail=repr(item))
        await gather_all(uploads)
    finally:
        for task in uploads:
            task.cancel()
        await asyncio.gather(*uploads, return_exceptions=True)
    assert r.started is not None and r.ended is not None
    log.info(f"the server ended the backup at {format_lsn(r.ended.lsn)} (timeline {r.ended.timeline})")
    if r.ended.timeline != r.started.timeline:
        raise BackupError("the server changed timelines during the backup (a standby promoted)",
                          detail=f"timeline {r.started.timeline} at the start, {r.ended.timeline} at the end; "
                                 "no sentinel was written",
                          hint="run backup-push again")


# --- pg_control -------------------------------------------------------------------------------------

async def _upload_pg_control(r: _Remote, uploader: Uploader, plan: PoolPlan) -> None:
    """pg_control.tar, after every part: a copy of the base archive's global/pg_control (WAL-G's tee)."""
    if r.pg_control is None:
        raise BackupError("BASE_BACKUP sent no global/pg_control", hint="is the server a PostgreSQL data directory?")
    member, data = r.pg_control
    entry = Entry(PG_CONTROL, "file", len(data), member.mode, member.mtime * 1_000_000_000, member.uid, member.gid,
                  data=data)
    object_name = layout.with_extension(layout.PG_CONTROL_TAR, r.ext)
    stream = TarPartStream(iter([entry]), uploader.pool, uploader.reader, depth=plan.depth)
    await uploader.upload(r.storage, layout.part_key(r.name, object_name), stream, r.counter, plan.parallel)
    r.parts.append(object_name)


# --- WAL ------------------------------------------------------------------------------------------------

async def _await_wal(r: _Remote, candidates: Candidates, poll: tuple[float, float] = (0.02, 0.5),
                     warn_every: float = 60.0) -> None:
    """The WAL from the backup's start to its end (and the backup history file) is in storage before the
    sentinel: the server's archiver stores it (the BASE_BACKUP did not wait for that), looked for at
    `poll` intervals, the first doubling up to the second. A standby that does not archive itself
    (archive_mode = on) leaves it to its primary's archiver, not awaited, as local mode does."""
    info = r.info
    assert r.started is not None and r.ended is not None
    if not archiving_applies(info):
        log.info("the server is a standby that does not archive (archive_mode = on): its primary's archive "
                 "must hold the backup's WAL, which is not awaited")
        return
    names = backup_wal_files(r.started.timeline, r.started.lsn, r.ended.lsn, info.segment_size)
    if info.in_recovery:
        names = names[1:]  # a standby writes no backup history file
    timeout = r.settings.stop_backup_timeout
    began = warned = time.monotonic()
    interval, longest = poll
    for name in names:
        while not await _archived(r, name, candidates):
            now = time.monotonic()
            if timeout and now - began >= timeout:
                raise BackupError(f"{name} is not in the archive {timeout:.0f} s after the backup's end",
                                  detail="the backup needs it to be restorable; no sentinel was written",
                                  hint="check that the server's archive_command succeeds (pg_stat_archiver, the "
                                       "server log) and stores into this storage; WALG_STOP_BACKUP_TIMEOUT sets "
                                       "how long to wait")
            if now - warned >= warn_every:
                warned = now
                log.warning(f"still waiting for {name} to be archived after {now - began:.0f} s")
            await asyncio.sleep(interval)
            interval = min(longest, interval * 2)
    log.info(f"WAL up to {names[-1]} is in the archive")


async def _archived(r: _Remote, name: str, candidates: Candidates) -> bool:
    keys = [key for key, _ in candidates(name, r.settings.compression_method)]
    present = await r.storage.keys_with_prefix(layout.wal_key(name))
    if present is not None:
        return any(key in present for key in keys)
    for key in keys:
        if await r.storage.exists(key):
            return True
    return False


# --- finish ---------------------------------------------------------------------------------------------

async def _finish(r: _Remote, permanent: bool, user_data: Any) -> None:
    """metadata.json and files_metadata.json, then the sentinel, last."""
    assert r.started is not None and r.ended is not None
    info = r.info
    finish_time = now_utc_micro()
    data_dir = info.data_directory.rstrip("/")
    # WAL-G's remote mode always writes the spec, with the server's tablespaces (their locations there)
    spec = TablespaceSpec(base_prefix=data_dir, locations={str(t.oid): t.location or "" for t in r.tablespaces})
    sentinel = Sentinel(
        start_lsn=r.started.lsn, finish_lsn=r.ended.lsn, pg_version=info.version_num,
        system_identifier=r.identity.system_id, uncompressed_size=r.feed.raw_bytes,
        compressed_size=r.counter.bytes, data_catalog_size=0, spec=spec, user_data=user_data,
        start_time=r.start_time, finish_time=finish_time, hostname=socket.gethostname(), data_dir=data_dir,
        is_permanent=permanent, version=2)
    metadata = ExtendedMetadata(
        start_time=r.start_time, finish_time=finish_time, hostname=sentinel.hostname, data_dir=data_dir,
        pg_version=info.version_num, start_lsn=r.started.lsn, finish_lsn=r.ended.lsn, is_permanent=permanent,
        system_identifier=sentinel.system_identifier, uncompressed_size=r.feed.raw_bytes,
        compressed_size=r.counter.bytes, user_data=user_data)
    # no TarFileSets, as WAL-G's remote mode: a partial restore reads every part
    files_metadata = FilesMetadata(files=r.files)
    await gather_all([r.storage.put_bytes(layout.backup_key(r.name, layout.METADATA), metadata.to_json()),
                      r.storage.put_bytes(layout.backup_key(r.name, layout.FILES_METADATA), files_metadata.to_json())])
    await r.storage.put_bytes(layout.sentinel_key(r.name), sentinel.to_json())
