"""Delta backups' base: which backup a backup-push builds on (WAL-G's rules), why it takes a full backup instead, and the checks that make a delta fatal."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from walrus.backup.dto import ExtendedMetadata, FilesMetadata, Sentinel
from walrus.backup.list import (list_backups, read_files_metadata, read_sentinel, resolve_backup,
                                resolve_by_user_data)
from walrus.config import Settings
from walrus.errors import BackupError, ObjectNotFound, WalrusError
from walrus.pg.xlog import first_wal_name_in, format_lsn
from walrus.storage import layout
from walrus.storage.base import Storage


@dataclass(frozen=True)
class DeltaBase:
    """The backup a delta is built on, with what the delta needs of it."""

    name: str
    sentinel: Sentinel
    files: FilesMetadata
    count: int  # the new backup's DeltaCount

    @property
    def lsn(self) -> int:
        """DeltaLSN: pages at or past the base's start LSN changed since the base."""
        assert self.sentinel.start_lsn is not None
        return self.sentinel.start_lsn

    @property
    def full_name(self) -> str:
        """DeltaFullName: the full backup at the root of the chain."""
        return self.sentinel.delta_full_name or self.name


@dataclass(frozen=True)
class DeltaChoice:
    base: DeltaBase | None  # None: a full backup
    reason: str  # for the log: why a full backup, or which base

    def as_json(self) -> dict[str, Any]:
        return {"delta_from": self.base.name if self.base else None, "reason": self.reason}


def _full(reason: str) -> DeltaChoice:
    return DeltaChoice(None, reason)


async def choose_base(settings: Settings, storage: Storage, *, permanent: bool = False, full: bool = False,
                      from_name: str | None = None, from_user_data: Any = None) -> DeltaChoice:
    """WAL-G's delta configuration: a delta needs WALG_DELTA_MAX_STEPS above 0 and a base (the named
    one, the one with the given user data, else LATEST); the chain's length, a base without an LSN
    or metadata.json, or a permanent base under an impermanent backup make it a full backup. An
    explicit base that does not exist is an error. WALG_DELTA_ORIGIN=LATEST_FULL builds on the
    chain's full backup, but counts the steps from the chosen base, as WAL-G does."""
    if full:
        return _full("--full was given")
    if settings.delta_max_steps <= 0:
        return _full("WALG_DELTA_MAX_STEPS is 0")
    from_name = from_name or settings.delta_from_name
    if from_user_data is None and settings.delta_from_user_data:
        from_user_data = settings.delta_from_user_data
    if from_name:
        name = await resolve_backup(storage, from_name)
    elif from_user_data is not None:
        name = await resolve_by_user_data(storage, from_user_data, settings.segment_size)
    else:
        listed = await list_backups(storage)
        if not listed:
            return _full("there is no backup to build a delta on")
        name = listed[-1].name
    sentinel = await _sentinel(storage, name)
    count = (sentinel.delta_count or 0) + 1
    if count > settings.delta_max_steps:
        return _full(f"{name} is delta step {count - 1}, and WALG_DELTA_MAX_STEPS is {settings.delta_max_steps}")
    if sentinel.start_lsn is None:
        return _full(f"{name} has no start LSN to build a delta on")
    try:
        metadata = ExtendedMetadata.from_json(await storage.get_bytes(layout.backup_key(name, layout.METADATA)),
                                              source=f"metadata.json of {name}")
    except (ObjectNotFound, WalrusError) as e:
        return _full(f"the metadata of {name} cannot be read ({e.message})")
    from_full = settings.delta_origin == "LATEST_FULL"
    if metadata.is_permanent and not permanent and not from_full:
        return _full(f"{name} is permanent and this backup is not: a delta would keep it from ever going")
    if from_full and sentinel.delta_full_name:
        name = sentinel.delta_full_name
        sentinel = await _sentinel(storage, name)
    files = await read_files_metadata(storage, name, sentinel)
    if files is None:
        # WAL-G builds a delta that copies every file whole; a full backup stores the same and
        # depends on nothing
        return _full(f"{name} has no file list (files_metadata.json) to compare with")
    return DeltaChoice(DeltaBase(name, sentinel, files, count),
                       f"delta from {name} (step {count}, pages changed since {format_lsn(sentinel.start_lsn)})")


async def _sentinel(storage: Storage, name: str) -> Sentinel:
    return await read_sentinel(storage, name, BackupError(
        f"delta base {name} vanished", detail=f"no {layout.sentinel_key(name)}",
        hint="a delete ran meanwhile; run backup-push again"))


def check_base(base: DeltaBase, start_lsn: int, system_identifier: int | None) -> None:
    """WAL-G's fatal cases, once the new backup has started: a base that finished after this backup
    started, or one taken of another cluster."""
    finish = base.sentinel.finish_lsn
    if finish is not None and finish > start_lsn:
        raise BackupError(f"delta base {base.name} is from the future",
                          detail=f"it finished at {format_lsn(finish)}, after this backup's start at "
                                 f"{format_lsn(start_lsn)}",
                          hint="the cluster was restored to an earlier point or is another one; take a full "
                               "backup (backup-push --full)")
    theirs = base.sentinel.system_identifier
    if theirs is not None and system_identifier is not None and theirs != system_identifier:
        raise BackupError(f"delta base {base.name} is a backup of another cluster",
                          detail=f"its system identifier is {theirs}; this server's is {system_identifier}",
                          hint="point WALG_*_PREFIX at this cluster's storage, or take a full backup "
                               "(backup-push --full)")


def delta_name(name: str, base: DeltaBase) -> str:
    """WAL-G's name of a delta: the new backup's name, `_D_`, and the base's WAL file name (its first
    24 hex digits; WAL-G writes 24 Zs for a base name without one)."""
    return f"{name}_D_{first_wal_name_in(base.name) or 'Z' * 24}"
