"""WAL segment file names in plain string operations: what restore_command's quickest answer needs,
without the regular-expression engine's start-up (xlog.py re-exports these beside the other names)."""
from __future__ import annotations

MIN_SEGMENT_SIZE = 1024 * 1024
MAX_SEGMENT_SIZE = 1024 * 1024 * 1024
XLOGID_SPAN = 0x100000000  # bytes of WAL covered by one value of the name's middle field

_UPPER_HEX = frozenset("0123456789ABCDEF")
# WAL-G parses the three fields with strconv.ParseUint(..., 16), which accepts either case.
_ANY_HEX = frozenset("0123456789ABCDEFabcdef")


def is_segment_name(name: str) -> bool:
    """PostgreSQL's IsXLogFileName: 24 uppercase hex digits."""
    return len(name) == 24 and _UPPER_HEX.issuperset(name)


def segments_per_xlogid(segment_size: int) -> int:
    """Number of segments named under one value of the name's middle (xlogid) field."""
    return XLOGID_SPAN // segment_size


def parse_wal_file_name(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, segno) of a 24-hex-digit WAL file name; ValueError if it is not one."""
    if len(name) != 24 or not _ANY_HEX.issuperset(name):
        raise ValueError(f"not a WAL file name: {name!r} (expected 24 hex digits)")
    timeline, xlogid, offset = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    per_id = segments_per_xlogid(segment_size)
    if offset >= per_id:
        raise ValueError(
            f"not a WAL file name for {segment_size // MIN_SEGMENT_SIZE} MiB segments: {name!r} "
            f"(last field must be below {per_id:08X})"
        )
    return timeline, xlogid * per_id + offset
