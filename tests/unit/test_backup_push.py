"""backup-push's phases without a cluster: a scripted PostgreSQL session and a data directory of
files, pushed to file storage and restored by backup-fetch."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random

import pytest

from walrus.backup.fetch import backup_fetch
from walrus.backup.push import backup_push
from walrus.config import load_settings
from walrus.errors import BackupError, StorageError
from walrus.pg.client import BackupStart, BackupStop, ServerInfo
from walrus.storage import layout
from walrus.storage.fs import FsStorage

SEGMENT = 16 << 20
START_LSN = 3 * SEGMENT + 0x28
STOP_LSN = 4 * SEGMENT + 0x100
LABEL = "START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\n"


class ScriptedSession:
    """What PgSession answers, scripted; records the calls."""

    def __init__(self, pgdata: str, data_directory: str | None = None):
        self.data_directory = data_directory or pgdata
        self.calls: list[str] = []

    def server_info(self) -> ServerInfo:
        self.calls.append("server_info")
        return ServerInfo(self.data_directory, 150004, 7000000000000000001, SEGMENT, False, "off", "")

    def backup_start(self, label: str, version_num: int) -> BackupStart:
        self.calls.append("backup_start")
        return BackupStart(START_LSN, 1)

    def backup_stop(self, version_num: int, wait_for_archive: bool = True) -> BackupStop:
        self.calls.append("backup_stop")
        return BackupStop(STOP_LSN, LABEL, "")

    def close(self) -> None:
        self.calls.append("close")


class RecordingFs(FsStorage):
    """File storage that records the keys put, in order, and fails the put of `fail_key` if asked."""

    def __init__(self, root: str, fail_key: str | None = None):
        super().__init__(root)
        self.puts: list[str] = []
        self.fail_key = fail_key

    async def put(self, key, stream, *, exclusive=False):
        if self.fail_key is not None and key.endswith(self.fail_key):
            async for _ in stream:  # the pipeline upstream ran; the storage then refuses
                pass
            raise StorageError(f"upload of {key} failed", detail="injected")
        size = await super().put(key, stream, exclusive=exclusive)
        self.puts.append(key)
        return size


def make_pgdata(root) -> dict[str, bytes]:
    rnd = random.Random(5)
    files = {"global/pg_control": rnd.randbytes(8192), "PG_VERSION": b"15\n",
             "base/1/1259": rnd.randbytes(3 << 20), "base/1/2608": b"\0" * 40000 + rnd.randbytes(100),
             "base/5/16384": rnd.randbytes(5 << 20), "postgresql.conf": b"# settings\n"}
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(root, "pg_wal", "archive_status"))
    with open(os.path.join(root, "pg_wal", "000000010000000000000003"), "wb") as f:
        f.write(b"w" * 1000)  # never in a backup
    return files


@pytest.fixture
def env(tmp_path):
    pgdata = tmp_path / "pgdata"
    files = make_pgdata(str(pgdata))
    settings = load_settings({"WALG_FILE_PREFIX": str(tmp_path / "store"), "HOME": str(tmp_path),
                              "WALG_TAR_SIZE_THRESHOLD": str(2 << 20), "WALG_UPLOAD_DISK_CONCURRENCY": "2"})
    os.makedirs(tmp_path / "store")
    return settings, str(pgdata), files, tmp_path


def test_the_phases_make_a_backup_that_restores(env):
    settings, pgdata, files, tmp_path = env
    session = ScriptedSession(pgdata)
    storage = RecordingFs(str(tmp_path / "store"))
    # a server that does not archive: --no-archive-check (archive_check=False) takes the backup anyway
    result = asyncio.run(backup_push(settings, storage, pgdata, connect=lambda s: session, names=no_names,
                                     archive_check=False))
    assert session.calls == ["server_info", "backup_start", "backup_stop", "close"]
    assert result.name == "base_000000010000000000000003"
    # data parts (at least two: the threshold splits them), pg_control.tar and backup_label.tar, then
    # the metadata, and the sentinel last
    parts = [k.rsplit("/", 1)[-1] for k in storage.puts if "/tar_partitions/" in k]
    assert {"pg_control.tar.lz4", "backup_label.tar.lz4"} <= set(parts) and len(parts) >= 4
    assert storage.puts[-1] == layout.sentinel_key(result.name)
    assert sorted(storage.puts[-3:-1]) == sorted([layout.backup_key(result.name, layout.METADATA),
                                                  layout.backup_key(result.name, layout.FILES_METADATA)])

    dest = tmp_path / "restored"
    asyncio.run(backup_fetch(settings, FsStorage(str(tmp_path / "store")), str(dest), "LATEST"))
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data, rel
    assert (dest / "backup_label").read_text() == LABEL
    assert not (dest / "pg_wal" / "000000010000000000000003").exists()


def test_a_failed_part_leaves_no_sentinel_and_never_stops_the_backup(env):
    settings, pgdata, _, tmp_path = env
    session = ScriptedSession(pgdata)
    storage = RecordingFs(str(tmp_path / "store"), fail_key="part_002.tar.lz4")
    with pytest.raises(StorageError, match="part_002"):
        asyncio.run(backup_push(settings, storage, pgdata, connect=lambda s: session, names=no_names,
                                archive_check=False))
    # closing the session without pg_backup_stop ends PostgreSQL's non-exclusive backup
    assert session.calls == ["server_info", "backup_start", "close"]
    assert not any(k.endswith(layout.SENTINEL_SUFFIX) or k.endswith(".json") for k in storage.puts)


def test_the_wrong_server_is_refused_before_any_upload(env):
    settings, pgdata, _, tmp_path = env
    session = ScriptedSession(pgdata, data_directory="/var/lib/postgresql/15/other")
    storage = RecordingFs(str(tmp_path / "store"))
    with pytest.raises(BackupError, match="is not the data directory"):
        asyncio.run(backup_push(settings, storage, pgdata, connect=lambda s: session, names=no_names,
                                archive_check=False))
    assert session.calls == ["server_info", "close"] and storage.puts == []


async def no_names(settings, session):
    """The scripted session stands for one connection: no per-database catalog to read."""
    return None


class InfoSession(ScriptedSession):
    """A ScriptedSession whose server_info says what `info` gives (the archiving settings)."""

    def __init__(self, pgdata: str, **info):
        super().__init__(pgdata)
        self.info = info

    def server_info(self) -> ServerInfo:
        self.calls.append("server_info")
        return ServerInfo(self.data_directory, 150004, 7000000000000000001, SEGMENT, **self.info)


@pytest.mark.parametrize("info, refused", [
    (dict(in_recovery=False, archive_mode="off", archive_command=""), "WAL archiving is off"),
    (dict(in_recovery=False, archive_mode="on", archive_command=""), "WAL archiving is off"),
    (dict(in_recovery=False, archive_mode="on", archive_command="walrus wal-push %p",
          archiver_failure="000000010000000000000002 at 2026-12-05 10:00:00+00"), "the WAL archiver is failing"),
])
def test_a_backup_that_could_not_be_restored_is_refused_before_it_starts(env, info, refused):
    settings, pgdata, _, tmp_path = env
    session = InfoSession(pgdata, **info)
    storage = RecordingFs(str(tmp_path / "store"))
    with pytest.raises(BackupError, match=refused) as caught:
        asyncio.run(backup_push(settings, storage, pgdata, connect=lambda s: session, names=no_names))
    assert "--no-archive-check" in caught.value.hint
    if "archiver_failure" in info:
        assert "000000010000000000000002" in caught.value.detail  # names pg_stat_archiver's failure
    assert session.calls == ["server_info", "close"]  # pg_backup_start never ran
    assert storage.puts == []


def test_a_standby_or_an_archive_library_is_not_refused(env):
    settings, pgdata, _, tmp_path = env
    for info in (dict(in_recovery=True, archive_mode="off", archive_command=""),
                 dict(in_recovery=False, archive_mode="on", archive_command="", archive_library="basic_archive")):
        session = InfoSession(pgdata, **info)
        storage = RecordingFs(str(tmp_path / "store"))
        if info["in_recovery"]:
            asyncio.run(backup_push(settings, storage, pgdata, connect=lambda s: session, names=no_names))
            assert any(k.endswith(layout.SENTINEL_SUFFIX) for k in storage.puts)
        else:  # archiving applies: the wait for the backup's WAL (not archived here) is bounded
            bounded = dataclasses.replace(settings, stop_backup_timeout=0.3)
            with pytest.raises(BackupError, match="not archived within"):
                asyncio.run(backup_push(bounded, storage, pgdata, connect=lambda s: session, names=no_names))
            assert not any(k.endswith(layout.SENTINEL_SUFFIX) for k in storage.puts)


def test_the_wait_for_the_archiver_times_out_without_a_sentinel(env):
    settings, pgdata, _, tmp_path = env
    # segment 4 (the backup's last) is in pg_wal, neither .ready nor .done: the archiver's to store
    with open(os.path.join(pgdata, "pg_wal", "000000010000000000000004"), "wb") as f:
        f.write(b"w" * 1000)
    session = InfoSession(pgdata, in_recovery=False, archive_mode="on", archive_command="walrus wal-push %p")
    storage = RecordingFs(str(tmp_path / "store"))
    bounded = dataclasses.replace(settings, stop_backup_timeout=0.3)
    with pytest.raises(BackupError, match="000000010000000000000003 was not archived within") as caught:
        asyncio.run(backup_push(bounded, storage, pgdata, connect=lambda s: session, names=no_names))
    assert "WALG_STOP_BACKUP_TIMEOUT" in caught.value.hint
    assert not any(k.endswith(layout.SENTINEL_SUFFIX) for k in storage.puts)
    assert session.calls[-1] == "close"


class ArchivingSession(ScriptedSession):
    """A primary with archive_mode on: the backup's WAL must be durable before its sentinel."""

    def server_info(self) -> ServerInfo:
        self.calls.append("server_info")
        return ServerInfo(self.data_directory, 150004, 7000000000000000001, SEGMENT, False, "on", "walrus wal-push %p")


def _wal_files(pgdata: str, status: dict[str, str]) -> None:
    """pg_wal files of the backup (START_LSN to STOP_LSN: segments 3 and 4, and the history file),
    each with the archive status given (.ready or .done)."""
    for name, state in status.items():
        with open(os.path.join(pgdata, "pg_wal", name), "wb") as f:
            f.write(random.Random(name).randbytes(SEGMENT if "." not in name else 300))
        open(os.path.join(pgdata, "pg_wal", "archive_status", f"{name}.{state}"), "w").close()


HISTORY = "000000010000000000000003.00000028.backup"


def test_backup_push_stores_the_wal_it_needs_before_its_sentinel(env):
    """The segments and history file PostgreSQL marked .ready are stored by backup-push itself (not
    awaited from the archiver), before the sentinel; one the archiver already stored (.done) is left
    alone; and the archiver's own call afterwards finds identical bytes and succeeds."""
    from walrus.wal.push import WalPusher, store_for_backup

    settings, pgdata, _, tmp_path = env
    os.remove(os.path.join(pgdata, "pg_wal", "000000010000000000000003"))
    _wal_files(pgdata, {"000000010000000000000003": "done", "000000010000000000000004": "ready", HISTORY: "ready"})
    storage = RecordingFs(str(tmp_path / "store"))
    stored: list[list[str]] = []

    async def archive(s, st, wal_dir, names):
        stored.append(names)
        await store_for_backup(s, st, wal_dir, names)

    result = asyncio.run(backup_push(settings, storage, pgdata, connect=lambda s: ArchivingSession(pgdata),
                                     names=no_names, archive=archive))
    assert stored == [[HISTORY, "000000010000000000000004"]]
    wal = [k for k in storage.puts if k.startswith("wal_005/")]
    assert sorted(wal) == [f"wal_005/{HISTORY}.lz4", "wal_005/000000010000000000000004.lz4"]
    assert storage.puts.index(layout.sentinel_key(result.name)) > max(storage.puts.index(k) for k in wal)

    async def archiver():
        pusher = WalPusher(settings)
        try:
            return [(await pusher.push(storage, os.path.join(pgdata, "pg_wal", n))).status
                    for n in ("000000010000000000000004", HISTORY)]
        finally:
            pusher.close()
    assert asyncio.run(archiver()) == ["already archived", "already archived"]


def test_pg_control_is_the_copy_read_before_pg_backup_stop(env):
    """pg_control's part is stored while the server stops the backup, so its bytes are read before
    the stop: a pg_control the stop rewrote is not the one in the backup."""
    settings, pgdata, files, tmp_path = env
    control = os.path.join(pgdata, "global", "pg_control")

    class RewritingStop(ScriptedSession):
        def backup_stop(self, version_num: int, wait_for_archive: bool = True) -> BackupStop:
            with open(control, "wb") as f:
                f.write(b"\x01" * 8192)
            return super().backup_stop(version_num, wait_for_archive)

    asyncio.run(backup_push(settings, FsStorage(str(tmp_path / "store")), pgdata,
                            connect=lambda s: RewritingStop(pgdata), names=no_names, archive_check=False))
    dest = tmp_path / "restored"
    asyncio.run(backup_fetch(settings, FsStorage(str(tmp_path / "store")), str(dest), "LATEST"))
    assert (dest / "global" / "pg_control").read_bytes() == files["global/pg_control"]


def test_a_failed_metadata_store_beside_the_wal_leaves_no_sentinel(env):
    """The backup's WAL and its metadata are stored at once; a failure of either ends the backup
    without a sentinel."""
    settings, pgdata, _, tmp_path = env
    os.remove(os.path.join(pgdata, "pg_wal", "000000010000000000000003"))
    _wal_files(pgdata, {"000000010000000000000003": "ready", "000000010000000000000004": "ready", HISTORY: "ready"})
    storage = RecordingFs(str(tmp_path / "store"), fail_key=layout.FILES_METADATA)
    from walrus.wal.push import store_for_backup

    with pytest.raises(StorageError, match="files_metadata"):
        asyncio.run(backup_push(settings, storage, pgdata, connect=lambda s: ArchivingSession(pgdata),
                                names=no_names, archive=store_for_backup))
    assert not any(k.endswith(layout.SENTINEL_SUFFIX) for k in storage.puts)
    assert not any(k.endswith(layout.FILES_METADATA) for k in storage.puts)


def test_backup_push_awaits_the_archiver_where_it_cannot_store_the_wal(env):
    """A file not marked complete yet is the archiver's to store; and a failure to store is a warning
    followed by the archiver's result: either way the backup completes once the archiver is done."""
    settings, pgdata, _, tmp_path = env
    os.remove(os.path.join(pgdata, "pg_wal", "000000010000000000000003"))
    _wal_files(pgdata, {"000000010000000000000003": "ready", "000000010000000000000004": "ready", HISTORY: "ready"})
    os.remove(os.path.join(pgdata, "pg_wal", "archive_status", "000000010000000000000004.ready"))
    status = os.path.join(pgdata, "pg_wal", "archive_status")

    async def never(s, st, wal_dir, names):
        raise AssertionError("not every file is complete: nothing may be stored by backup-push")

    async def archiver_later():
        await asyncio.sleep(0.3)  # PostgreSQL's archiver finishes the files meanwhile
        for name in ("000000010000000000000003", "000000010000000000000004", HISTORY):
            open(os.path.join(status, name + ".done"), "w").close()

    async def run(archive):
        later = asyncio.create_task(archiver_later())
        try:
            return await backup_push(settings, RecordingFs(str(tmp_path / "store")), pgdata,
                                     connect=lambda s: ArchivingSession(pgdata), names=no_names, archive=archive)
        finally:
            await later

    assert asyncio.run(run(never)).name == "base_000000010000000000000003"
    for name in os.listdir(status):
        if name.endswith(".done"):
            os.remove(os.path.join(status, name))
    open(os.path.join(status, "000000010000000000000004.ready"), "w").close()

    async def failing(s, st, wal_dir, names):
        raise StorageError("the storage refused the WAL", detail="injected")

    assert asyncio.run(run(failing)).name.startswith("base_")
