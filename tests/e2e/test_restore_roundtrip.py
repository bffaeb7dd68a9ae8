"""End to end on a real PostgreSQL 15 and file storage: archive, backup under load, restore to end of archive and to a time."""
from __future__ import annotations

import os

import pytest

from tests.e2e.roundtrip import backup_and_point_in_time_restore

pytestmark = pytest.mark.e2e

# (compression method, WAL segment size in MiB): 16 MiB is PostgreSQL's default; 1 MiB segments
# make the WAL span many segments quickly and exercise WALG_PG_WAL_SIZE.
CASES = [("lz4", 16), ("zstd", 1), ("brotli", 1), ("lzma", 1), ("none", 1)]


def _storage(root: str) -> dict[str, str]:
    return {"WALG_FILE_PREFIX": os.path.join(root, "storage")}


def _wal_names(root: str) -> list[str]:
    return os.listdir(os.path.join(root, "storage", "wal_005"))


@pytest.mark.parametrize("method,segsize", CASES, ids=[c[0] for c in CASES])
def test_backup_and_point_in_time_restore(method: str, segsize: int) -> None:
    backup_and_point_in_time_restore(method, segsize, _storage, _wal_names)
