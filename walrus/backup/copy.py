"""copy (and st copy): objects streamed from one storage to another unchanged, dependencies before what publishes them."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from walrus.aio import TaskWindow
from walrus.backup.dto import ExtendedMetadata, Sentinel
from walrus.backup.list import resolve_backup
from walrus.backup.retention import segment_range, wal_token
from walrus.errors import BackupError, CorruptObject, ObjectExists, ObjectNotFound, StorageError, StorageMissing
from walrus.log import log
from walrus.pg.xlog import parse_wal_file_name, wal_file_name
from walrus.storage import layout
from walrus.storage.base import ByteStream, Storage

# Publication phases, copied in this order, each finished before the next starts: a backup's
# sentinel (what makes it exist) only once its parts, its files_metadata.json, its metadata.json
# and its WAL are all there; a delta's sentinel after its base's (the depth is added).
PAYLOAD, METADATA, SENTINEL = 0, 1, 2


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    phase: int = PAYLOAD


@dataclass
class CopyResult:
    backups: list[str]
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already at the target with the same size
    bytes: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"backups": self.backups, "copied": len(self.copied), "skipped": len(self.skipped),
                "bytes": self.bytes, "copied_keys": self.copied, "skipped_keys": self.skipped}

    def render(self) -> str:
        what = f"backups {', '.join(self.backups)}: " if self.backups else ""
        return (f"{what}copied {len(self.copied)} objects ({self.bytes} bytes); skipped {len(self.skipped)} "
                "already at the target with the same size")


def put_buffering(target: Storage) -> int:
    """The most one put into `target` holds in memory: a cloud storage's part buffers (all its puts
    together keep to them); file storage writes as it goes, a 1 MiB batch at a time."""
    return target.upload_memory or 1 << 20


# -- planning -------------------------------------------------------------------------------------------


async def inventory(storage: Storage, folders: tuple[str, ...]) -> dict[str, int]:
    """Key -> size of every object under `folders` (recursively)."""
    return {o.key: o.size for folder in folders async for o in storage.list(folder, recursive=True)}


async def plan_backups(source: Storage, name: str | None, with_history: bool,
                       segment_size: int) -> tuple[list[str], list[Entry]]:
    """WAL-G's copy plan: each backup asked for (NAME, LATEST, or every one with a sentinel) with
    the chain of bases a delta needs, and the WAL its restore needs: the segments from the one
    holding start_lsn - 1 to the one holding finish_lsn - 1 on its timeline, or with_history every
    later one too, and every timeline .history file. Missing or non-contiguous WAL is an error."""
    objects = await inventory(source, (layout.BASEBACKUPS, layout.WAL))
    if name is not None:
        names = [await resolve_backup(source, name)]
    else:
        names = sorted(n for k in objects if k.startswith(layout.BASEBACKUPS + "/")
                       and (n := layout.backup_name_from_sentinel(k[len(layout.BASEBACKUPS) + 1:])))
        if not names:
            raise BackupError("no backups found", detail=f"no sentinels in {layout.BASEBACKUPS}/ of {source.describe()}",
                              hint="check --from's config (its WALG_*_PREFIX)")
    plan: dict[str, Entry] = {}
    depths: dict[str, int] = {}
    for backup in names:
        await _add_chain(source, objects, plan, backup, depths, set())
        await _add_wal(source, objects, plan, backup, with_history, segment_size)
    return names, list(plan.values())


async def _read_sentinel(source: Storage, name: str) -> Sentinel:
    try:
        data = await source.get_bytes(layout.sentinel_key(name))
    except ObjectNotFound:
        raise BackupError(f"backup {name} not found", detail=f"no {layout.sentinel_key(name)}",
                          hint="a delta's base must be in the source storage too") from None
    return Sentinel.from_json(data, source=f"sentinel of {name}")


async def _add_chain(source: Storage, objects: dict[str, int], plan: dict[str, Entry], name: str,
                     depths: dict[str, int], visiting: set[str]) -> None:
    """Add backup `name` and, for a delta, its bases; its sentinel is published after theirs."""
    if name in depths:
        return
    if name in visiting:
        raise BackupError(f"the delta chain of backup {name} is a cycle", hint="its sentinels are damaged")
    sentinel = await _read_sentinel(source, name)
    visiting.add(name)
    depth = 0
    if sentinel.delta_from:
        await _add_chain(source, objects, plan, sentinel.delta_from, depths, visiting)
        depth = depths[sentinel.delta_from] + 1
    folder = layout.backup_key(name) + "/"  # exactly this backup's folder: names may share a prefix
    for key, size in objects.items():
        if key.startswith(folder):
            plan[key] = Entry(key, size, METADATA if key == folder + layout.METADATA else PAYLOAD)
    key = layout.sentinel_key(name)
    plan[key] = Entry(key, objects.get(key, 0), SENTINEL + depth)
    depths[name] = depth
    visiting.discard(name)


async def _add_wal(source: Storage, objects: dict[str, int], plan: dict[str, Entry], name: str,
                   with_history: bool, segment_size: int) -> None:
    try:
        meta = ExtendedMetadata.from_json(await source.get_bytes(layout.backup_key(name, layout.METADATA)))
        start_lsn, finish_lsn = meta.start_lsn, meta.finish_lsn
    except (ObjectNotFound, CorruptObject):  # WAL-G reads metadata.json; the sentinel holds the same LSNs
        sentinel = await _read_sentinel(source, name)
        start_lsn, finish_lsn = sentinel.start_lsn, sentinel.finish_lsn
    token = wal_token(name, segment_size)
    if token is None or not start_lsn or not finish_lsn:
        raise BackupError(f"backup {name} does not say which WAL it needs",
                          detail="its name holds no WAL file name, or its metadata no start and finish LSN",
                          hint="copy its objects with `walrus st copy --prefix basebackups_005/` instead")
    timeline = token[0]
    first_no, last_no = segment_range(start_lsn, finish_lsn, segment_size)
    first, last = wal_file_name(timeline, first_no, segment_size), wal_file_name(timeline, last_no, segment_size)
    segments: dict[int, set[int]] = {}
    for key, size in objects.items():
        if not key.startswith(layout.WAL + "/"):
            continue
        archived = key.rsplit("/", 1)[-1]
        archived = layout.archived_name(archived)
        logical = archived.split(".", 1)[0]
        # .history files are small and any timeline's may be asked for: always copied, as WAL-G does
        if not archived.endswith(".history") and (logical < first or (not with_history and logical > last)):
            continue
        plan[key] = Entry(key, size, PAYLOAD)
        try:  # only a whole segment proves continuity (.backup and .partial files share its name)
            tli, segno = parse_wal_file_name(archived, segment_size)
        except ValueError:
            continue
        segments.setdefault(tli, set()).add(segno)
    found = segments.get(timeline, set())
    for needed, number in ((first, first_no), (last, last_no)):
        if number not in found:
            raise BackupError(f"WAL segment {needed} that backup {name} needs is not in the source storage",
                              detail=f"backup {name} needs {first} to {last}",
                              hint="the backup cannot be restored from the source either; copy another backup")
    for tli, numbers in segments.items():
        ordered = sorted(numbers)
        for a, b in zip(ordered, ordered[1:]):
            if b != a + 1:
                raise BackupError(f"the WAL after backup {name} has a gap on timeline {tli:08X}",
                                  detail=f"after {wal_file_name(tli, a, segment_size)} comes "
                                         f"{wal_file_name(tli, b, segment_size)}",
                                  hint="segments are missing from the source's archive; without --with-history "
                                       "only the backup's own WAL is copied")


async def plan_prefix(source: Storage, prefix: str) -> list[Entry]:
    """`st copy --prefix`: every object whose key starts with `prefix` (a plain string prefix)."""
    return [Entry(key, size) for key, size in (await inventory(source, ("",))).items() if key.startswith(prefix)]


# -- copying --------------------------------------------------------------------------------------------


class _Budget:
    """Bytes the copies in flight may buffer. One taker (the loop starting copies), so no queue:
    a share larger than the whole budget is cut to it, and then waits until nothing else runs."""

    def __init__(self, capacity: int):
        self.capacity = self.free = capacity
        self._freed = asyncio.Event()

    async def take(self, n: int) -> int:
        n = min(n, self.capacity)
        while self.free < n:
            self._freed.clear()
            await self._freed.wait()
        self.free -= n
        return n

    def give(self, n: int) -> None:
        self.free += n
        self._freed.set()


async def execute(source: Storage, target: Storage, entries: list[Entry], *, jobs: int, budget: int,
                  per_put: int, backups: list[str] | None = None) -> CopyResult:
    """Copy `entries` byte for byte, phase by phase, `jobs` objects at once within `budget` bytes of
    put buffering (`per_put` at most each). An object already at the target with the same size is
    skipped; with another size it is a conflict, reported before anything is copied. Every put is
    exclusive and checks the byte count before it publishes, so nothing at the target is ever
    replaced and no short copy ever appears."""
    result = CopyResult(backups or [])
    wanted = {e.key: e for e in entries}
    folders = {k.split("/", 1)[0] if "/" in k else "" for k in wanted}
    listed = ("",) if "" in folders else tuple(sorted(folders))
    present = {k: s for folder in listed async for k, s in _listed(target, folder) if k in wanted}
    conflicts = [k for k, size in present.items() if size != wanted[k].size]
    if conflicts:
        raise _conflict(conflicts[0], wanted[conflicts[0]].size, present[conflicts[0]], len(conflicts))
    result.skipped = sorted(present)
    todo = sorted((e for e in entries if e.key not in present), key=lambda e: (e.phase, e.key))
    limit = _Budget(max(budget, 1))
    for phase in sorted({e.phase for e in todo}):
        window = TaskWindow(max(1, jobs))
        try:
            for entry in (e for e in todo if e.phase == phase):
                share = await limit.take(min(entry.size, per_put))
                await window.start(_copy_one, source, target, entry, result, limit, share)
            await window.results()
        except BaseException:
            await window.cancel()
            raise
    return result


async def _listed(storage: Storage, folder: str) -> AsyncIterator[tuple[str, int]]:
    try:
        async for o in storage.list(folder, recursive=True):
            yield o.key, o.size
    except StorageMissing:  # a file storage not made yet holds nothing; the first put makes it
        return


async def _copy_one(source: Storage, target: Storage, entry: Entry, result: CopyResult, limit: _Budget,
                    share: int) -> None:
    try:
        stream = await source.get(entry.key)
        try:
            stored = await target.put(entry.key, _exactly(stream, entry), exclusive=True)
        except ObjectExists:  # written meanwhile by someone else: the same size is the same copy
            info = await target.stat(entry.key)
            if info is None or info.size != entry.size:
                raise _conflict(entry.key, entry.size, info.size if info else -1, 1) from None
            result.skipped.append(entry.key)
            return
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
    finally:
        limit.give(share)
    result.copied.append(entry.key)
    result.bytes += stored
    log.info(f"copied {entry.key} ({stored} bytes)")


async def _exactly(stream: ByteStream, entry: Entry) -> AsyncIterator[bytes]:
    """The stream, failing before its end (so the put publishes nothing) unless it is the size listed."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > entry.size:
            break
        yield chunk
    if seen != entry.size:
        raise StorageError(f"{entry.key} changed in the source storage while it was copied",
                           detail=f"listed with {entry.size} bytes, read {seen}", hint="run the copy again")


def _conflict(key: str, size: int, found: int, count: int) -> StorageError:
    more = f" (and {count - 1} more)" if count > 1 else ""
    return StorageError(f"{key} is already in the target storage with other contents{more}",
                        detail=f"source size {size}, target size {found}; nothing was copied over it",
                        hint="the two storages hold different data under one name: check --from and --to")


async def copy_backups(source: Storage, target: Storage, *, name: str | None, with_history: bool,
                       segment_size: int, jobs: int, budget: int, per_put: int) -> CopyResult:
    """`walrus copy`: plan_backups, then execute."""
    names, entries = await plan_backups(source, name, with_history, segment_size)
    log.info(f"copying {len(names)} backups ({len(entries)} objects) from {source.describe()} to {target.describe()}")
    return await execute(source, target, entries, jobs=jobs, budget=budget, per_put=per_put, backups=names)


async def copy_prefix(source: Storage, target: Storage, prefix: str, *, jobs: int, budget: int,
                      per_put: int) -> CopyResult:
    """`walrus st copy`: every object under the key prefix, unchanged."""
    entries = await plan_prefix(source, prefix.lstrip("/"))
    return await execute(source, target, entries, jobs=jobs, budget=budget, per_put=per_put)
