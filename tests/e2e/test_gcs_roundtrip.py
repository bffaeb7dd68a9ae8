"""End to end on a real PostgreSQL 15 and GCS (fake-gcs-server over HTTP), with faults injected during backup-push."""
from __future__ import annotations

import contextlib

import pytest

from tests.e2e.roundtrip import backup_and_point_in_time_restore
from tests.gcsserver import gcs_settings

pytestmark = pytest.mark.e2e

PREFIX = "cluster-1"
# One case, as on S3: each walrus command pays its start-up, and 16 MiB segments keep their count low.
CASES = [("lz4", 16)]


@pytest.mark.parametrize("method,segsize", CASES, ids=[c[0] for c in CASES])
def test_backup_and_point_in_time_restore_on_gcs(gcs_server, gcs_bucket, gcs_fault_proxy, method: str,
                                                 segsize: int) -> None:
    @contextlib.contextmanager
    def faults():
        # every 7th request fails (5xx, a dropped connection, an answer cut short), 30 times at most:
        # resumable chunks among them, which resume from the offset their session reports
        gcs_fault_proxy.fail_every(7, ("503", "drop", "500", "drop-body"), limit=30)
        try:
            yield
        finally:
            gcs_fault_proxy.clear()
        assert len(gcs_fault_proxy.applied) >= 10, "backup-push met too few faults to prove anything"
        assert any(request.kind == "part" for _, request in gcs_fault_proxy.applied), "no chunk met a fault"
        # every session of the backup that was sent bytes was finalized or cancelled (a start whose
        # answer was cut short leaves an empty one, as on GCS; archive_command may be uploading WAL)
        assert [k for k in gcs_server.pending_uploads(gcs_bucket, holding_bytes=True) if "/wal_005/" not in k] == []

    def storage(root: str) -> dict[str, str]:
        # chunks and ranges of 256 KiB: tar parts and 16 MiB segments go resumable and are read in ranges
        return gcs_settings(gcs_fault_proxy.endpoint, gcs_bucket, prefix=PREFIX)

    def wal_names(root: str) -> list[str]:
        return [k.rsplit("/", 1)[1] for k in gcs_server.keys(gcs_bucket, f"{PREFIX}/wal_005/")]

    backup_and_point_in_time_restore(method, segsize, storage, wal_names, during_backup=faults)
