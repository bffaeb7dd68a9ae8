"""The end-to-end flow shared by every storage: archive, backup under load, restore to end of archive and to a time."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import subprocess
import sys
import time
from typing import Callable, ContextManager

from tests.pgcluster import (WALRUS, Cluster, as_user, chown_to_user, make_workdir, pg_bindir, remove_tree, run,
                             walrus, write_config)


def _pgbench(cluster: Cluster, *args: str, background: bool = False):
    cmd = [os.path.join(pg_bindir(), "pgbench"), "-h", cluster.sockdir, "-p", str(cluster.port), *args, "postgres"]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **as_user())
    return run(cmd)


@functools.cache
def uring_refused() -> str | None:
    """Why walrus's io_uring probe refuses io_uring to the user walrus runs as, or None if it allows it.

    Run as that user, not in this (root) process: kernel.io_uring_disabled=1 lets root alone through.
    The compiled module is imported first, so that a broken build fails here rather than pass for
    the kernel refusing (ENOSYS, EPERM, ENOMEM, no IORING_OP_READ: what "auto" may fall back on).
    """
    code = "import walrus._uring._liburing\nfrom walrus._uring import probe\nprint(probe() or '')"
    return run([sys.executable, "-c", code]).stdout.decode().strip() or None


def expected_reader(io_method: str) -> str:
    """The file reader backup-push must report for WALRUS_IO_METHOD=io_method: "auto" falls back to
    preadv only where io_uring is refused, so a fallback anywhere else fails the test."""
    if io_method == "auto":
        return "preadv" if uring_refused() else "io_uring"
    return io_method


def _configured(config: str, name: str) -> str | None:
    with open(config) as f:
        return json.load(f).get(name)


def source_method(config: str) -> str:
    return _configured(config, "WALG_COMPRESSION_METHOD")


def _restore(root: str, name: str, config: str, source: Cluster, ts_oid: str, **recovery) -> Cluster:
    """backup-fetch into a fresh directory and start it with restore_command = walrus wal-fetch."""
    data = os.path.join(root, f"restore-{name}")
    ts_new = os.path.join(root, f"ts-{name}")
    spec = write_config(os.path.join(root, f"spec-{name}.json"),
                        {"base_prefix": source.data, "tablespaces": [ts_oid],
                         ts_oid: {"loc": ts_new, "link": f"pg_tblspc/{ts_oid}"}})
    # the restore reads every method whatever is configured: configure another one
    other = {"WALG_COMPRESSION_METHOD": "zstd" if source_method(config) != "zstd" else "lz4"}
    fetched = json.loads(walrus(["backup-fetch", data, "LATEST", "--restore-spec", spec, "--json"], config=config,
                                env=other).stdout)
    io_method = os.environ.get("WALRUS_IO_METHOD") or _configured(config, "WALRUS_IO_METHOD") or "auto"
    assert fetched["writer"] == {"preadv": "pwrite"}.get(expected_reader(io_method), "io_uring"), fetched
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert os.readlink(os.path.join(data, "pg_tblspc", ts_oid)) == ts_new
    assert os.path.exists(os.path.join(data, "backup_label"))
    assert not os.path.exists(os.path.join(data, "postmaster.pid"))
    open(os.path.join(data, "recovery.signal"), "w").close()
    restored = Cluster(data=data, sockdir=root)
    restored.configure(archive_mode="off", restore_command=f"{WALRUS} --config {config} wal-fetch %f %p",
                       **recovery)
    restored.start()
    return restored


def backup_and_point_in_time_restore(method: str, segsize: int, storage: Callable[[str], dict[str, str]],
                                     wal_names: Callable[[str], list[str]],
                                     during_backup: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
    """The whole flow on one storage.

    storage(root) gives the settings that select the storage (root: this run's work directory);
    wal_names(root) lists the names under wal_005/ once archiving is done; during_backup() is
    entered around backup-push (a fault injector, say).
    """
    root = make_workdir(f"walrus-e2e-{method}-")
    settings = storage(root)
    config = write_config(os.path.join(root, "walg.json"), {
        **settings, "WALG_COMPRESSION_METHOD": method, "WALG_PG_WAL_SIZE": str(segsize),
        "WALG_TAR_SIZE_THRESHOLD": str(8 << 20),  # several parts even for a small cluster
        "WALG_DOWNLOAD_CONCURRENCY": "3", "WALG_UPLOAD_DISK_CONCURRENCY": "2"})
    clusters: list[Cluster] = []
    try:
        primary = Cluster.init(root, wal_segsize_mb=segsize)
        clusters.append(primary)
        primary.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p",
                          checkpoint_timeout="30s")
        primary.start()
        ts_dir = os.path.join(root, "ts")
        os.mkdir(ts_dir)
        os.chmod(ts_dir, 0o700)
        chown_to_user(ts_dir)
        primary.psql(f"CREATE TABLESPACE ts LOCATION '{ts_dir}'")
        ts_oid = primary.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")
        _pgbench(primary, "-i", "-q", "-s", "3", "--tablespace=ts")
        primary.psql("CREATE TABLE notes(id serial PRIMARY KEY, body text);"
                     "INSERT INTO notes(body) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 20000) g")

        # backup-push while pgbench writes, and a table is created and dropped under it
        load = _pgbench(primary, "-n", "-c", "2", "-T", "6", background=True)
        churn = subprocess.Popen(
            ["bash", "-c", "for i in $(seq 1 20); do "
             f"{pg_bindir()}/psql -X -q -h {primary.sockdir} -p {primary.port} -d postgres "
             "-c 'CREATE TABLE churn AS SELECT g FROM generate_series(1, 20000) g' -c 'DROP TABLE churn'; done"],
            **as_user(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with during_backup():
            pushed = walrus(["backup-push", primary.data, "--json"], config=config, env=primary.env)
        result = json.loads(pushed.stdout)
        assert load.wait(timeout=120) == 0, load.stderr.read().decode()
        churn.wait(timeout=120)
        assert result["backup_name"].startswith("base_")
        # the runner's WALRUS_* variables reach walrus, which takes the environment over its config file
        reader = expected_reader(os.environ.get("WALRUS_IO_METHOD") or settings.get("WALRUS_IO_METHOD", "auto"))
        assert result["reader"] == reader, (f"expected the {reader} reader (io_uring refused: {uring_refused()})\n"
                                            f"{pushed.stderr.decode()[-2000:]}")
        assert len([p for p in result["parts"] if p.startswith("part_")]) >= 2

        occupied = os.path.join(root, "occupied")
        os.mkdir(occupied)
        chown_to_user(occupied)
        open(os.path.join(occupied, "keep-me"), "w").close()
        refused = walrus(["backup-fetch", occupied, "LATEST"], config=config, check=False)
        assert refused.returncode == 1 and b"not empty" in refused.stderr
        assert os.listdir(occupied) == ["keep-me"]

        listed = json.loads(walrus(["backup-list", "--json", "--detail"], config=config).stdout)
        assert [b["backup_name"] for b in listed] == [result["backup_name"]]
        assert listed[0]["pg_version"] // 10000 == 15

        # more writes: state A at time T, then state B, all archived
        _pgbench(primary, "-n", "-t", "300")
        primary.psql("CHECKPOINT")
        digest_a = primary.digest()
        target_time = primary.psql("SELECT now()")
        time.sleep(1.5)
        primary.psql("INSERT INTO notes(body) SELECT 'after target ' || g FROM generate_series(1, 500) g")
        _pgbench(primary, "-n", "-t", "200")
        digest_b = primary.digest()
        assert digest_a != digest_b
        last = primary.psql("SELECT pg_walfile_name(pg_switch_wal())")
        primary.wait_archived(last)
        failed = primary.psql("SELECT failed_count || ' ' || coalesce(last_failed_wal, '') FROM pg_stat_archiver")
        assert failed.split()[0] == "0", f"archive_command failed ({failed}):\n{primary.log()[-6000:]}"
        segments = [n for n in wal_names(root) if len(n.split(".")[0]) == 24]
        assert len(segments) >= 5

        # restore 1: to the end of the archive
        end = _restore(root, "end", config, primary, ts_oid)
        clusters.append(end)
        end.wait_until("SELECT pg_is_in_recovery()", "f", timeout=300)
        assert end.digest() == digest_b
        end.stop()

        # restore 2: to recovery_target_time
        pitr = _restore(root, "pitr", config, primary, ts_oid, recovery_target_time=target_time,
                        recovery_target_action="promote")
        clusters.append(pitr)
        pitr.wait_until("SELECT pg_is_in_recovery()", "f", timeout=300)
        assert pitr.digest() == digest_a
    finally:
        for c in clusters:
            c.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)
