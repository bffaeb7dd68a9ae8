"""LSN parsing and WAL file / backup naming, checked against PostgreSQL and WAL-G vectors."""
from __future__ import annotations

import pytest

from walrus.errors import ConfigError
from walrus.pg.xlog import (
    BACKUP_NAME_RE,
    DEFAULT_SEGMENT_SIZE,
    backup_name_for,
    check_segment_size,
    classify_wal_name,
    first_wal_name_in,
    format_lsn,
    next_wal_file_name,
    parse_lsn,
    parse_wal_file_name,
    segment_of,
    segments_per_xlogid,
    timeline_from_backup_name,
    wal_file_name,
)

MIB = 1024 * 1024

# Real `backup-list --detail --json` rows from WAL-G's cmd/pg/exporter/testdata/backup-list.json:
# (backup name, start_lsn). Every name is base_ + segment of (start_lsn - 1) on the name's timeline.
REAL_BACKUPS = [
    ("base_000000430000030600000060", 3325915299880),
    ("base_000000430000035900000062", 3682431139880),
    ("base_0000004300000371000000AB", 3786735091752),
    ("base_000000430000037B00000083", 3829013676072),
    ("base_000000430000038500000003", 3869815875000),
    ("base_0000004300000388000000AC_D_000000430000038500000003", 3885536116952),
    ("base_0000004300000388000000BB_D_0000004300000388000000AC", 3885787775016),
    ("base_0000004300000388000000BD", 3885821329448),
    ("base_0000004300000388000000BF_D_0000004300000388000000BD", 3885854883880),
    ("base_0000004300000388000000C1_D_0000004300000388000000BF", 3885888438312),
    ("base_0000004400000388000000C7", 3885989101608),
]


@pytest.mark.parametrize("size_mib", [1, 2, 16, 64, 1024])
def test_valid_segment_sizes_are_returned(size_mib: int) -> None:
    assert check_segment_size(size_mib * MIB) == size_mib * MIB


@pytest.mark.parametrize("size", [0, MIB // 2, 3 * MIB, 2048 * MIB, 24 * MIB, -16 * MIB])
def test_invalid_segment_sizes_raise_config_error(size: int) -> None:
    with pytest.raises(ConfigError, match="invalid WAL segment size") as info:
        check_segment_size(size)
    assert info.value.hint and "WALG_PG_WAL_SIZE" in info.value.hint


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16/B374D848", 0x16_B374D848),
        ("0/0", 0),
        ("0/2000028", 0x2000028),
        ("306/60000028", 0x306_60000028),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
        ("a/b", 0xA_0000000B),
    ],
)
def test_parse_lsn(text: str, value: int) -> None:
    assert parse_lsn(text) == value


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "1/2/3", "G/0", "123456789/0", "0x1/2", "1 /2"])
def test_parse_lsn_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(text)


@pytest.mark.parametrize("lsn", [0, 1, 0x2000028, 0x16_B374D848, 0x306_60000028, 2**64 - 1])
def test_format_parse_round_trip(lsn: int) -> None:
    assert parse_lsn(format_lsn(lsn)) == lsn


def test_format_lsn_matches_postgres() -> None:
    assert format_lsn(0x16_B374D848) == "16/B374D848"
    assert format_lsn(0x2000028) == "0/2000028"
    with pytest.raises(ValueError):
        format_lsn(2**64)


def test_spec_naming_vectors() -> None:
    # spec 13.2 item 9
    assert backup_name_for(0x43, 0x306_60000028, DEFAULT_SEGMENT_SIZE) == "base_000000430000030600000060"
    # On a segment boundary local mode names the previous segment; remote mode would say ...03.
    assert backup_name_for(1, 0x3000000, DEFAULT_SEGMENT_SIZE) == "base_000000010000000000000002"
    assert wal_file_name(1, segment_of(0x3000000, DEFAULT_SEGMENT_SIZE), DEFAULT_SEGMENT_SIZE).endswith("03")
    # spec 2.1 example
    assert backup_name_for(1, 0x2000028, DEFAULT_SEGMENT_SIZE) == "base_000000010000000000000002"


@pytest.mark.parametrize(("name", "start_lsn"), REAL_BACKUPS)
def test_real_wal_g_backups(name: str, start_lsn: int) -> None:
    own = first_wal_name_in(name)
    assert own is not None
    assert backup_name_for(timeline_from_backup_name(name), start_lsn, DEFAULT_SEGMENT_SIZE) == "base_" + own
    match = BACKUP_NAME_RE.fullmatch(name)
    assert match is not None


def test_backup_name_for_rejects_lsn_zero() -> None:
    with pytest.raises(ValueError):
        backup_name_for(1, 0, DEFAULT_SEGMENT_SIZE)


@pytest.mark.parametrize(
    ("size_mib", "per_id", "segno", "name"),
    [
        (16, 256, 0x306 * 256 + 0x60, "000000070000030600000060"),
        (1, 4096, 4096 * 5 + 0xABC, "000000070000000500000ABC"),
        (64, 64, 64 * 3 + 63, "00000007000000030000003F"),
        (1024, 4, 4 * 9 + 2, "000000070000000900000002"),
    ],
)
def test_wal_file_name_for_segment_sizes(size_mib: int, per_id: int, segno: int, name: str) -> None:
    size = size_mib * MIB
    assert segments_per_xlogid(size) == per_id
    assert wal_file_name(7, segno, size) == name
    assert parse_wal_file_name(name, size) == (7, segno)


def test_segment_of_64mib() -> None:
    size = 64 * MIB
    assert segment_of(64 * MIB - 1, size) == 0
    assert segment_of(64 * MIB, size) == 1
    # 64 segments per xlogid: segment 64 is the first of xlogid 1, named ...0100000000
    assert backup_name_for(2, 0x1_0000_0029, size) == "base_000000020000000100000000"
    assert backup_name_for(2, 0x1_0000_0000, size) == "base_00000002000000000000003F"


def test_parse_wal_file_name_rejects_offsets_beyond_the_segment_size() -> None:
    # 00000040 is a valid last field for 1 MiB segments but not for 64 MiB ones.
    assert parse_wal_file_name("000000010000000000000040", MIB) == (1, 0x40)
    with pytest.raises(ValueError, match="64 MiB"):
        parse_wal_file_name("000000010000000000000040", 64 * MIB)


@pytest.mark.parametrize(
    "name",
    ["", "00000001000000000000000", "0000000100000000000000001", "00000001000000000000000G",
     "0x000001000000000000000001", "00000001_00000000_0000001", "000000010000000000000001.partial",
     # 24 characters that int(..., 16) would take field by field: none is a name
     "0000_0010000000000000001", "+00000010000000000000001", " 00000010000000000000001",
     "\u0660" * 7 + "10000000000000000000000"[:17]],
)
def test_parse_wal_file_name_rejects_non_names(name: str) -> None:
    with pytest.raises(ValueError):
        parse_wal_file_name(name, DEFAULT_SEGMENT_SIZE)


def test_parse_wal_file_name_accepts_lowercase_like_wal_g() -> None:
    assert parse_wal_file_name("0000000a00000001000000ff", DEFAULT_SEGMENT_SIZE) == (10, 256 + 255)


def test_timeline_above_one() -> None:
    assert wal_file_name(0x1A, 5, DEFAULT_SEGMENT_SIZE) == "0000001A0000000000000005"
    assert parse_wal_file_name("FFFFFFFF0000000000000005", DEFAULT_SEGMENT_SIZE) == (0xFFFFFFFF, 5)
    with pytest.raises(ValueError):
        wal_file_name(2**32, 0, DEFAULT_SEGMENT_SIZE)


@pytest.mark.parametrize(
    ("size_mib", "name", "following"),
    [
        (16, "0000000300000001000000FE", "0000000300000001000000FF"),
        (16, "0000000300000001000000FF", "000000030000000200000000"),
        (64, "00000003000000010000003F", "000000030000000200000000"),
        (1, "000000030000000100000FFF", "000000030000000200000000"),
        (1024, "000000030000000100000003", "000000030000000200000000"),
    ],
)
def test_next_wal_file_name_crosses_xlogid(size_mib: int, name: str, following: str) -> None:
    assert next_wal_file_name(name, size_mib * MIB) == following


def test_next_wal_file_name_refuses_to_overflow() -> None:
    with pytest.raises(ValueError):
        next_wal_file_name("00000001FFFFFFFF000000FF", DEFAULT_SEGMENT_SIZE)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("000000010000000000000003", "segment"),
        ("00000002.history", "history"),
        ("000000010000000000000002.00000028.backup", "backup"),
        ("000000010000000000000003.partial", "partial"),
        ("000000010000000000000003.lz4", "other"),
        ("00000002.history.lz4", "other"),
        ("0000000100000000000000ab", "other"),
        ("2.history", "other"),
        ("archive_status", "other"),
        ("000000010000000000000003.00000028.backup.partial", "other"),
    ],
)
def test_classify_wal_name(name: str, kind: str) -> None:
    assert classify_wal_name(name) == kind


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("base_000000010000000000000002_backup_stop_sentinel.json", "base_000000010000000000000002"),
        ("basebackups_005/base_000000010000000000000004_D_000000010000000000000002/metadata.json",
         "base_000000010000000000000004_D_000000010000000000000002"),
        ("base_000000010000000000000004_00000040_backup_stop_sentinel.json",
         "base_000000010000000000000004_00000040"),
        ("base_000000010000000000000004/tar_partitions/part_001.tar.lz4", "base_000000010000000000000004"),
    ],
)
def test_backup_name_regex_finds_names_in_keys(key: str, name: str) -> None:
    match = BACKUP_NAME_RE.search(key)
    assert match is not None and match.group(0) == name


@pytest.mark.parametrize(
    "key", ["base_00000001000000000000000_backup_stop_sentinel.json", "base_0000000100000000000000ab", "bases"]
)
def test_backup_name_regex_ignores_non_names(key: str) -> None:
    assert BACKUP_NAME_RE.search(key) is None


def test_timeline_from_backup_name() -> None:
    assert timeline_from_backup_name("base_000000430000030600000060") == 0x43
    assert timeline_from_backup_name("base_0000004400000388000000C7_D_000000430000038500000003") == 0x44
    for bad in ["", "base_", "base_0000004", "wal_000000430000030600000060", "base_XYZ00043"]:
        with pytest.raises(ValueError):
            timeline_from_backup_name(bad)


def test_first_wal_name_in() -> None:
    assert first_wal_name_in("wal_005/000000010000000000000003.lz4") == "000000010000000000000003"
    assert (
        first_wal_name_in("base_000000010000000000000004_D_000000010000000000000002")
        == "000000010000000000000004"
    )
    assert first_wal_name_in("wal_005/00000002.history.lz4") is None
    assert first_wal_name_in("0000000100000000000000ab") is None
