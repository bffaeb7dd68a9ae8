"""backup-push on a real PostgreSQL 15 whose WAL archiving could not make the backup restorable: archiving
off, and an archiver that fails (archive_command = /bin/false). Each is refused before the backup starts,
naming why, with nothing stored; --no-archive-check takes the backup anyway, with a warning."""
from __future__ import annotations

import json
import os

import pytest

from tests.pgcluster import Cluster, make_workdir, remove_tree, walrus, write_config

pytestmark = pytest.mark.e2e


def _sentinels(storage: str) -> list[str]:
    folder = os.path.join(storage, "basebackups_005")
    return sorted(n for n in os.listdir(folder) if n.endswith("_backup_stop_sentinel.json")) \
        if os.path.isdir(folder) else []


@pytest.mark.parametrize("archiving", ["off", "failing"])
def test_backup_push_refuses_what_could_not_be_restored(archiving: str) -> None:
    root = make_workdir(f"walrus-e2e-archiving-{archiving}-")
    storage = os.path.join(root, "storage")
    config = write_config(os.path.join(root, "walg.json"), {"WALG_FILE_PREFIX": storage})
    cluster = Cluster.init(root)
    try:
        if archiving == "off":
            cluster.configure(archive_mode="off")
        else:
            cluster.configure(archive_mode="on", archive_command="/bin/false")
        cluster.start()
        if archiving == "failing":
            failed = cluster.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
            cluster.psql("CREATE TABLE t(id int); SELECT pg_switch_wal()")
            cluster.wait_until("SELECT failed_count > 0 FROM pg_stat_archiver", "t")

        refused = walrus(["backup-push", cluster.data], config=config, env=cluster.env, check=False)
        stderr = refused.stderr.decode()
        assert refused.returncode == 1, stderr
        if archiving == "off":
            assert "WAL archiving is off" in stderr and "archive_mode = off" in stderr, stderr
        else:
            assert "the WAL archiver is failing" in stderr and failed in stderr, stderr
        assert "--no-archive-check" in stderr, stderr
        assert _sentinels(storage) == []

        taken = walrus(["backup-push", cluster.data, "--no-archive-check", "--json"], config=config,
                       env=cluster.env)
        assert "WARNING" in taken.stderr.decode() and "--no-archive-check" in taken.stderr.decode()
        assert _sentinels(storage) == [json.loads(taken.stdout)["backup_name"] + "_backup_stop_sentinel.json"]
    finally:
        cluster.stop()
        remove_tree(root)
