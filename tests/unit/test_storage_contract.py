"""The storage contract, run against every backend: file storage, and S3, GCS and Azure on their emulators over real HTTP."""
from __future__ import annotations

import asyncio
import os
import random

import pytest

from tests.storage_helpers import Backend
from walrus.errors import ObjectExists, ObjectNotFound, StorageError
from walrus.storage.fs import FsStorage

PART = 256 << 10  # the S3 backend's part and range size here (s3_settings)


@pytest.fixture(params=["fs", "s3", "gcs", "azure"])
def backend(request, tmp_path) -> Backend:
    """Each backend, a fresh empty root per test. The cloud ones come from the fixtures beside their
    emulators (tests/s3server.py, tests/gcsserver.py, tests/azurite.py): `<name>_backend`."""
    if request.param == "fs":
        (tmp_path / "root").mkdir()  # as a bucket exists before its first object
        return Backend(FsStorage(str(tmp_path / "root")))
    return request.getfixturevalue(f"{request.param}_backend")


async def chunks(*parts: bytes):
    for p in parts:
        yield p


async def keys(storage, folder: str, recursive: bool) -> list[str]:
    """The keys listed, sorted: listings promise no order (S3 lists in key order, files in directory
    order, which lets a folder of a million objects stream in constant memory)."""
    return sorted([o.key async for o in storage.list(folder, recursive=recursive)])


def test_put_get_round_trip(backend):
    storage, run = backend.storage, backend.run
    data = [os.urandom(100_000), b"", os.urandom(3)]
    assert run(storage.put("wal_005/a.lz4", chunks(*data))) == sum(map(len, data))
    assert run(storage.get_bytes("wal_005/a.lz4")) == b"".join(data)
    info = run(storage.stat("wal_005/a.lz4"))
    assert info.size == sum(map(len, data)) and info.name == "a.lz4"


def test_owners_where_objects_have_them(backend):
    """File storage reports who owns an object (group readable); the clouds have no owners. Neither
    refuses this process as a writer (root in another user's repository: tests/unit/test_fs_ownership.py)."""
    storage, run = backend.storage, backend.run
    run(storage.put_bytes("walrus-check/probe", b"x"))
    owner = storage.object_owner("walrus-check/probe")
    inner = storage
    while hasattr(inner, "inner"):  # under retry or rate-limit wrappers
        inner = inner.inner
    if isinstance(inner, FsStorage):
        assert owner is not None and owner[0] == os.geteuid() and owner[2] == 0o640
    else:
        assert owner is None
    storage.check_writer()  # a test's own storage: nothing refused


def test_empty_object(backend):
    storage, run = backend.storage, backend.run
    assert run(storage.put("empty", chunks())) == 0
    assert run(storage.get_bytes("empty")) == b""
    assert run(storage.stat("empty")).size == 0


def test_get_missing_raises_before_any_byte(backend):
    storage, run = backend.storage, backend.run
    with pytest.raises(ObjectNotFound):
        run(storage.get("wal_005/missing"))
    assert run(storage.stat("wal_005/missing")) is None
    assert run(storage.exists("wal_005/missing")) is False


def test_failed_stream_leaves_no_object(backend):
    storage, run = backend.storage, backend.run

    async def failing():
        yield b"partial data"
        raise RuntimeError("upstream failed")

    with pytest.raises(RuntimeError):
        run(storage.put("basebackups_005/b/tar_partitions/part_001.tar.lz4", failing()))
    assert run(storage.stat("basebackups_005/b/tar_partitions/part_001.tar.lz4")) is None
    assert run(keys(storage, "", True)) == []  # not even a temporary file is listed


def test_overwrite_replaces_whole_object(backend):
    storage, run = backend.storage, backend.run
    run(storage.put_bytes("k", b"first version, long"))
    run(storage.put_bytes("k", b"second"))
    assert run(storage.get_bytes("k")) == b"second"


def test_list_direct_children_and_recursive(backend):
    storage, run = backend.storage, backend.run
    for key in ("basebackups_005/x_backup_stop_sentinel.json", "basebackups_005/x/metadata.json",
                "basebackups_005/x/tar_partitions/part_001.tar.lz4", "wal_005/000000010000000000000001.lz4"):
        run(storage.put_bytes(key, b"{}"))

    assert run(keys(storage, "basebackups_005", False)) == ["basebackups_005/x_backup_stop_sentinel.json"]
    assert run(keys(storage, "basebackups_005/", True)) == ["basebackups_005/x/metadata.json",
                                                            "basebackups_005/x/tar_partitions/part_001.tar.lz4",
                                                            "basebackups_005/x_backup_stop_sentinel.json"]
    assert run(keys(storage, "nothing-here", True)) == []


def test_list_start_after(backend):
    """Only keys greater than start_after; a backend that lists in key order says so."""
    storage, run = backend.storage, backend.run
    names = [f"wal_005/{n}" for n in ("000000010000000000000001", "000000010000000000000002", "00000002.history",
                                      "000000020000000000000001")]
    for key in names:
        run(storage.put_bytes(key, b"x"))

    async def listed(after):
        return [o.key async for o in storage.list("wal_005", start_after=after)]

    assert sorted(run(listed(names[1]))) == names[2:]
    assert sorted(run(listed("wal_005/00000001G"))) == names[2:]  # past every name of timeline 1
    assert run(listed("wal_005/Z")) == []
    in_order = run(listed(None))
    assert (in_order == names) if storage.lists_in_key_order else sorted(in_order) == names


def test_delete_is_idempotent(backend):
    storage, run = backend.storage, backend.run
    run(storage.put_bytes("a/b", b"1"))
    run(storage.delete(["a/b", "a/never-existed"]))
    assert run(storage.stat("a/b")) is None


def test_keys_cannot_escape_the_root(backend):
    with pytest.raises(StorageError):
        backend.run(backend.storage.put_bytes("../outside", b"x"))


# -- at scale: listings past one page, deletes past one batch, objects past one part

def _many_keys(n: int) -> list[str]:
    return [f"wal_005/{i:024X}.lz4" for i in range(n)]


async def _put_all(storage, names: list[str]) -> None:
    gate = asyncio.Semaphore(32)

    async def one(name: str) -> None:
        async with gate:
            await storage.put_bytes(name, name.encode())

    await asyncio.gather(*(one(n) for n in names))


def test_listing_past_1000_keys(backend):
    storage, run = backend.storage, backend.run
    names = _many_keys(1003)
    run(_put_all(storage, names + ["wal_005/sub/nested"]))
    assert run(keys(storage, "wal_005", False)) == names  # every page, no sub-folder entries
    assert run(keys(storage, "wal_005", True)) == names + ["wal_005/sub/nested"]


def test_delete_past_one_batch(backend):
    storage, run = backend.storage, backend.run
    names = _many_keys(1005)
    run(_put_all(storage, names + ["keep"]))
    run(storage.delete(iter(names)))  # any iterable, consumed once
    assert run(keys(storage, "", True)) == ["keep"]


def test_delete_removes_emptied_folders(backend):
    """File storage leaves no empty folder behind a deleted backup; a folder still holding an object
    stays. (S3 has no folders: the same calls must simply work there.)"""
    storage, run = backend.storage, backend.run
    run(storage.put_bytes("basebackups_005/b/tar_partitions/part_001.tar", b"1"))
    run(storage.put_bytes("basebackups_005/b/metadata.json", b"{}"))
    run(storage.put_bytes("basebackups_005/c/metadata.json", b"{}"))
    run(storage.delete(["basebackups_005/b/tar_partitions/part_001.tar", "basebackups_005/b/metadata.json"]))
    assert run(keys(storage, "", True)) == ["basebackups_005/c/metadata.json"]
    if isinstance(storage, FsStorage):
        assert sorted(os.listdir(os.path.join(storage.root, "basebackups_005"))) == ["c"]
    run(storage.put_bytes("basebackups_005/b/metadata.json", b"{}"))  # a writer recreates what was pruned
    assert run(storage.get_bytes("basebackups_005/b/metadata.json")) == b"{}"


def _large(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    return rng.randbytes(size)


async def _ragged(data: bytes, seed: int):
    """data in chunks of irregular sizes, some smaller and some larger than a part."""
    rng = random.Random(seed)
    offset = 0
    while offset < len(data):
        n = rng.choice([1, 4096, 65536, 300_000, PART, PART + 1, 3 * PART])
        yield data[offset:offset + n]
        offset += n


def test_large_streamed_object_round_trip(backend):
    storage, run = backend.storage, backend.run
    data = _large(1, 10 * PART + 12345)  # several parts (and several ranges to read back)
    assert run(storage.put("basebackups_005/b/tar_partitions/part_001.tar.lz4", _ragged(data, 2))) == len(data)
    assert run(storage.stat("basebackups_005/b/tar_partitions/part_001.tar.lz4")).size == len(data)
    assert backend.pending_uploads() == []

    async def read_slowly() -> bytes:
        out = bytearray()
        async for chunk in await storage.get("basebackups_005/b/tar_partitions/part_001.tar.lz4"):
            out += chunk
            await asyncio.sleep(0)  # a consumer that yields, so reads ahead overlap it
        return bytes(out)

    assert run(read_slowly()) == data


def test_exact_part_multiple_round_trip(backend):
    storage, run = backend.storage, backend.run
    for size in (PART, 2 * PART):
        data = _large(size, size)
        assert run(storage.put(f"k{size}", chunks(data))) == size
        assert run(storage.get_bytes(f"k{size}")) == data


def test_reader_closing_early_releases_everything(backend):
    storage, run = backend.storage, backend.run
    data = _large(3, 8 * PART)
    run(storage.put("big", chunks(data)))

    async def first_bytes() -> bytes:
        stream = await storage.get("big")
        first = await anext(stream)
        await stream.aclose()  # reads ahead are cancelled; nothing is left running
        return first

    assert data.startswith(run(first_bytes()))
    assert run(storage.get_bytes("big")) == data  # and the storage still works


def test_failed_large_upload_leaves_nothing(backend):
    storage, run = backend.storage, backend.run

    async def fails_after_parts():
        yield _large(4, 3 * PART + 100)  # some parts are already uploaded when the stream breaks
        await asyncio.sleep(0.05)
        raise RuntimeError("disk read failed")

    with pytest.raises(RuntimeError):
        run(storage.put("basebackups_005/b/tar_partitions/part_002.tar.lz4", fails_after_parts()))
    assert run(storage.stat("basebackups_005/b/tar_partitions/part_002.tar.lz4")) is None
    assert run(keys(storage, "", True)) == []
    assert backend.pending_uploads() == []  # the multipart upload was aborted, its parts dropped


# -- exclusive puts: of writers racing for one key exactly one publishes, and nothing is replaced

def test_exclusive_put_never_replaces(backend):
    storage, run = backend.storage, backend.run
    run(storage.put_bytes("wal_005/x.lz4", b"first", exclusive=True))
    with pytest.raises(ObjectExists):
        run(storage.put_bytes("wal_005/x.lz4", b"second", exclusive=True))
    with pytest.raises(ObjectExists):  # a multipart upload too: refused at its completion, and aborted
        run(storage.put("wal_005/x.lz4", chunks(_large(5, 3 * PART)), exclusive=True))
    assert run(storage.get_bytes("wal_005/x.lz4")) == b"first"
    assert run(keys(storage, "", True)) == ["wal_005/x.lz4"]  # no temporary object left visible
    assert backend.pending_uploads() == []


@pytest.mark.parametrize("size", [1000, 3 * PART], ids=["single", "multipart"])
def test_racing_exclusive_puts_publish_exactly_one(backend, size, request):
    # an emulator that checks and writes in two steps (moto) is raced through a proxy that passes
    # conditional writes on one at a time, as the real service is atomic: a test of walrus, not of it
    backend = backend.atomic(request)
    storage, run = backend.storage, backend.run
    versions = [_large(seed, size) for seed in range(6)]

    async def race():
        async def one(data: bytes):
            await asyncio.sleep(0)
            return await storage.put("wal_005/y.lz4", chunks(data), exclusive=True)

        return await asyncio.gather(*(one(v) for v in versions), return_exceptions=True)

    outcomes = run(race())
    won = [v for v, outcome in zip(versions, outcomes) if not isinstance(outcome, BaseException)]
    assert len(won) == 1, outcomes
    assert all(isinstance(o, ObjectExists) for o in outcomes if isinstance(o, BaseException)), outcomes
    assert run(storage.get_bytes("wal_005/y.lz4")) == won[0]
    assert backend.pending_uploads() == []


def test_missing_root_is_not_an_absent_object(tmp_path):
    """Only a storage that answered may say "absent": a root that is missing, or a file, is an error."""
    (tmp_path / "a-file").write_bytes(b"x")
    for root in (tmp_path / "missing", tmp_path / "a-file"):
        storage = Backend(FsStorage(str(root)))
        for call in (lambda s: s.get("wal_005/x.lz4"), lambda s: s.stat("wal_005/x.lz4"),
                     lambda s: keys(s, "wal_005", False)):
            with pytest.raises(StorageError) as caught:
                storage.run(call(storage.storage))
            assert not isinstance(caught.value, ObjectNotFound)
            assert "WALG_FILE_PREFIX" in caught.value.hint
    empty = Backend(FsStorage(str(tmp_path)))  # a root with nothing in it yet: absent is absent
    with pytest.raises(ObjectNotFound):
        empty.run(empty.storage.get("wal_005/x.lz4"))
    assert empty.run(keys(empty.storage, "wal_005", False)) == []
