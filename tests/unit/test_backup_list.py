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
