"""End to end: PostgreSQL drains an archive backlog through `walrus wal-push %p` with background uploads."""
from __future__ import annotations

import os
import re
import time

import pytest

from tests.pgcluster import WALRUS, Cluster, make_workdir, remove_tree, walrus, write_config

pytestmark = pytest.mark.e2e

SEGMENTS = 20
LIMIT = 8  # TOTAL_BG_UPLOADED_LIMIT: a call stores the asked segment and up to 7 more


@pytest.mark.parametrize("ready_rename", ["true", "false"])
def test_backlog_is_archived_whole_in_fewer_calls(ready_rename: str) -> None:
    root = make_workdir("walrus-bg-e2e-")
    storage = os.path.join(root, "storage")
    config = write_config(os.path.join(root, "walg.json"), {
        "WALG_FILE_PREFIX": storage, "WALG_PG_WAL_SIZE": "1", "WALG_UPLOAD_CONCURRENCY": "4",
        "TOTAL_BG_UPLOADED_LIMIT": str(LIMIT), "PG_READY_RENAME": ready_rename})
    cluster = Cluster.init(root, wal_segsize_mb=1)
    try:
        # archiving on, but no command yet: finished segments pile up .ready. No checkpoint recycles
        # them before the end, so pg_wal still holds what PostgreSQL wrote to compare with.
        cluster.configure(archive_mode="on", archive_command="", checkpoint_timeout="1h", max_wal_size="1GB")
        cluster.start()
        cluster.psql("CREATE TABLE t (i int, pad text)")
        for i in range(SEGMENTS):
            cluster.psql(f"INSERT INTO t SELECT g, md5(g::text || '{i}') FROM generate_series(1, 3000) g; "
                         "SELECT pg_switch_wal()")
        status = os.path.join(cluster.data, "pg_wal", "archive_status")
        backlog = sorted(f[:-6] for f in os.listdir(status) if f.endswith(".ready") and len(f) == 30)
        assert len(backlog) >= SEGMENTS

        cluster.psql(f"ALTER SYSTEM SET archive_command = '{WALRUS} --config {config} wal-push %p'")
        cluster.psql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(os.path.exists(os.path.join(status, f"{n}.done"))
                                                      for n in backlog):
            time.sleep(0.1)
        assert all(os.path.exists(os.path.join(status, f"{n}.done")) for n in backlog), cluster.log()[-4000:]
        time.sleep(0.5)  # the archiver reports its last call's success just after the rename
        calls, failed = map(int, cluster.psql("SELECT archived_count, failed_count FROM pg_stat_archiver").split("|"))
        assert failed == 0, cluster.log()[-4000:]
        log = cluster.log()
        if ready_rename == "true":
            # one call per LIMIT segments: the others were marked .done, PostgreSQL never called for them
            assert calls < len(backlog) // 2, (calls, len(backlog))
        else:
            # a call for each segment, most answered (silently, as WAL-G) by the marker an earlier
            # call's background upload left: most segments were stored in the background, none twice
            assert calls >= len(backlog)
            in_background = sum(int(n) for n in re.findall(r"archived (\d+) further \.ready segment", log))
            assert in_background >= len(backlog) // 2, log[-4000:]
            assert len(re.findall(r"archived 0000\w+ as wal_005/", log)) == len(set(re.findall(
                r"archived (0000\w+) as wal_005/", log))), "a segment was uploaded twice"
        markers = os.path.join(cluster.data, "pg_wal", "walg_data", "walg_archive_status")
        assert not os.path.exists(markers) or os.listdir(markers) == []  # every marker taken, none left

        # every segment is in storage once, and decompresses to the bytes PostgreSQL wrote
        objects = [n for n in os.listdir(os.path.join(storage, "wal_005")) if n.endswith(".lz4")]
        assert set(backlog) <= {n[:-4] for n in objects}
        for name in backlog:
            dest = os.path.join(root, f"fetched-{name}")
            walrus(["wal-fetch", name, dest], config=config)
            with open(dest, "rb") as fetched, open(os.path.join(cluster.data, "pg_wal", name), "rb") as written:
                assert fetched.read() == written.read(), name
    finally:
        cluster.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)
