"""backup-push's SQL session against a real PostgreSQL 15, through both libpq bindings (the distribution's
libpq via ctypes, psycopg's): typed server facts, a backup's start and stop, text values and NULLs as sent,
parameters that cannot inject, and every failure as libpq's message in a clear error."""
from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.pgcluster import Cluster, make_workdir, remove_tree, run, run_user
from walrus.backup.partial import collect_databases_by_names
from walrus.config import load_settings
from walrus.errors import BackupError
from walrus.pg import libpq
from walrus.pg.client import PgSession
from walrus.pg.libpq import Session, SessionError, parse_oid_array
from walrus.pg.xlog import parse_lsn

pytestmark = pytest.mark.e2e

BINDINGS = [libpq.CTYPES, libpq.PSYCOPG]


@pytest.fixture(scope="module")
def cluster():
    root = make_workdir("walrus-e2e-session-")
    c = Cluster.init(root)
    c.configure(archive_mode="on", archive_command="/bin/true")
    c.start()
    try:
        c.psql("CREATE DATABASE \"données\"")
        c.psql("CREATE TABLE t (id int PRIMARY KEY, note text)", db="données")
        yield c
    finally:
        c.stop()
        remove_tree(root)


def params(cluster: Cluster, **extra) -> dict:
    return {"host": cluster.sockdir, "port": cluster.port, "user": run_user() or getpass.getuser(),
            "dbname": "postgres", **extra}


def settings(cluster: Cluster, **extra):
    return load_settings({**settings_env(cluster), **extra})


def test_the_distributions_libpq_is_the_default_here():
    assert libpq.default_binding() == libpq.CTYPES  # libpq5 is installed beside PostgreSQL 15


@pytest.mark.parametrize("binding", BINDINGS)
def test_values_come_back_as_text_and_null_as_none(cluster, binding):
    with Session(params(cluster, dbname="données"), binding) as s:
        rows = s.query("SELECT x, CASE WHEN x = 2 THEN NULL ELSE 'é' || x END, ARRAY[x, 16384]::oid[]"
                       " FROM generate_series(1, 3) AS x ORDER BY x")
        assert rows == [("1", "é1", "{1,16384}"), ("2", None, "{2,16384}"), ("3", "é3", "{3,16384}")]
        assert s.one("SELECT current_database(), ''") == ("données", "")
        assert s.query("SET statement_timeout = '1min'") == []  # a command without rows
        assert parse_oid_array(rows[0][2]) == [1, 16384] and parse_oid_array("{}") == []


@pytest.mark.parametrize("binding", BINDINGS)
def test_parameters_are_values_never_sql(cluster, binding):
    hostile = "x'); DROP TABLE t; --"
    with Session(params(cluster, dbname="données"), binding) as s:
        assert s.one("SELECT $1::text, length($2)", (hostile, "ü")) == (hostile, "1")
        assert s.one("SELECT count(*) FROM t") == ("0",)  # the table is still there


@pytest.mark.parametrize("binding", BINDINGS)
def test_failures_are_libpqs_messages(cluster, binding):
    with pytest.raises(SessionError, match="Connection refused|No such file or directory"):
        Session(params(cluster, port=1), binding)
    with pytest.raises(SessionError, match='database "absent" does not exist'):
        Session(params(cluster, dbname="absent"), binding)
    s = Session(params(cluster), binding)
    with pytest.raises(SessionError, match="syntax error"):
        s.query("SELEC 1")
    assert s.one("SELECT 1") == ("1",)  # autocommit: a failed statement leaves no aborted transaction
    with pytest.raises(SessionError, match="expected one row, got 2"):
        s.one("SELECT generate_series(1, 2)")
    s.close()
    s.close()
    with pytest.raises(SessionError, match="closed"):
        s.query("SELECT 1")


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("given", ["parameter", "PGCONNECT_TIMEOUT"])
def test_a_server_that_never_answers_is_given_up_on(binding, given, monkeypatch):
    with socket.socket() as silent:  # accepts connections (the backlog), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = {"host": "127.0.0.1", "port": silent.getsockname()[1]}
        if given == "parameter":
            target["connect_timeout"] = 2
        else:
            monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")
        began = time.monotonic()
        with pytest.raises(SessionError, match="timeout"):
            Session(target, binding)
        assert time.monotonic() - began < 10


@pytest.mark.parametrize("binding", BINDINGS)
def test_backup_session_types_the_servers_answers(cluster, binding):
    session = PgSession(settings(cluster), binding)
    try:
        info = session.server_info()
        assert os.path.realpath(info.data_directory) == os.path.realpath(cluster.data)
        assert 150000 <= info.version_num < 160000
        controldata = run([os.path.join(cluster.bindir, "pg_controldata"), cluster.data]).stdout.decode()
        assert f"Database system identifier:           {info.system_identifier}\n" in controldata
        assert info.segment_size == 16 << 20 and info.in_recovery is False
        assert (info.archive_mode, info.archive_command, info.archive_library) == ("on", "/bin/true", "")
        start = session.backup_start("it's a label", info.version_num)
        assert start.timeline == 1 and start.lsn > 0
        stop = session.backup_stop(info.version_num, wait_for_archive=False)
        assert stop.lsn >= start.lsn
        assert "LABEL: it's a label\n" in stop.label
        assert f"START WAL LOCATION: {stop.label.split()[3]}" in stop.label
        assert parse_lsn(stop.label.split()[3]) == start.lsn
        timeline, lsn, segment_size = session.wal_position()
        assert (timeline, segment_size) == (1, 16 << 20) and lsn >= stop.lsn
    finally:
        session.close()


@pytest.mark.parametrize("binding", BINDINGS)
def test_backup_session_errors_say_what_and_hint(cluster, binding):
    with pytest.raises(BackupError) as e:
        PgSession(settings(cluster, PGPORT="1"), binding)
    assert e.value.message == "could not connect to PostgreSQL" and "PGHOST" in e.value.hint and e.value.detail
    session = PgSession(settings(cluster), binding)
    try:
        with pytest.raises(BackupError) as e:
            session.backup_stop(150000)  # no backup in progress
        assert "refused a backup query" in e.value.message and "backup is not in progress" in e.value.detail
    finally:
        session.close()


def test_catalog_names_through_the_session(cluster):
    names = collect_databases_by_names(settings(cluster))
    assert {"postgres", "données", "template1"} <= set(names)
    table = names["données"]["tables_new"]["public.t"]
    assert table["oid"] > 16384 and "public.t_pkey" in table["subtables"]
    assert all(isinstance(d["oid"], int) for d in names.values())


def test_catalog_through_the_backup_session_reads_the_same(cluster):
    """Listed, and its own database read, on backup-push's connection; the others on their own."""
    opened = []

    def connect(settings, dbname):
        opened.append(dbname)
        return Session(params(cluster, dbname=dbname or "postgres"))

    session = PgSession(settings(cluster))
    try:
        via_session = collect_databases_by_names(settings(cluster), connect, session.sql)
        assert session.server_info().version_num >= 150000  # the session goes on after the catalog
    finally:
        session.close()
    assert via_session == collect_databases_by_names(settings(cluster))
    assert "postgres" in via_session and sorted(opened) == sorted(set(via_session) - {"postgres"})


@pytest.mark.parametrize("binding", BINDINGS)
def test_close_waits_for_a_statement_on_another_thread(cluster, binding):
    s = Session(params(cluster), binding)
    rows = []
    worker = threading.Thread(target=lambda: rows.append(s.query("SELECT pg_sleep(0.5), 'done'")))
    worker.start()
    time.sleep(0.1)
    began = time.monotonic()
    s.close()  # after the statement, never under it
    assert time.monotonic() - began >= 0.3
    worker.join(5)
    assert rows == [[("", "done")]]
    with pytest.raises(SessionError, match="closed"):
        s.query("SELECT 1")


def test_close_gives_up_on_a_long_statement_and_leaves_the_connection(cluster):
    s = Session(params(cluster))
    rows = []
    worker = threading.Thread(target=lambda: rows.append(s.query("SELECT pg_sleep(1), 'done'")))
    worker.start()
    time.sleep(0.1)
    began = time.monotonic()
    s.close(wait=0.1)
    assert time.monotonic() - began < 0.5
    worker.join(5)
    assert rows == [[("", "done")]]  # the statement was not cut from under libpq
    s.close()


def test_a_backup_session_does_not_import_psycopg(cluster):
    """The point of the ctypes binding: backup-push's session costs no psycopg import."""
    code = ("import sys; from walrus.config import load_settings; from walrus.pg.client import PgSession; "
            f"s = PgSession(load_settings({settings_env(cluster)!r})); s.server_info(); s.close(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'psycopg'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def settings_env(cluster: Cluster) -> dict:
    return {"PGHOST": cluster.sockdir, "PGPORT": str(cluster.port), "PGUSER": run_user() or getpass.getuser(),
            "PGDATABASE": "postgres"}
