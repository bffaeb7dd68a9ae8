"""wal-show: the archive's WAL by timeline (WAL-G's wal-show): ranges, missing segments, parents and backups."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from walrus.backup.dto import go_json
from walrus.backup.list import BackupInfo, list_backups, load_details
from walrus.config import Settings
from walrus.log import log
from walrus.pg.xlog import format_lsn, segment_of, timeline_from_backup_name, wal_file_name
from walrus.storage.base import Storage
from walrus.table import box_table
from walrus.wal.timelines import list_archived, read_history

OK, LOST_SEGMENTS = "OK", "LOST_SEGMENTS"


@dataclass
class TimelineInfo:
    """One timeline's segments in the archive: from its first to its last, and the gaps between."""

    id: int
    parent_id: int
    switch_point_lsn: int
    start_segment: str
    end_segment: str
    segments_count: int
    missing_segments: list[str]  # newest first, as WAL-G lists them
    segment_range_size: int
    backups: list[BackupInfo] | None = None  # None: not looked up

    @property
    def status(self) -> str:
        return LOST_SEGMENTS if self.missing_segments else OK

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "parent_id": self.parent_id, "switch_point_lsn": self.switch_point_lsn,
                               "start_segment": self.start_segment, "end_segment": self.end_segment,
                               "segments_count": self.segments_count, "missing_segments": self.missing_segments}
        if self.backups:  # WAL-G omits an empty list
            out["backups"] = [b.as_json(detail=True) for b in self.backups]
        out.update(segment_range_size=self.segment_range_size, status=self.status)
        return out


@dataclass
class WalShowResult:
    timelines: list[TimelineInfo] = field(default_factory=list)
    with_backups: bool = True

    def as_json(self) -> list[dict[str, Any]]:
        return [t.as_json() for t in self.timelines]

    def json_text(self) -> str:
        return go_json(self.as_json())

    def text(self) -> str:
        header = ["TLI", "Parent TLI", "Switchpoint LSN", "Start segment", "End segment", "Segment range",
                  "Segments count", "Status"] + (["Backups count"] if self.with_backups else [])
        rows = [[t.id, t.parent_id, format_lsn(t.switch_point_lsn), t.start_segment, t.end_segment,
                 t.segment_range_size, t.segments_count, t.status]
                + ([len(t.backups or ())] if self.with_backups else []) for t in self.timelines]
        right = [True, True, True, False, False, True, True, False] + [True] * self.with_backups
        return box_table(header, rows, right)


async def wal_show(settings: Settings, storage: Storage, *, with_backups: bool = True) -> WalShowResult:
    """Phases: list wal_005/ once; each timeline's range, gaps and parent (its own history file's
    last record); the backups whose WAL lies in each range (from their metadata.json)."""
    size = settings.segment_size
    archived = await list_archived(storage, size)
    result = WalShowResult(with_backups=with_backups)
    for timeline in sorted(archived.segments):
        present = archived.segments[timeline]
        first, last = min(present), max(present)
        history = await read_history(settings, storage, timeline)
        parent = history[-1] if history else None
        result.timelines.append(TimelineInfo(
            id=timeline, parent_id=parent.timeline if parent else 0, switch_point_lsn=parent.lsn if parent else 0,
            start_segment=wal_file_name(timeline, first, size), end_segment=wal_file_name(timeline, last, size),
            segments_count=len(present),
            missing_segments=[wal_file_name(timeline, s, size) for s in range(last, first - 1, -1) if s not in present],
            segment_range_size=last - first + 1))
    if with_backups:
        backups = await list_backups(storage)
        if not backups:
            log.info("No backups found in storage.")
        else:
            # WAL-G reads them in reverse key order: newest name first
            details = await load_details(storage, sorted(backups, key=lambda b: b.name, reverse=True))
            details.sort(key=lambda b: b.name, reverse=True)
            for t in result.timelines:
                t.backups = [b for b in details if _within(b, t, size)]
    return result


def _within(b: BackupInfo, t: TimelineInfo, size: int) -> bool:
    """A backup is on a timeline when its WAL, from its start segment to its finish's, lies in the
    timeline's range (WAL-G's test: the backup name's timeline, segment names compared)."""
    try:
        timeline = timeline_from_backup_name(b.name)
    except ValueError:
        return False
    start = wal_file_name(timeline, segment_of(b.metadata.start_lsn, size), size)
    end = wal_file_name(timeline, segment_of(b.metadata.finish_lsn, size), size)
    return timeline == t.id and t.start_segment <= start and end <= t.end_segment
