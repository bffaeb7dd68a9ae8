"""backup-list, backup selection (LATEST by sentinel LastModified, as WAL-G picks it), and the backups retention plans over."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from walrus.backup.dto import ExtendedMetadata, Sentinel, format_go_time
from walrus.backup.retention import Backup, RetentionError, segment_range, wal_token
from walrus.errors import BackupError, CorruptObject, ObjectNotFound
from walrus.log import log
from walrus.pg.xlog import BACKUP_NAME_RE, first_wal_name_in, format_lsn
from walrus.storage import layout
from walrus.storage.base import ObjectInfo, Storage


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


def render_table(backups: list[BackupInfo], detail: bool) -> str:
    header = ["backup_name", "modified", "wal_file_name", "storage_name"]
    if detail:
        header += ["start_time", "finish_time", "hostname", "data_dir", "pg_version", "start_lsn",
                   "finish_lsn", "is_permanent"]
    rows = [header]
    for b in backups:
        row = [b.name, b.modified.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
               b.wal_file_name, b.storage_name]
        if detail and b.metadata is not None:
            m = b.metadata
            row += [format_go_time(m.start_time.replace(microsecond=0)), format_go_time(m.finish_time.replace(microsecond=0)),
                    m.hostname, m.data_dir, str(m.pg_version), format_lsn(m.start_lsn),
                    format_lsn(m.finish_lsn), "true" if m.is_permanent else "false"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(" ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
