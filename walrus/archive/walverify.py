"""wal-verify: is the archive whole from the oldest backup to the server's position, and on the server's timeline (WAL-G's checks)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from walrus.backup.dto import go_json
from walrus.backup.list import load_backups
from walrus.backup.retention import Backup
from walrus.config import Settings
from walrus.errors import BackupError, WalrusError
from walrus.log import log
from walrus.pg.xlog import segment_of, wal_file_name
from walrus.storage.base import Storage
from walrus.table import box_table
from walrus.wal.timelines import ArchivedWal, HistoryRecord, list_archived, read_history

CHECKS = ("integrity", "timeline")
OK, WARNING, FAILURE = "OK", "WARNING", "FAILURE"
FOUND, MISSING_DELAYED, MISSING_UPLOADING, MISSING_LOST = "FOUND", "MISSING_DELAYED", "MISSING_UPLOADING", "MISSING_LOST"


@dataclass(frozen=True)
class Position:
    """Where the server writes: its timeline and LSN (the segment holding LSN - 1 is the current one,
    not checked: it is still being written)."""

    timeline: int
    lsn: int


@dataclass(frozen=True)
class Run:
    """Consecutive segments of one timeline with one status."""

    timeline: int
    start_segment: str
    end_segment: str
    segments_count: int
    status: str

    def as_json(self) -> dict[str, Any]:
        return {"timeline_id": self.timeline, "start_segment": self.start_segment, "end_segment": self.end_segment,
                "segments_count": self.segments_count, "status": self.status}


@dataclass
class IntegrityResult:
    status: str
    runs: list[Run]

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "details": [r.as_json() for r in self.runs] if self.runs else None}

    def text(self) -> str:
        rows = [[r.timeline, r.start_segment, r.end_segment, r.segments_count, r.status] for r in self.runs]
        return box_table(["TLI", "Start", "End", "Segments count", "Status"], rows, [True, False, False, True, True])

    def problem(self) -> str:
        """The missing segments, for the error a failure ends with."""
        lost = [r for r in self.runs if r.status == MISSING_LOST]
        return "; ".join(f"{r.start_segment}" + (f" to {r.end_segment}" if r.segments_count > 1 else "")
                         + f" ({r.segments_count} segment{'s' * (r.segments_count > 1)})" for r in lost)


@dataclass
class TimelineResult:
    status: str
    current: int
    highest: int

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status,
                "details": {"current_timeline_id": self.current, "highest_storage_timeline_id": self.highest}}

    def text(self) -> str:
        return f"Highest timeline found in storage: {self.highest}\nCurrent cluster timeline: {self.current}"

    def problem(self) -> str:
        return f"the archive's highest timeline is {self.highest}, the server's is {self.current}"


@dataclass
class WalVerifyResult:
    results: dict[str, IntegrityResult | TimelineResult] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {name: self.results[name].as_json() for name in CHECKS if name in self.results}

    def json_text(self) -> str:
        return go_json(self.as_json())

    def text(self) -> str:
        return "\n".join(f"[wal-verify] {name} check status: {r.status}\n[wal-verify] {name} check details:\n{r.text()}"
                         for name in CHECKS if (r := self.results.get(name)) is not None)

    def failure(self) -> WalrusError | None:
        """The error to exit with when a check failed (the report is printed first); None otherwise.
        A WARNING (segments missing that may still be on their way) exits 0, as OK does."""
        failed = [(name, r) for name in CHECKS if (r := self.results.get(name)) is not None and r.status == FAILURE]
        if not failed:
            return None
        return WalrusError(f"wal-verify: the {' and '.join(n for n, _ in failed)} check failed",
                           detail="; ".join(f"{n}: {r.problem()}" for n, r in failed),
                           hint="a backup needs every segment from its start to the point it is restored to: "
                                "take a new backup (backup-push) so that restores need no missing segment, and find "
                                "why archive_command did not store them (the server log, pg_stat_archiver)")


async def wal_verify(settings: Settings, storage: Storage, checks: list[str], *,
                     locate: Callable[[Settings], tuple[int, int, int]] | None = None,
                     position: Position | None = None, backup_name: str | None = None) -> WalVerifyResult:
    """Phases: the server's position (given, else asked of PostgreSQL through `locate`); one listing
    of wal_005/; each check in turn."""
    size = settings.segment_size
    if position is None:
        if locate is None:
            raise WalrusError("wal-verify needs the server's WAL position", hint="give --lsn and --timeline")
        timeline, lsn, server_size = await asyncio.to_thread(locate, settings)
        if server_size != size:
            raise WalrusError("WAL segment size mismatch", detail=f"the server uses {server_size >> 20} MiB segments, "
                                                                  f"WALG_PG_WAL_SIZE is {size >> 20}",
                              hint=f"set WALG_PG_WAL_SIZE={server_size >> 20}")
        position = Position(timeline, lsn)
    if position.lsn < 1:
        raise WalrusError("wal-verify needs a WAL position above 0/0", hint="give the server's LSN with --lsn")
    current = segment_of(position.lsn - 1, size)
    log.info(f"Current WAL segment: {wal_file_name(position.timeline, current, size)}")
    archived = await list_archived(storage, size)
    result = WalVerifyResult()
    for name in CHECKS:
        if name not in checks:
            continue
        log.info(f"Running the check: {name}")
        if name == "integrity":
            history = await read_history(settings, storage, position.timeline) or []
            backups = await load_backups(storage, size)
            result.results[name] = integrity(archived, position.timeline, current, history, backups, size,
                                             settings.integrity_max_delayed_wals, settings.upload_concurrency,
                                             backup_name)
        else:
            highest = archived.highest_timeline()
            status = WARNING if highest == 0 else OK if highest == position.timeline else FAILURE
            result.results[name] = TimelineResult(status, position.timeline, highest)
    return result


def integrity(archived: ArchivedWal, timeline: int, current: int, history: list[HistoryRecord],
              backups: list[Backup], size: int, max_delayed: int, uploading: int,
              backup_name: str | None = None) -> IntegrityResult:
    """Every segment from the one before `current` back to the oldest usable backup's start (or
    `backup_name`'s; segment 1 when there is none), following the server's timeline history down
    to its ancestors. Found or not, each is classed as WAL-G does: the newest missing ones, up to
    `max_delayed` (until one is found), MISSING_DELAYED; the next `uploading` MISSING_UPLOADING
    (archive_command may still be storing them); older ones MISSING_LOST."""
    stop, no_backups = _range_start(timeline, history, backups, size, backup_name)
    # where each ancestor's WAL ends in the server's history: the walk turns to the parent there
    switches = {segment_of(r.lsn, size): r.timeline for r in history}
    visited: list[tuple[int, int, str]] = []  # (timeline, segno, status)
    tli, segno = timeline, current

    def walk(limit: int | None, missing: str, stop_at_found: bool = False) -> None:
        nonlocal tli, segno
        steps = 0
        while segno > stop and (limit is None or steps < limit):
            parent = switches.get(segno)
            if parent is not None and not archived.has(tli, segno - 1):
                tli = parent
            segno -= 1
            steps += 1
            found = archived.has(tli, segno)
            visited.append((tli, segno, FOUND if found else missing))
            if found and stop_at_found:
                return

    walk(max_delayed, MISSING_DELAYED, stop_at_found=True)
    walk(uploading, MISSING_UPLOADING)
    walk(None, MISSING_LOST)
    grouped: list[list] = []  # [timeline, first segno, last segno, status, count], oldest first
    for t, s, status in sorted(visited, key=lambda v: v[1]):
        if grouped and grouped[-1][0] == t and grouped[-1][3] == status:
            grouped[-1][2] = s
            grouped[-1][4] += 1
        else:
            grouped.append([t, s, s, status, 1])
    runs = [Run(t, wal_file_name(t, lo, size), wal_file_name(t, hi, size), n, status)
            for t, lo, hi, status, n in grouped]
    status, seen_found = OK, False
    for r in runs:
        if r.status == FOUND:
            seen_found = True
        elif r.status == MISSING_LOST:
            if no_backups and not seen_found:  # before the first archived segment, with no backup to restore
                status = WARNING
                continue
            status = FAILURE
            break
        else:
            status = WARNING
    return IntegrityResult(status, runs)


def _range_start(timeline: int, history: list[HistoryRecord], backups: list[Backup], size: int,
                 backup_name: str | None) -> tuple[int, bool]:
    """(the first segment checked, whether no backup gave it): `backup_name`'s start segment, else the
    oldest usable backup's, else 1 (every segment since the cluster began)."""
    if backup_name is not None:
        named = next((b for b in backups if b.name == backup_name), None)
        if named is None:
            raise BackupError(f"backup {backup_name} was not found", hint="backup-list shows the backups")
        if not _on_history(named, timeline, history, size):
            raise BackupError(f"backup {backup_name} is not on the server's timeline history",
                              detail=f"its WAL is on timeline {named.timeline}, which the server's timeline "
                                     f"{timeline} does not descend from at that point")
        log.info(f"Detected correct backup with specified name: {backup_name}")
        return named.start_segno, False
    usable = [b for b in backups if not b.permanent and _on_history(b, timeline, history, size)]
    if not usable:
        log.warning(f"no backup to start from (none, or none on the server's timeline history): the archive "
                    f"is checked from segment {wal_file_name(timeline, 1, size)}")
        return 1, True
    oldest = min(usable, key=lambda b: b.start_segno)
    log.info(f"Detected earliest available backup: {oldest.name}")
    return oldest.start_segno, False


def _on_history(b: Backup, timeline: int, history: list[HistoryRecord], size: int) -> bool:
    """Whether a backup's start is on the server's line of timelines: on one of them, after that
    timeline began and before it ended. Without a history file (timeline 1, or none archived) any
    backup counts, as in WAL-G."""
    if not history:
        return True
    chain = [r.timeline for r in history] + [timeline]
    if b.timeline not in chain:
        return False
    i = chain.index(b.timeline)
    begins = segment_of(history[i - 1].lsn, size) if i > 0 else 0
    ends = segment_of(history[i].lsn, size) if i < len(history) else None
    return begins <= b.start_segno and (ends is None or b.start_segno < ends)
