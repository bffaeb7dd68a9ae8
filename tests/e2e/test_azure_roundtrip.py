"""End to end on a real PostgreSQL 15 and Azure Blob Storage (Azurite over HTTP), with faults during backup-push."""
from __future__ import annotations

import contextlib

import pytest

from tests.azurite import azure_settings
from tests.e2e.roundtrip import backup_and_point_in_time_restore

pytestmark = pytest.mark.e2e

PREFIX = "cluster-1"
# One case, as on S3: each walrus command pays its start-up (imports, client) hundreds of times over;
# the file-storage e2e covers the compression methods.
CASES = [("lz4", 16)]


@pytest.mark.parametrize("method,segsize", CASES, ids=[c[0] for c in CASES])
def test_backup_and_point_in_time_restore_on_azure(azurite, azure_container, azure_fault_proxy, method: str,
                                                   segsize: int) -> None:
    @contextlib.contextmanager
    def faults():
        # every 7th request fails (5xx, a dropped connection, a body cut short, an answer lost), 30 times at most
        azure_fault_proxy.fail_every(7, ("503", "drop", "500", "drop-body", "lose"), limit=30)
        try:
            yield
        finally:
            azure_fault_proxy.clear()
        assert len(azure_fault_proxy.applied) >= 10, "backup-push met too few faults to prove anything"
        # the backup's blocks were all committed: no blob of it holds blocks staged and left behind
        # (archive_command may be uploading WAL meanwhile)
        backup = azurite.keys(azure_container, f"{PREFIX}/basebackups_005/")
        assert backup and all(azurite.uncommitted_blocks(azure_container, k) == 0 for k in backup)
        assert azurite.pending(azure_container, f"{PREFIX}/basebackups_005/") == []

    def storage(root: str) -> dict[str, str]:
        # blocks and ranges of 256 KiB: tar parts and 16 MiB segments are staged in blocks and read in ranges
        return azure_settings(azure_fault_proxy.endpoint, azure_container, prefix=PREFIX)

    def wal_names(root: str) -> list[str]:
        return [k.rsplit("/", 1)[1] for k in azurite.keys(azure_container, f"{PREFIX}/wal_005/")]

    backup_and_point_in_time_restore(method, segsize, storage, wal_names, during_backup=faults)
