"""The storage contract, run against every backend (file storage here; S3 joins with its issue)."""
from __future__ import annotations

import asyncio
import os

import pytest

from walrus.errors import ObjectNotFound
from walrus.storage.fs import FsStorage


@pytest.fixture(params=["fs"])
def storage(request, tmp_path):
    return FsStorage(str(tmp_path / "root"))


def run(coro):
    return asyncio.run(coro)


async def chunks(*parts: bytes):
    for p in parts:
        yield p


def test_put_get_round_trip(storage):
    data = [os.urandom(100_000), b"", os.urandom(3)]
    assert run(storage.put("wal_005/a.lz4", chunks(*data))) == sum(map(len, data))
    assert run(storage.get_bytes("wal_005/a.lz4")) == b"".join(data)
    info = run(storage.stat("wal_005/a.lz4"))
    assert info.size == sum(map(len, data)) and info.name == "a.lz4"


def test_get_missing_raises_before_any_byte(storage):
    with pytest.raises(ObjectNotFound):
        run(storage.get("wal_005/missing"))
    assert run(storage.stat("wal_005/missing")) is None
    assert run(storage.exists("wal_005/missing")) is False


def test_failed_stream_leaves_no_object(storage):
    async def failing():
        yield b"partial data"
        raise RuntimeError("upstream failed")

    with pytest.raises(RuntimeError):
        run(storage.put("basebackups_005/b/tar_partitions/part_001.tar.lz4", failing()))
    assert run(storage.stat("basebackups_005/b/tar_partitions/part_001.tar.lz4")) is None

    async def listed():
        return [o.key async for o in storage.list("", recursive=True)]

    assert run(listed()) == []  # not even a temporary file is listed


def test_overwrite_replaces_whole_object(storage):
    run(storage.put_bytes("k", b"first version, long"))
    run(storage.put_bytes("k", b"second"))
    assert run(storage.get_bytes("k")) == b"second"


def test_list_direct_children_and_recursive(storage):
    for key in ("basebackups_005/x_backup_stop_sentinel.json", "basebackups_005/x/metadata.json",
                "basebackups_005/x/tar_partitions/part_001.tar.lz4", "wal_005/000000010000000000000001.lz4"):
        run(storage.put_bytes(key, b"{}"))

    async def keys(folder, recursive):
        return [o.key async for o in storage.list(folder, recursive=recursive)]

    assert run(keys("basebackups_005", False)) == ["basebackups_005/x_backup_stop_sentinel.json"]
    assert run(keys("basebackups_005/", True)) == ["basebackups_005/x/metadata.json",
                                                   "basebackups_005/x/tar_partitions/part_001.tar.lz4",
                                                   "basebackups_005/x_backup_stop_sentinel.json"]
    assert run(keys("nothing-here", True)) == []


def test_delete_is_idempotent(storage):
    run(storage.put_bytes("a/b", b"1"))
    run(storage.delete(["a/b", "a/never-existed"]))
    assert run(storage.stat("a/b")) is None


def test_keys_cannot_escape_the_root(storage):
    from walrus.errors import StorageError

    with pytest.raises(StorageError):
        run(storage.put_bytes("../outside", b"x"))
