"""Tar parts laid out in pool buffers: valid tars, WAL-G's split rule, files that change under the backup."""
from __future__ import annotations

import asyncio
import io
import itertools
import os
import tarfile

import pytest

from walrus.tar.read import iter_members
from walrus.tar.write import Entry, TarPartStream, header_bytes
from walrus.backup.walk import WalkResult, walk_data_directory
from walrus.fileio import BufferPool
from walrus.fileio import open_reader


def file_entry(path, name=None) -> Entry:
    st = os.stat(path)
    return Entry(name=name or "/" + os.path.basename(path), kind="file", size=st.st_size, mode=0o600,
                 mtime_ns=st.st_mtime_ns, path=str(path))


async def collect(stream: TarPartStream) -> bytes:
    out = bytearray()
    async for buf in stream:
        out += buf.data
        buf.release()
    return bytes(out)


IO_MODES = ["preadv", "io_uring", "io_uring+direct", "preadv+direct"]


@pytest.fixture(params=IO_MODES)
def io_mode(request):
    if "io_uring" in request.param:
        from walrus._uring import probe

        if probe() is not None:
            pytest.skip(f"io_uring unavailable: {probe()}")
    return request.param


def build(entries, *, buffers=4, size=8192, threshold=None, depth=2, hook=None, io_mode="preadv"):
    async def main():
        pool = BufferPool(buffers, size)
        reader = open_reader(io_mode.split("+")[0])
        direct_min = 0 if io_mode.endswith("+direct") else None
        it = iter(entries)
        parts = []
        try:
            while True:
                first = next(it, None)
                if first is None:
                    break
                stream = TarPartStream(itertools.chain([first], it), pool, reader, threshold=threshold, depth=depth,
                                       direct_min=direct_min, on_member=hook)
                parts.append((await collect(stream), stream.members, stream.data_size))
            assert pool.available() == buffers  # every buffer came back
        finally:
            reader.close()
        return parts

    return asyncio.run(main())


def test_part_is_a_valid_tar_with_exact_contents(tmp_path, io_mode):
    payloads = {"a": os.urandom(10000), "b": b"", "c": os.urandom(8192 * 3 + 7), "d": b"x" * 511}
    for name, data in payloads.items():
        (tmp_path / name).write_bytes(data)
    entries = [Entry("/", "dir", mode=0o700)] + [file_entry(tmp_path / n) for n in payloads]
    [(raw, members, size)] = build(entries, io_mode=io_mode)
    assert size == sum(len(d) for d in payloads.values())
    assert members == ["/", "/a", "/b", "/c", "/d"]
    assert raw.endswith(bytes(1024)) and len(raw) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for name, data in payloads.items():
            assert tf.extractfile("/" + name).read() == data
    got = {m.name: m for m, _ in iter_members(io.BytesIO(raw))}
    assert got["/"].kind == "dir" and got["/"].mode == 0o700


def test_split_after_the_file_that_crosses_the_threshold(tmp_path, io_mode):
    sizes = [3000, 3000, 3000, 20000, 100, 100]
    for i, n in enumerate(sizes):
        (tmp_path / f"f{i}").write_bytes(os.urandom(n))
    parts = build([file_entry(tmp_path / f"f{i}") for i in range(len(sizes))], threshold=5000, io_mode=io_mode)
    assert [p[1] for p in parts] == [["/f0", "/f1"], ["/f2", "/f3"], ["/f4", "/f5"]]
    for raw, members, _ in parts:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            assert tf.getnames() == members


def test_file_that_shrinks_grows_or_vanishes(tmp_path, io_mode):
    (tmp_path / "shrinks").write_bytes(b"s" * 20000)
    (tmp_path / "grows").write_bytes(b"g" * 1000)
    (tmp_path / "shrinks-odd").write_bytes(b"o" * 20000)
    (tmp_path / "vanishes").write_bytes(b"v" * 100)
    (tmp_path / "stays").write_bytes(b"k" * 100)
    entries = [file_entry(tmp_path / n) for n in ("shrinks", "grows", "vanishes", "stays", "shrinks-odd")]
    # change the files after the walk, before the reads: what PostgreSQL does under a backup
    (tmp_path / "shrinks").write_bytes(b"s" * 5000)
    (tmp_path / "shrinks-odd").write_bytes(b"o" * 4097)  # ends off a block boundary
    (tmp_path / "grows").write_bytes(b"g" * 5000)
    os.unlink(tmp_path / "vanishes")
    [(raw, members, _)] = build(entries, io_mode=io_mode)
    assert members == ["/shrinks", "/grows", "/stays", "/shrinks-odd"]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        assert tf.extractfile("/shrinks").read() == b"s" * 5000 + bytes(15000)
        assert tf.extractfile("/shrinks-odd").read() == b"o" * 4097 + bytes(20000 - 4097)
        assert tf.extractfile("/grows").read() == b"g" * 1000
        assert tf.extractfile("/stays").read() == b"k" * 100


def test_memory_is_bounded_by_the_pool(tmp_path, io_mode):
    big = tmp_path / "big"
    big.write_bytes(os.urandom((1 << 20) + 333))
    [(raw, _, _)] = build([file_entry(big)], buffers=3, size=4096, depth=1, io_mode=io_mode)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        assert tf.extractfile("/big").read() == big.read_bytes()


def test_long_names_and_in_memory_members():
    name = "/pg_tblspc/16384/PG_15_202209061/" + "d" * 90 + "/16385"
    entries = [Entry(name, "file", 5, 0o600, data=b"hello"), Entry("backup_label", "file", 3, 0o600, data=b"abc")]
    [(raw, members, _)] = build(entries)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        assert tf.extractfile(name).read() == b"hello"
        assert tf.getmember("backup_label").mtime == 0


def test_directory_header_has_no_trailing_slash():
    raw = header_bytes(Entry("/base/1", "dir", mode=0o700))
    assert raw[:8] == b"/base/1\0"


def test_walk_follows_walg_rules(tmp_path):
    pgdata = tmp_path / "data"
    for d in ("base/1", "global", "pg_wal/archive_status", "pg_tblspc", "pg_stat_tmp", "base/1/pgsql_tmp"):
        (pgdata / d).mkdir(parents=True)
    (pgdata / "base/1/1259").write_bytes(b"r" * 8192)
    (pgdata / "base/1/pgsql_tmp/tmpfile").write_bytes(b"t")
    (pgdata / "global/pg_control").write_bytes(b"c" * 8192)
    (pgdata / "pg_wal/000000010000000000000001").write_bytes(b"w")
    (pgdata / "postmaster.pid").write_bytes(b"1")
    (pgdata / "PG_VERSION").write_bytes(b"15\n")
    (pgdata / "stray-link").symlink_to("/etc")
    ts = tmp_path / "ts"
    (ts / "PG_15_202209061/5").mkdir(parents=True)
    (ts / "PG_15_202209061/5/16390").write_bytes(b"t" * 100)
    (pgdata / "pg_tblspc/16389").symlink_to(ts)
    result = WalkResult()
    names = [e.name for e in walk_data_directory(str(pgdata), result)]
    assert names[0] == "/"
    assert "/pg_wal" in names and "/pg_stat_tmp" in names  # excluded dirs kept, empty
    for absent in ("/pg_wal/000000010000000000000001", "/pg_wal/archive_status", "/postmaster.pid",
                   "/base/1/pgsql_tmp/tmpfile", "/global/pg_control", "/stray-link"):
        assert absent not in names
    assert "/base/1/pgsql_tmp" in names
    assert "/pg_tblspc/16389/PG_15_202209061/5/16390" in names
    assert result.tablespaces == {"16389": str(ts)}
    assert result.pg_control is not None and result.pg_control.name == "/global/pg_control"
    assert result.skipped_links == ["/stray-link"]
    assert names == ["/", "/PG_VERSION", "/base", "/base/1", "/base/1/1259", "/base/1/pgsql_tmp", "/global",
                     "/pg_stat_tmp", "/pg_tblspc", "/pg_tblspc/16389", "/pg_tblspc/16389/PG_15_202209061",
                     "/pg_tblspc/16389/PG_15_202209061/5", "/pg_tblspc/16389/PG_15_202209061/5/16390", "/pg_wal"]


def test_pool_rejects_unaligned_sizes():
    with pytest.raises(ValueError):
        BufferPool(2, 1000)


def test_consumer_that_stops_early_or_is_cancelled_never_hangs(tmp_path, io_mode):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20))

    async def main(cancel: bool):
        pool = BufferPool(3, 4096)
        reader = open_reader(io_mode.split("+")[0])
        stream = TarPartStream(iter([file_entry(big)]), pool, reader, depth=1)

        async def consume():
            async for buf in stream:
                buf.release()
                if not cancel:
                    break  # the part's consumer gives up (e.g. the upload failed)
                await asyncio.sleep(3600)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        if cancel:
            task.cancel()  # SIGTERM / Ctrl-C
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        await asyncio.sleep(0.01)  # let the async generator's finalizer run
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        reader.close()
        return leftover

    assert asyncio.run(main(cancel=False)) == []
    assert asyncio.run(main(cancel=True)) == []


def _page(lsn: int) -> bytes:
    import struct

    head = struct.pack("<IIHHHHHH", lsn >> 32, lsn & 0xFFFFFFFF, 0, 0, 28, 8000, 8192, 8192 | 4)
    return head + os.urandom(8192 - len(head))


def test_delta_entries_become_wi1_increments_of_changed_pages(tmp_path, io_mode):
    from walrus.pg.pages import read_increment_head

    lsns = [5, 50, 7, 60, 61, 0, 9, 99]  # threshold 50: blocks 1, 3, 4 changed; 5 is new (all zero)
    pages = [_page(lsn) if lsn else bytes(8192) for lsn in lsns]
    (tmp_path / "16385").write_bytes(b"".join(pages))
    (tmp_path / "16386").write_bytes(_page(70) + b"\xff" * 8192)  # an invalid page: copied whole
    delta = [file_entry(tmp_path / "16385"), file_entry(tmp_path / "16386")]
    for e in delta:
        e.delta_lsn = 50
    [(raw, members, _)] = build(delta, buffers=6, size=16384, io_mode=io_mode)
    assert members == ["/16385", "/16386"]
    assert [e.incremented for e in delta] == [True, False]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        member = tf.getmember("/16385")
        body = io.BytesIO(tf.extractfile(member).read())
        inc = read_increment_head(body.read, member.size, "16385")
        assert (inc.file_size, list(inc.blocks)) == (8 * 8192, [1, 3, 4, 5, 7])
        assert body.read() == b"".join(pages[b] for b in inc.blocks)
        assert tf.extractfile("/16386").read() == (tmp_path / "16386").read_bytes()


def test_block_map_entries_carry_exactly_their_blocks(tmp_path, io_mode):
    from array import array

    from walrus.pg.pages import read_increment_head

    pages = [_page(1) for _ in range(6)]
    (tmp_path / "16385").write_bytes(b"".join(pages))
    entry = file_entry(tmp_path / "16385")
    entry.blocks = array("I", [0, 2, 3])
    entry.delta_lsn = 1 << 40  # the map wins: no scan
    [(raw, _, size)] = build([entry], io_mode=io_mode)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        member = tf.getmember("/16385")
        body = io.BytesIO(tf.extractfile(member).read())
        assert list(read_increment_head(body.read, member.size, "16385").blocks) == [0, 2, 3]
        assert body.read() == pages[0] + pages[2] + pages[3]
    assert size == member.size


def test_an_increment_of_a_file_that_shrank_lays_zero_pages(tmp_path, io_mode):
    from array import array

    from walrus.pg.pages import read_increment_head

    pages = [_page(1) for _ in range(3)]
    (tmp_path / "16385").write_bytes(b"".join(pages))
    entry = file_entry(tmp_path / "16385")
    entry.size = 6 * 8192  # walked before it was truncated
    entry.blocks = array("I", [0, 4, 5])
    [(raw, _, _)] = build([entry], buffers=4, size=16384, io_mode=io_mode)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        member = tf.getmember("/16385")
        body = io.BytesIO(tf.extractfile(member).read())
        inc = read_increment_head(body.read, member.size, "16385")
        assert (inc.file_size, list(inc.blocks)) == (6 * 8192, [0, 4, 5])
        assert body.read() == pages[0] + bytes(2 * 8192)


@pytest.mark.parametrize("lanes, compressing", [(1, 1), (2, 4), (3, 4), (2, 8)])
def test_increments_of_parts_side_by_side_never_starve_the_pool(tmp_path, lanes, compressing):
    """Parts sharing one pool (a backup's lanes) each lay increments whose pages are read a window
    at a time: a window waits for a fill buffer while it holds its own, and each part's compression
    stage keeps its last `compressing` buffers until the next comes, so the windows together may
    never hold the buffers the fills need (window_quota). The smallest pool a plan makes."""
    from array import array
    from collections import deque

    from walrus.pg.pages import read_increment_head
    from walrus.tar.write import window_quota

    pages = b"".join(_page(1) for _ in range(64))
    blocks = array("I", range(0, 64, 2))  # runs of one page: many pieces, a window of several buffers

    async def main():
        count = lanes * (compressing + 2)  # PoolPlan's floor: the compression jobs and two buffers a lane
        pool = BufferPool(count, 16384)
        reader = open_reader("preadv")
        windows = asyncio.Semaphore(window_quota(count, lanes, compressing))
        try:
            async def lane(n: int) -> bytes:
                entries = []
                for i in range(6):
                    path = tmp_path / f"{n}_{16384 + i}"
                    path.write_bytes(pages)
                    entries.append(file_entry(path))
                    entries[-1].blocks = array("I", blocks)
                stream = TarPartStream(iter(entries), pool, reader, depth=1, windows=windows)
                out, held = bytearray(), deque()
                async for buf in stream:  # as the compression stage: the oldest goes when one more comes
                    await asyncio.sleep(0.001)
                    held.append(buf)
                    if len(held) > compressing - 1:
                        done = held.popleft()
                        out += done.data
                        done.release()
                for done in held:
                    out += done.data
                    done.release()
                return bytes(out)

            raws = await asyncio.wait_for(asyncio.gather(*(lane(n) for n in range(lanes))), 30)
            assert pool.available() == count
            return raws
        finally:
            reader.close()

    for raw in asyncio.run(main()):
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            for member in tf.getmembers():
                body = io.BytesIO(tf.extractfile(member).read())
                assert list(read_increment_head(body.read, member.size, member.name).blocks) == list(blocks)
                assert body.read() == b"".join(pages[b * 8192:(b + 1) * 8192] for b in blocks)


def test_an_abandoned_increment_keeps_buffers_its_reads_still_land_in(tmp_path):
    """A part given up (a failed upload, SIGTERM) while its increment's reads are in flight: each
    buffer a read may still land in goes back to the pool only once that read completed, never
    while the kernel may write into it (another part would have taken it)."""
    from array import array

    pages = b"".join(_page(1) for _ in range(32))
    (tmp_path / "16385").write_bytes(pages)
    entry = file_entry(tmp_path / "16385")
    entry.blocks = array("I", range(32))

    class GatedReader:
        """preadv behind a gate: reads issued before it opens complete only after."""

        def __init__(self):
            self.inner = open_reader("preadv")
            self.gate = asyncio.Event()
            self.reading = 0  # batches with bytes to read, issued and not landed

        async def read_batch(self, requests):
            self.reading += bool(requests)
            await self.gate.wait()
            try:
                return await self.inner.read_batch(requests)
            finally:
                self.reading -= bool(requests)

        def close(self):
            self.inner.close()

    async def main():
        pool = BufferPool(8, 16384)
        reader = GatedReader()
        stream = TarPartStream(iter([entry]), pool, reader, depth=2)

        async def consume():
            async for buf in stream:
                buf.release()

        async def pages_in_flight():  # buffers of pages issued, none landed
            while reader.reading < 3:
                await asyncio.sleep(0.001)

        task = asyncio.create_task(consume())
        await asyncio.wait_for(pages_in_flight(), 5)
        task.cancel()
        await asyncio.sleep(0.05)
        held, reading = pool.available(), reader.reading
        reader.gate.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
        for _ in range(100):
            if pool.available() == 8:
                break
            await asyncio.sleep(0.01)
        reader.close()
        return held, reading, pool.available()

    held, reading, after = asyncio.run(main())
    assert reading >= 3 and held <= 8 - reading  # the in-flight reads' buffers stay out of the pool
    assert after == 8  # and come back once those reads have landed


def test_increments_and_whole_files_side_by_side_carry_each_page_in_place(tmp_path, io_mode):
    """Increments' pages are read straight into the part's buffers (O_DIRECT too: a buffer goes out
    short where the head leaves it off a block boundary); runs that cross buffers, a whole file and
    another increment after them, each page distinct, all land where the tar says."""
    from array import array

    from walrus.pg.pages import read_increment_head

    def pages_of(tag: int, n: int) -> list[bytes]:
        return [bytes([tag, b % 251]) * 4096 for b in range(n)]

    a, b, c = pages_of(1, 40), pages_of(2, 5), pages_of(3, 24)
    for name, pages in (("16385", a), ("16386", b), ("16387", c)):
        (tmp_path / name).write_bytes(b"".join(pages))
    first, whole, last = (file_entry(tmp_path / n) for n in ("16385", "16386", "16387"))
    first.blocks = array("I", [0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 14, 15, 16, 17, 30, 39])
    last.blocks = array("I", [5, 6, 7, 8, 23])
    [(raw, members, _)] = build([first, whole, last], buffers=6, size=16384, io_mode=io_mode)
    assert members == ["/16385", "/16386", "/16387"]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for name, entry, pages in (("/16385", first, a), ("/16387", last, c)):
            member = tf.getmember(name)
            body = io.BytesIO(tf.extractfile(member).read())
            assert list(read_increment_head(body.read, member.size, name).blocks) == list(entry.blocks)
            assert body.read() == b"".join(pages[i] for i in entry.blocks)
        assert tf.extractfile("/16386").read() == b"".join(b)
