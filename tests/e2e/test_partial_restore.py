"""End to end on a real PostgreSQL 15: backup-push records DatabasesByNames, backup-fetch --restore-only
restores one database or one table of it, and recovery from the archive brings them to the archive's end."""
from __future__ import annotations

import contextlib
import json
import os
import time

import pytest

from tests.pgcluster import WALRUS, Cluster, chown_to_user, make_workdir, remove_tree, run, walrus, write_config

pytestmark = pytest.mark.e2e


class Source:
    def __init__(self, root: str, config: str, cluster: Cluster, ts_oid: str):
        self.root, self.config, self.cluster, self.ts_oid = root, config, cluster, ts_oid
        self.restored: list[Cluster] = []

    def oid(self, sql: str, db: str = "postgres") -> int:
        return int(self.cluster.psql(sql, db))

    def files_metadata(self) -> dict:
        folder = os.path.join(self.root, "storage", "basebackups_005")
        (name,) = [n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))]
        with open(os.path.join(folder, name, "files_metadata.json")) as f:
            return json.load(f)

    def fetch(self, name: str, *restore_only: str, check: bool = True):
        data = os.path.join(self.root, f"restore-{name}")
        spec = write_config(os.path.join(self.root, f"spec-{name}.json"), {
            "base_prefix": self.cluster.data, "tablespaces": [self.ts_oid],
            self.ts_oid: {"loc": os.path.join(self.root, f"ts-{name}"), "link": f"pg_tblspc/{self.ts_oid}"}})
        args = [f"--restore-only={key}" for key in restore_only]
        return data, walrus(["backup-fetch", data, "LATEST", "--restore-spec", spec, *args], config=self.config,
                            check=check)

    def recover(self, data: str, *, until_stopped: bool = False, **settings) -> Cluster:
        """Start the restored directory with restore_command = walrus wal-fetch, and wait until recovery
        reaches the archive's end (or, until_stopped, until the server has stopped)."""
        open(os.path.join(data, "recovery.signal"), "w").close()
        restored = Cluster(data=data, sockdir=self.root)
        self.restored.append(restored)
        restored.configure(archive_mode="off", restore_command=f"{WALRUS} --config {self.config} wal-fetch %f %p",
                           **settings)
        if not until_stopped:
            restored.start()
            restored.wait_until("SELECT pg_is_in_recovery()", "f", timeout=300)
            return restored
        with contextlib.suppress(AssertionError):  # pg_ctl fails if it stops before accepting connections
            restored.start()
        deadline = time.monotonic() + 300
        while os.path.exists(os.path.join(data, "postmaster.pid")) and time.monotonic() < deadline:
            time.sleep(0.2)
        return restored


@pytest.fixture(scope="module")
def source():
    """db1 (t1: serial key, index, TOASTed text; t2) and db2 (t3, t4, t5) in a tablespace, a backup,
    then WAL that replay must apply: rows added to t1, t2 and t4, t5 vacuumed; t3 left alone."""
    root = make_workdir("walrus-e2e-partial-")
    config = write_config(os.path.join(root, "walg.json"), {
        "WALG_FILE_PREFIX": os.path.join(root, "storage"), "WALG_COMPRESSION_METHOD": "lz4",
        "WALG_TAR_SIZE_THRESHOLD": str(1 << 20)})
    primary = Cluster.init(root)
    src = Source(root, config, primary, "")
    try:
        # no autovacuum: which tables the WAL after the backup touches, and how, is the test's choice
        primary.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p",
                          autovacuum="off")
        primary.start()
        ts_dir = os.path.join(root, "ts")
        os.mkdir(ts_dir, 0o700)
        chown_to_user(ts_dir)
        primary.psql(f"CREATE TABLESPACE ts LOCATION '{ts_dir}'")
        src.ts_oid = primary.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")
        primary.psql("CREATE DATABASE db1")
        primary.psql("CREATE DATABASE db2 TABLESPACE ts")
        primary.psql("CREATE TABLE t1(id serial PRIMARY KEY, body text);"
                     "INSERT INTO t1(body) SELECT (SELECT string_agg(md5(g::text || i::text), '')"
                     " FROM generate_series(1, 200) i) FROM generate_series(1, 300) g;"
                     "CREATE TABLE t2 AS SELECT g AS n FROM generate_series(1, 50000) g", "db1")
        for t in ("t3", "t4", "t5"):
            primary.psql(f"CREATE TABLE {t} AS SELECT g AS n FROM generate_series(1, 50000) g", "db2")
        walrus(["backup-push", primary.data], config=config, env=primary.env)
        primary.psql("INSERT INTO t1(body) SELECT 'after ' || g FROM generate_series(1, 100) g;"
                     "INSERT INTO t2 SELECT g FROM generate_series(1, 1000) g", "db1")
        primary.psql("INSERT INTO t4 SELECT g FROM generate_series(1, 1000) g", "db2")
        primary.psql("VACUUM t5", "db2")
        last = primary.psql("SELECT pg_walfile_name(pg_switch_wal())")
        primary.wait_archived(last)
        yield src
    finally:
        for c in [primary, *src.restored]:
            c.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)


def test_backup_push_records_databases_by_names_in_walg_shape(source):
    names = source.files_metadata()["DatabasesByNames"]
    pg = source.cluster
    assert sorted(names) == pg.psql("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1").split()
    for db, info in names.items():
        assert info["oid"] == source.oid(f"SELECT oid FROM pg_database WHERE datname = '{db}'")
        assert set(info) == {"oid", "tables_new"}
        for entry in info["tables_new"].values():
            assert set(entry) <= {"oid", "relfilenode", "subtables"}
            assert all(set(sub) == {"oid", "relfilenode"} for sub in entry.get("subtables", {}).values())
    tables = names["db1"]["tables_new"]
    t1 = tables["public.t1"]
    assert t1["oid"] == source.oid("SELECT 'public.t1'::regclass::oid", "db1")
    assert t1["relfilenode"] == source.oid("SELECT pg_relation_filenode('t1')", "db1")
    # subtables: walrus adds a table's index, TOAST and sequence to WAL-G's (inheritance children)
    toast = f"pg_toast.pg_toast_{t1['oid']}"
    assert set(t1["subtables"]) == {"public.t1_pkey", "public.t1_id_seq", toast, toast + "_index"}
    assert t1["subtables"][toast]["oid"] == source.oid(f"SELECT '{toast}'::regclass::oid", "db1")
    assert {"public.t1_pkey", "public.t2", toast} <= set(tables)  # each also on its own, as WAL-G lists them
    # a mapped catalog's file number is the one its map names (pg_class.relfilenode is 0)
    mapped = source.oid("SELECT pg_relation_filenode('pg_class')", "db1")
    assert tables["pg_catalog.pg_class"]["relfilenode"] == mapped


def _file(source: Source, data: str, db: str, relation: str) -> str:
    """Where `relation`'s main file is in the restored directory (through its pg_tblspc link for db2)."""
    return os.path.join(data, source.cluster.psql(f"SELECT pg_relation_filepath('{relation}')", db))


def test_restore_only_a_database(source):
    data, _ = source.fetch("db1", "db1")
    assert all(os.path.exists(_file(source, data, "db1", t)) for t in ("t1", "t2"))
    assert not any(os.path.exists(_file(source, data, "db2", t)) for t in ("t3", "t4", "t5"))
    assert os.path.exists(_file(source, data, "db2", "pg_class"))  # its catalogs are restored: it can be dropped

    # VACUUM t5 logged its heap page without an image (no checksums, no wal_log_hints): replay finds
    # no such page and PostgreSQL stops, unless told to go on
    assert "PANIC:  WAL contains references to invalid pages" in source.recover(data, until_stopped=True).log()
    restored = source.recover(data, ignore_invalid_pages="on")
    assert restored.digest("db1") == source.cluster.digest("db1")

    # db2 opens (its catalogs are there). t3, which no WAL after the backup touched, has no file;
    # t4 was recreated by replay with only the pages that WAL wrote (each in full: the first change
    # after the backup's checkpoint carries the whole page): its new rows and a few old ones; t5's
    # file was created, empty, by the record that referred to its missing page.
    assert _psql(restored, "SELECT 1", "db2") == (0, "1", "")
    rc, _, err = _psql(restored, "SELECT count(*) FROM t3", "db2")
    assert rc == 1 and "could not open file" in err and "No such file or directory" in err
    assert 1000 <= int(restored.psql("SELECT count(*) FROM t4", "db2")) < 51000
    assert restored.psql("SELECT count(*) FROM t5", "db2") == "0"
    restored.psql("DROP DATABASE db2")  # what the user does next, as WAL-G's documentation advises
    restored.stop()


def test_restore_only_a_table(source):
    data, _ = source.fetch("t1", "db1/public.t1")
    toast = "pg_toast.pg_toast_" + source.cluster.psql("SELECT 't1'::regclass::oid", "db1")
    assert all(os.path.exists(_file(source, data, "db1", rel)) for rel in ("t1", "t1_pkey", "t1_id_seq", toast))
    assert not os.path.exists(_file(source, data, "db1", "t2"))
    assert not os.path.exists(_file(source, data, "db2", "t4"))
    restored = source.recover(data, ignore_invalid_pages="on")
    assert restored.digest("db1")["public.t1"] == source.cluster.digest("db1")["public.t1"]
    # its index, TOAST and sequence came with it: an index scan, detoasting and an insert work
    assert restored.psql("SET enable_seqscan = off; SELECT count(*), sum(length(body)) FROM t1 WHERE id <= 10",
                         "db1") == "10|64000"
    assert int(restored.psql("INSERT INTO t1(body) VALUES ('new') RETURNING id", "db1")) > 400
    assert int(restored.psql("SELECT count(*) FROM t2", "db1")) < 51000  # only what WAL replay rewrote
    restored.stop()


def test_an_unknown_name_is_refused_before_anything_is_written(source):
    data, proc = source.fetch("unknown", "db1/t1", "db3", check=False)
    assert proc.returncode == 1 and b"has no database 'db3'" in proc.stderr, proc.stderr
    assert not os.path.exists(data)


def _psql(cluster: Cluster, sql: str, db: str) -> tuple[int, str, str]:
    proc = run([os.path.join(cluster.bindir, "psql"), "-X", "-q", "-A", "-t", "-h", cluster.sockdir, "-p",
                str(cluster.port), "-d", db, "-c", sql], check=False)
    return proc.returncode, proc.stdout.decode().strip(), proc.stderr.decode().strip()
