"""backup-mark: make a backup permanent (retention never deletes it) or impermanent again.

Permanence lives in the backup's metadata.json (`is_permanent`), where WAL-G reads and writes it.
Marking a delta permanent marks the chain it restores from too; a backup cannot be made
impermanent while a delta built on it is permanent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from walrus.backup.dto import ExtendedMetadata, Sentinel
from walrus.backup.list import load_backups, read_sentinel, resolve_backup
from walrus.backup.retention import RetentionError, with_dependants
from walrus.config import Settings
from walrus.errors import ObjectNotFound
from walrus.log import log
from walrus.storage import layout
from walrus.storage.base import Storage


@dataclass
class MarkResult:
    backup: str
    permanent: bool
    changed: list[str]  # backups whose metadata.json was rewritten, chain base first
    unchanged: list[str]  # already as asked

    def as_json(self) -> dict[str, Any]:
        return {"backup_name": self.backup, "permanent": self.permanent, "changed": self.changed,
                "unchanged": self.unchanged}


async def backup_mark(settings: Settings, storage: Storage, name: str, *, permanent: bool) -> MarkResult:
    name = await resolve_backup(storage, name)
    # the backups to mark: a delta's whole chain when marking permanent, the backup alone otherwise
    chain = await _chain(storage, name) if permanent else [name]
    if not permanent:
        await _refuse_permanent_dependants(storage, name, settings.segment_size)
    result = MarkResult(name, permanent, [], [])
    for member in chain:
        meta = await _metadata(storage, member)
        if meta.is_permanent == permanent:
            result.unchanged.append(member)
            continue
        await storage.put_bytes(layout.backup_key(member, layout.METADATA),
                                dataclasses.replace(meta, is_permanent=permanent).to_json())
        result.changed.append(member)
        log.info(f"marked {member} {'permanent' if permanent else 'impermanent'}")
    if not result.changed:
        log.warning(f"{name} is already {'permanent' if permanent else 'impermanent'}")
    return result


async def _sentinel(storage: Storage, name: str) -> Sentinel:
    return await read_sentinel(storage, name, RetentionError(
        f"backup {name} not found", detail=f"no {layout.sentinel_key(name)}",
        hint="backup-list shows the backups in this storage"))


async def _metadata(storage: Storage, name: str) -> ExtendedMetadata:
    try:
        return ExtendedMetadata.from_json(await storage.get_bytes(layout.backup_key(name, layout.METADATA)),
                                          source=f"metadata.json of {name}")
    except ObjectNotFound:
        raise RetentionError(f"backup {name} has no {layout.METADATA}, where permanence is kept",
                             hint="this backup was written by a tool too old to mark; it cannot be marked") from None


async def _chain(storage: Storage, name: str) -> list[str]:
    """name and the backups it is built on, the full backup first."""
    chain = [name]
    sentinel = await _sentinel(storage, name)
    while sentinel.delta_from is not None:
        if sentinel.delta_from in chain:
            raise RetentionError(f"the delta chain of {name} loops at {sentinel.delta_from}")
        chain.append(sentinel.delta_from)
        sentinel = await _sentinel(storage, sentinel.delta_from)
    return chain[::-1]


async def _refuse_permanent_dependants(storage: Storage, name: str, segment_size: int) -> None:
    """A permanent delta needs its bases: none built on name, however indirectly, may be permanent."""
    backups = await load_backups(storage, segment_size)
    dependants = with_dependants({name}, backups)
    permanent = sorted(b.name for b in backups if b.name in dependants - {name} and b.permanent)
    if permanent:
        raise RetentionError(f"cannot make {name} impermanent: permanent delta backups are built on it",
                             detail="permanent: " + ", ".join(permanent),
                             hint="backup-mark -i those first")
