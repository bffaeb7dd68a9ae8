"""backup-push: a non-exclusive base backup of a local data directory into WAL-G's layout."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterator, Protocol

from walrus import codec
from walrus.aio import gather_all
from walrus.tar.write import BLOCK, Entry, TarPartStream, padding, window_quota
from walrus.backup.blockmap import MapChoice, MapJoin, load_block_map, log_choice, prefetch_stored_maps
from walrus.backup.delta import DeltaBase, DeltaChoice, check_base, choose_base, delta_name
from walrus.backup.common import BackupPushResult, archiving_applies, backup_wal_files, check_server_settings
from walrus.backup.dto import (ExtendedMetadata, FileDescription, FilesMetadata, Sentinel, TablespaceSpec,
                               now_utc_micro, system_identifier_from_pg)
from walrus.backup.mark import backup_mark
from walrus.backup.partial import databases_by_names
from walrus.backup.verifypages import PageVerification
from walrus.backup.walk import WalkResult, walk_data_directory
from walrus.config import Settings
from walrus.errors import BackupError, WalrusError
from walrus.log import log
from walrus.pg.pages import increment_size, is_paged_file
from walrus.progress import Progress
from walrus.pg.walmap import BlockMap
from walrus.pg.client import BackupStart, BackupStop, PgSession, ServerInfo
from walrus.pg.xlog import backup_name_for, format_lsn
from walrus.ratelimit import RateLimiter
from walrus.runtime import cpu_count, raise_nofile_limit
from walrus.storage import layout
from walrus.storage.base import Storage
from walrus.stream.upload import PoolPlan, Uploader, upload_threads
from walrus.stream.stages import Counter, blocks_in_flight, metered

UTILITY_MEMBERS = ("/global/pg_control", "backup_label", "tablespace_map")


@dataclass
class _Collected:
    """What the parts packed, for files_metadata.json and the sentinel's sizes."""

    files: dict[str, FileDescription] = field(default_factory=dict)
    tar_file_sets: dict[str, list[str]] = field(default_factory=dict)
    uncompressed: int = 0

    def record(self, entry: Entry) -> None:
        self.uncompressed += increment_size(len(entry.blocks)) if entry.incremented else entry.size
        if entry.name not in UTILITY_MEMBERS:
            # nanoseconds matter: WAL-G's delta skips a file only when its MTime matches exactly
            self.files[entry.name] = FileDescription.for_mtime_ns(entry.mtime_ns, is_incremented=entry.incremented)
        entry.blocks = None

    def skip(self, entry: Entry) -> None:
        """A delta's file unchanged since its base: no member, only its description."""
        self.files[entry.name] = FileDescription.for_mtime_ns(entry.mtime_ns, is_skipped=True)


def delta_entries(entries: Iterator[Entry], base: DeltaBase, collected: _Collected,
                  block_map: BlockMap | None = None) -> Iterator[Entry]:
    """WAL-G's choice per file of a delta: one the base holds with the very same mtime is skipped;
    a paged file the base holds becomes an increment of the pages changed since the base's start
    (the blocks the WAL block map names, else those a page scan finds); any other file is copied
    whole, as is a relation the map says was created anew."""
    for entry in entries:
        if entry.kind == "file" and entry.data is None:
            known = base.files.lookup(entry.name)
            if known is not None:
                if known.mtime_ns == entry.mtime_ns:
                    collected.skip(entry)
                    continue
                relpath = entry.name.lstrip("/")
                if is_paged_file(relpath, entry.size):
                    if block_map is None:
                        entry.delta_lsn = base.lsn
                    else:
                        entry.blocks = block_map.blocks(relpath, entry.size)
        yield entry


class _SharedEntries:
    """The walk, pulled by several part lanes in turn (all on the event loop thread)."""

    def __init__(self, entries: Iterator[Entry]):
        self._it = entries

    def take_first(self) -> Entry | None:
        return next(self._it, None)

    def rest(self) -> Iterator[Entry]:
        return self._it


# Stores WAL files of pg_wal (names) into storage as archive_command would: the wal-push engine's,
# handed down by the command (an engine does not import another).
ArchiveWal = Callable[[Settings, Storage, str, list[str]], Awaitable[None]]


async def _await_wal(push: _Push, archive: ArchiveWal | None) -> None:
    """The WAL the backup needs is durable before its sentinel. Files the archiver has not stored yet
    are stored here, from pg_wal, once PostgreSQL has marked them complete (.ready): a backup then
    does not wait for archive_command to start and run once per file. Where that is not possible
    (no .ready yet, a file gone meanwhile, a failure), the archiver's own result is awaited."""
    info, stop = push.info, push.stop
    if not archiving_applies(info):
        return
    names = backup_wal_files(push.start.timeline, push.start.lsn, stop.lsn, info.segment_size)
    wal_dir = os.path.join(push.pgdata, "pg_wal")
    status = os.path.join(wal_dir, "archive_status")
    pending = [n for n in names if not os.path.exists(os.path.join(status, n + ".done"))
               and os.path.exists(os.path.join(wal_dir, n))]
    if archive is not None and pending and all(os.path.exists(os.path.join(status, n + ".ready")) for n in pending):
        try:
            await archive(push.settings, push.storage, wal_dir, pending)
        except WalrusError as e:
            log.warning(f"could not store the backup's WAL ({e.message}); waiting for the archiver instead")
        else:
            log.info(f"WAL up to {names[-1]} is stored ({len(pending)} file(s) stored by backup-push)")
            return
    await wait_for_archiver(push.pgdata, names, push.settings.stop_backup_timeout)


async def wait_for_archiver(pgdata: str, names: list[str], timeout: float, poll: float = 0.02,
                            warn_every: float = 60.0) -> None:
    """Wait until each WAL file is archived, by PostgreSQL's own test (XLogArchiveIsBusy): its
    archive_status/<name>.done exists, or the file is gone from pg_wal (archived and recycled).
    Gives up after `timeout` seconds (0: never), as WAL-G's statement_timeout on pg_backup_stop does."""
    wal = os.path.join(pgdata, "pg_wal")
    began = time.monotonic()
    warned = began
    for name in names:
        while not os.path.exists(os.path.join(wal, "archive_status", name + ".done")) \
                and os.path.exists(os.path.join(wal, name)):
            now = time.monotonic()
            if timeout and now - began >= timeout:
                raise BackupError(f"{name} was not archived within {timeout:.0f} s of the backup's end",
                                  detail="the backup needs it to be restorable; it is not stored, and no sentinel "
                                         "was written",
                                  hint="check that archive_command succeeds (pg_stat_archiver, the server log); "
                                       "WALG_STOP_BACKUP_TIMEOUT sets how long to wait")
            if now - warned >= warn_every:
                warned = now
                log.warning(f"still waiting for {name} to be archived after {now - began:.0f} s; "
                            "check that archive_command succeeds (pg_stat_archiver, the server log)")
            await asyncio.sleep(poll)
    log.info(f"WAL up to {names[-1]} is archived")


def _check_server(info, pgdata: str, settings: Settings, archive_check: bool = True) -> None:
    if os.path.realpath(pgdata) != os.path.realpath(info.data_directory):
        raise BackupError(f"{pgdata} is not the data directory of the server walrus connected to",
                          detail=f"the server's data_directory is {info.data_directory}",
                          hint="pass the server's data directory, or set PGHOST/PGPORT to the right server")
    check_server_settings(info, settings, archive_check)


class PgBackupSession(Protocol):
    """The PostgreSQL session the phases drive: walrus.pg.client.PgSession, or a test's own."""

    def server_info(self) -> ServerInfo: ...

    def backup_start(self, label: str, version_num: int) -> BackupStart: ...

    def backup_stop(self, version_num: int, wait_for_archive: bool = True) -> BackupStop: ...

    def close(self) -> None: ...


# Reads the databases' relations by name for partial restore (None: they could not be read):
# walrus.backup.partial.databases_by_names, or a test's own.
ReadCatalog = Callable[[Settings, PgBackupSession], Awaitable[dict[str, Any] | None]]


@dataclass
class _Push:
    """One backup in the making: what each phase leaves for the next."""

    settings: Settings
    storage: Storage
    pgdata: str
    session: PgBackupSession
    info: ServerInfo
    start: BackupStart
    start_time: datetime
    name: str
    ext: str  # the compression's file extension
    plan: PoolPlan
    lanes: int
    walk: WalkResult = field(default_factory=WalkResult)
    collected: _Collected = field(default_factory=_Collected)
    counter: Counter = field(default_factory=Counter)
    stop: BackupStop | None = None
    reader: str = ""  # the file reader's name, for the result
    disk: RateLimiter | None = None  # WALG_DISK_RATE_LIMIT: one bucket for the reads of every part
    base: DeltaBase | None = None  # a delta's base; None for a full backup
    block_map: MapChoice | None = None  # a delta's WAL block map, or why it scans pages
    windows: asyncio.Semaphore | None = None  # pool buffers the parts' delta reads may hold at once
    pages: PageVerification | None = None  # --verify's checks
    corrupt: dict[str, list[int]] | None = None  # what they found
    progress: Progress | None = None  # the status line on a terminal, fed the parts' buffers
    catalog: asyncio.Future | None = None  # the databases' relations by name, read from the stop on


async def backup_push(settings: Settings, storage: Storage, pgdata: str, *, permanent: bool = False,
                      user_data: Any = None, full: bool = False, delta_from_name: str | None = None,
                      delta_from_user_data: Any = None,
                      connect: Callable[[Settings], PgBackupSession] = PgSession,
                      names: ReadCatalog = databases_by_names,
                      archive: ArchiveWal | None = None, archive_check: bool = True,
                      progress: Progress | None = None) -> BackupPushResult:
    """Phases: choose the delta base (or a full backup), start (pg_backup_start; a delta's base is
    checked against it), upload data (the walk's tar parts; a delta skips and increments files), upload control files
    (pg_control.tar stored while pg_backup_stop runs, then backup_label.tar), WAL and metadata at
    once (what the backup needs is stored: by `archive`, else by the archiver, awaited; metadata.json
    and files_metadata.json), then the sentinel, last: a backup exists if and only if its sentinel
    does."""
    began = time.monotonic()
    if not os.path.isdir(pgdata):
        raise BackupError(f"data directory {pgdata} does not exist", hint="pass the PostgreSQL data directory")
    storage.check_writer()  # before the server is asked for anything
    # the connection (and the client library's import) is made while the base is chosen
    connecting = asyncio.ensure_future(asyncio.to_thread(connect, settings))
    try:
        choice = await choose_base(settings, storage, permanent=permanent, full=full, from_name=delta_from_name,
                                   from_user_data=delta_from_user_data)
    except BaseException:
        _discard(connecting)
        raise
    log.info(f"backup-push: {choice.reason}" if choice.base else f"full backup: {choice.reason}")
    # a delta's stored block maps are fetched while the connection is made
    maps = asyncio.ensure_future(prefetch_stored_maps(settings, storage, choice.base)) if choice.base else None
    try:
        session = await connecting
    except BaseException:
        await _cancelled(maps)
        raise
    push: _Push | None = None
    try:
        push = await _start(settings, storage, pgdata, session, choice, archive_check, maps)
        if progress is not None:
            push.progress = progress
            _estimate_total(push)
        raise_nofile_limit()  # parts keep the files of their in-flight buffers open
        with Uploader(settings, push.plan.count, push.plan.buffer_size, push.lanes * upload_threads(push.plan.parallel),
                      register=True, name="walrus-compress") as uploader:
            push.reader = uploader.reader.name
            await _upload_data(push, uploader)
            await _upload_control_files(push, uploader, names)
        if progress is not None:
            progress.note = "storing the backup's WAL"
        # the backup's WAL and its metadata are stored at once, both durable before the sentinel;
        # the WAL after the pool is unmapped: storing it uses buffers of its own
        _, sentinel = await gather_all([_await_wal(push, archive), _store_metadata(push, permanent, user_data)])
        await push.storage.put_bytes(layout.sentinel_key(push.name), sentinel.to_json())
    finally:
        await _cancelled(maps)  # when the backup failed before it needed them
        await _cancelled(push.catalog if push is not None else None)
        await asyncio.to_thread(session.close)
    return BackupPushResult(name=push.name, start_lsn=push.start.lsn, finish_lsn=push.stop.lsn,
                            uncompressed_size=push.collected.uncompressed, compressed_size=push.counter.bytes,
                            parts=sorted(push.collected.tar_file_sets), files=len(push.collected.files),
                            seconds=time.monotonic() - began, reader=push.reader, storage=storage.describe(),
                            delta_from=push.base.name if push.base else None,
                            delta_method=None if push.base is None else
                            "block map" if push.block_map and push.block_map.map is not None else "page scan",
                            corrupt_blocks=push.corrupt)


async def _cancelled(task: asyncio.Future | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _discard(connecting: asyncio.Future) -> None:
    """Close a session no longer wanted once its connection is made, without waiting for it (a
    SIGTERM must not wait for a connect); a connection that failed has nothing to close."""
    def close(made: asyncio.Future) -> None:
        if not made.cancelled() and made.exception() is None:
            made.result().close()

    connecting.add_done_callback(close)


async def _start(settings: Settings, storage: Storage, pgdata: str, session: PgBackupSession,
                 choice: DeltaChoice, archive_check: bool = True,
                 maps: "asyncio.Future[MapJoin] | None" = None) -> _Push:
    info = await asyncio.to_thread(session.server_info)
    _check_server(info, pgdata, settings, archive_check)
    start_time = now_utc_micro()
    start = await asyncio.to_thread(session.backup_start, start_time.isoformat(), info.version_num)
    name = backup_name_for(start.timeline, start.lsn, info.segment_size)
    block_map = None
    if choice.base is not None:
        check_base(choice.base, start.lsn, system_identifier_from_pg(info.system_identifier))
        name = delta_name(name, choice.base)
        block_map = await load_block_map(settings, storage, pgdata, choice.base, start.lsn, start.timeline,
                                         None if maps is None else await maps)
    log.info(f"backup {name} started at {format_lsn(start.lsn)} (timeline {start.timeline})")
    if block_map is not None:
        log_choice(block_map)
    lanes = settings.upload_disk_concurrency
    # each part's buffers are compressed on every core, so the last part is not left to one
    plan = PoolPlan.for_settings(settings, lanes, parallel=cpu_count(), reserved=storage.upload_memory)
    disk = RateLimiter(settings.disk_rate_limit) if settings.disk_rate_limit is not None else None
    pages = (PageVerification(pgdata, start.lsn, settings.store_all_corrupt_blocks)
             if settings.verify_page_checksums else None)
    return _Push(settings, storage, pgdata, session, info, start, start_time, name,
                 codec.extension(settings.compression_method), plan, lanes, disk=disk, base=choice.base,
                 block_map=block_map,
                 windows=asyncio.Semaphore(window_quota(plan.count, lanes, blocks_in_flight(plan.parallel))),
                 pages=pages)


async def _upload_data(push: _Push, uploader: Uploader) -> None:
    """The data directory's files as tar parts, `lanes` parts filled at once from the one walk."""
    part_numbers = itertools.count(1)
    entries = walk_data_directory(push.pgdata, push.walk)
    if push.base is not None:
        entries = delta_entries(entries, push.base, push.collected, push.block_map.map if push.block_map else None)
    shared = _SharedEntries(entries)

    async def lane() -> None:
        while (first := shared.take_first()) is not None:
            object_name = layout.part_object_name(next(part_numbers), push.ext)
            await _upload_part(push, uploader, itertools.chain([first], shared.rest()), object_name,
                               push.settings.tar_size_threshold)

    await gather_all([lane() for _ in range(push.lanes)])


async def _upload_control_files(push: _Push, uploader: Uploader, names: ReadCatalog) -> None:
    """pg_control.tar, then pg_backup_stop and backup_label.tar. pg_control is read before the stop
    (the copy WAL-G and pg_basebackup take last, while the backup is still on) and stored while the
    server stops the backup; the catalog is read from the stop on (`push.catalog`)."""
    if push.walk.pg_control is None:
        raise BackupError(f"{push.pgdata} has no global/pg_control", hint="is this a PostgreSQL data directory?")
    control = await asyncio.to_thread(_read_into_memory, push.walk.pg_control)
    await gather_all([_upload_part(push, uploader, iter([control]),
                                   layout.with_extension(layout.PG_CONTROL_TAR, push.ext), None),
                      _stop(push, uploader, names)])


def _read_into_memory(entry: Entry) -> Entry:
    """A small file's member with its bytes read now (its size as read)."""
    try:
        with open(entry.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BackupError(f"could not read {entry.path}: {e.strerror}",
                          hint="the data directory changed under the backup; no sentinel was written") from e
    return dataclasses.replace(entry, path=None, data=data, size=len(data))


async def _stop(push: _Push, uploader: Uploader, names: ReadCatalog) -> None:
    """pg_backup_stop, then backup_label.tar; the catalog's read begins at the stop."""
    # PostgreSQL's own wait for the archiver polls once a second; walrus stops without it and makes
    # the WAL durable itself (_await_wal)
    info = push.info
    push.stop = stop = await asyncio.to_thread(push.session.backup_stop, info.version_num, False)
    if not push.settings.disable_partial_restore:  # the catalog as the backup ended
        push.catalog = asyncio.ensure_future(names(push.settings, push.session))
    label, spcmap = stop.label.encode(), stop.tablespace_map.encode()
    label_entries = [Entry("backup_label", "file", len(label), 0o600, data=label),
                     Entry("tablespace_map", "file", len(spcmap), 0o600, data=spcmap)]
    await _upload_part(push, uploader, iter(label_entries), layout.with_extension(layout.BACKUP_LABEL_TAR, push.ext),
                       None)


async def _upload_part(push: _Push, uploader: Uploader, entries: Iterator[Entry], object_name: str,
                       threshold: int | None) -> None:
    s = push.settings
    stream = TarPartStream(entries, uploader.pool, uploader.reader, threshold=threshold, depth=push.plan.depth,
                           direct_min=s.direct_io_min if s.direct_io else None, on_member=push.collected.record,
                           limiter=push.disk, windows=push.windows,
                           checker=push.pages.checker if push.pages is not None else None)
    buffers = stream if push.progress is None else metered(stream, push.progress.add, _buffer_length)
    await uploader.upload(push.storage, layout.part_key(push.name, object_name), buffers, push.counter,
                          push.plan.parallel)
    push.collected.tar_file_sets[object_name] = stream.members
    if push.progress is not None:
        push.progress.part_done()
    log.info(f"uploaded {object_name} ({stream.data_size} bytes of files)")


def _buffer_length(buf) -> int:
    return buf.length


def _estimate_total(push: _Push) -> None:
    """The progress line's total, from a walk of its own on a thread, set once it is done (the
    backup's walk goes along with the reads, so its total is known only at the end)."""
    block_map = push.block_map.map if push.block_map else None
    if push.base is not None and block_map is None:
        return  # a page scan finds a delta's pages as it reads them: no total to show
    progress = push.progress
    assert progress is not None

    def estimated(job: asyncio.Future) -> None:
        if not job.cancelled() and job.exception() is None:
            progress.set_total(job.result())

    asyncio.ensure_future(asyncio.to_thread(_tar_bytes, push.pgdata, push.base, block_map)).add_done_callback(estimated)


def _tar_bytes(pgdata: str, base: DeltaBase | None, block_map: BlockMap | None) -> int:
    """The bytes the parts will carry as the data directory stands: each member's header and its
    bytes (a delta's unchanged files none, its increments their changed pages), pg_control's part
    and backup_label's. Its walk's warnings are left to the backup's walk."""
    quiet = _QuietThread()
    log.addFilter(quiet)
    try:
        entries: Iterator[Entry] = walk_data_directory(pgdata, WalkResult())
        if base is not None:
            entries = delta_entries(entries, base, _Collected(), block_map)
        total = 2 * (BLOCK + 8192 + 2 * BLOCK)  # pg_control.tar and backup_label.tar, about
        for entry in entries:
            size = increment_size(len(entry.blocks)) if entry.blocks is not None else entry.size
            total += BLOCK + size + padding(size)
        return total
    finally:
        log.removeFilter(quiet)


class _QuietThread(logging.Filter):
    """Drops the records of the thread that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


async def _store_metadata(push: _Push, permanent: bool, user_data: Any) -> Sentinel:
    """metadata.json and files_metadata.json, durable; returns the sentinel, which the caller
    stores last."""
    if push.pages is not None:
        push.corrupt = await asyncio.to_thread(push.pages.corrupt_blocks)
        for name, blocks in push.corrupt.items():
            push.collected.files[name] = dataclasses.replace(push.collected.files[name],
                                                             corrupt_blocks=push.pages.record(blocks))
    # None: partial restore off, or the relations could not be read
    catalog = None if push.catalog is None else await push.catalog
    info, start, stop, storage, base = push.info, push.start, push.stop, push.storage, push.base
    finish_time = now_utc_micro()
    spec = TablespaceSpec(base_prefix=os.path.realpath(push.pgdata).rstrip("/"),
                          locations=dict(push.walk.tablespaces)) if push.walk.tablespaces else None
    sentinel = Sentinel(
        start_lsn=start.lsn, finish_lsn=stop.lsn, pg_version=info.version_num,
        system_identifier=system_identifier_from_pg(info.system_identifier),
        uncompressed_size=push.collected.uncompressed, compressed_size=push.counter.bytes,
        data_catalog_size=push.walk.data_catalog_size, spec=spec, user_data=user_data,
        files_metadata_disabled=False, delta_lsn=base.lsn if base else None, delta_from=base.name if base else None,
        delta_full_name=base.full_name if base else None, delta_count=base.count if base else None,
        start_time=push.start_time, finish_time=finish_time, hostname=socket.gethostname(),
        data_dir=os.path.realpath(info.data_directory), is_permanent=permanent, version=2,
        legacy_files=None, legacy_tar_file_sets=None)
    metadata = ExtendedMetadata(
        start_time=push.start_time, finish_time=finish_time, hostname=sentinel.hostname, data_dir=sentinel.data_dir,
        pg_version=info.version_num, start_lsn=start.lsn, finish_lsn=stop.lsn, is_permanent=permanent,
        system_identifier=sentinel.system_identifier, uncompressed_size=push.collected.uncompressed,
        compressed_size=push.counter.bytes, user_data=user_data)
    # the catalog as the backup ended, as WAL-G reads it (a relation rewritten during the backup has
    # its new file number, which recovery recreates); a failure here is a warning, never the backup's
    files_metadata = FilesMetadata(files=push.collected.files, tar_file_sets=push.collected.tar_file_sets,
                                   databases_by_names=catalog)
    if permanent and base is not None:  # before this backup's metadata: marks go up the chain in order
        await backup_mark(push.settings, storage, base.name, permanent=True)
    await gather_all([storage.put_bytes(layout.backup_key(push.name, layout.METADATA), metadata.to_json()),
                      storage.put_bytes(layout.backup_key(push.name, layout.FILES_METADATA), files_metadata.to_json())])
    return sentinel
