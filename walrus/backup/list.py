"""backup-list and backup selection (LATEST by sentinel LastModified, as WAL-G picks it)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from walrus.backup import layout
from walrus.backup.dto import ExtendedMetadata, format_go_time
from walrus.errors import BackupError, ObjectNotFound
from walrus.pg.xlog import BACKUP_NAME_RE, first_wal_name_in, format_lsn
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
