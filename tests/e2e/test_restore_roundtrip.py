"""End to end on a real PostgreSQL 15 and file storage: archive, backup under load, restore to end of archive and to a time."""
from __future__ import annotations

import os

import pytest

from tests.e2e.roundtrip import backup_and_point_in_time_restore

pytestmark = pytest.mark.e2e

# (compression method, WAL segment size in MiB, file I/O): 16 MiB is PostgreSQL's default; 1 MiB
# segments make the WAL span many segments quickly and exercise WALG_PG_WAL_SIZE. "auto" must read
# with io_uring wherever the kernel lets the walrus user set up a ring (the round trip checks the
# reader backup-push reports); one case runs the whole round trip on the preadv/pwrite fallback.
CASES = [("lz4", 16, "auto"), ("lz4", 16, "preadv"), ("zstd", 1, "auto"), ("brotli", 1, "auto"),
         ("lzma", 1, "auto"), ("none", 1, "auto")]


def _storage_with(io_method: str):
    def storage(root: str) -> dict[str, str]:
        return {"WALG_FILE_PREFIX": os.path.join(root, "storage"), "WALRUS_IO_METHOD": io_method}

    return storage


def _wal_names(root: str) -> list[str]:
    return os.listdir(os.path.join(root, "storage", "wal_005"))


@pytest.mark.parametrize("method,segsize,io_method", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_backup_and_point_in_time_restore(method: str, segsize: int, io_method: str) -> None:
    backup_and_point_in_time_restore(method, segsize, _storage_with(io_method), _wal_names)
