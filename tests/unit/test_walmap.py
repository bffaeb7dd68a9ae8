"""The WAL block map: the compiled parser over synthetic WAL (page and segment crossings, every kind
of block header, records that change files without block references), sidecars, and the union a
delta reads; load_block_map over stored maps and pg_wal."""
from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from array import array

import pytest

from tests.unit.walgen import PAGE, Record, Ref, dbase_copy, filler, smgr_create, switch, wal_stream
from walrus.backup.blockmap import MapJoin, load_block_map, prefetch_stored_maps
from walrus.config import load_settings
from walrus.errors import CorruptObject
from walrus.pg.walmap import (WHOLE, BlockMap, MapError, SegmentMap, SegmentParser, join_record,
                              relation_of)
from walrus.pg.xlog import wal_file_name
from walrus.storage import open_storage

SEG = 1 << 20  # PostgreSQL's smallest segment keeps the tests fast
START = 40 * SEG


def parse(data: bytes, start: int = START, stop: int = 0, piece: int = 3 * PAGE + 123) -> SegmentMap:
    """One segment's map, fed in pieces that split pages (as no reader would, to prove it need not)."""
    parser = SegmentParser(1, SEG, start, stop)
    for i in range(0, len(data), piece):
        if not parser.feed(data[i:i + piece]):
            break
    return parser.finish()


def quads(refs: array) -> set[tuple[int, ...]]:
    return {tuple(refs[i:i + 4]) for i in range(0, len(refs), 4)}


def union_of(data: bytes, segments: int, start: int = START) -> set[tuple[int, ...]]:
    """The union over the segments the stream reached (PostgreSQL has not written the others yet)."""
    maps = [parse(data[i * SEG:(i + 1) * SEG], start + i * SEG) for i in range(segments) if data[i * SEG]]
    found = set()
    for i, m in enumerate(maps):
        found |= quads(m.refs)
        if m.tail_len:
            found |= quads(join_record(m, maps[i + 1]))
    return found


def random_records(rng: random.Random, n: int) -> tuple[list[Record], set[tuple[int, ...]]]:
    records, expected = [], set()
    for _ in range(n):
        refs = []
        for i in range(rng.choice([0, 1, 1, 2, 3, 5])):
            same = i > 0 and rng.random() < 0.5
            spc, db, rel = (refs[-1].spc, refs[-1].db, refs[-1].rel) if same else \
                (rng.choice([1663, 16400]), rng.choice([5, 16384]), rng.randrange(16384, 16400))
            ref = Ref(spc, db, rel, rng.randrange(0, 300000), fork=rng.choice([0, 0, 0, 1, 2]),
                      image=rng.choice([0, 0, 8192, 3000]), data=rng.choice([0, 30, 200]), same_rel=same,
                      hole_compressed=rng.random() < 0.3)
            refs.append(ref)
            if ref.fork == 0:
                expected.add((spc, db, rel, ref.blk))
        records.append(Record(refs=refs, main=bytes(rng.choice([0, 10, 300])), origin=rng.random() < 0.1,
                              toplevel_xid=rng.random() < 0.1))
    return records, expected


def test_every_main_fork_block_of_records_across_pages_and_segments():
    rng = random.Random(7)
    records, expected = random_records(rng, 900)
    data, _ = wal_stream(records, START, 8, SEG)
    assert union_of(data, 8) == expected


def test_a_record_whose_header_crosses_into_the_next_segment():
    refs = [Ref(1663, 5, 16384 + i, i, data=10) for i in range(30)]  # 624 bytes of headers, 300 of data
    for lead in (48, 200, 600, 896):  # bytes of the record in the first segment
        data, lsns = wal_stream([filler(SEG - 40 - 24 * (SEG // PAGE - 1) - lead), Record(refs=refs)], START, 2, SEG)
        assert lsns[1] == START + SEG - lead
        first, second = parse(data[:SEG]), parse(data[SEG:], START + SEG)
        assert (first.tail_len > 0) == (lead < 624), lead  # headers cut: the next segment's start completes them
        assert second.cont_len == 924 - lead
        assert union_of(data, 2) == {(1663, 5, 16384 + i, i) for i in range(30)}


def test_a_record_larger_than_a_segment():
    big = Record(refs=[Ref(1663, 5, 16384, 9, image=8000), Ref(1663, 5, 16385, 10)], main=bytes(SEG + 5000))
    data, _ = wal_stream([filler(SEG - 40 - 24 * (SEG // PAGE - 1) - 56), big, Record(refs=[Ref(1663, 5, 1, 2)])],
                         START, 3, SEG)
    maps = [parse(data[i * SEG:(i + 1) * SEG], START + i * SEG) for i in range(3)]
    assert maps[0].tail_len == big.encode().__len__() and maps[1].cont_len > SEG
    assert union_of(data, 3) == {(1663, 5, 16384, 9), (1663, 5, 16385, 10), (1663, 5, 1, 2)}


def test_created_relations_and_copied_databases_are_whole():
    data, _ = wal_stream([smgr_create(1663, 5, 17000), smgr_create(1663, 5, 17001, fork=1), dbase_copy(16500, 1663),
                          Record(refs=[Ref(1663, 5, 16384, 3)])], START, 1, SEG)
    found = quads(parse(data).refs)
    assert found == {(1663, 5, 17000, WHOLE), (1663, 16500, 0, WHOLE), (1663, 5, 16384, 3)}
    union = BlockMap()
    union.add(parse(data).refs)
    union.seal()
    assert union.blocks("base/5/17000", 8 * PAGE) is None  # created anew: copied whole
    assert union.blocks("base/16500/1259", 8 * PAGE) is None  # its database was copied from a template
    assert union.blocks("base/5/17001", 8 * PAGE) == array("I")  # only a fork was created
    assert union.blocks("base/5/16384", 8 * PAGE) == array("I", [3])


def test_a_switch_ends_the_segment_and_stop_lsn_ends_the_parse():
    data, lsns = wal_stream([Record(refs=[Ref(1663, 5, 1, 1)]), switch(), Record(refs=[Ref(1663, 5, 1, 2)])],
                            START, 2, SEG)
    first = parse(data[:SEG])
    assert first.switched and quads(first.refs) == {(1663, 5, 1, 1)}
    records = [Record(refs=[Ref(1663, 5, 1, b)]) for b in range(50)]
    data, lsns = wal_stream(records, START, 1, SEG)
    assert quads(parse(data, stop=lsns[20]).refs) == {(1663, 5, 1, b) for b in range(20)}
    # a file still being written: what follows the last record is unused space
    assert quads(parse(data[:2 * PAGE] + bytes(SEG - 2 * PAGE)).refs) <= {(1663, 5, 1, b) for b in range(50)}


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"\0\0" + d[2:], "magic"),
    (lambda d: d[:8] + (1).to_bytes(8, "little") + d[16:], "another segment"),
    (lambda d: d[:40] + (7).to_bytes(4, "little") + d[44:], "impossible length"),
    (lambda d: d[:64] + bytes([99]) + d[65:], "does not decode"),
])
def test_damaged_wal_has_no_map(damage, message):
    data, _ = wal_stream([Record(refs=[Ref(1663, 5, 1, 1)], main=b"x" * 10) for _ in range(3)], START, 1, SEG)
    with pytest.raises(MapError, match=message):
        parse(damage(data))


def test_sidecar_round_trip_and_damage():
    rng = random.Random(3)
    records, expected = random_records(rng, 120)
    data, _ = wal_stream(records, START, 1, SEG)
    m = parse(data)
    again = SegmentMap.decode(m.encode(), "test", 1, SEG, START)
    assert quads(again.refs) == expected and again.records == m.records == 120
    encoded = m.encode()
    unsorted = SegmentMap(1, SEG, START, array("I", [1663, 5, 2, 1, 1663, 5, 1, 1]), 1, False, 0xD110).encode()
    for blob, timeline, detail in [(encoded, 2, "not timeline 2"), (encoded[:-9] + b"\0" * 9, 1, "zstd"),
                                   (unsorted, 1, "not sorted"), (b"", 1, "zstd")]:
        with pytest.raises(CorruptObject) as e:
            SegmentMap.decode(blob, "test", timeline, SEG, START)
        assert detail in e.value.detail


def test_zstd_is_imported_for_sidecars_only():
    # every backup-push imports the block map module; only a delta's sidecars need zstd, whose import
    # is the largest a full lz4 backup would otherwise pay for
    probe = ("import sys, walrus.backup.push; print('zstandard' in sys.modules); "
             "from walrus.pg.walmap import SegmentMap; from array import array; "
             f"SegmentMap(1, {SEG}, {START}, array('I'), 0, False, 0xD110).encode(); print('zstandard' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_block_map_union_in_batches_and_per_file_blocks(monkeypatch):
    monkeypatch.setattr(BlockMap, "BATCH", 5)
    union = BlockMap()
    rng = random.Random(1)
    expected = set()
    for _ in range(20):
        refs = sorted({(1663, 5, 16384, rng.randrange(0, 2 * 131072 + 50)) for _ in range(7)})
        expected |= set(refs)
        union.add(array("I", [v for q in refs for v in q]))
    union.seal()
    assert quads(union.refs) == expected and len(union) == len(expected)
    first = sorted(b for *_, b in expected if b < 131072)
    second = sorted(b - 131072 for *_, b in expected if 131072 <= b < 2 * 131072)
    assert list(union.blocks("base/5/16384", 131072 * PAGE)) == first
    assert list(union.blocks("base/5/16384.1", 131072 * PAGE)) == second
    assert list(union.blocks("base/5/16384.1", 1000 * PAGE)) == [b for b in second if b < 1000]  # truncated file
    assert list(union.blocks("base/5/16385", 10 * PAGE)) == []
    assert relation_of("pg_tblspc/16400/PG_15_202209061/5/16384.2") == (16400, 5, 16384, 2)
    assert relation_of("global/1262") is None and relation_of("base/5/16384_fsm") is None


def test_block_map_memory_is_the_files_touched_not_the_blocks(monkeypatch):
    """Half the blocks of eight 1 GiB files of one relation changed (half a million references):
    the union holds a bitmap of each file, 16 KiB, not 16 bytes a block (8 MiB), and still answers
    per file, per block, and whole relations and databases apart."""
    import tracemalloc

    monkeypatch.setattr(BlockMap, "BATCH", 70000)
    union = BlockMap()
    tracemalloc.start()
    try:
        for seg in range(8):
            union.add(array("I", [v for b in range(seg * 131072, (seg + 1) * 131072, 2) for v in (1663, 5, 16384, b)]))
        union.add(array("I", [1663, 5, 16390, 7, 1663, 5, 16390, WHOLE, 1663, 6, 0, WHOLE]))
        union.seal()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 512 << 10, held
    assert len(union) == 8 * 65536 + 3  # and block 7 of 16390, and the two markers
    assert list(union.blocks("base/5/16384.3", 131072 * PAGE)) == list(range(0, 131072, 2))
    assert list(union.blocks("base/5/16384.7", 1001 * PAGE)) == list(range(0, 1001, 2))  # below the file's size
    assert union.blocks("base/5/16390", 10 * PAGE) is None and union.blocks("base/6/16384", PAGE) is None
    assert list(union.blocks("base/5/16391", 10 * PAGE)) == []
    assert union.touches(1663, 5, 16384, 3 * 131072 + 4) and not union.touches(1663, 5, 16384, 3 * 131072 + 5)
    assert union.touches(1663, 5, 16390, 12345) and union.touches(1663, 6, 1, 1)
    assert not union.touches(1663, 5, 16384, 8 * 131072)


class _Base:
    def __init__(self, name: str, lsn: int):
        self.name, self.lsn = name, lsn


def _four_segments(tmp_path):
    """A data directory's pg_wal, settings of 1 MiB segments, and four segments (40 to 43) of WAL
    touching blocks 0..3999 of one relation, one block a record."""
    pgdata = tmp_path / "pgdata"
    (pgdata / "pg_wal").mkdir(parents=True)
    settings = load_settings(env={"WALG_FILE_PREFIX": str(tmp_path / "storage"), "WALG_DELTA_MAX_STEPS": "3",
                                  "WALG_PG_WAL_SIZE": "1"}, config_path=None)
    records = [Record(refs=[Ref(1663, 5, 1, b, data=900)]) for b in range(4000)]
    return pgdata, settings, *wal_stream(records, START, 4, SEG)


def test_load_block_map_from_storage_and_pg_wal(tmp_path):
    # four segments: 40 and 41 have maps in storage, 42 is only in pg_wal (not archived yet), 43 is
    # the one the backup starts in: parsed from pg_wal up to its start
    pgdata, settings, data, lsns = _four_segments(tmp_path)
    in_segment = {i: [b for b, lsn in enumerate(lsns) if lsn // SEG == 40 + i] for i in range(4)}
    assert all(in_segment.values())
    start_lsn = lsns[in_segment[3][len(in_segment[3]) // 2]]
    names = [wal_file_name(1, 40 + i, SEG) for i in range(4)]
    base = _Base("base_" + wal_file_name(1, 39, SEG), START + 100)

    async def load():
        storage = open_storage(settings)
        try:
            for i in range(2):
                await storage.put_bytes(f"blockmap_005/{names[i]}.zst",
                                        parse(data[i * SEG:(i + 1) * SEG], START + i * SEG).encode())
            return await load_block_map(settings, storage, str(pgdata), base, start_lsn, 1)
        finally:
            await storage.close()

    for i in (2, 3):
        (pgdata / "pg_wal" / names[i]).write_bytes(data[i * SEG:(i + 1) * SEG])
    choice = asyncio.run(load())
    assert choice.map is not None, choice.reason
    assert choice.segments == 4 and choice.from_pg_wal == 1
    assert list(choice.map.blocks("base/5/1", 4000 * PAGE)) == [b for b, lsn in enumerate(lsns) if lsn < start_lsn]

    os.remove(pgdata / "pg_wal" / names[2])  # archived without a map, and recycled
    choice = asyncio.run(load())
    assert choice.map is None and f"{names[2]} has no block map" in choice.reason
    off = load_settings(env={"WALG_FILE_PREFIX": "/unused", "WALG_DELTA_MAX_STEPS": "3", "WALG_PG_WAL_SIZE": "1",
                             "WALRUS_BLOCK_MAP": "false"}, config_path=None)
    choice = asyncio.run(load_block_map(off, None, str(pgdata), base, start_lsn, 1))
    assert choice.map is None and "WALRUS_BLOCK_MAP is off" in choice.reason
    choice = asyncio.run(load_block_map(settings, None, str(pgdata), base, start_lsn, 2))
    assert choice.map is None and "another timeline" in choice.reason


def test_stored_maps_are_prefetched_before_the_start_lsn_is_known(tmp_path):
    """backup-push fetches a delta's stored maps while it connects: up to the first window with a
    segment that has none; load_block_map then takes them from there (here: with the objects gone
    from storage) and still parses pg_wal for what was not stored. A damaged stored map is reported
    when the range needs it."""
    pgdata, settings, data, lsns = _four_segments(tmp_path)
    start_lsn = [lsn for lsn in lsns if lsn // SEG == 43][0]
    names = [wal_file_name(1, 40 + i, SEG) for i in range(4)]
    base = _Base("base_" + wal_file_name(1, 40, SEG), START + 100)
    for i in (2, 3):
        (pgdata / "pg_wal" / names[i]).write_bytes(data[i * SEG:(i + 1) * SEG])

    async def run(damaged: bool):
        storage = open_storage(settings)
        try:
            for i in range(2):
                encoded = parse(data[i * SEG:(i + 1) * SEG], START + i * SEG).encode()
                await storage.put_bytes(f"blockmap_005/{names[i]}.zst", b"garbage" if damaged and i else encoded)
            stored = await prefetch_stored_maps(settings, storage, base)
            prefetched = (40 in stored, 41 in stored, 42 in stored, stored.unusable(42))
            for i in range(2):
                await storage.delete([f"blockmap_005/{names[i]}.zst"])
            return prefetched, await load_block_map(settings, storage, str(pgdata), base, start_lsn, 1, stored)
        finally:
            await storage.close()

    prefetched, choice = asyncio.run(run(False))
    assert prefetched == (True, True, False, (True, None))
    assert choice.map is not None and choice.segments == 4 and choice.from_pg_wal == 1, choice.reason
    assert list(choice.map.blocks("base/5/1", 4000 * PAGE)) == [b for b, lsn in enumerate(lsns) if lsn < start_lsn]
    prefetched, choice = asyncio.run(run(True))
    assert prefetched[:3] == (True, False, False) and choice.map is None and names[1] in choice.reason


def test_map_join_in_any_order_holds_only_open_edges():
    """Segments' maps join into the same union whatever order they arrive in (the prefetch's
    concurrent fetches), and a join holds the edges only of segments whose neighbour is missing:
    in order, one or two; with a gap, those beside it; never the segments' references."""
    # records that are all block headers: whichever record crosses a segment's edge has its headers
    # cut there, so each edge holds a record that only the two segments together name (one relation
    # per record: a join that went missing would leave its blocks out of the union)
    records = [Record(refs=[Ref(1663, 5, 16384 + b, k) for k in range(30)]) for b in range(9000)]
    data, _ = wal_stream(records, START, 8, SEG)
    n = sum(1 for i in range(8) if data[i * SEG])  # the segments the stream reached
    maps = [parse(data[i * SEG:(i + 1) * SEG], START + i * SEG) for i in range(n)]
    assert n >= 6 and sum(1 for m in maps if m.tail_len) >= 4
    expected = union_of(data, n)
    crossing = set().union(*(quads(join_record(maps[i], maps[i + 1])) for i in range(n - 1) if maps[i].tail_len))
    assert crossing - set().union(*(quads(m.refs) for m in maps))  # blocks only the joins name

    for order in (list(range(n)), list(range(n - 1, -1, -1)), random.Random(3).sample(range(n), n)):
        join = MapJoin()
        peak = 0
        for i in order:
            join.add(40 + i, maps[i])
            peak = max(peak, join.held_edges)
            assert all(not len(m.refs) for m in join._edges.values())  # references live in the union only
        assert join.complete(40, 40 + n - 1) and join.error is None
        join.union.seal()
        assert quads(join.union.refs) == expected, order
        if order == list(range(n)):
            assert peak <= 2 and join.held_edges <= 2

    join = MapJoin()
    for i in [i for i in range(n) if i != 3]:  # 43 missing: 42 and 44 wait for it, the others are done
        join.add(40 + i, maps[i])
    assert join.held_edges <= 4 and not join.complete(40, 40 + n - 1)
    join.add(43, maps[3])
    assert join.complete(40, 40 + n - 1) and join.held_edges <= 2


def test_prefetching_a_long_range_holds_the_union_not_the_maps(tmp_path, monkeypatch):
    """A day of WAL is thousands of stored maps naming mostly the same hot blocks: the prefetch
    joins them as they come, so its memory is the union and one merge batch, not every segment's
    references (here 300 maps of the same 2000 blocks: 9.6 MB of references, a 32 KB union)."""
    import tracemalloc

    from tests.unit.walgen import MAGIC_15

    monkeypatch.setattr(BlockMap, "BATCH", 20000)
    settings = load_settings(env={"WALG_FILE_PREFIX": str(tmp_path / "storage"), "WALG_DELTA_MAX_STEPS": "3",
                                  "WALG_PG_WAL_SIZE": "1"}, config_path=None)
    hot = array("I", [v for b in range(2000) for v in (1663, 5, 16384, b)])
    segments = 300
    base = _Base("base_" + wal_file_name(1, 40, SEG), START + 100)

    async def run():
        storage = open_storage(settings)
        try:
            for i in range(segments):
                sidecar = SegmentMap(1, SEG, START + i * SEG, hot, 100, False, MAGIC_15).encode()
                await storage.put_bytes(f"blockmap_005/{wal_file_name(1, 40 + i, SEG)}.zst", sidecar)
            tracemalloc.start()
            try:
                join = await prefetch_stored_maps(settings, storage, base)
                held, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            return join, held, peak
        finally:
            await storage.close()

    join, held, peak = asyncio.run(run())
    assert all(40 + i in join for i in range(segments)) and 40 + segments not in join
    assert join.held_edges <= 2
    join.union.seal()
    assert len(join.union) == 2000
    # what stays is the union (and the sets of segments seen); the peak is the window of maps being
    # fetched and decoded at once, the same for any range (holding every map: 10 MB here, and growing)
    assert held < 1 << 20 and peak < 8 << 20, (held, peak)
