"""Rate limits: the shared token bucket, the storage that paces every transfer by it
(WALG_NETWORK_RATE_LIMIT, the storage contract included), and backup-push's disk reads
(WALG_DISK_RATE_LIMIT)."""
from __future__ import annotations

import asyncio
import inspect
import os
import time
from datetime import datetime, timezone

import pytest

from tests.unit import test_storage_contract as contract
from tests.unit.test_backup_push import ScriptedSession, make_pgdata, no_names
from walrus.backup.push import backup_push
from walrus.config import load_settings
from walrus.ratelimit import RateLimiter
from walrus.storage import open_storage
from walrus.storage.base import ObjectInfo, Storage, Upload
from walrus.storage.fs import FsStorage
from walrus.storage.limited import LimitedStorage
from walrus.wal.push import wal_push

MIB = 1 << 20


async def chunks(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_concurrent_takers_keep_to_the_rate():
    rate, takers, chunk = 8 * MIB, 6, 24 << 10
    total = int(rate * 0.75) // (takers * chunk) * takers * chunk
    limiter = RateLimiter(rate)

    async def taker():
        for _ in range(total // takers // chunk):
            await limiter.take(chunk)

    async def main():
        began = time.monotonic()
        await asyncio.gather(*(taker() for _ in range(takers)))
        return time.monotonic() - began

    elapsed = asyncio.run(main())
    # never faster than the rate after the first burst, however the machine schedules us; a loaded
    # machine can only make it slower, hence the slack on that side
    assert elapsed >= (total - limiter.burst) / rate
    assert total / elapsed >= 0.9 * rate, f"{total / elapsed / MIB:.2f} MiB/s against a limit of {rate / MIB} MiB/s"


def test_each_taker_waits_for_the_bytes_reserved_before_it(monkeypatch):
    # a fake clock and sleep: exact accounting, free of the machine's scheduling
    now = [0.0]
    limiter = RateLimiter(1000, burst=100, clock=lambda: now[0])
    slept: list[float] = []

    async def fake_sleep(seconds):
        slept.append(seconds)

    async def main():
        monkeypatch.setattr(asyncio, "sleep", fake_sleep)
        await limiter.take(100)  # the burst: no wait
        await limiter.take(500)  # a debt of 500: half a second
        now[0] = 0.2
        await limiter.take(300)  # behind the 300 still owed: 0.6 s
        monkeypatch.undo()

    asyncio.run(main())
    assert slept == [pytest.approx(0.5), pytest.approx(0.6)]


def test_a_chunk_larger_than_the_burst_passes():
    limiter = RateLimiter(2 * MIB, burst=64 << 10)
    assert limiter.burst < MIB

    async def main():
        began = time.monotonic()
        await limiter.take(MIB)
        return time.monotonic() - began

    elapsed = asyncio.run(main())
    assert (MIB - limiter.burst) / limiter.rate <= elapsed < 2.0


def test_a_cancelled_taker_stops_at_once_and_gives_its_bytes_back():
    limiter = RateLimiter(MIB, burst=64 << 10)

    async def main():
        waiting = asyncio.create_task(limiter.take(100 * MIB))  # 100 s of debt
        await asyncio.sleep(0.05)
        began = time.monotonic()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        cancelled = time.monotonic() - began
        began = time.monotonic()
        await limiter.take(32 << 10)  # the cancelled bytes never moved: the next taker does not owe them
        return cancelled, time.monotonic() - began

    cancelled, next_take = asyncio.run(main())
    assert cancelled < 0.5 and next_take < 0.5


def test_network_limit_paces_a_put_and_a_get_on_file_storage(tmp_path):
    rate = 4 * MIB
    (tmp_path / "store").mkdir()
    storage = open_storage(load_settings({"WALG_FILE_PREFIX": str(tmp_path / "store"), "HOME": str(tmp_path),
                                          "WALG_NETWORK_RATE_LIMIT": str(rate)}))
    assert isinstance(storage, LimitedStorage) and isinstance(storage.inner, FsStorage)
    data = os.urandom(2 * MIB)

    async def main():
        began = time.monotonic()
        assert await storage.put("wal_005/a", chunks(data, 64 << 10)) == len(data)
        put = time.monotonic() - began
        began = time.monotonic()
        got = b"".join([c async for c in await storage.get("wal_005/a")])
        return put, time.monotonic() - began, got

    put, get, got = asyncio.run(main())
    assert got == data
    for elapsed in (put, get):
        assert (len(data) - storage.limiter.burst) / rate <= elapsed < 3 * len(data) / rate


def test_no_limit_no_wrapper(tmp_path):
    storage = open_storage(load_settings({"WALG_FILE_PREFIX": str(tmp_path), "HOME": str(tmp_path)}))
    assert isinstance(storage, FsStorage)


@pytest.fixture
def backend(tmp_path) -> contract.Backend:
    """File storage behind a limit too high to slow the contract down."""
    (tmp_path / "root").mkdir()
    storage = open_storage(load_settings({"WALG_FILE_PREFIX": str(tmp_path / "root"), "HOME": str(tmp_path),
                                          "WALG_NETWORK_RATE_LIMIT": "1GiB"}))
    assert isinstance(storage, LimitedStorage)
    return contract.Backend(storage)


# the whole storage contract again, through the limited storage: every contract test that takes a backend
for _name, _test in vars(contract).items():
    if _name.startswith("test_") and "backend" in inspect.signature(_test).parameters:
        globals()[f"{_name}_through_a_limit"] = _test


class Recording(Storage):
    """A backend whose every answer is recognisable, recording what it was asked."""

    name = "recorded"
    lists_in_key_order = True
    UPLOAD = Upload("basebackups_005/x.tmp", datetime(2024, 1, 1, tzinfo=timezone.utc))

    def __init__(self):
        self.calls: list[tuple] = []
        self.closed_streams = 0

    async def put(self, key, stream, *, exclusive=False):
        data = b"".join([c async for c in stream])
        self.calls.append(("put", key, data, exclusive))
        return len(data)

    async def get(self, key):
        async def body():
            try:
                for _ in range(3):
                    yield b"x" * 10
            finally:
                self.closed_streams += 1

        return body()

    async def stat(self, key):
        return ObjectInfo(key, 7, datetime(2024, 1, 1, tzinfo=timezone.utc))

    async def list(self, folder, *, recursive=False, start_after=None):
        self.calls.append(("list", folder, recursive, start_after))
        yield await self.stat(folder + "/a")

    async def delete(self, keys):
        self.calls.append(("delete", list(keys)))

    async def keys_with_prefix(self, prefix):
        return {prefix + ".lz4"}

    async def abandoned_uploads(self, folder, started_before):
        return [self.UPLOAD]

    async def discard_uploads(self, uploads):
        self.calls.append(("discard", list(uploads)))

    async def close(self):
        self.calls.append(("close",))

    def describe(self):
        return "recorded storage"


def test_the_limited_storage_delegates_everything_else():
    inner = Recording()
    storage = LimitedStorage(inner, RateLimiter(1 << 30))
    when = datetime(2025, 1, 1, tzinfo=timezone.utc)

    async def main():
        assert await storage.put("k", chunks(b"abcdef", 4), exclusive=True) == 6
        assert await storage.put_bytes("j", b"xyz") == 3
        assert await storage.get_bytes("g") == b"x" * 30
        assert (await storage.stat("s")).size == 7 and await storage.exists("s")
        assert [o.key async for o in storage.list("f", recursive=True, start_after="f/0")] == ["f/a"]
        await storage.delete(iter(["d1", "d2"]))
        assert await storage.keys_with_prefix("wal_005/0001") == {"wal_005/0001.lz4"}
        assert await storage.abandoned_uploads("basebackups_005", when) == [Recording.UPLOAD]
        await storage.discard_uploads([Recording.UPLOAD])
        stream = await storage.get("g")
        assert await anext(stream) == b"x" * 10
        await stream.aclose()  # an abandoned download releases the backend's stream
        await storage.close()

    asyncio.run(main())
    assert inner.calls == [("put", "k", b"abcdef", True), ("put", "j", b"xyz", False),
                           ("list", "f", True, "f/0"), ("delete", ["d1", "d2"]),
                           ("discard", [Recording.UPLOAD]), ("close",)]
    assert inner.closed_streams == 2
    assert storage.name == "recorded" and storage.describe() == "recorded storage" and storage.lists_in_key_order


@pytest.fixture
def backup_env(tmp_path):
    pgdata = tmp_path / "pgdata"
    files = make_pgdata(str(pgdata))
    os.makedirs(tmp_path / "store")
    base = {"WALG_FILE_PREFIX": str(tmp_path / "store"), "HOME": str(tmp_path),
            "WALG_TAR_SIZE_THRESHOLD": str(2 << 20), "WALG_UPLOAD_DISK_CONCURRENCY": "2"}
    return base, str(pgdata), sum(len(d) for d in files.values()), tmp_path


def test_disk_limit_slows_backup_push_reads(backup_env):
    base, pgdata, data_bytes, tmp_path = backup_env
    rate = 16 * MIB
    settings = load_settings({**base, "WALG_DISK_RATE_LIMIT": str(rate)})
    storage = FsStorage(str(tmp_path / "store"))
    began = time.monotonic()
    result = asyncio.run(backup_push(settings, storage, pgdata, connect=lambda s: ScriptedSession(pgdata),
                                     names=no_names, archive_check=False))
    elapsed = time.monotonic() - began
    assert result.uncompressed_size >= data_bytes  # the files, and backup_label from memory
    burst = RateLimiter(rate).burst
    assert (data_bytes - burst) / rate <= elapsed < 2 * data_bytes / rate + 1, \
        f"{data_bytes / elapsed / MIB:.1f} MiB/s read"


def test_a_disk_limited_backup_push_stops_at_once_when_cancelled(backup_env):
    base, pgdata, _, tmp_path = backup_env
    settings = load_settings({**base, "WALG_DISK_RATE_LIMIT": str(64 << 10)})  # minutes for these files
    session = ScriptedSession(pgdata)

    async def main():
        push = asyncio.create_task(backup_push(settings, FsStorage(str(tmp_path / "store")), pgdata,
                                               connect=lambda s: session, names=no_names, archive_check=False))
        await asyncio.sleep(0.5)
        began = time.monotonic()
        push.cancel()
        with pytest.raises(asyncio.CancelledError):
            await push
        return time.monotonic() - began

    assert asyncio.run(main()) < 2.0
    assert session.calls[-1] == "close" and "backup_stop" not in session.calls


def test_turbo_lifts_the_disk_limit(backup_env):
    base, pgdata, data_bytes, tmp_path = backup_env
    settings = load_settings({**base, "WALG_DISK_RATE_LIMIT": "1"}, turbo=True)  # a byte a second, lifted
    assert settings.disk_rate_limit is None
    result = asyncio.run(asyncio.wait_for(
        backup_push(settings, FsStorage(str(tmp_path / "store")), pgdata, connect=lambda s: ScriptedSession(pgdata),
                    names=no_names, archive_check=False),
        timeout=30))
    assert result.uncompressed_size >= data_bytes  # the files, and backup_label from memory


def test_wal_push_reads_are_not_disk_limited(tmp_path):
    settings = load_settings({"WALG_FILE_PREFIX": str(tmp_path / "store"), "HOME": str(tmp_path),
                              "WALG_PG_WAL_SIZE": "1", "WALG_DISK_RATE_LIMIT": "1"})  # a byte a second
    os.makedirs(tmp_path / "store")
    segment = tmp_path / "000000010000000000000001"
    segment.write_bytes(os.urandom(MIB))
    result = asyncio.run(asyncio.wait_for(wal_push(settings, FsStorage(str(tmp_path / "store")), str(segment)),
                                          timeout=30))
    assert result.name == segment.name
