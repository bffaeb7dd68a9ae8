"""The archive's WAL as wal-show and wal-verify see it: segments by timeline, and timelines' history files."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from walrus.config import Settings
from walrus.errors import CorruptObject
from walrus.log import log
from walrus.pg.xlog import classify_wal_name, parse_lsn, parse_wal_file_name
from walrus.storage import layout
from walrus.storage.base import Storage
from walrus.wal.stored import read_archived

# PostgreSQL's history line: parent timeline, switch point, reason, separated by tabs (timeline.c)
_HISTORY_LINE = re.compile(r"(\d+)\t([^\t]+)\t(.+)")


@dataclass(frozen=True)
class HistoryRecord:
    """One line of a timeline's history file: `timeline` ended at `lsn`, where its child began."""

    timeline: int
    lsn: int
    reason: str


def parse_history(text: str, source: str) -> list[HistoryRecord]:
    """The records of a .history file; lines of another shape (blank, comments) are skipped, as
    PostgreSQL and WAL-G skip them, but a record with a bad number or LSN is an error."""
    records = []
    for line in text.splitlines():
        match = _HISTORY_LINE.fullmatch(line.strip("\r"))
        if match is None:
            continue
        try:
            records.append(HistoryRecord(int(match.group(1)), parse_lsn(match.group(2)), match.group(3)))
        except ValueError as e:
            raise CorruptObject(f"{source} is not a readable timeline history", detail=f"{line!r}: {e}") from None
    return records


async def read_history(settings: Settings, storage: Storage, timeline: int) -> list[HistoryRecord] | None:
    """Timeline `timeline`'s history from wal_005/ (any compression), None where none is archived
    (timeline 1 never has one)."""
    name = f"{timeline:08X}.history"
    data = await read_archived(settings, storage, name)
    if data is None:
        return None
    return parse_history(data.decode("utf-8", errors="replace"), layout.wal_key(name))


@dataclass
class ArchivedWal:
    """What wal_005/ holds: the segment numbers on each timeline, and the timelines with a history file."""

    segments: dict[int, set[int]] = field(default_factory=dict)
    histories: set[int] = field(default_factory=set)

    def has(self, timeline: int, segno: int) -> bool:
        return segno in self.segments.get(timeline, ())

    def highest_timeline(self) -> int:
        """The highest timeline any segment or history file is on; 0 for an empty archive."""
        return max([*self.segments, *self.histories], default=0)


async def list_archived(storage: Storage, segment_size: int) -> ArchivedWal:
    """One listing of wal_005/. A file counts by what PostgreSQL would call it once its compression
    extension is off: a segment, a history file; .backup and .partial files, and names that are no
    WAL file (logged), are not segments."""
    found = ArchivedWal()
    strange: list[str] = []
    async for obj in storage.list(layout.WAL):
        name = layout.archived_name(obj.name)
        kind = classify_wal_name(name)
        if kind == "segment":
            try:
                timeline, segno = parse_wal_file_name(name, segment_size)
            except ValueError:  # a segment of another size than WALG_PG_WAL_SIZE's
                strange.append(obj.name)
                continue
            found.segments.setdefault(timeline, set()).add(segno)
        elif kind == "history":
            found.histories.add(int(name[:8], 16))
        elif kind == "other":
            strange.append(obj.name)
    if strange:
        log.warning(f"{len(strange)} object(s) in {layout.WAL}/ are no WAL file of {segment_size >> 20} MiB "
                    f"segments and were left out (first: {strange[0]}); is WALG_PG_WAL_SIZE right?")
    return found
