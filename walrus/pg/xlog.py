"""PostgreSQL WAL positions (LSNs) and the WAL file and backup names derived from them."""
from __future__ import annotations

import re

from walrus.errors import ConfigError
from walrus.pg.segname import (MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, is_segment_name, parse_wal_file_name,
                               segments_per_xlogid)

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF

BACKUP_NAME_PREFIX = "base_"

_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_WAL_NAME_SEARCH_RE = re.compile(r"[0-9A-F]{24}")  # listings only look for uppercase names
_BACKUP_TIMELINE_RE = re.compile(r"base_([0-9A-Fa-f]{8})")

# Classification follows PostgreSQL's own predicates (xlog_internal.h): uppercase hex only.
_HISTORY_RE = re.compile(r"[0-9A-F]{8}\.history")
_BACKUP_HISTORY_RE = re.compile(r"[0-9A-F]{24}\.[0-9A-F]{8}\.backup")
_PARTIAL_RE = re.compile(r"[0-9A-F]{24}\.partial")

# WAL-G applies this with FindString (a search, not a full match) to object names such as
# "base_X_backup_stop_sentinel.json"; the optional 8-hex tail covers WAL-E names.
BACKUP_NAME_RE: re.Pattern[str] = re.compile(
    r"base_[0-9A-F]{24}(?:_D_[0-9A-F]{24})?(?:_[0-9A-F]{8})?"
)


def check_segment_size(size: int) -> int:
    """Return size if PostgreSQL allows it as a WAL segment size, else raise ConfigError."""
    if MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE and size & (size - 1) == 0:
        return size
    raise ConfigError(
        f"invalid WAL segment size: {size} bytes",
        detail="PostgreSQL WAL segments are a power of two from 1 MiB to 1 GiB.",
        hint="Set WALG_PG_WAL_SIZE to the server's wal_segment_size in MiB (1, 2, 4, ... 1024).",
    )


def parse_lsn(text: str) -> int:
    """Parse PostgreSQL's "%X/%X" LSN notation (e.g. "16/B374D848")."""
    match = _LSN_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an LSN: {text!r} (expected two hex numbers like 16/B374D848)")
    return int(match.group(1), 16) << 32 | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints it: high and low 32 bits in uppercase hex."""
    _check_range("LSN", lsn, UINT64_MAX)
    return f"{lsn >> 32:X}/{lsn & UINT32_MAX:X}"


def segment_of(lsn: int, segment_size: int) -> int:
    """Number of the segment that contains the byte at lsn."""
    _check_range("LSN", lsn, UINT64_MAX)
    return lsn // segment_size


def wal_file_name(timeline: int, segno: int, segment_size: int) -> str:
    """The 24-hex-digit WAL file name of segment segno on timeline."""
    _check_range("timeline", timeline, UINT32_MAX)
    per_id = segments_per_xlogid(segment_size)
    _check_range("segment number", segno, (UINT32_MAX + 1) * per_id - 1)
    xlogid, offset = divmod(segno, per_id)
    return f"{timeline:08X}{xlogid:08X}{offset:08X}"


def next_wal_file_name(name: str, segment_size: int) -> str:
    """Name of the segment after name on the same timeline."""
    timeline, segno = parse_wal_file_name(name, segment_size)
    return wal_file_name(timeline, segno + 1, segment_size)


def backup_name_for(timeline: int, start_lsn: int, segment_size: int) -> str:
    """WAL-G's local-mode backup name: "base_" + the segment holding start_lsn - 1.

    This is what pg_walfile_name_offset(start_lsn) names; remote (BASE_BACKUP) mode names the
    segment of start_lsn itself, which differs only when start_lsn is on a segment boundary.
    """
    if start_lsn < 1:
        raise ValueError(f"backup start LSN must be positive, got {start_lsn}")
    return BACKUP_NAME_PREFIX + wal_file_name(timeline, segment_of(start_lsn - 1, segment_size), segment_size)


def classify_wal_name(name: str) -> str:
    """Kind of a file PostgreSQL archives: segment, history, backup, partial or other."""
    if is_segment_name(name):
        return "segment"
    if _HISTORY_RE.fullmatch(name):
        return "history"
    if _BACKUP_HISTORY_RE.fullmatch(name):
        return "backup"
    if _PARTIAL_RE.fullmatch(name):
        return "partial"
    return "other"


def timeline_from_backup_name(name: str) -> int:
    """Timeline of a backup: the first 8 hex digits after "base_"."""
    match = _BACKUP_TIMELINE_RE.match(name)
    if match is None:
        raise ValueError(f"not a backup name: {name!r} (expected base_ followed by 24 hex digits)")
    return int(match.group(1), 16)


def first_wal_name_in(text: str) -> str | None:
    """First 24-uppercase-hex-digit run in text, which WAL-G treats as the WAL file name."""
    match = _WAL_NAME_SEARCH_RE.search(text)
    return match.group(0) if match else None


def _check_range(what: str, value: int, maximum: int) -> None:
    if not 0 <= value <= maximum:
        raise ValueError(f"{what} out of range: {value}")
