"""wal-push / wal-fetch / settings through the real `walrus` command, on file storage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import lz4.frame
import pytest

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
SEGMENT = "000000010000000000000003"


def walrus(args, env, check=False):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_"))}
    base["HOME"] = env.pop("HOME", "/nonexistent")
    base["WALG_PG_WAL_SIZE"] = "4"  # the segments here: wal-fetch restores only whole segments
    base.update(env)
    proc = subprocess.run([WALRUS, *args], env=base, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def segment(tmp_path):
    data = os.urandom(1 << 20) + bytes((3 << 20) - 5000) + os.urandom(5000)  # some incompressible, mostly zeros
    path = tmp_path / "pg_wal" / SEGMENT
    path.parent.mkdir()
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("method,ext", [("lz4", ".lz4"), ("zstd", ".zst"), ("brotli", ".br"),
                                        ("lzma", ".lzma"), ("none", "")])
def test_push_fetch_round_trip(tmp_path, segment, method, ext):
    env = {"WALG_FILE_PREFIX": str(tmp_path / "store"), "WALG_COMPRESSION_METHOD": method}
    walrus(["wal-push", str(segment)], dict(env), check=True)
    stored = tmp_path / "store" / "wal_005" / (SEGMENT + ext)
    assert stored.is_file()
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # no temp file left behind
    # fetch with a different configured method: the probe finds it anyway
    other = "lz4" if method != "lz4" else "zstd"
    dest = tmp_path / "RECOVERYXLOG"
    walrus(["wal-fetch", SEGMENT, str(dest)], {**env, "WALG_COMPRESSION_METHOD": other}, check=True)
    assert dest.read_bytes() == segment.read_bytes()


def test_lz4_object_has_walg_frame_header(tmp_path, segment):
    walrus(["wal-push", str(segment)], {"WALG_FILE_PREFIX": str(tmp_path / "s")}, check=True)
    raw = (tmp_path / "s" / "wal_005" / (SEGMENT + ".lz4")).read_bytes()
    assert raw[:7] == bytes.fromhex("04224D18607073")
    assert lz4.frame.decompress(raw) == segment.read_bytes()


def test_history_backup_and_partial_files(tmp_path):
    env = {"WALG_FILE_PREFIX": str(tmp_path / "s")}
    for name in ("00000002.history", "000000010000000000000002.00000028.backup",
                 "000000010000000000000007.partial"):
        src = tmp_path / name
        src.write_bytes(b"content of " + name.encode())
        walrus(["wal-push", str(src)], dict(env), check=True)
        assert (tmp_path / "s" / "wal_005" / (name + ".lz4")).is_file()
        dest = tmp_path / ("fetched-" + name)
        walrus(["wal-fetch", name, str(dest)], dict(env), check=True)
        assert dest.read_bytes() == src.read_bytes()


def test_push_identical_again_succeeds_and_different_fails(tmp_path, segment):
    env = {"WALG_FILE_PREFIX": str(tmp_path / "s"), "WALG_PREVENT_WAL_OVERWRITE": "true"}
    walrus(["wal-push", str(segment)], dict(env), check=True)
    key = tmp_path / "s" / "wal_005" / (SEGMENT + ".lz4")
    before = key.read_bytes()
    again = walrus(["wal-push", str(segment), "--json"], dict(env), check=True)
    assert json.loads(again.stdout)["status"] == "already archived"
    data = segment.read_bytes()
    segment.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # always differs (a fixed byte matched 1 time in 256)
    different = walrus(["wal-push", str(segment)], dict(env))
    assert different.returncode == 1
    assert "already archived with different contents" in different.stderr
    assert "HINT:" in different.stderr
    assert key.read_bytes() == before  # the archived copy is untouched


def test_fetch_missing_exits_74_quietly(tmp_path):
    (tmp_path / "s").mkdir()
    proc = walrus(["wal-fetch", SEGMENT, str(tmp_path / "x")], {"WALG_FILE_PREFIX": str(tmp_path / "s")})
    assert proc.returncode == 74
    assert proc.stderr.strip().count("\n") == 0
    assert SEGMENT in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("prefix", ["missing", "a-file", "a-file/below"])
def test_fetch_from_storage_that_cannot_be_read_is_not_74(tmp_path, prefix):
    """74 ends a recovery ("not archived"): only a storage that answered may say it. A mistyped or
    unmounted WALG_FILE_PREFIX is a failure, exit 1, with the setting named; so for every reader."""
    (tmp_path / "a-file").write_bytes(b"not a folder")
    env = {"WALG_FILE_PREFIX": str(tmp_path / prefix)}
    proc = walrus(["wal-fetch", SEGMENT, str(tmp_path / "x")], dict(env))
    assert proc.returncode == 1, proc.stderr
    assert "WALG_FILE_PREFIX" in proc.stderr and "HINT:" in proc.stderr
    assert not (tmp_path / "x").exists()
    for args in (["backup-list"], ["backup-list", "--json"], ["backup-fetch", str(tmp_path / "r"), "LATEST"]):
        listed = walrus(args, dict(env))
        assert listed.returncode == 1 and "WALG_FILE_PREFIX" in listed.stderr, (args, listed.stderr)
    if prefix != "missing":  # a writer creates a missing prefix (the first archive_command does)
        pushed = walrus(["wal-push", str(tmp_path / "pg_wal" / SEGMENT)], dict(env))
        assert pushed.returncode == 1 and "ERROR:" in pushed.stderr


def test_push_accepts_only_wal_file_names(tmp_path):
    env = {"WALG_FILE_PREFIX": str(tmp_path / "s")}
    for name in ("hostname", "00000001000000000000000G", "000000010000000000000003.tmp", "backup_label"):
        (tmp_path / name).write_bytes(b"x" * 100)
        proc = walrus(["wal-push", str(tmp_path / name)], dict(env))
        assert proc.returncode == 1 and "is not a WAL file" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()  # nothing stored, not even the prefix


def test_push_of_a_file_larger_than_a_segment_does_not_hang(tmp_path):
    """The pool is sized for a segment of WALG_PG_WAL_SIZE; a larger file must still go through it."""
    path = tmp_path / "pg_wal" / SEGMENT
    path.parent.mkdir()
    data = os.urandom(1 << 20) + bytes(15 << 20)
    path.write_bytes(data)
    for size in ("1", "4", "8"):
        env = {"WALG_FILE_PREFIX": str(tmp_path / f"s{size}"), "WALG_PG_WAL_SIZE": size}
        proc = subprocess.run([WALRUS, "wal-push", str(path)], capture_output=True, text=True, timeout=60,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("WALG_")}, **env})
        assert proc.returncode == 0, proc.stderr
        stored = tmp_path / f"s{size}" / "wal_005" / (SEGMENT + ".lz4")
        assert lz4.frame.decompress(stored.read_bytes()) == data


def test_fetch_walg_308_trailing_dot_and_bare_objects(tmp_path):
    wal = tmp_path / "s" / "wal_005"
    wal.mkdir(parents=True)
    dot, bare = b"trailing dot none".ljust(4 << 20, b"\0"), b"bare".ljust(4 << 20, b"\0")
    (wal / (SEGMENT + ".")).write_bytes(dot)
    (wal / "000000010000000000000004").write_bytes(bare)
    env = {"WALG_FILE_PREFIX": str(tmp_path / "s")}
    walrus(["wal-fetch", SEGMENT, str(tmp_path / "a")], dict(env), check=True)
    walrus(["wal-fetch", "000000010000000000000004", str(tmp_path / "b")], dict(env), check=True)
    assert (tmp_path / "a").read_bytes() == dot
    assert (tmp_path / "b").read_bytes() == bare


def test_fetch_of_a_cut_segment_fails_whatever_the_codec(tmp_path):
    """Uncompressed objects, and zstd objects cut at a frame boundary, decode without complaint: only
    the size says a segment is not whole. Exit 1 (damaged), never 0 or 74, and nothing at DEST."""
    wal = tmp_path / "s" / "wal_005"
    wal.mkdir(parents=True)
    import zstandard
    (wal / SEGMENT).write_bytes(bytes(3 << 20))
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(1 << 20))
    (wal / "000000010000000000000004.zst").write_bytes(frame * 3)
    for name in (SEGMENT, "000000010000000000000004"):
        proc = walrus(["wal-fetch", name, str(tmp_path / "dest")], {"WALG_FILE_PREFIX": str(tmp_path / "s")})
        assert proc.returncode == 1 and "not a whole WAL segment" in proc.stderr, proc.stderr
        assert not (tmp_path / "dest").exists()


def test_fetch_corrupt_object_fails_without_leaving_dest(tmp_path):
    wal = tmp_path / "s" / "wal_005"
    wal.mkdir(parents=True)
    (wal / (SEGMENT + ".lz4")).write_bytes(bytes.fromhex("04224D186470B9") + b"garbage" * 10)
    proc = walrus(["wal-fetch", SEGMENT, str(tmp_path / "dest")], {"WALG_FILE_PREFIX": str(tmp_path / "s")})
    assert proc.returncode == 1
    assert "ERROR:" in proc.stderr
    # neither dest nor a temp file; the prefetch folder (.wal-g, as WAL-G's) holds no segment
    assert sorted(p.name for p in tmp_path.iterdir()) == [".wal-g", "s"]
    assert not [p for p in (tmp_path / ".wal-g").rglob("*") if p.is_file() and not p.name.startswith(".")]


def test_push_missing_file_is_an_error(tmp_path):
    proc = walrus(["wal-push", str(tmp_path / SEGMENT)], {"WALG_FILE_PREFIX": str(tmp_path / "s")})
    assert proc.returncode == 1
    assert "cannot open WAL file" in proc.stderr


def test_no_storage_configured(tmp_path, segment):
    proc = walrus(["wal-push", str(segment)], {})
    assert proc.returncode == 1
    assert "no storage is configured" in proc.stderr
    assert "WALG_FILE_PREFIX" in proc.stderr


def test_malformed_setting_names_the_variable(tmp_path, segment):
    proc = walrus(["wal-push", str(segment)], {"WALG_FILE_PREFIX": str(tmp_path), "WALG_UPLOAD_CONCURRENCY": "lots"})
    assert proc.returncode == 1
    assert "WALG_UPLOAD_CONCURRENCY" in proc.stderr
    proc = walrus(["wal-push", str(segment)], {"WALG_FILE_PREFIX": str(tmp_path), "WALG_COMPRESSION_METHOD": "gzip"})
    assert "WALG_COMPRESSION_METHOD" in proc.stderr


def test_config_file_json_and_yaml_env_wins(tmp_path, segment):
    store_file = tmp_path / "from-file"
    store_env = tmp_path / "from-env"
    cfg = tmp_path / "walg.yaml"
    cfg.write_text(f"WALG_FILE_PREFIX: {store_file}\nWALG_COMPRESSION_METHOD: zstd\n")
    walrus(["--config", str(cfg), "wal-push", str(segment)], {}, check=True)
    assert (store_file / "wal_005" / (SEGMENT + ".zst")).is_file()
    walrus(["--config", str(cfg), "wal-push", str(segment)], {"WALG_FILE_PREFIX": str(store_env)}, check=True)
    assert (store_env / "wal_005" / (SEGMENT + ".zst")).is_file()
    home = tmp_path / "home"
    home.mkdir()
    (home / ".walg.json").write_text(json.dumps({"WALG_FILE_PREFIX": str(tmp_path / "home-store"),
                                                 "WALG_COMPRESSION_METHOD": "none"}))
    walrus(["wal-push", str(segment)], {"HOME": str(home)}, check=True)
    assert (tmp_path / "home-store" / "wal_005" / SEGMENT).is_file()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = walrus(["wal-push", str(segment)], {"WALG_CONFIG_PATH": str(bad)})
    assert proc.returncode == 1 and "malformed" in proc.stderr


def test_backup_list_empty_json(tmp_path):
    (tmp_path / "s").mkdir()
    proc = walrus(["backup-list", "--json"], {"WALG_FILE_PREFIX": str(tmp_path / "s")}, check=True)
    assert json.loads(proc.stdout) == []


def test_help_lists_commands():
    proc = walrus(["--help"], {}, check=True)
    for cmd in ("wal-push", "wal-fetch", "backup-push", "backup-fetch", "backup-list"):
        assert cmd in proc.stdout
    assert "WALG_COMPRESSION_METHOD" in proc.stdout
    assert walrus(["wal-fetch", "--help"], {}, check=True).stdout.count("74") == 1
    assert walrus(["--version"], {}, check=True).stdout.startswith("walrus")


def _lz4_block_sizes(raw: bytes) -> list[int]:
    """Uncompressed sizes of an lz4 frame's blocks (frame header as WAL-G writes it: 7 bytes)."""
    import lz4.block
    sizes, at = [], 7
    while True:
        word = int.from_bytes(raw[at:at + 4], "little")
        at += 4
        if word == 0:
            return sizes
        n, stored = word & 0x7FFFFFFF, word & 0x80000000
        block = raw[at:at + n]
        at += n
        sizes.append(n if stored else len(lz4.block.decompress(block, uncompressed_size=4 << 20)))


def test_segment_is_compressed_in_4mib_blocks(tmp_path):
    data = os.urandom(3 << 20) + bytes(13 << 20)  # a whole 16 MiB segment
    path = tmp_path / "pg_wal" / SEGMENT
    path.parent.mkdir()
    path.write_bytes(data)
    walrus(["wal-push", str(path)], {"WALG_FILE_PREFIX": str(tmp_path / "s"), "WALG_PG_WAL_SIZE": "16"}, check=True)
    raw = (tmp_path / "s" / "wal_005" / (SEGMENT + ".lz4")).read_bytes()
    assert _lz4_block_sizes(raw) == [4 << 20] * 4
    assert lz4.frame.decompress(raw) == data


def test_push_memory_is_at_most_a_segment_per_push():
    from walrus.config import load_settings
    from walrus.wal.push import WAL_BLOCK, WalPusher, wal_block

    def settings(**env):
        return load_settings(env={"HOME": "/nonexistent", "WALG_FILE_PREFIX": "/x", **env})

    s = settings()
    assert wal_block(s) == WAL_BLOCK == 4 << 20  # WALRUS_BUFFER_SIZE (1 MiB) is raised to a block
    assert WalPusher.buffers_per_push(s, 1) == 3  # one compressing, two read ahead
    assert WalPusher.buffers_per_push(s, 2) == 4  # a lone push: four jobs, capped at the segment's 4 blocks
    files, cloud = SimpleNamespace(upload_memory=0), SimpleNamespace(upload_memory=16 << 20)
    assert WalPusher.slots_for(s, files) == 2  # 32 MiB budget / 12 MiB a push, under WALG_UPLOAD_CONCURRENCY 16
    assert WalPusher.slots_for(s, cloud) == 1  # what the storage's part buffers leave: 16 MiB
    assert WalPusher.slots_for(settings(WALRUS_MEMORY_BUDGET="128MiB"), files) == 10
    assert WalPusher.slots_for(settings(WALRUS_MEMORY_BUDGET="128MiB"), cloud) == 9
    assert WalPusher.slots_for(settings(WALRUS_MEMORY_BUDGET="128MiB", WALG_UPLOAD_CONCURRENCY="3"), files) == 3
    small = settings(WALG_PG_WAL_SIZE="1")  # 1 MiB segments: one block is the whole segment
    assert WalPusher.buffers_per_push(small, 1) == WalPusher.buffers_per_push(small, 2) == 1
    assert wal_block(settings(WALRUS_BUFFER_SIZE="8MiB", WALRUS_MEMORY_BUDGET="48MiB")) == 8 << 20


def test_memory_settings_that_cannot_be_kept_are_refused():
    from walrus.config import WAL_BLOCKS_PER_PUSH, load_settings, minimum_memory_budget
    from walrus.errors import ConfigError
    from walrus.wal.push import PUSH_PARALLEL, WalPusher

    def settings(**env):
        return load_settings(env={"HOME": "/nonexistent", "WALG_FILE_PREFIX": "/x", **env})

    # the floor is what a lone push of the largest segment holds
    assert WalPusher.buffers_per_push(settings(WALG_PG_WAL_SIZE="1024"), PUSH_PARALLEL) == WAL_BLOCKS_PER_PUSH
    assert minimum_memory_budget(1 << 20) == 24 << 20
    for env, named in ((dict(WALRUS_MEMORY_BUDGET="1"), "WALRUS_MEMORY_BUDGET"),
                       (dict(WALRUS_MEMORY_BUDGET="16MiB"), "WALRUS_MEMORY_BUDGET"),
                       (dict(WALRUS_BUFFER_SIZE="8MiB"), "WALRUS_MEMORY_BUDGET"),
                       (dict(WALRUS_BUFFER_SIZE="0"), "WALRUS_BUFFER_SIZE"),
                       (dict(WALRUS_BUFFER_SIZE="1GiB"), "WALRUS_BUFFER_SIZE"),
                       (dict(WALG_PG_WAL_SIZE="3"), "WALG_PG_WAL_SIZE"),
                       (dict(WALG_PG_WAL_SIZE="2048"), "WALG_PG_WAL_SIZE"),
                       (dict(WALG_PG_WAL_SIZE="0"), "WALG_PG_WAL_SIZE")):
        with pytest.raises(ConfigError) as caught:
            settings(**env)
        assert named in caught.value.message + (caught.value.hint or ""), caught.value.render()
    assert settings(WALRUS_MEMORY_BUDGET="24MiB").memory_budget == 24 << 20
    assert settings(WALG_PG_WAL_SIZE="64").segment_size == 64 << 20
    # the command line refuses them at start-up, before touching anything
    proc = walrus(["wal-push", "/nonexistent/000000010000000000000001"],
                  {"WALG_FILE_PREFIX": "/nonexistent/store", "WALRUS_MEMORY_BUDGET": "1"})
    assert proc.returncode == 1 and "WALRUS_MEMORY_BUDGET" in proc.stderr and "HINT:" in proc.stderr


def _push_concurrently(tmp_path, monkeypatch, count, slots, encode_delay):
    """Pushes `count` 16 MiB segments through one WalPusher with `slots`; returns (events, settings).

    Events are (seconds, what, segment): "read" when a block's read is issued, "encoded" when a
    block's compression ends (slowed by encode_delay, so the order of events is the pusher's, not
    the machine's).
    """
    import asyncio
    import contextvars
    import threading
    import time

    import walrus.stream.upload as upload
    from walrus.codec import lz4 as lz4_codec
    from walrus.config import load_settings
    from walrus.storage import open_storage
    from walrus.wal.push import WalPusher

    events, lock = [], threading.Lock()
    current = contextvars.ContextVar("segment")  # set in each push's task
    plain_compress, plain_new = lz4_codec.Lz4Compressor.compress, upload.new_compressor

    def slow_compress(self, data):
        out = plain_compress(self, data)
        time.sleep(encode_delay)
        with lock:
            events.append((time.monotonic(), "encoded", self.segment))
        return out

    def tagged(*args, **kwargs):  # made inside a push's task: remember which segment it compresses
        compressor = plain_new(*args, **kwargs)
        compressor.segment = current.get()
        return compressor

    monkeypatch.setattr(lz4_codec.Lz4Compressor, "compress", slow_compress)
    monkeypatch.setattr(upload, "new_compressor", tagged)
    settings = load_settings(env={"HOME": "/nonexistent", "WALG_FILE_PREFIX": str(tmp_path / "s"),
                                  "WALG_COMPRESSION_METHOD": "lz4"})
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    names = [f"0000000100000000000000{i:02X}" for i in range(1, count + 1)]
    for i, name in enumerate(names):
        (wal / name).write_bytes(bytes([i]) * (16 << 20))

    async def main():
        pusher = WalPusher(settings, slots=slots)
        plain_read = pusher.uploader.reader.read_batch

        async def read_batch(requests):
            for r in requests:
                events.append((time.monotonic(), "read", os.path.basename(os.readlink(f"/proc/self/fd/{r.fd}"))))
            return await plain_read(requests)

        pusher.uploader.reader.read_batch = read_batch
        storage = open_storage(settings)

        async def one(name):
            current.set(name)
            return await pusher.push(storage, str(wal / name))

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(n) for n in names)), 60)
        finally:
            pusher.close()

    results = asyncio.run(main())
    for name, result in zip(names, results):
        assert result.status == "uploaded"
        stored = (tmp_path / "s" / "wal_005" / (name + ".lz4")).read_bytes()
        assert lz4.frame.decompress(stored) == (wal / name).read_bytes()
    return sorted(events), names


def test_next_push_reads_while_the_previous_ones_still_compress(tmp_path, monkeypatch):
    # the daemon's arrangement: two slots, one core a push; a third segment waits for a slot
    events, names = _push_concurrently(tmp_path, monkeypatch, count=3, slots=2, encode_delay=0.05)
    reads = {name: [t for t, what, seg in events if what == "read" and seg == name] for name in names}
    encoded = {name: [t for t, what, seg in events if what == "encoded" and seg == name] for name in names}
    early, late = sorted(names, key=lambda n: reads[n][0])[:2], sorted(names, key=lambda n: reads[n][0])[2]
    # it waited for a slot, which came back once a push's reads were all issued, not its compression
    assert reads[late][0] > min(reads[n][-1] for n in early)
    assert reads[late][0] < min(encoded[n][-1] for n in early)


def test_more_pushes_than_slots_share_the_pool_without_stalling(tmp_path, monkeypatch):
    events, names = _push_concurrently(tmp_path, monkeypatch, count=7, slots=2, encode_delay=0.005)
    assert {seg for _, what, seg in events if what == "encoded"} == set(names)
    assert sum(1 for _, what, _ in events if what == "read") == 4 * len(names)  # four 4 MiB blocks each


@pytest.mark.parametrize("same", [False, True], ids=["different bytes", "identical bytes"])
def test_concurrent_pushes_of_one_name_never_lose_a_version(tmp_path, same):
    """Two archivers (two clusters on one prefix, or a retry racing a slow first try) push the same name
    at once. Different bytes: exactly one succeeds and its bytes are the archived ones, the other fails
    and says why (both used to exit 0, one version silently gone). Identical bytes: both succeed."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_"))}
    sources = []
    for side in ("a", "b"):
        path = tmp_path / side / SEGMENT
        path.parent.mkdir()
        sources.append(path)
    for trial in range(20):
        store = tmp_path / f"store{trial}"
        datas = [os.urandom(1 << 20) + bytes(3 << 20) for _ in sources]
        if same:
            datas[1] = datas[0]
        for path, data in zip(sources, datas):
            path.write_bytes(data)
        env = {**base, "HOME": "/nonexistent", "WALG_FILE_PREFIX": str(store), "WALG_PG_WAL_SIZE": "4"}
        procs = [subprocess.Popen([WALRUS, "wal-push", str(p)], env=env, stderr=subprocess.PIPE, text=True)
                 for p in sources]
        results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
        for p in procs:
            p.stderr.close()
        stored = lz4.frame.decompress((store / "wal_005" / (SEGMENT + ".lz4")).read_bytes())
        if same:
            assert [rc for rc, _ in results] == [0, 0], results
            assert stored == datas[0]
            continue
        winners = [i for i, (rc, _) in enumerate(results) if rc == 0]
        assert len(winners) == 1, (trial, results)
        assert stored == datas[winners[0]]
        rc, err = results[1 - winners[0]]
        assert rc == 1 and "already archived with different contents" in err, err
        assert [p.name for p in (store / "wal_005").iterdir()] == [SEGMENT + ".lz4"]


def test_push_records_the_block_map_beside_the_segment(tmp_path):
    """With deltas on, a pushed segment's block map lands in blockmap_005/ (also when a retry finds
    the segment archived and the map missing); with deltas off, or a file that is not WAL, none, and
    the push still succeeds."""
    from tests.unit.walgen import Record, Ref, wal_stream
    from walrus.pg.walmap import SegmentMap
    from walrus.pg.xlog import parse_wal_file_name

    size = 4 << 20
    timeline, segno = parse_wal_file_name(SEGMENT, size)
    data, _ = wal_stream([Record(refs=[Ref(1663, 5, 16384, b, data=100)]) for b in range(2000)],
                         segno * size, 1, size, timeline=timeline)
    path = tmp_path / "pg_wal" / SEGMENT
    path.parent.mkdir()
    path.write_bytes(data)
    store = tmp_path / "s"
    key = store / "blockmap_005" / (SEGMENT + ".zst")
    walrus(["wal-push", str(path)], {"WALG_FILE_PREFIX": str(store)}, check=True)
    assert not key.exists()  # WALG_DELTA_MAX_STEPS is 0: no delta will read it
    env = {"WALG_FILE_PREFIX": str(store), "WALG_DELTA_MAX_STEPS": "2"}
    again = walrus(["wal-push", str(path), "--json"], dict(env), check=True)
    assert json.loads(again.stdout)["status"] == "already archived"
    stored = SegmentMap.decode(key.read_bytes(), "test", timeline, size, segno * size)
    assert stored.records == 2000 and len(stored.refs) == 4 * 2000
    key.unlink()
    (store / "wal_005" / (SEGMENT + ".lz4")).unlink()
    walrus(["wal-push", str(path)], dict(env), check=True)
    assert SegmentMap.decode(key.read_bytes(), "test", timeline, size, segno * size).records == 2000
    # a segment that is not WAL PostgreSQL wrote (random bytes): archived, and no map, with a warning
    other = tmp_path / "pg_wal" / "000000010000000000000009"
    other.write_bytes(os.urandom(size))
    pushed = walrus(["wal-push", str(other)], dict(env), check=True)
    assert "its block map cannot be made" in pushed.stderr
    assert not (store / "blockmap_005" / "000000010000000000000009.zst").exists()
