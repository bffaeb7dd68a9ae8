"""End to end on a real PostgreSQL 15: a full backup and three page-scan deltas under pgbench, the
chain's limit, and a restore of the last delta that recovers to the end of the archive."""
from __future__ import annotations

import json
import os

import pytest

from tests.e2e.roundtrip import _pgbench
from tests.pgcluster import WALRUS, Cluster, make_workdir, remove_tree, walrus, write_config

pytestmark = pytest.mark.e2e


def _files_metadata(root: str, name: str) -> dict:
    with open(os.path.join(root, "storage", "basebackups_005", name, "files_metadata.json")) as f:
        return json.load(f)["Files"]


def test_full_then_deltas_then_restore_of_the_chain() -> None:
    root = make_workdir("walrus-e2e-delta-")
    config = write_config(os.path.join(root, "walg.json"), {
        "WALG_FILE_PREFIX": os.path.join(root, "storage"), "WALG_COMPRESSION_METHOD": "lz4",
        "WALG_DELTA_MAX_STEPS": "3", "WALG_TAR_SIZE_THRESHOLD": str(8 << 20),
        "WALG_UPLOAD_DISK_CONCURRENCY": "2", "WALG_DOWNLOAD_CONCURRENCY": "3"})
    clusters: list[Cluster] = []
    try:
        primary = Cluster.init(root)
        clusters.append(primary)
        primary.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p")
        primary.start()
        _pgbench(primary, "-i", "-q", "-s", "4")
        primary.psql("CREATE TABLE quiet(id int PRIMARY KEY, body text);"
                     "INSERT INTO quiet SELECT g, md5(g::text) FROM generate_series(1, 50000) g;"
                     "CHECKPOINT")

        def push() -> dict:
            return json.loads(walrus(["backup-push", primary.data, "--json"], config=config, env=primary.env).stdout)

        full = push()
        assert full["delta_from"] is None
        pushed = [full]
        for step in range(3):
            _pgbench(primary, "-n", "-t", "300")  # touches a few pages of every pgbench table
            primary.psql("CHECKPOINT")
            delta = push()
            assert delta["delta_from"] == pushed[-1]["backup_name"], delta
            assert delta["backup_name"].endswith("_D_" + pushed[-1]["backup_name"][5:29])
            assert delta["compressed_size"] < full["compressed_size"] / 3, (delta, full)
            pushed.append(delta)
        files = _files_metadata(root, pushed[-1]["backup_name"])
        accounts = primary.psql("SELECT pg_relation_filepath('pgbench_accounts')")
        quiet = primary.psql("SELECT pg_relation_filepath('quiet')")
        assert files["/" + accounts]["IsIncremented"], files["/" + accounts]
        assert files["/" + quiet]["IsSkipped"], files["/" + quiet]  # untouched since the full backup

        fourth = push()  # WALG_DELTA_MAX_STEPS=3: the chain is full, a full backup starts the next
        assert fourth["delta_from"] is None

        _pgbench(primary, "-n", "-t", "200")
        digest = primary.digest()
        last = primary.psql("SELECT pg_walfile_name(pg_switch_wal())")
        primary.wait_until("SELECT last_archived_wal FROM pg_stat_archiver", last)

        data = os.path.join(root, "restore")
        fetched = json.loads(walrus(["backup-fetch", data, pushed[-1]["backup_name"], "--json"],
                                    config=config).stdout)
        assert fetched["chain"] == [b["backup_name"] for b in pushed]
        open(os.path.join(data, "recovery.signal"), "w").close()
        restored = Cluster(data=data, sockdir=root)
        restored.configure(archive_mode="off", restore_command=f"{WALRUS} --config {config} wal-fetch %f %p")
        restored.start()
        clusters.append(restored)
        restored.wait_until("SELECT pg_is_in_recovery()", "f", timeout=300)
        assert restored.digest() == digest
    finally:
        for c in clusters:
            c.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)
