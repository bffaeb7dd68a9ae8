"""Tests for the streaming tar reader and the safe extractor of backup tar parts."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import tracemalloc

import pytest

from walrus.tar.read import (
    ExtractStats,
    extract_tar,
    iter_members,
    member_relpath,
)
from walrus.errors import CorruptObject, WalrusError

LONG_DIR = "/pg_tblspc/16385/PG_16_202307071/16384/" + "d" * 60
LONG_FILE = LONG_DIR + "/" + "f" * 70  # > 100 bytes: ustar prefix, GNU 'L' or PAX 'x'


class Trickle:
    """A pull reader that hands out at most `step` bytes per read and has no readinto."""

    def __init__(self, data: bytes, step: int = 7):
        self._data = data
        self._pos = 0
        self._step = step

    def read(self, n: int) -> bytes:
        chunk = self._data[self._pos:self._pos + min(n, self._step)]
        self._pos += len(chunk)
        return chunk


def info(name: str, kind: bytes = tarfile.REGTYPE, *, size: int = 0, mode: int = 0o600,
         linkname: str = "", mtime: float = 1_700_000_000,
         pax: dict | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = size
    ti.mode = mode
    ti.linkname = linkname
    ti.mtime = mtime
    if pax:
        ti.pax_headers = pax
    return ti


def python_tar(entries: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT,
               **kwargs) -> bytes:
    """A tar written by Python's tarfile (padded to a 10240-byte record)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, **kwargs) as tar:
        for ti, data in entries:
            ti.size = len(data) if ti.type == tarfile.REGTYPE else ti.size
            tar.addfile(ti, io.BytesIO(data))
    return out.getvalue()


def go_tar(entries: list[tuple[tarfile.TarInfo, bytes]], *, end: bytes = bytes(1024)) -> bytes:
    """A tar laid out the way Go's archive/tar writes it: no record padding after the end blocks."""
    parts = []
    for ti, data in entries:
        if ti.type == tarfile.REGTYPE and not ti.pax_headers:
            ti.size = len(data)
        parts.append(ti.tobuf(tarfile.USTAR_FORMAT if not ti.pax_headers else tarfile.PAX_FORMAT,
                              "utf-8", "surrogateescape"))
        parts.append(data + bytes(-len(data) % 512))
    parts.append(end)
    return b"".join(parts)


def pgdata_entries() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        (info("/", tarfile.DIRTYPE, mode=0o700), b""),
        (info("/base", tarfile.DIRTYPE, mode=0o750), b""),
        (info("/base/1", tarfile.DIRTYPE, mode=0o700), b""),
        (info("/base/1/1259", mode=0o600), b"relation" * 1000),
        (info("/PG_VERSION", mode=0o640), b"16\n"),
        (info("/global/pg_control", mode=0o600), bytes(range(256)) * 32),
        # Tablespace contents come before their directory entries, as WAL-G walks them.
        (info(LONG_FILE, mode=0o600), b"tablespace data"),
        (info(LONG_DIR, tarfile.DIRTYPE, mode=0o750), b""),
        (info("/pg_tblspc", tarfile.DIRTYPE, mode=0o700), b""),
        (info("/empty", mode=0o600), b""),
    ]


def read_all(stream, name: str = "part_001.tar") -> list[tuple[str, str, int, int, bytes]]:
    return [(m.name, m.kind, m.size, m.mode, data.read())
            for m, data in iter_members(stream, name=name)]


EXPECTED = [
    ("/", "dir", 0, 0o700, b""),
    ("/base", "dir", 0, 0o750, b""),
    ("/base/1", "dir", 0, 0o700, b""),
    ("/base/1/1259", "file", 8000, 0o600, b"relation" * 1000),
    ("/PG_VERSION", "file", 3, 0o640, b"16\n"),
    ("/global/pg_control", "file", 8192, 0o600, bytes(range(256)) * 32),
    (LONG_FILE, "file", 15, 0o600, b"tablespace data"),
    (LONG_DIR, "dir", 0, 0o750, b""),
    ("/pg_tblspc", "dir", 0, 0o700, b""),
    ("/empty", "file", 0, 0o600, b""),
]


# --- iter_members ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("reader", [io.BytesIO, Trickle])
def test_reads_python_formats(fmt, reader):
    assert read_all(reader(python_tar(pgdata_entries(), fmt))) == EXPECTED


@pytest.mark.parametrize("reader", [io.BytesIO, Trickle])
def test_reads_go_layout_without_record_padding(reader):
    data = go_tar(pgdata_entries())
    assert len(data) % 10240 != 0
    assert read_all(reader(data)) == EXPECTED


def test_one_zero_block_then_eof_ends_the_archive():
    data = go_tar([(info("/a"), b"x")], end=bytes(512))
    assert read_all(io.BytesIO(data)) == [("/a", "file", 1, 0o600, b"x")]


def test_long_names_without_pax_use_the_ustar_prefix():
    block = info(LONG_FILE).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    assert block[257:263] == b"ustar\x00" and block[345:350] == b"/pg_t"
    assert read_all(io.BytesIO(go_tar([(info(LONG_FILE), b"")])))[0][0] == LONG_FILE


def test_gnu_header_times_are_not_a_name_prefix():
    # GNU tar stores atime/ctime where ustar keeps the name prefix.
    block = bytearray(info("/base/1/2").tobuf(tarfile.GNU_FORMAT, "utf-8", "strict"))
    assert block[257:265] == b"ustar  \x00"
    block[345:357] = b"%011o\x00" % 1_700_000_000
    data = with_checksum(block) + bytes(1024)
    assert read_all(io.BytesIO(data)) == [("/base/1/2", "file", 0, 0o600, b"")]


def test_pax_overrides_size_and_mtime_and_global_headers_are_ignored():
    # The ustar size field says 0; the PAX record is authoritative.
    override = info("/big", pax={"size": "5", "mtime": "1700000000.75"})
    data = go_tar([(override, b"hello"), (info("/next"), b"n")])
    members = [(m, d.read()) for m, d in iter_members(io.BytesIO(data))]
    assert [(m.name, m.size, m.mtime, body) for m, body in members] == [
        ("/big", 5, 1_700_000_000, b"hello"), ("/next", 1, 1_700_000_000, b"n")]

    with_global = python_tar([(info("/a"), b"abc")], pax_headers={"comment": "walrus"})
    assert with_global[156:157] == tarfile.XGLTYPE
    assert read_all(io.BytesIO(with_global)) == [("/a", "file", 3, 0o600, b"abc")]


def test_non_ascii_names_round_trip():
    name = "/base/é/\udcff"  # a UTF-8 name and an undecodable byte
    data = python_tar([(info(name), b"z")], tarfile.PAX_FORMAT, errors="surrogateescape")
    assert read_all(io.BytesIO(data))[0][0] == name


def test_unread_and_partly_read_payloads_are_skipped():
    data = python_tar(pgdata_entries(), tarfile.GNU_FORMAT)
    seen = []
    for member, payload in iter_members(Trickle(data, 1000)):
        if member.name == "/base/1/1259":
            assert payload.read(3) == b"rel"
            buf = bytearray(5)
            assert payload.readinto(buf) == 5 and bytes(buf) == b"ation"
            assert payload.remaining == 8000 - 8
        seen.append(member.name)
    assert seen == [e[0] for e in EXPECTED]


def test_payload_reads_stop_at_member_end():
    data = go_tar([(info("/a"), b"abc"), (info("/b"), b"bc")])
    for _member, payload in iter_members(io.BytesIO(data)):
        assert payload.read(10) in (b"abc", b"bc")
        assert payload.read(10) == b"" and payload.readinto(bytearray(4)) == 0
    # Once the generator moves on, an earlier payload is drained and reads nothing.
    (_, first), (_, second) = list(iter_members(io.BytesIO(data)))
    assert first.read(10) == b"" and second.read() == b""


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_link_members_report_their_targets(fmt):
    far = "../" + "t" * 120  # beyond the 100-byte linkname field outside USTAR
    entries = [(info("/d/l", tarfile.SYMTYPE, linkname="../f"), b""),
               (info("/h", tarfile.LNKTYPE, linkname="/f"), b""),
               (info("/dev", tarfile.CHRTYPE), b"")]
    if fmt != tarfile.USTAR_FORMAT:
        entries.append((info("/d/far", tarfile.SYMTYPE, linkname=far), b""))
    members = [m for m, _ in iter_members(io.BytesIO(python_tar(entries, fmt)))]
    assert [(m.kind, m.linkname, m.size) for m in members] == [
        ("symlink", "../f", 0), ("hardlink", "/f", 0), ("other", "", 0),
        *([("symlink", far, 0)] if fmt != tarfile.USTAR_FORMAT else [])]


def with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def corrupt_cases() -> dict[str, tuple[bytes, str]]:
    """Each case's bytes and a phrase the error detail must contain."""
    good = go_tar([(info("/base/1/1259"), b"p" * 1000), (info("/b"), b"bb")])
    bad_sum = bytearray(good)
    bad_sum[0] ^= 0x01
    negative = bytearray(info("/neg").tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    negative[124:136] = b"\xff" * 12  # base-256 -1
    huge = bytearray(info("/huge").tobuf(tarfile.GNU_FORMAT, "utf-8", "strict"))
    huge[124:136] = b"\x80" + b"\xff" * 11  # base-256 2**88-1, beyond Go's int64
    long_pax = info("/" + "x" * 200).tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
    return {
        "truncated payload": (good[:700], "ends after 188 of 1000"),
        "truncated header": (good[:300], "inside the header"),
        "eof inside padding": (good[:512 + 1010], "inside the padding"),
        "eof after one byte of padding": (good[:512 + 1001], "inside the padding"),
        "empty stream": (b"", "without an end-of-archive"),
        "eof inside the second header": (good[:512 + 1024 + 100], "inside the header"),
        "eof inside the last payload": (good[:512 + 1024 + 512 + 1], "ends after 1 of 2"),
        "eof after an extended header": (long_pax[:512 * 2], "without an end-of-archive"),
        "bad checksum": (bytes(bad_sum), "bad checksum"),
        "negative size": (with_checksum(negative) + bytes(1024), "size -1"),
        "huge size": (with_checksum(huge) + bytes(1024), f"size {2**88 - 1}"),
        "trailing garbage": (good + bytes(4000) + b"junk", "follow the end-of-archive"),
        "garbage block after one zero block": (good[:-512] + b"x" * 512,
                                               "follow the end-of-archive"),
        "dangling extended header": (long_pax[:512 * 2] + bytes(1024), "not followed by a member"),
    }


@pytest.mark.parametrize("case", sorted(corrupt_cases()))
def test_corrupt_archives_are_rejected(case):
    data, phrase = corrupt_cases()[case]
    with pytest.raises(CorruptObject) as raised:
        for _member, payload in iter_members(io.BytesIO(data), name="part_007.tar.lz4"):
            payload.read()
    assert "part_007.tar.lz4" in raised.value.message
    assert phrase in raised.value.detail


def test_truncation_names_the_member():
    data = go_tar([(info("/base/1/1259"), b"p" * 1000)])[:700]
    with pytest.raises(CorruptObject) as raised:
        read_all(io.BytesIO(data))
    assert "/base/1/1259" in raised.value.detail and "188 of 1000" in raised.value.detail


@pytest.mark.parametrize("cut", ["end blocks", "end blocks and padding"])
@pytest.mark.parametrize("reader", [io.BytesIO, Trickle])
def test_eof_at_a_member_boundary_ends_the_archive(cut, reader):
    """As Go's archive/tar: WAL-G's remote-mode parts and BASE_BACKUP's archives have no end blocks,
    and may lack the last member's padding."""
    good = go_tar([(info("/base/1/1259"), b"p" * 1000), (info("/b"), b"bb")])
    data = good[:-1024] if cut == "end blocks" else good[:-1024 - 510]
    assert read_all(reader(data)) == [("/base/1/1259", "file", 1000, 0o600, b"p" * 1000),
                                      ("/b", "file", 2, 0o600, b"bb")]


def test_eof_after_a_directory_or_a_whole_block_member_ends_the_archive():
    data = go_tar([(info("/a"), b"x" * 512), (info("/d", tarfile.DIRTYPE, mode=0o700), b"")], end=b"")
    assert read_all(io.BytesIO(data)) == [("/a", "file", 512, 0o600, b"x" * 512), ("/d", "dir", 0, 0o700, b"")]


def test_extract_accepts_a_part_without_end_blocks(dest):
    data = go_tar([(info("global", tarfile.DIRTYPE, mode=0o700), b""), (info("global/pg_control"), b"c" * 8192)],
                  end=b"")
    stats = extract_tar(io.BytesIO(data), dest, name="pg_control.tar")
    assert stats.files == 1
    with open(os.path.join(dest, "global", "pg_control"), "rb") as f:
        assert f.read() == b"c" * 8192


def test_trailing_zeros_of_any_length_are_accepted():
    data = go_tar([(info("/a"), b"x")]) + bytes(3 * 1024 * 1024 + 17)
    assert read_all(io.BytesIO(data)) == [("/a", "file", 1, 0o600, b"x")]


# --- member_relpath -------------------------------------------------------------------------

@pytest.mark.parametrize("name, rel", [
    ("/base/1/1259", "base/1/1259"), ("backup_label", "backup_label"), ("/", ""), ("", ""),
    ("./global/pg_control", "global/pg_control"), ("//a//b/./c", "a/b/c"), ("./", ""),
])
def test_member_relpath(name, rel):
    assert member_relpath(name) == rel


@pytest.mark.parametrize("name", ["../x", "/../../etc/x", "a/../../b", "a/..", "a\x00b"])
def test_member_relpath_rejects_escapes(name):
    with pytest.raises(CorruptObject):
        member_relpath(name)


# --- extract_tar ----------------------------------------------------------------------------

@pytest.fixture
def dest(tmp_path):
    path = tmp_path / "dest"
    path.mkdir(mode=0o755)
    return path


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_extracts_files_dirs_and_modes(dest, fmt):
    stats = extract_tar(Trickle(python_tar(pgdata_entries(), fmt), 4096), str(dest),
                        name="part_001.tar", buffer_size=1000)
    restored = stats.restored
    stats.restored = set()
    assert stats == ExtractStats(files=5, dirs=5, bytes=8000 + 3 + 8192 + 15, skipped=0,
                                 root_mode=0o700)
    assert {"base/1/1259", "global/pg_control", "PG_VERSION", "base", "pg_tblspc"} <= restored
    assert mode_of(dest) == 0o755  # the caller applies root_mode at the end
    assert (dest / "base/1/1259").read_bytes() == b"relation" * 1000
    assert (dest / "PG_VERSION").read_bytes() == b"16\n"
    assert (dest / "global/pg_control").read_bytes() == bytes(range(256)) * 32
    assert (dest / LONG_FILE.lstrip("/")).read_bytes() == b"tablespace data"
    assert (dest / "empty").read_bytes() == b""
    assert mode_of(dest / "PG_VERSION") == 0o640
    assert mode_of(dest / "base/1/1259") == 0o600
    assert mode_of(dest / "base") == 0o750
    assert mode_of(dest / "global") == 0o700  # created as a parent, no member of its own
    assert mode_of(dest / LONG_DIR.lstrip("/")) == 0o750


def test_modes_keep_only_permission_bits(dest):
    data = python_tar([(info("/d", tarfile.DIRTYPE, mode=0o4755 | 0o2000), b""),
                       (info("/d/f", mode=0o4711), b"x")])
    extract_tar(io.BytesIO(data), str(dest))
    assert mode_of(dest / "d") == 0o755 and mode_of(dest / "d/f") == 0o711


def test_backup_label_part(dest):
    entries = [(info("backup_label", mtime=0), b"START WAL LOCATION: 0/2000028\n"),
               (info("tablespace_map", mtime=0), b"")]
    stats = extract_tar(io.BytesIO(go_tar(entries)), str(dest))
    assert stats.files == 2 and stats.root_mode is None
    assert (dest / "backup_label").read_bytes().startswith(b"START WAL")


def test_existing_file_is_truncated_and_replaced(dest):
    (dest / "PG_VERSION").write_bytes(b"something much longer than the new content")
    extract_tar(io.BytesIO(python_tar([(info("/PG_VERSION", mode=0o600), b"16\n")])), str(dest))
    assert (dest / "PG_VERSION").read_bytes() == b"16\n"


def test_directory_in_place_of_a_file_is_an_error(dest):
    (dest / "PG_VERSION").mkdir()
    with pytest.raises(WalrusError) as raised:
        extract_tar(io.BytesIO(python_tar([(info("/PG_VERSION"), b"16\n")])), str(dest))
    assert "/PG_VERSION" in raised.value.message and "dest" in raised.value.detail


def test_file_in_place_of_a_directory_is_an_error(dest):
    (dest / "base").write_bytes(b"")
    with pytest.raises(WalrusError):
        extract_tar(io.BytesIO(python_tar([(info("/base/1/2"), b"x")])), str(dest))


def test_wanted_filters_regular_files_only(dest):
    keep = {"base/1/1259", "PG_VERSION"}
    stats = extract_tar(io.BytesIO(python_tar(pgdata_entries())), str(dest),
                        wanted=keep.__contains__)
    assert stats.files == 2 and stats.skipped == 3 and stats.dirs == 5
    assert (dest / "base/1/1259").read_bytes() == b"relation" * 1000
    assert (dest / "PG_VERSION").read_bytes() == b"16\n"
    assert not (dest / "global/pg_control").exists() and not (dest / "empty").exists()
    assert (dest / "pg_tblspc").is_dir()


def test_truncated_payload_is_corrupt(dest):
    data = python_tar([(info("/base/1/1259"), b"p" * 5000)])[:3000]
    with pytest.raises(CorruptObject) as raised:
        extract_tar(io.BytesIO(data), str(dest), name="part_002.tar.zst")
    assert "part_002.tar.zst" in raised.value.message and "/base/1/1259" in raised.value.detail


def test_large_member_streams_with_bounded_memory(dest):
    size = 20 * 1024 * 1024
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB

    class Generated:
        """Yields a one-member tar without ever holding the payload."""

        def __init__(self):
            header = info("/base/1/big", size=size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
            self._chunks = iter([header, *([block] * (size // len(block))), bytes(1024)])
            self._pending = b""

        def read(self, n: int) -> bytes:
            if not self._pending:
                self._pending = next(self._chunks, b"")
            chunk, self._pending = self._pending[:n], self._pending[n:]
            return chunk

    tracemalloc.start()
    try:
        stats = extract_tar(Generated(), str(dest), buffer_size=64 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.bytes == size
    assert peak < 2 * 1024 * 1024
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()
    with open(dest / "base/1/big", "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == expected


def test_inside_symlinks_and_hardlinks_are_restored(dest):
    entries = [
        (info("/f", mode=0o640), b"data"),
        (info("/d/link", tarfile.SYMTYPE, linkname="../f"), b""),
        (info("/d/e/deeper", tarfile.SYMTYPE, linkname="../../d/./link"), b""),
        (info("/here", tarfile.SYMTYPE, linkname="f"), b""),
        (info("/hard", tarfile.LNKTYPE, linkname="/f"), b""),
    ]
    data = python_tar(entries)
    stats = extract_tar(io.BytesIO(data), str(dest))
    assert stats.files == 5
    assert os.readlink(dest / "d/link") == "../f"
    assert (dest / "d/e/deeper").read_bytes() == b"data"
    assert os.stat(dest / "hard").st_ino == os.stat(dest / "f").st_ino
    # Restoring a delta chain replays the same links; identical symlinks are accepted again.
    extract_tar(io.BytesIO(python_tar(entries[:4])), str(dest))
    assert os.readlink(dest / "here") == "f"


def hostile_cases() -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    return {
        "dotdot file": [(info("../x"), b"evil")],
        "absolute dotdot file": [(info("/../../etc/x"), b"evil")],
        "dotdot dir": [(info("a/../../x", tarfile.DIRTYPE), b"")],
        "absolute symlink": [(info("/x", tarfile.SYMTYPE, linkname="/etc/passwd"), b"")],
        "escaping symlink": [(info("a", tarfile.SYMTYPE, linkname="../../x"), b"")],
        "escaping nested symlink": [(info("/d/x", tarfile.SYMTYPE, linkname="../../x"), b"")],
        "folded symlink": [(info("/d/x", tarfile.SYMTYPE, linkname="e/../../../x"), b"")],
        "hardlink outside": [(info("/x", tarfile.LNKTYPE, linkname="../outside"), b"")],
        "hardlink absolute": [(info("/x", tarfile.LNKTYPE, linkname="/etc/passwd"), b"")],
        "hardlink to a directory": [(info("/d", tarfile.DIRTYPE), b""),
                                    (info("/x", tarfile.LNKTYPE, linkname="/d"), b"")],
        "character device": [(info("/x", tarfile.CHRTYPE), b"")],
        "block device": [(info("/x", tarfile.BLKTYPE), b"")],
        "fifo": [(info("/x", tarfile.FIFOTYPE), b"")],
        "file at the root": [(info("/", tarfile.REGTYPE), b"")],
    }


@pytest.mark.parametrize("case", sorted(hostile_cases()))
def test_hostile_members_are_corrupt_and_write_nothing_outside(tmp_path, dest, case):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    with pytest.raises(CorruptObject):
        extract_tar(io.BytesIO(python_tar(hostile_cases()[case])), str(dest), name="part_003.tar")
    assert sorted(os.listdir(tmp_path)) == ["dest", "outside"]
    assert outside.read_bytes() == b"precious" and os.stat(outside).st_nlink == 1
    assert not os.path.lexists(dest / "x") and not os.path.lexists(dest / "a")


def test_links_outside_message(dest):
    with pytest.raises(CorruptObject) as raised:
        extract_tar(io.BytesIO(python_tar(hostile_cases()["absolute symlink"])), str(dest),
                    name="part_003.tar")
    assert raised.value.message == (
        "tar member '/x' in 'part_003.tar' links outside the restore directory")


def test_archive_symlink_is_never_written_through(tmp_path, dest):
    entries = [(info("/sub", tarfile.DIRTYPE, mode=0o700), b""),
               (info("/evil", tarfile.SYMTYPE, linkname="sub"), b""),
               (info("/evil/x", mode=0o600), b"through")]
    with pytest.raises(WalrusError) as raised:
        extract_tar(io.BytesIO(python_tar(entries)), str(dest))
    assert "symbolic link" in raised.value.message
    assert os.listdir(dest / "sub") == []


@pytest.mark.parametrize("name", ["/base/1/2", "/PG_VERSION"])
def test_preexisting_symlink_in_dest_is_refused(tmp_path, dest, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "PG_VERSION").write_bytes(b"keep")
    os.symlink(outside, dest / "base")
    os.symlink(outside / "PG_VERSION", dest / "PG_VERSION")
    with pytest.raises(WalrusError) as raised:
        extract_tar(io.BytesIO(python_tar([(info(name), b"evil")])), str(dest))
    assert "symbolic link" in raised.value.message
    assert sorted(os.listdir(outside)) == ["PG_VERSION"]
    assert (outside / "PG_VERSION").read_bytes() == b"keep"


def tablespace_setup(tmp_path, dest):
    location = tmp_path / "tblspc_loc"
    location.mkdir()
    (dest / "pg_tblspc").mkdir()
    os.symlink(location, dest / "pg_tblspc/16385")
    return location


def test_allowed_tablespace_link_is_written_through(tmp_path, dest):
    location = tablespace_setup(tmp_path, dest)
    entries = [
        (info(LONG_FILE, mode=0o600), b"in the tablespace"),
        (info("/pg_tblspc/16385/PG_16_202307071/16384/link", tarfile.SYMTYPE,
              linkname="../../sibling"), b""),
        (info("/pg_tblspc/16385", tarfile.DIRTYPE, mode=0o700), b""),
        # PostgreSQL's own base.tar carries the tablespace link; the caller's link stays.
        (info("/pg_tblspc/16385", tarfile.SYMTYPE, linkname="/somewhere/else"), b""),
    ]
    stats = extract_tar(io.BytesIO(python_tar(entries)), str(dest),
                        allowed_links=frozenset({"pg_tblspc/16385"}))
    assert stats.files == 2 and stats.skipped == 1
    inside = location / LONG_FILE.removeprefix("/pg_tblspc/16385/")
    assert inside.read_bytes() == b"in the tablespace"
    assert mode_of(location) == 0o700
    assert os.readlink(dest / "pg_tblspc/16385") == str(location)


def test_symlink_may_not_climb_out_of_a_tablespace(tmp_path, dest):
    location = tablespace_setup(tmp_path, dest)
    # Lexically this lands on dest/pg_tblspc, but ".." from the link's directory moves in
    # the tablespace location, so it would point beside it.
    entry = (info("/pg_tblspc/16385/link", tarfile.SYMTYPE, linkname="../x"), b"")
    with pytest.raises(CorruptObject):
        extract_tar(io.BytesIO(python_tar([entry])), str(dest),
                    allowed_links=frozenset({"pg_tblspc/16385"}))
    assert os.listdir(location) == []


def test_tablespace_link_is_refused_unless_allowed(tmp_path, dest):
    location = tablespace_setup(tmp_path, dest)
    with pytest.raises(WalrusError) as raised:
        extract_tar(io.BytesIO(python_tar([(info(LONG_FILE), b"x")])), str(dest))
    assert not isinstance(raised.value, CorruptObject)
    assert os.listdir(location) == []


def test_missing_dest_is_an_error(tmp_path):
    with pytest.raises(WalrusError) as raised:
        extract_tar(io.BytesIO(python_tar([])), str(tmp_path / "nope"))
    assert "nope" in raised.value.message


def test_member_pieces_hand_out_the_source_reads_unjoined_and_fail_when_cut():
    payload = os.urandom(10_000)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        ti = tarfile.TarInfo("base/1/1259")
        ti.size = len(payload)
        tar.addfile(ti, io.BytesIO(payload))
        ti = tarfile.TarInfo("PG_VERSION")
        ti.size = 3
        tar.addfile(ti, io.BytesIO(b"15\n"))
    data = buf.getvalue()
    got = {}
    for member, body in iter_members(Trickle(data, step=999), name="pieces.tar"):
        pieces = list(body.pieces(600))
        assert all(0 < len(p) <= 600 for p in pieces)
        got[member.name] = b"".join(pieces)
    assert got == {"base/1/1259": payload, "PG_VERSION": b"15\n"}
    cut = data[:512 + 4000]  # the header and part of the payload
    with pytest.raises(CorruptObject, match="truncated"):
        for _member, body in iter_members(Trickle(cut, step=999), name="cut.tar"):
            list(body.pieces(600))
