"""backup-push without a data directory (WAL-G's remote mode) on a real PostgreSQL 15: a primary with a
tablespace and a streaming standby backed up over a replication connection, each restored by
backup-fetch and recovered from the archive; a role without REPLICATION; SIGTERM during the stream."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.e2e.roundtrip import _pgbench
from tests.pgcluster import (WALRUS, Cluster, _user_env, as_user, chown_to_user, free_port, make_workdir,
                             remove_tree, run, walrus, write_config)

pytestmark = pytest.mark.e2e

SEGSIZE = 1  # MiB: the backup's WAL spans segments quickly


class Env:
    def __init__(self, root: str, config: str, primary: Cluster, ts_oid: str):
        self.root, self.config, self.primary, self.ts_oid = root, config, primary, ts_oid
        self.storage = os.path.join(root, "storage")
        self.clusters: list[Cluster] = [primary]

    def backups(self) -> str:
        return os.path.join(self.storage, "basebackups_005")

    def sentinel(self, name: str) -> dict:
        with open(os.path.join(self.backups(), f"{name}_backup_stop_sentinel.json")) as f:
            return json.load(f)

    def files_metadata(self, name: str) -> dict:
        with open(os.path.join(self.backups(), name, "files_metadata.json")) as f:
            return json.load(f)

    def parts(self, name: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.backups(), name, "tar_partitions")))

    def sentinels(self) -> set[str]:
        return {n for n in os.listdir(self.backups()) if n.endswith("_backup_stop_sentinel.json")} \
            if os.path.isdir(self.backups()) else set()

    def push(self, cluster: Cluster, **env) -> dict:
        """backup-push with no data directory: no argument, no PGDATA (the harness drops PG* variables)."""
        done = walrus(["backup-push", "--json"], config=self.config, env={**cluster.env, **env})
        return json.loads(done.stdout)

    def restore(self, name: str, tag: str) -> Cluster:
        """backup-fetch NAME into a new directory, the tablespace relocated, then recover from the archive."""
        data = os.path.join(self.root, f"restore-{tag}")
        ts_new = os.path.join(self.root, f"ts-{tag}")
        spec = write_config(os.path.join(self.root, f"spec-{tag}.json"),
                            {"base_prefix": self.primary.data, "tablespaces": [self.ts_oid],
                             self.ts_oid: {"loc": ts_new, "link": f"pg_tblspc/{self.ts_oid}"}})
        walrus(["backup-fetch", data, name, "--restore-spec", spec], config=self.config)
        assert os.readlink(os.path.join(data, "pg_tblspc", self.ts_oid)) == ts_new
        assert os.path.exists(os.path.join(data, "backup_label"))
        for leftover in ("standby.signal", "postmaster.pid"):
            if os.path.exists(os.path.join(data, leftover)):
                os.unlink(os.path.join(data, leftover))
        open(os.path.join(data, "recovery.signal"), "w").close()
        chown_to_user(os.path.join(data, "recovery.signal"))
        restored = Cluster(data=data, sockdir=self.root)
        restored.configure(archive_mode="off", restore_command=f"{WALRUS} --config {self.config} wal-fetch %f %p",
                           max_wal_senders=10, primary_conninfo="")
        self.clusters.append(restored)
        restored.start()
        restored.wait_until("SELECT pg_is_in_recovery()", "f", timeout=180)
        return restored

    def archive_all(self) -> None:
        last = self.primary.psql("SELECT pg_walfile_name(pg_switch_wal())")
        self.primary.wait_archived(last)


@pytest.fixture(scope="module")
def env():
    root = make_workdir("walrus-e2e-remote-")
    storage = os.path.join(root, "storage")
    config = write_config(os.path.join(root, "walg.json"), {
        "WALG_FILE_PREFIX": storage, "WALG_COMPRESSION_METHOD": "lz4", "WALG_PG_WAL_SIZE": str(SEGSIZE),
        "WALG_TAR_SIZE_THRESHOLD": str(4 << 20),  # several parts even for a small cluster
        "WALG_STOP_BACKUP_TIMEOUT": "60s"})
    primary = Cluster.init(root, wal_segsize_mb=SEGSIZE)
    primary.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p",
                      max_wal_senders=10, wal_keep_size="256MB")
    primary.start()
    e = Env(root, config, primary, "")
    try:
        ts_dir = os.path.join(root, "ts")
        os.mkdir(ts_dir, 0o700)
        chown_to_user(ts_dir)
        primary.psql(f"CREATE TABLESPACE ts LOCATION '{ts_dir}'")
        e.ts_oid = primary.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")
        _pgbench(primary, "-i", "-q", "-s", "2", "--tablespace=ts")
        primary.psql("CREATE TABLE notes(id serial PRIMARY KEY, body text);"
                     "INSERT INTO notes(body) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 20000) g")
        yield e
    finally:
        for c in e.clusters:
            c.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)


def _wal_name(timeline: int, lsn: int) -> str:
    segment = SEGSIZE << 20
    segno = lsn // segment
    per_id = 0x100000000 // segment
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def test_remote_backup_of_a_primary_restores_its_contents(env: Env):
    primary = env.primary
    load = _pgbench(primary, "-n", "-c", "2", "-T", "4", background=True)
    result = env.push(primary)
    assert load.wait(timeout=60) == 0
    name = result["backup_name"]

    # WAL-G's remote layout: parts numbered from 1 across all archives, then pg_control.tar
    parts = env.parts(name)
    data_parts = [p for p in parts if p.startswith("part_")]
    assert "pg_control.tar.lz4" in parts
    assert len(data_parts) >= 3
    assert data_parts == [f"part_{i:03d}.tar.lz4" for i in range(1, len(data_parts) + 1)]
    assert not any(p.startswith("backup_label") for p in parts)

    sentinel = env.sentinel(name)
    assert name == "base_" + _wal_name(1, sentinel["LSN"])  # the start LSN's own segment, no -1
    assert sentinel["Spec"] == {"base_prefix": primary.data.rstrip("/"), "tablespaces": [env.ts_oid],
                                env.ts_oid: {"loc": os.path.join(env.root, "ts"), "link": f"pg_tblspc/{env.ts_oid}"}}
    assert "DataCatalogSize" not in sentinel
    assert sentinel["FinishLSN"] > sentinel["LSN"]
    assert sentinel["UncompressedSize"] > 30 << 20 and sentinel["CompressedSize"] > 0
    assert sentinel["DataDir"] == primary.data.rstrip("/") and sentinel["PgVersion"] // 10000 == 15
    assert str(sentinel["SystemIdentifier"]) == primary.psql("SELECT system_identifier FROM pg_control_system()")

    files = env.files_metadata(name)
    keys = set(files["Files"])
    assert not files.get("TarFileSets")
    assert not any(k.startswith("/") for k in keys)
    assert {"backup_label", "tablespace_map", "global/pg_control", "PG_VERSION"} <= keys
    # with TABLESPACE_MAP the server sends pg_tblspc/<oid> as a directory, not a link: not listed
    assert f"pg_tblspc/{env.ts_oid}" not in keys
    assert any(k.startswith(f"pg_tblspc/{env.ts_oid}/PG_15_") for k in keys)
    assert "base" not in keys and "global" not in keys  # no directories

    listed = json.loads(walrus(["backup-list", "--json", "--detail"], config=env.config).stdout)
    assert name in [b["backup_name"] for b in listed]

    primary.psql("INSERT INTO notes(body) SELECT 'after the backup ' || g FROM generate_series(1, 500) g")
    env.archive_all()
    digest = primary.digest()
    restored = env.restore(name, "primary")
    assert restored.digest() == digest
    restored.stop()


def test_remote_backup_of_a_standby_restores_with_the_primary_archive(env: Env):
    primary = env.primary
    standby_dir = os.path.join(env.root, "standby")
    ts_standby = os.path.join(env.root, "ts-standby")
    run([os.path.join(primary.bindir, "pg_basebackup"), "-h", primary.sockdir, "-p", str(primary.port),
         "-D", standby_dir, "-X", "stream", "-R", "--no-sync", "--checkpoint=fast",
         f"--tablespace-mapping={os.path.join(env.root, 'ts')}={ts_standby}"])
    standby = Cluster(data=standby_dir, sockdir=env.root)
    # archive_mode = on: a standby does not archive; the primary's archiver stores the WAL
    standby.configure(archive_mode="on", archive_command=f"{WALRUS} --config {env.config} wal-push %p",
                      max_wal_senders=10, hot_standby="on")
    env.clusters.append(standby)
    standby.start()
    assert standby.psql("SELECT pg_is_in_recovery()") == "t"

    # a checkpoint in a new segment, replayed by the standby: its restartpoint, where its backup starts,
    # is not the primary's backup's start (the names would be equal)
    _pgbench(primary, "-n", "-t", "200")
    env.archive_all()
    primary.psql("CHECKPOINT")
    lsn = primary.psql("SELECT pg_current_wal_lsn()")
    standby.wait_until(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'", "t", timeout=60)

    before = env.sentinels()
    result = env.push(standby)
    name = result["backup_name"]
    assert f"{name}_backup_stop_sentinel.json" not in before
    sentinel = env.sentinel(name)
    assert name == "base_" + _wal_name(1, sentinel["LSN"])
    assert sentinel["Spec"]["tablespaces"] == [env.ts_oid]
    assert sentinel["Spec"][env.ts_oid]["loc"] == ts_standby
    assert "standby.signal" not in env.files_metadata(name)["Files"]  # the server sends it; a backup keeps none
    assert "pg_control.tar.lz4" in env.parts(name)

    # the standby's WAL comes from the primary's archive
    primary.psql("INSERT INTO notes(body) SELECT 'after the standby backup ' || g FROM generate_series(1, 300) g")
    env.archive_all()
    digest = primary.digest()
    restored = env.restore(name, "from-standby")
    assert restored.digest() == digest
    restored.stop()
    standby.stop()

    # the standby rebuilt in place with `walrus restore` (its data directory and tablespace emptied: the
    # tablespace comes back where the backup's spec says), recovered to the end of the archive
    remove_tree(standby_dir)
    remove_tree(ts_standby)
    port = free_port()
    out = walrus(["restore", standby_dir, "--backup", name, "--start", "--json", "--set", f"port={port}",
                  "--set", f"unix_socket_directories={env.root}", "--set", "archive_mode=off",
                  "--set", "max_wal_senders=10", "--set", "primary_conninfo=''"], config=env.config)
    rebuilt = Cluster(data=standby_dir, sockdir=env.root, port=port)
    env.clusters.append(rebuilt)
    assert json.loads(out.stdout)["reached"] == "promoted", out.stdout
    assert os.readlink(os.path.join(standby_dir, "pg_tblspc", env.ts_oid)) == ts_standby
    assert rebuilt.digest() == digest
    rebuilt.stop()


def test_a_role_without_replication_is_refused_without_a_sentinel(env: Env):
    env.primary.psql("CREATE ROLE no_replication LOGIN NOREPLICATION")
    before = env.sentinels()
    began = time.monotonic()
    done = walrus(["backup-push"], config=env.config, env={**env.primary.env, "PGUSER": "no_replication"},
                  check=False)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "may not open a replication connection" in err and "ALTER ROLE" in err, err
    assert "Traceback" not in err
    assert time.monotonic() - began < 30
    assert env.sentinels() == before


def test_delta_flags_are_refused_without_a_data_directory(env: Env):
    done = walrus(["backup-push", "--delta-from-name", "LATEST"], config=env.config, env=env.primary.env, check=False)
    assert done.returncode == 1 and "always a full backup" in done.stderr.decode(), done.stderr.decode()


def test_sigterm_stops_the_stream_promptly_without_a_sentinel(env: Env):
    """A slow storage (the network rate limit) stalls the stream; SIGTERM ends the command within
    seconds, the server's backup is aborted (its WAL sender gone), and no sentinel is written. The disk
    rate limit is the server's MAX_RATE (it reads the files)."""
    primary = env.primary
    before = env.sentinels()
    cmd = [WALRUS, "--config", env.config, "backup-push"]
    proc = subprocess.Popen(cmd, env=_user_env({**primary.env, "WALG_NETWORK_RATE_LIMIT": str(512 << 10),
                                                "WALG_DISK_RATE_LIMIT": str(8 << 20),
                                                "WALG_COMPRESSION_METHOD": "none"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **as_user())
    try:
        primary.wait_until("SELECT count(*) > 0 FROM pg_stat_replication WHERE application_name = 'walrus'", "t",
                           timeout=30)
        command = primary.psql("SELECT query FROM pg_stat_activity WHERE backend_type = 'walsender' "
                               "AND application_name = 'walrus'")
        assert command.startswith("BASE_BACKUP") and "MAX_RATE 8192" in command, command
        assert "WAIT false" in command, command  # walrus, not the server, waits for the backup's WAL
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        _, err = proc.communicate(timeout=20)
        assert time.monotonic() - began < 8, err.decode()
        assert proc.returncode != 0 and "stopped by SIGTERM" in err.decode(), err.decode()
        assert "Traceback" not in err.decode(), err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    primary.wait_until("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walrus'", "0",
                       timeout=20)
    assert env.sentinels() == before


def test_a_failed_upload_ends_the_stream_with_its_error(env: Env):
    """A part that cannot be stored (the backups' folder is not writable) ends the command with the
    storage's error, not a hang on the full pool or an interrupted-stream message; the server's backup
    is aborted and nothing is published."""
    primary = env.primary
    storage = os.path.join(env.root, "storage-readonly")
    os.makedirs(os.path.join(storage, "basebackups_005"), 0o755)  # root's: the archiver's user cannot write in it
    os.chmod(storage, 0o755)
    chown_to_user(storage)
    config = write_config(os.path.join(env.root, "walg-readonly.json"), {
        "WALG_FILE_PREFIX": storage, "WALG_COMPRESSION_METHOD": "lz4", "WALG_PG_WAL_SIZE": str(SEGSIZE),
        "WALG_TAR_SIZE_THRESHOLD": str(4 << 20)})
    began = time.monotonic()
    done = walrus(["backup-push"], config=config, env=primary.env, check=False)
    err = done.stderr.decode()
    assert done.returncode != 0, err
    assert time.monotonic() - began < 30, err
    assert "Permission denied" in err or "permission" in err.lower(), err
    assert "replication interrupted" not in err and "Traceback" not in err, err
    assert os.listdir(os.path.join(storage, "basebackups_005")) == []
    primary.wait_until("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walrus'", "0",
                       timeout=20)


def test_parts_do_not_pile_up_behind_a_slow_storage(env: Env):
    """A storage slower than the server stalls the stream: the server has sent no more than the memory
    budget and two parts' queued chunks (one streaming, one finishing) ahead of what is stored, not the
    whole backup into parts piling up outside the budget, as once (without compression every queued
    chunk is a whole buffer's copy)."""
    primary = env.primary
    budget, buffer = 24 << 20, 1 << 20
    proc = subprocess.Popen([WALRUS, "--config", env.config, "backup-push"],
                            env=_user_env({**primary.env, "WALG_NETWORK_RATE_LIMIT": str(256 << 10),
                                           "WALG_COMPRESSION_METHOD": "none", "WALRUS_MEMORY_BUDGET": str(budget),
                                           "WALRUS_BUFFER_SIZE": str(buffer)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **as_user())
    try:
        primary.wait_until("SELECT count(*) > 0 FROM pg_stat_progress_basebackup WHERE phase = 'streaming database "
                           "files'", "t", timeout=30)
        time.sleep(4)  # long enough for the server to send all it is let
        streamed = primary.psql("SELECT backup_streamed FROM pg_stat_progress_basebackup")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert streamed, f"the backup is not streaming: {err.decode()}"
    streamed = int(streamed)
    total = sum(os.path.getsize(os.path.join(d, f)) for top in (primary.data, os.path.join(env.root, "ts"))
                for d, _, files in os.walk(top) if "pg_wal" not in d for f in files)
    # the pool, two uploads' queues (4 chunks, one being written) and socket buffers (a few MiB)
    bound = budget + 2 * 5 * buffer + (8 << 20)
    assert total > bound + (8 << 20), f"the cluster ({total} bytes) is too small for this test"
    assert streamed <= bound, f"{streamed} of {total} bytes streamed; {err.decode()}"
    assert proc.returncode != 0
    primary.wait_until("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walrus'", "0",
                       timeout=20)


def test_a_server_restart_mid_backup_is_a_clear_error_without_a_sentinel(env: Env):
    """The server stops while it streams the backup (a slow storage keeps the stream going): the
    command ends within seconds with the lost connection as its error and a hint, writes no sentinel,
    and the next backup, once the server is up again, succeeds."""
    primary = env.primary
    before = env.sentinels()
    proc = subprocess.Popen([WALRUS, "--config", env.config, "backup-push"],
                            env=_user_env({**primary.env, "WALG_NETWORK_RATE_LIMIT": str(1 << 20),
                                           "WALG_COMPRESSION_METHOD": "none"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **as_user())
    try:
        primary.wait_until("SELECT count(*) > 0 FROM pg_stat_replication WHERE application_name = 'walrus'", "t",
                           timeout=30)
        time.sleep(1)
        primary.stop("immediate")
        began = time.monotonic()
        _, err = proc.communicate(timeout=60)
        err = err.decode()
        assert time.monotonic() - began < 15, err
        assert proc.returncode != 0 and "the server closed the replication connection" in err, err
        assert "HINT" in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        primary.start()
    assert env.sentinels() == before
    name = env.push(primary)["backup_name"]
    assert env.sentinels() == before | {f"{name}_backup_stop_sentinel.json"}


def test_wal_the_archiver_did_not_store_fails_without_a_sentinel(env: Env):
    """Last: it loses WAL from the archive. The server does not wait for its archiver (WAIT false);
    walrus waits for the backup's WAL in storage instead, a stronger test: an archive_command that
    succeeds without storing anything passes the server's test, not walrus's. WALG_STOP_BACKUP_TIMEOUT
    bounds the wait, and no sentinel is written."""
    primary = env.primary
    before = env.sentinels()
    archive_command = primary.psql("SHOW archive_command")
    primary.psql("ALTER SYSTEM SET archive_command = 'true'")
    primary.psql("SELECT pg_reload_conf()")
    try:
        began = time.monotonic()
        done = subprocess.run([WALRUS, "--config", env.config, "backup-push"],
                              env=_user_env({**primary.env, "WALG_STOP_BACKUP_TIMEOUT": "3s"}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120, **as_user())
        err = done.stderr.decode()
        assert done.returncode != 0 and "is not in the archive 3 s after the backup's end" in err, err
        assert "no sentinel was written" in err and "Traceback" not in err, err
        assert time.monotonic() - began < 60
    finally:
        primary.psql("ALTER SYSTEM SET archive_command = '" + archive_command.replace("'", "''") + "'")
        primary.psql("SELECT pg_reload_conf()")
    assert env.sentinels() == before
