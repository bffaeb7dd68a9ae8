"""wal-verify and wal-show on a real PostgreSQL 15 archiving through walrus: a whole archive passes,
asking the server for its position, before and after a failover to timeline 2 (followed down its
history to timeline 1); a segment deleted from the middle fails integrity, exits 1 and is named,
in the report and in the error, and wal-show shows the gap."""
from __future__ import annotations

import json
import os

import pytest

from tests.pgcluster import WALRUS, Cluster, make_workdir, remove_tree, walrus, write_config

pytestmark = pytest.mark.e2e


def test_wal_verify_finds_a_deleted_segment_and_wal_show_the_gap() -> None:
    root = make_workdir("walrus-e2e-walverify-")
    storage = os.path.join(root, "storage")
    config = write_config(os.path.join(root, "walg.json"), {
        "WALG_FILE_PREFIX": storage, "WALG_COMPRESSION_METHOD": "lz4", "WALG_PG_WAL_SIZE": "1",
        "WALG_UPLOAD_CONCURRENCY": "2"})
    cluster = Cluster.init(root, wal_segsize_mb=1)
    try:
        cluster.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p")
        cluster.start()
        cluster.psql("CREATE TABLE t(id serial, body text)")
        walrus(["backup-push", cluster.data], config=config, env=cluster.env)
        for i in range(8):  # a segment each
            cluster.psql("INSERT INTO t(body) SELECT repeat(md5(g::text), 20) FROM generate_series(1, 3000) g")
            last = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())")
        cluster.wait_archived(last)

        whole = walrus(["wal-verify", "integrity", "timeline", "--json"], config=config, env=cluster.env)
        report = json.loads(whole.stdout)
        assert report["integrity"]["status"] == "OK" and report["timeline"]["status"] == "OK", report
        assert report["timeline"]["details"] == {"current_timeline_id": 1, "highest_storage_timeline_id": 1}
        assert all(r["status"] == "FOUND" for r in report["integrity"]["details"])

        # a failover: the backup restored, recovered to the end of the archive and promoted to
        # timeline 2, archiving into the same storage; the old primary is gone
        cluster.stop()
        walrus(["backup-fetch", os.path.join(root, "promoted"), "LATEST"], config=config)
        open(os.path.join(root, "promoted", "recovery.signal"), "w").close()
        cluster = Cluster(data=os.path.join(root, "promoted"), sockdir=root)
        cluster.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p",
                          restore_command=f"{WALRUS} --config {config} wal-fetch %f %p")
        cluster.start()
        cluster.wait_until("SELECT pg_is_in_recovery()", "f")
        cluster.psql("INSERT INTO t(body) SELECT repeat(md5(g::text), 20) FROM generate_series(1, 3000) g")
        last = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())")
        assert last.startswith("00000002")
        cluster.wait_archived(last)
        report = json.loads(walrus(["wal-verify", "integrity", "timeline", "--json"], config=config,
                                   env=cluster.env).stdout)
        assert report["timeline"]["details"] == {"current_timeline_id": 2, "highest_storage_timeline_id": 2}
        runs = report["integrity"]["details"]
        assert report["integrity"]["status"] == "OK" and [r["timeline_id"] for r in runs] == [1, 2], runs

        wal_dir = os.path.join(storage, "wal_005")
        # on timeline 1, below the switch point: a segment every restore of the backup needs
        segments = sorted(n for n in os.listdir(wal_dir) if len(n.split(".")[0]) == 24 and n.endswith(".lz4")
                          and n.startswith("00000001"))
        victim = segments[len(segments) // 2]
        os.remove(os.path.join(wal_dir, victim))
        broken = walrus(["wal-verify", "integrity"], config=config, env=cluster.env, check=False)
        out, err = broken.stdout.decode(), broken.stderr.decode()
        assert broken.returncode == 1, err
        assert "[wal-verify] integrity check status: FAILURE" in out and "MISSING_LOST" in out
        assert victim.split(".")[0] in out and victim.split(".")[0] in err

        shown = json.loads(walrus(["wal-show", "--detailed-json"], config=config).stdout)
        assert [(t["id"], t["parent_id"]) for t in shown] == [(1, 0), (2, 1)]
        assert shown[0]["missing_segments"] == [victim.split(".")[0]] and shown[0]["status"] == "LOST_SEGMENTS"
        assert len(shown[0]["backups"]) == 1 and shown[1]["status"] == "OK" and shown[1]["switch_point_lsn"] > 0
        table = walrus(["wal-show"], config=config).stdout.decode()
        assert "LOST_SEGMENTS" in table and table.splitlines()[1].startswith("| TLI | PARENT TLI |")
    finally:
        cluster.stop()
        remove_tree(root)
