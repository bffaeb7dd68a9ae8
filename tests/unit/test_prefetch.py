"""wal-fetch prefetch in WAL-G's layout: next segments downloaded ahead, taken when whole, old ones cleaned."""
from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time

from walrus.wal import prefetch, prefetcher

BIN = os.path.dirname(sys.executable)
SEGSIZE = 1 << 20


def seg(n: int) -> str:
    return f"0000000100000000000000{n:02X}"


def wal_bytes(n: int) -> bytes:
    return struct.pack("<HH", 0xD110, 0) + bytes([n]) * (SEGSIZE - 4)  # PostgreSQL 15's page magic


def env_for(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "PG"))}
    env.update(WALG_FILE_PREFIX=str(tmp_path / "store"), WALG_PG_WAL_SIZE="1", WALG_DOWNLOAD_CONCURRENCY="3",
               HOME=str(tmp_path))
    env.update(extra)
    return env


def test_fetch_prefetches_next_segments_and_uses_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in range(1, 6):
        (src / seg(n)).write_bytes(wal_bytes(n))
        subprocess.run([f"{BIN}/walrus", "wal-push", str(src / seg(n))], env=env_for(tmp_path), check=True)
    pg_wal = tmp_path / "pgdata" / "pg_wal"
    pg_wal.mkdir(parents=True)
    dest = pg_wal / "RECOVERYXLOG"
    subprocess.run([f"{BIN}/walrus", "wal-fetch", seg(1), str(dest)], env=env_for(tmp_path), check=True)
    assert dest.read_bytes() == wal_bytes(1)
    ready = pg_wal / ".wal-g" / "prefetch"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all((ready / seg(n)).exists() for n in (2, 3, 4)):
        time.sleep(0.05)
    assert sorted(p.name for p in ready.iterdir() if p.is_file()) == [seg(2), seg(3), seg(4)]
    # the archive is gone: the next fetch must come from the prefetched copy
    os.rename(tmp_path / "store", tmp_path / "store-away")
    out = subprocess.run([f"{BIN}/walrus", "wal-fetch", seg(2), str(dest), "--json"],
                         env=env_for(tmp_path, WALG_DOWNLOAD_CONCURRENCY="1"), check=True, capture_output=True)
    assert b'"key": "prefetched"' in out.stdout
    assert dest.read_bytes() == wal_bytes(2)
    assert not (ready / seg(2)).exists()


def test_take_refuses_partial_or_foreign_files(tmp_path):
    location = tmp_path / "prefetch"
    (location / "running").mkdir(parents=True)
    (location / seg(7)).write_bytes(wal_bytes(7)[:1000])  # wrong size
    (location / seg(8)).write_bytes(bytes(SEGSIZE))  # not WAL
    (location / seg(9)).write_bytes(wal_bytes(9))
    dest = tmp_path / "dest"
    assert asyncio.run(prefetch.take(str(location), seg(7), str(dest), SEGSIZE)) is None
    assert asyncio.run(prefetch.take(str(location), seg(8), str(dest), SEGSIZE)) is None
    assert not (location / seg(7)).exists() and not (location / seg(8)).exists()
    assert not dest.exists()
    assert asyncio.run(prefetch.take(str(location), seg(9), str(dest), SEGSIZE)) == SEGSIZE
    assert dest.read_bytes() == wal_bytes(9)


def test_clean_removes_segments_recovery_has_passed(tmp_path):
    location = tmp_path / "prefetch"
    (location / "running").mkdir(parents=True)
    for n in (1, 2, 5):
        (location / seg(n)).write_bytes(b"x")
    (location / "running" / seg(3)).write_bytes(b"x")
    prefetch.clean(str(location), seg(4), SEGSIZE)
    assert sorted(p.name for p in location.iterdir() if p.is_file()) == [seg(5)]
    assert list((location / "running").iterdir()) == []


def test_full_prefetch_window_of_large_segments_does_not_starve(tmp_path):
    """Ten 16 MiB downloads at once (the default window) once deadlocked the loop's default
    executor: each decompressing thread waited for reads that needed a thread of that same pool."""
    from walrus.config import load_settings
    from walrus.storage import open_storage

    big = 16 << 20
    store = tmp_path / "store" / "wal_005"
    store.mkdir(parents=True)
    for n in range(2, 12):  # compression 'none' objects: the bare name
        (store / seg(n)).write_bytes(struct.pack("<HH", 0xD110, 0) + bytes([n]) * (big - 4))
    settings = load_settings(env={"WALG_FILE_PREFIX": str(tmp_path / "store"), "WALG_DOWNLOAD_CONCURRENCY": "10",
                                  "HOME": str(tmp_path)})
    location = str(tmp_path / "pg_wal" / ".wal-g" / "prefetch")

    async def main():
        storage = open_storage(settings)
        window = prefetcher.Window(settings, storage)
        done = await asyncio.wait_for(asyncio.gather(*window.fill(seg(1), location)), 60)
        return [s for s in done if s]

    assert sorted(asyncio.run(main())) == [seg(n) for n in range(2, 12)]
    assert all(os.path.getsize(os.path.join(location, seg(n))) == big for n in range(2, 12))


def test_take_refuses_a_prefetched_file_from_before_the_last_boot(tmp_path):
    """Prefetched files are not fsynced: one written before a crash may be torn, so it is never used."""
    location = tmp_path / "prefetch"
    location.mkdir()
    (location / seg(5)).write_bytes(wal_bytes(5))
    before_boot = prefetch._boot_time() - 60
    os.utime(location / seg(5), (before_boot, before_boot))
    dest = tmp_path / "dest"
    assert prefetch.take_ready(str(location), seg(5), str(dest), SEGSIZE) is None
    assert not (location / seg(5)).exists() and not dest.exists()


def test_prefetcher_follows_the_cursor_and_exits_when_recovery_stops(tmp_path, monkeypatch):
    from walrus.config import load_settings
    from walrus.storage import open_storage

    store = tmp_path / "store" / "wal_005"
    store.mkdir(parents=True)
    for n in range(2, 12):  # compression 'none' objects: the bare name
        (store / seg(n)).write_bytes(wal_bytes(n))
    settings = load_settings(env={"WALG_FILE_PREFIX": str(tmp_path / "store"), "WALG_DOWNLOAD_CONCURRENCY": "3",
                                  "WALG_PG_WAL_SIZE": "1", "HOME": str(tmp_path)})
    location = str(tmp_path / "pg_wal" / ".wal-g" / "prefetch")
    monkeypatch.setattr(prefetcher, "FOLLOW_LINGER", 0.5)

    def here() -> list[str]:
        return sorted(n for n in os.listdir(location) if not n.startswith("."))[:-1]  # less running/

    async def main():
        storage = open_storage(settings)
        follower = asyncio.create_task(prefetcher.follow(settings, storage, seg(1), location))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if here() == [seg(2), seg(3), seg(4)]:
                break
        assert here() == [seg(2), seg(3), seg(4)]
        for n in (2, 3):  # recovery takes two of them and asks on
            assert prefetch.take_ready(location, seg(n), str(tmp_path / "RECOVERYXLOG"), SEGSIZE) == SEGSIZE
            prefetch.advance(location, seg(n))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if here() == [seg(4), seg(5), seg(6)]:
                break
        assert here() == [seg(4), seg(5), seg(6)]
        return await asyncio.wait_for(follower, 10)  # nothing new asked: it ends after FOLLOW_LINGER

    assert asyncio.run(main()) == 5
    assert prefetch.cursor(location) == seg(3)
