"""walrus restore on a real PostgreSQL 15: two commits after a backup, and a restore to a point between
them by each kind of target (time, LSN, xid, restore point), started and followed to the promoted
server, holds exactly the first; --immediate holds neither; the time target also on S3 (moto). A
target before every backup is refused before anything is written."""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.pgcluster import WALRUS, Cluster, free_port, make_workdir, remove_tree, walrus, write_config
from tests.s3server import s3_settings

pytestmark = pytest.mark.e2e


def _rows(cluster: Cluster) -> list[str]:
    return cluster.psql("SELECT string_agg(tag, ',' ORDER BY tag) FROM marks").split(",")


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_restore_to_a_point_between_two_commits(request, kind: str) -> None:
    root = make_workdir(f"walrus-e2e-pitr-{kind}-")
    if kind == "file":
        settings = {"WALG_FILE_PREFIX": os.path.join(root, "storage")}
    else:
        settings = s3_settings(request.getfixturevalue("moto_server").endpoint, request.getfixturevalue("s3_bucket"),
                               prefix="pitr")
    config = write_config(os.path.join(root, "walg.json"), {**settings, "WALG_COMPRESSION_METHOD": "lz4"})
    source = Cluster.init(root)
    restored: list[Cluster] = []
    try:
        source.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p")
        source.start()
        source.psql("CREATE TABLE marks(tag text PRIMARY KEY); INSERT INTO marks VALUES ('before')")
        walrus(["backup-push", source.data], config=config, env=source.env)
        first = source.psql("BEGIN; INSERT INTO marks VALUES ('first'); SELECT txid_current(); COMMIT").splitlines()
        xid = next(line for line in first if line.isdigit())
        at = source.psql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'")
        lsn = source.psql("SELECT pg_current_wal_lsn()")
        source.psql("SELECT pg_create_restore_point('between')")
        time.sleep(1.1)  # the second commit is well after the time target
        source.psql("INSERT INTO marks VALUES ('second')")
        last = source.psql("SELECT pg_walfile_name(pg_switch_wal())")
        source.wait_archived(last)

        targets = [("--target-time", at)] if kind == "s3" else [
            ("--target-time", at), ("--target-lsn", lsn), ("--target-xid", xid), ("--target-name", "between")]
        for flag, value in targets + ([("--immediate", None)] if kind == "file" else []):
            port = free_port()
            directory = os.path.join(root, f"restore-{flag.strip('-')}")
            out = walrus(["restore", directory, flag, *([value] if value else []), "--start", "--json",
                          "--set", f"port={port}", "--set", f"unix_socket_directories={root}",
                          "--set", "archive_mode=off"], config=config)
            result = json.loads(out.stdout)
            cluster = Cluster(data=directory, sockdir=root, port=port)
            restored.append(cluster)
            assert result["reached"] == "promoted" and result["started"], result
            expected = ["before"] if flag == "--immediate" else ["before", "first"]
            assert _rows(cluster) == expected, (flag, value)
            assert cluster.psql("SELECT pg_is_in_recovery()") == "f"
            cluster.stop()

        # before the backup ended: no backup reaches it, and nothing is written
        early = walrus(["restore", os.path.join(root, "too-early"), "--target-time", "2000-01-01T00:00:00+00:00"],
                       config=config, check=False)
        assert early.returncode == 1 and b"no backup can reach" in early.stderr
        assert not os.path.exists(os.path.join(root, "too-early", "PG_VERSION"))
    finally:
        for c in restored:
            if os.path.exists(os.path.join(c.data, "postmaster.pid")):
                c.stop()
        source.stop()
        remove_tree(root)


def test_restore_to_the_end_of_the_archive_takes_the_wal_fed_ahead_of_recovery() -> None:
    """The failover: the source gone, restore --start to the end of the archive. Each segment after
    the backup comes through the feed (restore_command renames it), the server ends promoted with the
    source's contents, and the feed's directory is gone."""
    root = make_workdir("walrus-e2e-pitr-feed-")
    config = write_config(os.path.join(root, "walg.json"), {"WALG_FILE_PREFIX": os.path.join(root, "storage"),
                                                            "WALG_COMPRESSION_METHOD": "lz4"})
    source = Cluster.init(root)
    restored = None
    try:
        source.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p")
        source.start()
        source.psql("CREATE TABLE rows(id int, body text)")
        walrus(["backup-push", source.data], config=config, env=source.env)
        for step in range(6):  # six segments or more of WAL after the backup
            source.psql(f"INSERT INTO rows SELECT g, md5(g::text) FROM generate_series({step * 40000}, "
                        f"{step * 40000 + 39999}) g; SELECT pg_switch_wal()")
        last = source.psql("SELECT pg_walfile_name(pg_switch_wal())")
        source.wait_archived(last)
        expected = source.psql("SELECT count(*), md5(string_agg(body, ',' ORDER BY id)) FROM rows")
        source.stop()

        port = free_port()
        directory = os.path.join(root, "restored")
        result = json.loads(walrus(["restore", directory, "--start", "--json", "--set", f"port={port}",
                                    "--set", f"unix_socket_directories={root}", "--set", "archive_mode=off"],
                                   config=config).stdout)
        restored = Cluster(data=directory, sockdir=root, port=port)
        assert result["reached"] == "promoted", result
        assert result["restore_command"].startswith("f=pg_wal/.walrus-feed/%f;"), result
        assert result["wal_fed"] >= 6, result
        assert restored.psql("SELECT count(*), md5(string_agg(body, ',' ORDER BY id)) FROM rows") == expected
        assert not os.path.exists(os.path.join(directory, "pg_wal", ".walrus-feed"))
        with open(os.path.join(directory, "walrus-restore.log")) as f:
            assert f.read().count("restored log file") >= 6
    finally:
        if restored is not None and os.path.exists(os.path.join(restored.data, "postmaster.pid")):
            restored.stop()
        if os.path.exists(os.path.join(source.data, "postmaster.pid")):
            source.stop()
        remove_tree(root)
