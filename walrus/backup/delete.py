"""delete: retention (retain, before, everything, target, garbage), a dry run unless confirmed.

Phases: load the complete backups, plan (walrus.backup.retention), then, confirmed, delete in the
order that keeps every listed backup restorable if the command dies at any instant: sentinels
first (a backup without one is no longer listed, nor restored), then the backups' folders, then
the WAL below the cut, then garbage. A dry run walks the same listings and deletes nothing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from walrus.aio import TaskWindow
from walrus.backup.dto import format_go_time
from walrus.backup.list import load_backups
from walrus.backup.retention import (HISTORY_RE, Backup, Plan, Request, RetentionError, garbage_backup_folders, plan,
                                     wal_token)
from walrus.config import Settings
from walrus.errors import StorageError
from walrus.log import log
from walrus.pg.xlog import wal_file_name
from walrus.storage import layout
from walrus.storage.base import Storage, Upload, join_key

BATCH = 1000  # keys per delete request (S3's DeleteObjects limit)
IN_FLIGHT = 4  # delete requests at once beside the listing that feeds them: at most 4 x BATCH keys held
DEFAULT_GRACE = 24 * 3600.0


@dataclass
class WalSweep:
    """The WAL a plan removes, counted while listing (a million objects cost no memory)."""

    objects: int = 0
    bytes: int = 0
    timelines: dict[int, list] = field(default_factory=dict)  # timeline -> [count, first, last]
    history: list[str] = field(default_factory=list)
    other: int = 0  # objects with no WAL name: kept unless everything
    maps: int = 0  # the segments' block maps (blockmap_005/)

    def add(self, name: str, size: int, segment_size: int) -> None:
        self.objects += 1
        self.bytes += size
        token = wal_token(name, segment_size)
        if HISTORY_RE.match(name):
            self.history.append(name)
        elif token is None:
            self.other += 1
        else:
            entry = self.timelines.setdefault(token[0], [0, name, name])
            entry[0] += 1
            entry[1] = min(entry[1], name)
            entry[2] = max(entry[2], name)

    def as_json(self) -> dict[str, Any]:
        return {"objects": self.objects, "bytes": self.bytes, "history": self.history, "block_maps": self.maps,
                "timelines": [{"timeline": tl, "objects": n, "first": first, "last": last}
                              for tl, (n, first, last) in sorted(self.timelines.items())]}


@dataclass
class DeleteResult:
    plan: Plan
    confirmed: bool
    segment_size: int
    wal: WalSweep = field(default_factory=WalSweep)
    folders: list[str] = field(default_factory=list)  # backup folders with no sentinel removed as garbage
    in_progress: list[str] = field(default_factory=list)  # folders with no sentinel left alone: written recently
    uploads: list[Upload] = field(default_factory=list)  # abandoned uploads removed
    backup_objects: int = 0  # objects of deleted backups (sentinels, folders)

    @property
    def cut_name(self) -> str | None:
        if self.plan.wal_cut is None:
            return None
        kept = [b for b, _ in self.plan.keep]
        timeline = min((b.timeline for b in kept), default=1)
        return wal_file_name(timeline, self.plan.wal_cut, self.segment_size)

    def as_json(self) -> dict[str, Any]:
        p = self.plan
        return {
            "command": "delete " + p.request.describe(),
            "dry_run": not self.confirmed,
            "delete": [_backup_json(b) for b in p.delete],
            "backup_objects": self.backup_objects,
            "keep": [{**_backup_json(b), "reason": why} for b, why in p.keep],
            "wal": {"everything": p.wal_all, "below_segment": self.cut_name,
                    "history_timelines_below": p.history_below,
                    "permanent_ranges": [{"timeline": tl, "first": f, "last": last} for tl, f, last in p.protected],
                    **self.wal.as_json()},
            "garbage": {"backup_folders": self.folders, "in_progress_left_alone": self.in_progress,
                        "abandoned_uploads": [{"key": u.key, "started": format_go_time(u.started)}
                                              for u in self.uploads]},
            "notes": p.notes,
        }

    def render(self) -> str:
        p = self.plan
        done = "deleted" if self.confirmed else "to delete"
        lines = [f"delete {p.request.describe()}" + ("" if self.confirmed else ": dry run, nothing is deleted")]
        lines += [f"note: {n}" for n in p.notes]
        if p.request.mode != "garbage":
            lines.append(f"backups {done}: {len(p.delete)} ({self.backup_objects} objects)")
            lines += [f"  {b.name}  {_when(b)}" + ("  (permanent)" if b.permanent else "") for b in p.delete]
        lines.append(f"backups kept: {len(p.keep)}")
        lines += [f"  {b.name}  {_when(b)}  {why}" for b, why in p.keep]
        if p.wal_all:
            rule = "every object"
        elif p.wal_cut is not None:
            rule = f"segments before {self.cut_name} by segment number, on every timeline"
            if p.history_below and p.history_below > 1:
                rule += f", timeline history files below {p.history_below:08X}"
        elif p.request.mode == "target":
            rule = "none: delete target never deletes WAL"
        else:
            rule = "none: no backup to measure it against"
        lines.append(f"WAL {done}: {self.wal.objects} objects, {_size(self.wal.bytes)} ({rule})"
                     if p.wal_all or p.wal_cut is not None else f"WAL {done}: {rule}")
        for tl, (n, first, last) in sorted(self.wal.timelines.items()):
            lines.append(f"  timeline {tl}: {n} objects, {first} .. {last}")
        lines += [f"  {h}" for h in self.wal.history]
        if self.wal.maps:
            lines.append(f"  and their block maps: {self.wal.maps} objects")
        for tl, first, last in p.protected:
            lines.append(f"  kept for a permanent backup: {wal_file_name(tl, first, self.segment_size)} .. "
                         f"{wal_file_name(tl, last, self.segment_size)}")
        if self.folders or self.uploads or p.request.mode in ("garbage", "everything"):
            lines.append(f"garbage {done}: {len(self.folders)} backup folders without a sentinel, "
                         f"{len(self.uploads)} abandoned uploads")
            lines += [f"  {layout.BASEBACKUPS}/{f}/" for f in self.folders]
            lines += [f"  {u.key} (started {format_go_time(u.started)})" for u in self.uploads]
        if self.in_progress:
            lines.append("left alone, written to recently (a backup may be in progress): "
                         + ", ".join(self.in_progress))
        if not self.confirmed:
            lines.append("run again with --confirm to delete")
        return "\n".join(lines)


def _backup_json(b: Backup) -> dict[str, Any]:
    return {"backup_name": b.name, "time": format_go_time(b.time), "permanent": b.permanent,
            "delta_from": b.delta_from}


def _when(b: Backup) -> str:
    return b.time.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


async def delete(settings: Settings, storage: Storage, request: Request, *, confirm: bool,
                 grace: float = DEFAULT_GRACE) -> DeleteResult:
    # init: what is in storage
    backups = await load_backups(storage, settings.segment_size, request.use_sentinel_time)
    # plan
    result = DeleteResult(plan(request, backups, settings.segment_size), confirm, settings.segment_size)
    quiet_since = datetime.now(timezone.utc) - timedelta(seconds=grace)
    scope = request.modifier if request.mode == "garbage" else None
    if request.mode != "target":
        await _find_orphan_folders(storage, result, backups, quiet_since)
        if scope == "ARCHIVES":
            result.folders = []  # WAL only; but a backup in progress still holds its WAL back (below)
        _hold_wal_for_backups_in_progress(result)
    if confirm:
        log.info(f"deleting: {len(result.plan.delete)} backups" + (", WAL" if _touches_wal(request) else ""))
    # delete: sentinels, folders, WAL, garbage (a dry run only counts)
    await _delete_backups(storage, result, confirm)
    if _touches_wal(request):
        await _sweep_wal(storage, result, confirm)
    if request.mode in ("garbage", "everything"):
        await _abandoned_uploads(storage, result, scope, quiet_since, confirm)
    return result


def _touches_wal(request: Request) -> bool:
    return request.mode != "target" and not (request.mode == "garbage" and request.modifier == "BACKUPS")


async def _find_orphan_folders(storage: Storage, result: DeleteResult, backups: list[Backup],
                               quiet_since: datetime) -> None:
    """Backup folders with no sentinel: a crashed backup-push's, or a delete's that died after the
    sentinels. Garbage once older than the reference backup and untouched for the grace period;
    a folder written to recently may be a backup being taken right now, and is left alone."""
    complete = {b.name for b in backups}
    newest: dict[str, datetime] = {}

    def seen(key: str, when: datetime) -> None:
        folder, sep, _ = key[len(layout.BASEBACKUPS) + 1:].partition("/")
        if sep and folder not in complete:
            newest[folder] = max(newest.get(folder, when), when)

    async for obj in storage.list(layout.BASEBACKUPS, recursive=True):
        seen(obj.key, obj.mtime)
    # a part being uploaded (a temporary file, a multipart upload) is a backup at work too, perhaps
    # one whose folder holds nothing yet
    try:
        found = await storage.abandoned_uploads(layout.BASEBACKUPS, datetime.now(timezone.utc) + timedelta(days=1))
    except StorageError as e:  # an endpoint without ListMultipartUploads: the folders still tell
        log.warning(f"could not list the uploads in progress: {e.detail or e.message}; going by folders alone")
        found = []
    for upload in found:
        seen(upload.key, upload.started)
    p = result.plan
    if p.request.mode == "everything":
        reference = []  # every folder goes, but for those written to recently
        chosen = [f for f, t in newest.items() if t < quiet_since]
    else:
        if p.request.mode == "garbage":
            reference = [b for b in backups]
        else:
            reference = [b for b, why in p.keep if why.startswith("target")]
        chosen = garbage_backup_folders(newest.items(), reference, quiet_since, result.segment_size)
    result.folders = sorted(chosen)
    result.in_progress = sorted(f for f, t in newest.items() if t >= quiet_since and f not in chosen)


def _hold_wal_for_backups_in_progress(result: DeleteResult) -> None:
    """A backup being taken needs the WAL from its start on, though it has no sentinel yet: one that
    started before the newest backup finished (two pushes overlapping) starts below the cut."""
    p = result.plan
    if p.wal_all or p.wal_cut is None:
        return
    held = sorted((token[1], f) for f in result.in_progress
                  if (token := wal_token(f, result.segment_size)) is not None)
    if held and held[0][0] < p.wal_cut:
        p.wal_cut = held[0][0]
        p.notes.append(f"WAL is kept from the start of {held[0][1]} on: a backup in progress (no sentinel yet, "
                       "written to recently) needs it")


async def _delete_backups(storage: Storage, result: DeleteResult, confirm: bool) -> None:
    doomed = result.plan.delete
    # sentinels first, dependants before their bases (newest first): from here on they are not listed
    sentinels = [layout.sentinel_key(b.name) for b in sorted(doomed, key=lambda b: (b.time, b.name), reverse=True)]
    result.backup_objects += len(sentinels)
    if confirm:
        await storage.delete(sentinels)  # the backend batches (S3: DELETE_BATCH keys a request)
    for name in [b.name for b in doomed] + result.folders:
        await _delete_folder(storage, result, layout.backup_key(name), confirm)


async def _delete_folder(storage: Storage, result: DeleteResult, folder: str, confirm: bool) -> None:
    async with _Deleter(storage, confirm) as deleter:
        async for obj in storage.list(folder, recursive=True):
            result.backup_objects += 1
            await deleter.add(obj.key)


class _Deleter:
    """Deletes keys in batches of BATCH, up to IN_FLIGHT requests at once while the caller goes on
    listing (a dry run deletes nothing). The first failed request fails the block; leaving it by an
    error or a cancellation cancels every request still running and waits for them."""

    def __init__(self, storage: Storage, confirm: bool) -> None:
        self._storage, self._confirm = storage, confirm
        self._batch: list[str] = []
        self._requests = TaskWindow(IN_FLIGHT)

    async def __aenter__(self) -> "_Deleter":
        return self

    async def add(self, key: str) -> None:
        if self._confirm:
            self._batch.append(key)
            if len(self._batch) >= BATCH:
                await self._send()

    async def _send(self) -> None:
        batch, self._batch = self._batch, []
        await self._requests.start(self._storage.delete, batch)

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._batch:
                    await self._send()
                await self._requests.results()
        finally:
            await self._requests.cancel()


async def _sweep_wal(storage: Storage, result: DeleteResult, confirm: bool) -> None:
    """WAL below the cut goes, streamed in batches: only names the plan judges, never a segment at
    or after the cut, so a wal-push running meanwhile loses nothing. The segments' block maps
    (blockmap_005/, named as their segments) go by the same rule.

    Where the storage lists in key order (S3), a timeline's segments come in segment order, so the
    first one at or above the cut ends that timeline: the listing restarts after it, at the next
    timeline. The requests then grow with what is deleted, not with the WAL kept (most of an
    archive, in a daily retention)."""
    plan_, size, sweep = result.plan, result.segment_size, result.wal
    skip = storage.lists_in_key_order and not plan_.wal_all and plan_.wal_cut is not None
    async with _Deleter(storage, confirm) as deleter:
        for folder in (layout.WAL, layout.BLOCKMAP):
            start_after = None
            while True:
                restart = None
                async with contextlib.aclosing(storage.list(folder, recursive=plan_.wal_all,
                                                            start_after=start_after)) as listing:
                    async for obj in listing:
                        if skip and (token := _segment_token(obj.name, size)) is not None \
                                and token[1] >= plan_.wal_cut:
                            restart = join_key(folder, f"{token[0]:08X}G")  # past every WAL name of this timeline
                            break
                        if not plan_.deletes_wal(obj.name, size):
                            continue
                        if folder == layout.WAL:
                            sweep.add(obj.name, obj.size, size)
                        else:
                            sweep.maps += 1
                        await deleter.add(obj.key)
                if restart is None:
                    break
                start_after = restart


def _segment_token(name: str, segment_size: int) -> tuple[int, int] | None:
    """(timeline, segno) of a name that starts with a WAL file name."""
    token = wal_token(name[:24], segment_size)
    return token if token is not None and len(name) >= 24 else None


async def _abandoned_uploads(storage: Storage, result: DeleteResult, scope: str | None,
                             started_before: datetime, confirm: bool) -> None:
    folders = {"ARCHIVES": [layout.WAL], "BACKUPS": [layout.BASEBACKUPS]}.get(scope or "", [""])
    for folder in folders:
        try:
            found = await storage.abandoned_uploads(folder, started_before)
        except StorageError as e:
            log.warning(f"could not list abandoned uploads: {e.detail or e.message}; none removed")
            return
        result.uploads += list(found)
        if confirm and found:
            await storage.discard_uploads(found)


def parse_user_data(text: str | None) -> Any:
    import json

    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise RetentionError("--target-user-data is not valid JSON", detail=str(e)) from None
