"""Delta backups' page logic: paged files, the page scan (compiled and Python, which must agree), and `wi1` heads."""
from __future__ import annotations

import io
import random
import struct
from array import array

import pytest

from walrus.errors import CorruptObject
from walrus.pg import pages
from walrus.pg.pages import (BLOCK_SIZE, increment_head, increment_size, is_paged_file, read_increment_head,
                             select_pages)


def page(lsn: int = 0x1_0000_0000, *, lower: int = 28, upper: int = 8000, special: int = BLOCK_SIZE, flags: int = 0,
         version: int = 4, size: int = BLOCK_SIZE) -> bytes:
    head = struct.pack("<IIHHHHHH", lsn >> 32, lsn & 0xFFFFFFFF, 0, flags, lower, upper, special, size | version)
    return head + bytes(BLOCK_SIZE - len(head))


@pytest.mark.parametrize("relpath,size,paged", [
    ("base/16384/16385", BLOCK_SIZE, True),
    ("base/16384/16385.2", 3 * BLOCK_SIZE, True),
    ("pg_tblspc/16400/PG_15_202209061/16384/16385", BLOCK_SIZE, True),
    ("base/16384/16385_fsm", BLOCK_SIZE, False),
    ("base/16384/16385_vm", BLOCK_SIZE, False),
    ("base/16384/PG_VERSION", 3, False),
    ("base/16384/16385", 0, False),
    ("base/16384/16385", BLOCK_SIZE + 1, False),
    ("global/1262", BLOCK_SIZE, False),
    ("pg_xact/0000", BLOCK_SIZE, False),
    ("pg_multixact/offsets/0000", BLOCK_SIZE, False),
])
def test_paged_files(relpath, size, paged):
    assert is_paged_file(relpath, size) is paged


def _both(data: bytes, first: int, lsn: int) -> tuple[list[int], int | None]:
    compiled, python = array("I"), array("I")
    got = select_pages(memoryview(data), first, lsn, compiled)
    want = pages._select_in_python(memoryview(data), len(data) // BLOCK_SIZE, first, lsn, python)
    assert (list(compiled), got) == (list(python), want)
    return list(compiled), got


def test_compiled_selector_is_used():
    assert select_pages(memoryview(page()), 0, 0, array("I")) is None
    assert pages._compiled() is not None, "the compiled page scan did not load"


def test_selects_changed_and_new_pages():
    threshold = 0x2_0000_0000
    data = b"".join([page(threshold - 1), page(threshold), page(threshold + 5), bytes(BLOCK_SIZE), page(1)])
    assert _both(data, 10, threshold) == ([11, 12, 13], None)


def test_an_invalid_page_stops_the_scan_at_its_block():
    data = b"".join([page(9), page(9, lower=20), page(9)])  # pd_lower below the header
    assert _both(data, 100, 5) == ([100], 101)


@pytest.mark.parametrize("bad", [
    dict(flags=8), dict(lower=23), dict(lower=8001, upper=8000), dict(upper=8100, special=8000),
    dict(special=BLOCK_SIZE + 8), dict(lsn=0), dict(size=4096), dict(version=6),
])
def test_walg_validity_rules(bad):
    assert _both(page(**{"lsn": 7, **bad}), 0, 1) == ([], 0)


def test_compiled_and_python_scans_agree_on_random_headers():
    rng = random.Random(20)
    for _ in range(300):
        count = rng.randint(1, 12)
        data = bytearray()
        for _ in range(count):
            raw = bytearray(rng.randbytes(24)) if rng.random() < 0.3 else bytearray(page(
                rng.choice([0, 1, 5, 1 << 33, (1 << 64) - 1]), lower=rng.choice([0, 24, 100]),
                upper=rng.choice([0, 100, 8000]), special=rng.choice([8000, BLOCK_SIZE]), flags=rng.choice([0, 1, 4]))[:24])
            data += raw + bytes(BLOCK_SIZE - 24)
        _both(bytes(data), rng.randint(0, 1 << 20), rng.choice([0, 1, 6, 1 << 33]))


def test_only_whole_pages_are_scanned():
    assert _both(page(9) + page(9)[:100], 0, 1) == ([0], None)


def test_increment_head_is_walgs_layout():
    head = increment_head(3 * BLOCK_SIZE, array("I", [0, 2]))
    assert head == b"wi1\x55" + (3 * BLOCK_SIZE).to_bytes(8, "little") + (2).to_bytes(4, "little") + \
        (0).to_bytes(4, "little") + (2).to_bytes(4, "little")
    assert increment_size(2) == len(head) + 2 * BLOCK_SIZE == 16 + 8 + 16384


def test_increment_head_round_trips():
    blocks = array("I", [1, 5, 6])
    member = increment_head(10 * BLOCK_SIZE, blocks) + bytes(3 * BLOCK_SIZE)
    parsed = read_increment_head(io.BytesIO(member).read, len(member), "base/1/2")
    assert (parsed.file_size, list(parsed.blocks), parsed.size) == (10 * BLOCK_SIZE, [1, 5, 6], len(member))


@pytest.mark.parametrize("damage,message", [
    (lambda m: b"xx1\x55" + m[4:], "starts with"),
    (lambda m: b"wi2\x55" + m[4:], "version"),
    (lambda m: m[:10], "inside the 16-byte"),
    (lambda m: m + b"\0", "declares 2 pages"),
    (lambda m: m[:-1], "declares 2 pages"),
])
def test_damaged_increment_heads_are_refused(damage, message):
    member = damage(increment_head(4 * BLOCK_SIZE, array("I", [0, 3])) + bytes(2 * BLOCK_SIZE))
    with pytest.raises(CorruptObject, match="invalid increment for base/1/2") as e:
        read_increment_head(io.BytesIO(member).read, len(member), "base/1/2")
    assert message in e.value.detail


def test_an_increment_cannot_write_beyond_its_file():
    member = increment_head(2 * BLOCK_SIZE, array("I", [0, 2])) + bytes(2 * BLOCK_SIZE)
    with pytest.raises(CorruptObject) as e:
        read_increment_head(io.BytesIO(member).read, len(member), "base/1/2")
    assert "block 2 of a file of 16384 bytes" in e.value.detail


def test_page_checksums_compiled_and_python_agree_and_catch_damage():
    import random
    import struct

    from walrus.pg import pages as P

    rng = random.Random(7)
    page = bytearray(rng.randbytes(8192))
    struct.pack_into("<IIHHHHHH", page, 0, 0, 0x1000, 0, 0, 40, 8000, 8192, 8192 | 4)  # a sane header
    struct.pack_into("<H", page, 8, P.page_checksum(page, 70))  # as PostgreSQL stamps block 70
    assert P.check_pages(bytes(page), 70) == [] and P._page_ok(memoryview(page), 70)
    assert P.check_pages(bytes(page), 71) == [71]  # the same page at another block: transposed
    damaged = bytearray(page)
    damaged[5000] ^= 1
    new = bytes(8192)
    not_new = bytearray(8192)
    not_new[100] = 1  # pd_upper 0 but not all zeros
    assert P.check_pages(bytes(page) + bytes(damaged) + new + bytes(not_new), 70) == [71, 73]
    assert [b for b in range(4) if not P._page_ok(memoryview(bytes(page) + bytes(damaged) + new + bytes(not_new))
                                                  [b * 8192:(b + 1) * 8192], 70 + b)] == [1, 3]


def test_checksummed_files_and_pg_control():
    from walrus.pg.control import data_checksum_version
    from walrus.pg.pages import checksummed_block0

    assert checksummed_block0("base/5/16384") == 0 and checksummed_block0("base/5/16384.2") == 2 * 131072
    assert checksummed_block0("global/1262_vm") == 0 and checksummed_block0("pg_tblspc/16400/PG_15_1/5/16384_fsm.1") == 131072
    assert checksummed_block0("global/pg_control") is None and checksummed_block0("pg_xact/0000") is None
    assert checksummed_block0("base/5/pg_filenode.map") is None and checksummed_block0("base/pgsql_tmp/1") is None
    import struct
    control = bytes(200) + struct.pack("=8I", 8192, 131072, 8192, 16 << 20, 64, 32, 1996, 2048) + b"\x01\0\0\0"
    assert data_checksum_version(control + struct.pack("=I", 1) + bytes(40)) == 1
    assert data_checksum_version(control + struct.pack("=I", 0) + bytes(40)) == 0
    assert data_checksum_version(bytes(300)) is None
