"""delete's engine sends its delete requests a few at a time beside the listing: bounded, and the
first failure (or a cancellation) ends the whole sweep with no request left running."""
from __future__ import annotations

import asyncio
import os

import pytest

from tests.unit.test_delete import name_at, metadata, sentinel, wal
from walrus.backup import delete as engine
from walrus.backup.retention import parse_request
from walrus.config import load_settings
from walrus.errors import StorageError
from walrus.storage.fs import FsStorage

SEGMENTS = 5500  # WAL 1..5499: the cut at the newest kept backup's start (5000) leaves 4999 to delete


class SlowFsStorage(FsStorage):
    """File storage whose deletes take a while and may fail: counts the requests in flight."""

    def __init__(self, root: str, fail_at: int | None = None) -> None:
        super().__init__(root)
        self.fail_at, self.started, self.finished = fail_at, 0, 0
        self.in_flight = self.peak = 0

    async def delete(self, keys) -> None:
        keys = list(keys)
        self.started += 1
        call = self.started
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.05)
            if call == self.fail_at:
                raise StorageError(f"could not delete {len(keys)} objects", detail="injected")
            await super().delete(keys)
        finally:
            self.in_flight -= 1
            self.finished += 1


def _archive(root) -> None:
    def write(key: str, data: bytes) -> None:
        path = os.path.join(root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    for segno in range(1, SEGMENTS):
        write(f"wal_005/{wal(1, segno)}", b"wal")
    for segno in (2, 5000):
        name = name_at(segno)
        write(f"basebackups_005/{name}/tar_partitions/part_001.tar.lz4", b"part")
        write(f"basebackups_005/{name}/metadata.json", metadata(segno))
        write(f"basebackups_005/{name}_backup_stop_sentinel.json", sentinel(segno))
        os.utime(os.path.join(root, f"basebackups_005/{name}_backup_stop_sentinel.json"), (segno, segno))


def _run(storage, root, *, confirm: bool = True):
    settings = load_settings({"WALG_FILE_PREFIX": str(root)})
    return engine.delete(settings, storage, parse_request(["retain", "1"]), confirm=confirm, grace=0)


def _wal_left(root) -> int:
    return len(os.listdir(os.path.join(root, "wal_005")))


def test_deletes_run_a_few_at_a_time_and_all_finish(tmp_path):
    _archive(tmp_path)
    storage = SlowFsStorage(str(tmp_path))
    result = asyncio.run(_run(storage, tmp_path))
    assert result.wal.objects == 4999
    assert _wal_left(tmp_path) == SEGMENTS - 1 - 4999
    assert 1 < storage.peak <= engine.IN_FLIGHT
    assert storage.in_flight == 0


def test_a_failed_request_fails_the_sweep_and_cancels_the_rest(tmp_path):
    _archive(tmp_path)
    storage = SlowFsStorage(str(tmp_path), fail_at=3)  # the first folder's, then the sweep's first batch

    async def main():
        with pytest.raises(StorageError) as failure:
            await _run(storage, tmp_path)
        assert failure.value.detail == "injected"
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(main())
    assert storage.in_flight == 0 and storage.finished == storage.started
    assert storage.started <= 3 + engine.IN_FLIGHT  # no request sent once the failure was seen
    assert _wal_left(tmp_path) > SEGMENTS - 1 - 4999  # the sweep stopped short


def test_cancelling_the_command_leaves_no_request_running(tmp_path):
    _archive(tmp_path)
    storage = SlowFsStorage(str(tmp_path))

    async def main():
        task = asyncio.create_task(_run(storage, tmp_path))
        while storage.started < 4:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(main())
    assert storage.in_flight == 0
    assert _wal_left(tmp_path) > SEGMENTS - 1 - 4999


def test_a_dry_run_sends_no_request(tmp_path):
    _archive(tmp_path)
    storage = SlowFsStorage(str(tmp_path))
    result = asyncio.run(_run(storage, tmp_path, confirm=False))
    assert result.wal.objects == 4999 and storage.started == 0
    assert _wal_left(tmp_path) == SEGMENTS - 1
