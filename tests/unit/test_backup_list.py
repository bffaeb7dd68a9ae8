"""LATEST and backup-list ordering follow the sentinel's LastModified, not the name (WAL-G's rule)."""
from __future__ import annotations

import asyncio
import os

import pytest

from walrus.backup.list import list_backups, resolve_backup
from walrus.errors import BackupError
from walrus.storage.fs import FsStorage


def test_latest_is_newest_sentinel_by_mtime(tmp_path):
    storage = FsStorage(str(tmp_path))
    folder = tmp_path / "basebackups_005"
    folder.mkdir()
    # the name that sorts last is the oldest object
    for name, mtime in (("base_000000010000000000000009", 1000), ("base_000000010000000000000002", 3000),
                        ("base_000000010000000000000005", 2000)):
        path = folder / f"{name}_backup_stop_sentinel.json"
        path.write_text("{}")
        os.utime(path, (mtime, mtime))
    (folder / "not_a_backup.json").write_text("{}")
    names = [b.name for b in asyncio.run(list_backups(storage))]
    assert names == ["base_000000010000000000000009", "base_000000010000000000000005",
                     "base_000000010000000000000002"]
    assert asyncio.run(resolve_backup(storage, "LATEST")) == "base_000000010000000000000002"
    assert asyncio.run(resolve_backup(storage, "base_000000010000000000000005")) == "base_000000010000000000000005"
    with pytest.raises(BackupError):
        asyncio.run(resolve_backup(storage, "base_00000001000000000000000A"))


def test_latest_without_backups_is_a_clear_error(tmp_path):
    with pytest.raises(BackupError, match="no backups found"):
        asyncio.run(resolve_backup(FsStorage(str(tmp_path)), "LATEST"))


def _detailed_storage(tmp_path) -> FsStorage:
    """Two backups with metadata.json: a 3 GiB one of 4.25 s, and one without times (an old writer's)."""
    from datetime import datetime, timezone

    from walrus.backup.dto import ExtendedMetadata

    folder = tmp_path / "basebackups_005"
    folder.mkdir()
    start = datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=timezone.utc)
    metas = {"base_000000010000000000000002": ExtendedMetadata(
                 start_time=start, finish_time=start.replace(second=9, microsecond=500000), hostname="db1",
                 data_dir="/pg", pg_version=160002, start_lsn=0x2000028, finish_lsn=0x2000100,
                 uncompressed_size=3 << 30, compressed_size=812 << 20),
             "base_000000010000000000000005": ExtendedMetadata(
                 start_time=datetime(1, 1, 1, tzinfo=timezone.utc), finish_time=datetime(1, 1, 1, tzinfo=timezone.utc),
                 uncompressed_size=1536, compressed_size=0)}
    for i, (name, meta) in enumerate(metas.items()):
        sentinel = folder / f"{name}_backup_stop_sentinel.json"
        sentinel.write_text("{}")
        os.utime(sentinel, (1000 + i, 1000 + i))
        (folder / name).mkdir()
        (folder / name / "metadata.json").write_bytes(meta.to_json())
    return FsStorage(str(tmp_path))


def _listed(storage, detail: bool, pretty: bool, as_json: bool) -> str:
    from walrus.backup.list import load_details, render

    async def main():
        backups = await list_backups(storage)
        return await load_details(storage, backups) if detail else backups

    return render(asyncio.run(main()), detail, pretty, as_json)


def test_detail_columns_add_sizes_and_duration_after_walgs(tmp_path):
    storage = _detailed_storage(tmp_path)
    lines = _listed(storage, True, False, False).splitlines()
    assert lines[0].split() == ["backup_name", "modified", "wal_file_name", "storage_name", "start_time",
                                "finish_time", "hostname", "data_dir", "pg_version", "start_lsn", "finish_lsn",
                                "is_permanent", "uncompressed_size", "compressed_size", "duration"]
    # the older backup (no times) sorts first by start_time; raw numbers, "-" where times are missing
    assert lines[1].split()[-4:] == ["false", "1536", "0", "-"]
    assert lines[2].split()[-4:] == ["false", str(3 << 30), str(812 << 20), "4.250"]
    # without --detail: WAL-G's four columns only
    assert _listed(storage, False, False, False).splitlines()[0].split() == [
        "backup_name", "modified", "wal_file_name", "storage_name"]


def test_detail_pretty_table_is_readable(tmp_path):
    table = _listed(_detailed_storage(tmp_path), True, True, False).splitlines()
    head = [c.strip() for c in table[1].strip("|").split("|")]
    assert head[-4:] == ["PERMANENT", "UNCOMPRESSED SIZE", "COMPRESSED SIZE", "DURATION"]
    rows = [[c for c in line.strip("|").split("|")] for line in table[3:5]]
    assert [c.strip() for c in rows[1][-3:]] == ["3.0 GiB", "812 MiB", "0:00:04"]
    assert [c.strip() for c in rows[0][-3:]] == ["1.5 KiB", "0 B", "-"]
    # right-aligned, header included
    assert rows[1][-3].startswith("           3.0 GiB") and rows[1][-1] == "  0:00:04 "
    assert len({len(line) for line in table}) == 1


def test_detail_json_keeps_walgs_fields(tmp_path):
    import json

    listed = json.loads(_listed(_detailed_storage(tmp_path), True, False, True))
    assert list(listed[1]) == ["backup_name", "time", "wal_file_name", "storage_name", "start_time",
                               "finish_time", "date_fmt", "hostname", "data_dir", "pg_version", "start_lsn",
                               "finish_lsn", "is_permanent", "system_identifier", "uncompressed_size",
                               "compressed_size"]
    assert (listed[1]["uncompressed_size"], listed[1]["compressed_size"]) == (3 << 30, 812 << 20)
