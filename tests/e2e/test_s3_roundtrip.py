"""End to end on a real PostgreSQL 15 and S3 (moto over HTTP), with faults injected during backup-push."""
from __future__ import annotations

import contextlib

import pytest

from tests.e2e.roundtrip import backup_and_point_in_time_restore
from tests.s3server import s3_settings

pytestmark = pytest.mark.e2e

PREFIX = "cluster-1"
# One case: each walrus command pays ~0.4 s of start-up on S3 (imports, client), so 1 MiB segments
# (hundreds of archive and restore commands) take minutes; the file-storage e2e covers the methods.
CASES = [("lz4", 16)]


@pytest.mark.parametrize("method,segsize", CASES, ids=[c[0] for c in CASES])
def test_backup_and_point_in_time_restore_on_s3(moto_server, s3_bucket, fault_proxy, method: str,
                                                segsize: int) -> None:
    @contextlib.contextmanager
    def faults():
        # every 7th request fails (5xx, a dropped connection, a body cut short), 30 times at most
        fault_proxy.fail_every(7, ("503", "drop", "500", "drop-body"), limit=30)
        try:
            yield
        finally:
            fault_proxy.clear()
        assert len(fault_proxy.applied) >= 10, "backup-push met too few faults to prove anything"
        # no multipart upload of the backup left behind (archive_command may be uploading WAL meanwhile)
        assert [k for k in moto_server.pending_uploads(s3_bucket) if "/wal_005/" not in k] == []

    def storage(root: str) -> dict[str, str]:
        # parts and ranges of 256 KiB: tar parts and 16 MiB segments go multipart and are read in ranges
        return s3_settings(fault_proxy.endpoint, s3_bucket, prefix=PREFIX)

    def wal_names(root: str) -> list[str]:
        return [k.rsplit("/", 1)[1] for k in moto_server.keys(s3_bucket, f"{PREFIX}/wal_005/")]

    backup_and_point_in_time_restore(method, segsize, storage, wal_names, during_backup=faults)
