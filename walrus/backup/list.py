"""backup-list, backup selection (LATEST by sentinel LastModified, as WAL-G picks it), and the backups retention plans over."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from walrus.backup.dto import ExtendedMetadata, FilesMetadata, Sentinel, format_go_time, go_json
from walrus.backup.retention import Backup, RetentionError, segment_range, wal_token
from walrus.errors import BackupError, CorruptObject, ObjectNotFound
from walrus.log import log
from walrus.pg.xlog import BACKUP_NAME_RE, first_wal_name_in, format_lsn
from walrus.progress import format_size
from walrus.storage import layout
from walrus.storage.base import ObjectInfo, Storage
from walrus.table import box_table


@dataclass
class BackupInfo:
    name: str
    modified: Any  # datetime of the sentinel object
    wal_file_name: str
    storage_name: str
    metadata: ExtendedMetadata | None = None

    def as_json(self, detail: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"backup_name": self.name, "time": format_go_time(self.modified),
                               "wal_file_name": self.wal_file_name, "storage_name": self.storage_name}
        if detail and self.metadata is not None:
            out.update(json.loads(self.metadata.to_json()))
        return out


async def list_backups(storage: Storage) -> list[BackupInfo]:
    """Backups are the sentinels in basebackups_005/, oldest first by LastModified (stable)."""
    found: list[tuple[ObjectInfo, str]] = []
    async for obj in storage.list(layout.BASEBACKUPS):
        name = layout.backup_name_from_sentinel(obj.name)
        if name is not None and BACKUP_NAME_RE.match(name):
            found.append((obj, name))
    found.sort(key=lambda pair: pair[0].mtime)
    return [BackupInfo(name, obj.mtime, first_wal_name_in(name) or "", storage.name) for obj, name in found]


async def load_details(storage: Storage, backups: list[BackupInfo]) -> list[BackupInfo]:
    """--detail: metadata.json of each backup (a missing one is fatal, as in WAL-G); sorted by start_time."""
    for b in backups:
        try:
            b.metadata = ExtendedMetadata.from_json(await storage.get_bytes(layout.backup_key(b.name, layout.METADATA)))
        except ObjectNotFound:
            raise BackupError(f"backup {b.name} has no {layout.METADATA}",
                              hint="backup-list without --detail still lists it") from None
    backups.sort(key=lambda b: b.metadata.start_time)
    return backups


async def resolve_backup(storage: Storage, name: str) -> str:
    """LATEST means the newest sentinel by LastModified; a name must have its sentinel."""
    if name == "LATEST":
        backups = await list_backups(storage)
        if not backups:
            raise BackupError("no backups found", detail=f"no sentinels in {layout.BASEBACKUPS}/ of {storage.describe()}",
                              hint="run backup-push first, or check WALG_*_PREFIX")
        return backups[-1].name
    if "/" in name or not await storage.exists(layout.sentinel_key(name)):
        raise BackupError(f"backup {name} not found", detail=f"no {name}{layout.SENTINEL_SUFFIX}",
                          hint="backup-list shows the backups in this storage")
    return name


async def resolve_by_user_data(storage: Storage, user_data: Any, segment_size: int) -> str:
    """The one backup whose user data (metadata.json's, else the sentinel's) equals user_data."""
    matches = [b.name for b in await load_backups(storage, segment_size) if b.user_data == user_data]
    if len(matches) != 1:
        shown = json.dumps(user_data)
        raise BackupError(f"no backup has the user data {shown}" if not matches
                          else f"{len(matches)} backups have the user data {shown}",
                          detail=", ".join(matches[:5]) if matches else None,
                          hint="backup-list --detail --json shows each backup's user_data; "
                               "give the backup name instead")
    return matches[0]


LOADS_AT_ONCE = 16  # sentinels and metadata.json read concurrently


async def load_backups(storage: Storage, segment_size: int, use_sentinel_time: bool = False) -> list[Backup]:
    """Every complete backup, with what the planner needs from its sentinel and metadata.json.

    Permanence is metadata.json's is_permanent (WAL-G's source of truth, which backup-mark
    rewrites); the sentinel's IsPermanent stands in only where metadata.json is missing."""
    listed = await list_backups(storage)
    gate = asyncio.Semaphore(LOADS_AT_ONCE)

    async def one(info) -> tuple[Backup, datetime | None]:
        async with gate:
            try:
                sentinel = Sentinel.from_json(await storage.get_bytes(layout.sentinel_key(info.name)),
                                              source=f"sentinel of {info.name}")
            except ObjectNotFound:
                return None  # deleted meanwhile (another delete): not a backup any more
            except CorruptObject as e:
                raise RetentionError(f"backup {info.name} cannot be planned for: its sentinel is unreadable",
                                     detail=e.detail or e.message,
                                     hint=f"delete target {info.name} --confirm removes it, or move "
                                          f"{layout.sentinel_key(info.name)} aside") from None
            try:
                meta = ExtendedMetadata.from_json(await storage.get_bytes(layout.backup_key(info.name, layout.METADATA)),
                                                  source=f"metadata.json of {info.name}")
            except ObjectNotFound:
                meta = None
            except CorruptObject:
                log.warning(f"metadata.json of {info.name} is unreadable: its sentinel's permanence and times are used")
                meta = None
        timeline, segno = wal_token(info.name, segment_size) or (1, 0)
        start_lsn = meta.start_lsn if meta else sentinel.start_lsn
        finish_lsn = meta.finish_lsn if meta else sentinel.finish_lsn
        finish = segment_range(start_lsn or 0, finish_lsn, segment_size)[1] if finish_lsn else None
        start_time = meta.start_time if meta and meta.start_time.year > 1 else sentinel.start_time
        return Backup(
            name=info.name, time=info.modified, timeline=timeline, start_segno=segno, finish_segno=finish,
            permanent=meta.is_permanent if meta else sentinel.is_permanent,
            delta_from=sentinel.delta_from, delta_full=sentinel.delta_full_name,
            user_data=meta.user_data if meta and meta.user_data is not None else sentinel.user_data,
        ), start_time

    loaded = [r for r in await asyncio.gather(*(one(b) for b in listed)) if r is not None]
    if use_sentinel_time:
        if all(start is not None for _, start in loaded):
            return [Backup(**{**b.__dict__, "time": start}) for b, start in loaded]
        log.warning("--use-sentinel-time: some backups have no start time; ordering by the sentinels' modification time")
    return [b for b, _ in loaded]


def _columns(b: BackupInfo, detail: bool) -> list[tuple[str, str, str, str | None]]:
    """WAL-G's printable fields of a backup: (name, pretty name, value, pretty value or None)."""
    fields = [("backup_name", "Backup name", b.name, None),
              ("modified", "Modified", _rfc3339(b.modified), _rfc850(b.modified)),
              ("wal_file_name", "WAL file name", b.wal_file_name, None),
              ("storage_name", "Storage name", b.storage_name, None)]
    if detail and b.metadata is not None:
        m = b.metadata
        fields += [("start_time", "Start time", _rfc3339(m.start_time), _rfc850(m.start_time)),
                   ("finish_time", "Finish time", _rfc3339(m.finish_time), _rfc850(m.finish_time)),
                   ("hostname", "Hostname", m.hostname, None),
                   ("data_dir", "Datadir", m.data_dir, None),
                   ("pg_version", "PG version", str(m.pg_version), None),
                   ("start_lsn", "Start LSN", format_lsn(m.start_lsn), None),
                   ("finish_lsn", "Finish LSN", format_lsn(m.finish_lsn), None),
                   ("is_permanent", "Permanent", "true" if m.is_permanent else "false", None),
                   # walrus's own, after WAL-G's: raw numbers in the columns, readable ones in the table
                   ("uncompressed_size", "Uncompressed size", str(m.uncompressed_size),
                    format_size(m.uncompressed_size)),
                   ("compressed_size", "Compressed size", str(m.compressed_size), format_size(m.compressed_size)),
                   ("duration", "Duration", *_duration(m.start_time, m.finish_time))]
    return fields


RIGHT_ALIGNED = frozenset({"uncompressed_size", "compressed_size", "duration"})


def _duration(start: datetime, finish: datetime) -> tuple[str, str]:
    """finish - start: seconds (to the millisecond), and h:mm:ss; "-" where a time is missing."""
    if start.year <= 1 or finish.year <= 1:
        return "-", "-"
    seconds = max(0.0, (finish - start).total_seconds())
    whole = int(seconds + 0.5)
    return f"{seconds:.3f}", f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _rfc3339(dt: datetime) -> str:
    return "-" if dt.year <= 1 else format_go_time(dt.replace(microsecond=0))


def _rfc850(dt: datetime) -> str:
    """Go's time.RFC850 layout ("Monday, 02-Jan-06 15:04:05 MST"), WAL-G's --pretty times."""
    if dt.year <= 1:
        return "-"
    zone = dt.tzname() or ""
    if zone.startswith("UTC") and zone != "UTC":  # a fixed offset without a name: Go prints it numerically
        zone = dt.strftime("%z")
    return dt.strftime("%A, %d-%b-%y %H:%M:%S ") + zone


def render(backups: list[BackupInfo], detail: bool, pretty: bool, as_json: bool) -> str | None:
    """backup-list's output, WAL-G's three shapes: JSON (indented with --pretty), a boxed table
    (--pretty), or columns aligned by spaces; None for a table without backups (nothing printed)."""
    if as_json:
        return go_json([b.as_json(detail) for b in backups], "    " if pretty else None)
    if not backups:
        return None
    rows = [_columns(b, detail) for b in backups]
    if not pretty:
        lines = [[name for name, _, _, _ in rows[0]]] + [[value for _, _, value, _ in row] for row in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        return "\n".join(" ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    # go-pretty's default style, rows numbered from 0 (right-aligned)
    header = ["#"] + [pretty_name for _, pretty_name, _, _ in rows[0]]
    body = [[str(i)] + [shown if shown is not None else value for _, _, value, shown in row]
            for i, row in enumerate(rows)]
    return box_table(header, body, [True] + [name in RIGHT_ALIGNED for name, _, _, _ in rows[0]])


async def read_files_metadata(storage: Storage, name: str, sentinel: Sentinel) -> FilesMetadata | None:
    """files_metadata.json of backup `name`, else the file list old WAL-G versions kept in the
    sentinel; None where the backup has none (version 1, or written without it)."""
    try:
        return FilesMetadata.from_json(await storage.get_bytes(layout.backup_key(name, layout.FILES_METADATA)))
    except ObjectNotFound:
        legacy = sentinel.legacy_files_metadata()
        if legacy is not None:
            return legacy
        if sentinel.version >= 2 and not sentinel.files_metadata_disabled:
            raise CorruptObject(f"backup {name} has no {layout.FILES_METADATA}",
                                 hint="a version-2 backup needs it; the backup may be incomplete") from None
        return None


async def read_sentinel(storage: Storage, name: str, absent: Exception | None = None) -> Sentinel | None:
    """Backup `name`'s sentinel; where it has none, `absent` is raised if given, else None returned."""
    try:
        return Sentinel.from_json(await storage.get_bytes(layout.sentinel_key(name)), source=f"sentinel of {name}")
    except ObjectNotFound:
        if absent is not None:
            raise absent from None
        return None
