"""End to end: archive_command and restore_command through the daemon, which is killed mid-burst."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.pgcluster import (WALRUS, Cluster, as_user, make_workdir, pg_bindir, remove_tree, run, walrus,
                             write_config)
from walrus.pg.walmap import SegmentMap
from walrus.pg.xlog import parse_wal_file_name

pytestmark = pytest.mark.e2e


def _start_daemon(config: str, sock: str, pgdata: str, log: str) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "PGDATA": pgdata, "HOME": "/tmp", "LC_ALL": "C.UTF-8"}
    proc = subprocess.Popen([WALRUS, "--config", config, "daemon", sock], env=env, **as_user(),
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(sock):
            return proc
        assert proc.poll() is None, open(log).read()
        time.sleep(0.05)
    raise AssertionError("daemon did not start: " + open(log).read())


@pytest.mark.parametrize("ready_rename", ["false", "true"])
def test_archive_through_daemon_survives_a_kill_and_restores(ready_rename: str) -> None:
    root = make_workdir("walrus-daemon-e2e-")
    storage = os.path.join(root, "storage")
    config = write_config(os.path.join(root, "walg.json"), {
        "WALG_FILE_PREFIX": storage, "WALG_PG_WAL_SIZE": "1", "WALG_UPLOAD_CONCURRENCY": "4",
        "PG_READY_RENAME": ready_rename, "WALG_DELTA_MAX_STEPS": "2"})
    sock = os.path.join(root, "walrus.sock")
    daemon_log = os.path.join(root, "daemon.log")
    clusters: list[Cluster] = []
    daemons: list[subprocess.Popen] = []
    try:
        primary = Cluster.init(root, wal_segsize_mb=1)
        clusters.append(primary)
        primary.configure(archive_mode="on", archive_command=f"{WALRUS} daemon-client {sock} wal-push %f")
        daemons.append(_start_daemon(config, sock, primary.data, daemon_log))
        primary.start()
        run([os.path.join(pg_bindir(), "pgbench"), "-i", "-q", "-s", "2", "-h", primary.sockdir,
             "-p", str(primary.port), "postgres"])
        walrus(["backup-push", primary.data], config=config, env=primary.env)

        burst = subprocess.Popen([os.path.join(pg_bindir(), "pgbench"), "-n", "-c", "4", "-T", "8", "-h",
                                  primary.sockdir, "-p", str(primary.port), "postgres"],
                                 **as_user(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        daemons[0].send_signal(signal.SIGKILL)  # mid-burst: the archiver's next calls fail, then retry
        daemons[0].wait()
        time.sleep(2)
        daemons.append(_start_daemon(config, sock, primary.data, daemon_log))  # over the stale socket
        assert burst.wait(timeout=120) == 0
        expected = primary.digest()
        last = primary.psql("SELECT pg_walfile_name(pg_switch_wal())")
        # archive_status, not pg_stat_archiver: with PG_READY_RENAME the daemon marks segments .done that
        # the archiver then never asks for (background writes may complete one more segment meanwhile)
        status = os.path.join(primary.data, "pg_wal", "archive_status")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (not os.path.exists(os.path.join(status, last + ".done"))
                                                or [f for f in os.listdir(status) if f.endswith(".ready")]):
            time.sleep(0.2)
        assert os.path.exists(os.path.join(status, last + ".done"))
        assert [f for f in os.listdir(status) if f.endswith(".ready")] == []  # the backlog drains to 0

        # every segment from the backup on is in the archive, none missing (the killed daemon may have left
        # temporary files of the uploads it was writing: never under a final key, hidden from listings)
        names = sorted(n.split(".")[0] for n in os.listdir(os.path.join(storage, "wal_005"))
                       if len(n.split(".")[0]) == 24 and ".backup" not in n and ".tmp." not in n)
        first, final = int(names[0][16:], 16), int(last[16:], 16)
        assert [int(n[16:], 16) for n in names if int(n[16:], 16) <= final] == list(range(first, final + 1))
        # and each has its block map (deltas are on), also those whose push the kill cut short
        maps = os.path.join(storage, "blockmap_005")
        for name in names:
            timeline, segno = parse_wal_file_name(name, 1 << 20)
            with open(os.path.join(maps, name + ".zst"), "rb") as f:
                assert SegmentMap.decode(f.read(), name, timeline, 1 << 20, segno << 20).records > 0

        # restore, with restore_command through a daemon serving the restored directory
        restored_dir = os.path.join(root, "restored")
        walrus(["backup-fetch", restored_dir, "LATEST"], config=config)
        open(os.path.join(restored_dir, "recovery.signal"), "w").close()
        sock2 = os.path.join(root, "restore.sock")
        daemons.append(_start_daemon(config, sock2, restored_dir, daemon_log))
        restored = Cluster(data=restored_dir, sockdir=root)
        clusters.append(restored)
        restored.configure(archive_mode="off",
                           restore_command=f"{WALRUS} daemon-client {sock2} wal-fetch %f %p")
        primary.stop()
        restored.start()
        restored.wait_until("SELECT pg_is_in_recovery()", "f", timeout=300)
        assert restored.digest() == expected
    finally:
        for d in daemons:
            if d.poll() is None:
                d.send_signal(signal.SIGTERM)
                d.wait(timeout=60)
        for c in clusters:
            c.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)
