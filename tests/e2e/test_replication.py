"""walrus.pg.replication against a real PostgreSQL 15 on timeline 2 (promoted at start-up, so one timeline
has ended): the replication commands, BASE_BACKUP's archives, WAL equal to pg_wal's bytes, and each
failure as a clear error within a bounded time."""
from __future__ import annotations

import getpass
import io
import json
import os
import signal
import socket
import tarfile
import threading
import time

import psycopg
import pytest

from tests.pgcluster import Cluster, chown_to_user, make_workdir, remove_tree, run, run_user
from walrus.config import load_settings
from walrus.pg import copyfill
from walrus.pg.replication import (ArchiveData, ArchiveStarted, BackupEnded, BackupProgress, BackupStarted,
                                   ConnectionLost, EndOfTimeline, Keepalive, ManifestData, ReplicationConnection,
                                   ReplicationError, ReplicationInterrupted, ReplicationTimeout, Tablespaces,
                                   XLogData, base_backup_command, replication_conninfo)
from walrus.pg.xlog import format_lsn, parse_lsn

pytestmark = pytest.mark.e2e

SEGMENT = 1024 * 1024  # the cluster's WAL segment size: small, so a whole segment streams quickly
TIMEOUT = 20.0  # the connections' silence bound: no test waits longer than this for one message


class Env:
    def __init__(self, root: str, cluster: Cluster, tablespace: str):
        self.root, self.cluster, self.tablespace = root, cluster, tablespace
        self.user = run_user() or getpass.getuser()
        self.sql = self.connect_sql()

    def connect_sql(self) -> psycopg.Connection:
        return psycopg.connect(host=self.cluster.sockdir, port=self.cluster.port, user=self.user, dbname="postgres",
                               autocommit=True)

    def conninfo(self, **extra) -> dict:
        return {"host": self.cluster.sockdir, "port": self.cluster.port, "user": self.user, **extra}

    def open(self, timeout: float = TIMEOUT, **extra) -> ReplicationConnection:
        return ReplicationConnection.open(self.conninfo(**extra), timeout)

    def one(self, sql: str, *params):
        return self.sql.execute(sql, params).fetchone()

    def wait_for(self, sql: str, expected, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while (got := self.one(sql)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == expected, sql


@pytest.fixture(scope="module")
def env():
    root = make_workdir("walrus-e2e-replication-")
    cluster = Cluster.init(root, wal_segsize_mb=SEGMENT // (1024 * 1024))
    # max_wal_senders as initdb's primary had it (a standby may not have fewer); wal_keep_size keeps
    # timeline 1's last segment for the end-of-timeline test
    cluster.configure(max_wal_senders=10, max_replication_slots=10, wal_keep_size="64MB")
    signal_file = os.path.join(cluster.data, "standby.signal")
    open(signal_file, "w").close()
    chown_to_user(signal_file)
    cluster.start()
    run([os.path.join(cluster.bindir, "pg_ctl"), "-D", cluster.data, "-w", "promote"])
    tablespace = os.path.join(root, "ts1")
    os.mkdir(tablespace)
    chown_to_user(tablespace)
    e = None
    try:
        e = Env(root, cluster, tablespace)
        e.sql.execute(f"CREATE TABLESPACE ts1 LOCATION '{tablespace}'")
        e.sql.execute("CREATE TABLE in_ts1 TABLESPACE ts1 AS SELECT generate_series(1, 1000) AS x")
        yield e
    finally:
        if e is not None:
            e.sql.close()
        cluster.stop()
        remove_tree(root)


# --- without a server ------------------------------------------------------------------------------

def test_base_backup_command_is_walgs_by_default():
    assert base_backup_command("wal-g") == \
        "BASE_BACKUP ( LABEL 'wal-g', CHECKPOINT 'fast', TABLESPACE_MAP, VERIFY_CHECKSUMS false )"
    assert base_backup_command("it's", fast_checkpoint=False, tablespace_map=False, progress=True, manifest=True,
                               verify_checksums=True) == \
        "BASE_BACKUP ( LABEL 'it''s', VERIFY_CHECKSUMS true, PROGRESS, MANIFEST 'yes' )"
    assert base_backup_command("wal-g", max_rate_kb=4096).endswith("VERIFY_CHECKSUMS false, MAX_RATE 4096 )")
    assert base_backup_command("wal-g", wait=False).endswith("VERIFY_CHECKSUMS false, WAIT false )")
    with pytest.raises(ValueError):
        base_backup_command("wal-g", max_rate_kb=31)  # below what the server accepts


def test_disk_rate_limit_as_max_rate():
    from walrus.backup.remote import max_rate_kb

    assert max_rate_kb(None) is None
    assert max_rate_kb(4 << 20) == 4096
    assert max_rate_kb(10_000) == 32  # below the server's least: raised to it (a warning says so)
    assert max_rate_kb(2 << 30) is None  # above the most MAX_RATE takes: no limit the server could apply


def test_replication_conninfo_from_settings():
    settings = load_settings(env={"PGHOST": "/run/pg", "PGPORT": "5433", "PGUSER": "backup"})
    info = psycopg.conninfo.conninfo_to_dict(replication_conninfo(settings))
    assert info == {"host": "/run/pg", "port": "5433", "user": "backup", "replication": "true",
                    "application_name": "walrus"}


def test_connect_timeout():
    with socket.socket() as listener:  # accepts the TCP connection (the backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        began = time.monotonic()
        with pytest.raises(ReplicationTimeout, match="no answer within 0.5 s"):
            ReplicationConnection.open({"host": "127.0.0.1", "port": listener.getsockname()[1], "sslmode": "disable",
                                        "gssencmode": "disable"}, 0.5)
        assert time.monotonic() - began < 2


# --- the commands ------------------------------------------------------------------------------------

def test_identify_system_and_timeline_history(env):
    (system_id,) = env.one("SELECT system_identifier FROM pg_control_system()")
    with env.open(replication="database") as conn:  # forced back to a physical connection
        ident = conn.identify_system()
        assert ident.system_id == system_id
        assert ident.timeline == 2 and ident.dbname is None
        (now,) = env.one("SELECT pg_current_wal_lsn()::text")
        assert 0 < ident.xlogpos <= parse_lsn(now)
        name, content = conn.timeline_history(2)
    assert name == "00000002.history"
    with open(os.path.join(env.cluster.data, "pg_wal", name), "rb") as f:
        assert content == f.read()
    assert content.startswith(b"1\t")


def test_slots_created_read_and_dropped(env):
    with env.open() as conn:
        assert conn.read_replication_slot("walrus_a") is None
        conn.create_physical_slot("walrus_a", reserve_wal=True)
        conn.create_physical_slot("walrus_b", reserve_wal=False)
        a, b = conn.read_replication_slot("walrus_a"), conn.read_replication_slot("walrus_b")
        assert a.slot_type == "physical" and a.restart_timeline == 2
        (restart,) = env.one("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walrus_a'")
        assert a.restart_lsn == parse_lsn(restart)
        assert b.slot_type == "physical" and b.restart_lsn is None
        with pytest.raises(ReplicationError, match="already exists"):
            conn.create_physical_slot("walrus_a")
        conn.drop_slot("walrus_a")
        conn.drop_slot("walrus_b")
        assert conn.read_replication_slot("walrus_a") is None
        with pytest.raises(ReplicationError, match="does not exist") as err:
            conn.drop_slot("walrus_a")
        assert err.value.hint and err.value.sqlstate == "42704"
        with pytest.raises(ReplicationError, match="invalid replication slot name"):
            conn.read_replication_slot("Bad-Name")
        conn.identify_system()  # after errors the connection still works
    assert env.one("SELECT count(*) FROM pg_replication_slots") == (0,)


# --- BASE_BACKUP ---------------------------------------------------------------------------------------

def _collect(events) -> tuple[list, dict[str, bytes], bytes]:
    """(events without data, archive name -> bytes, manifest bytes)."""
    order, archives, manifest, current = [], {}, bytearray(), None
    for ev in events:
        if isinstance(ev, ArchiveData):
            archives[current] += ev.data
        elif isinstance(ev, ManifestData):
            manifest += ev.data
        else:
            order.append(ev)
            if isinstance(ev, ArchiveStarted):
                current = ev.name
                archives[current] = bytearray()
    return order, {k: bytes(v) for k, v in archives.items()}, bytes(manifest)


def _members(tar_bytes: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: tar.extractfile(m).read() if m.isfile() and m.size < 65536 else None for m in tar}


def test_base_backup_archives(env):
    (ts_oid,) = env.one("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")
    with env.open() as conn:
        order, archives, manifest = _collect(conn.base_backup("walrus-test", progress=True, manifest=True))
        conn.identify_system()  # the connection is free again
    start, spaces, end = order[0], order[1], order[-1]
    assert isinstance(start, BackupStarted) and isinstance(spaces, Tablespaces) and isinstance(end, BackupEnded)
    assert start.timeline == end.timeline == 2 and end.lsn >= start.lsn
    by_oid = {t.oid: t for t in spaces.tablespaces}
    assert by_oid[ts_oid].location == env.tablespace and by_oid[None].location is None
    assert all(t.size_kb is not None for t in spaces.tablespaces)  # sizes come with progress=True
    started = [ev for ev in order if isinstance(ev, ArchiveStarted)]
    assert {(a.name, a.location) for a in started} == {(f"{ts_oid}.tar", env.tablespace), ("base.tar", "")}
    progress = [ev.done for ev in order if isinstance(ev, BackupProgress)]
    assert progress and progress == sorted(progress)

    base = _members(archives["base.tar"])
    assert base["PG_VERSION"] == b"15\n"
    assert b"LABEL: walrus-test" in base["backup_label"]
    assert "global/pg_control" in base
    assert base["tablespace_map"].split() == [str(ts_oid).encode(), env.tablespace.encode()]
    tablespace = _members(archives[f"{ts_oid}.tar"])
    (relpath,) = env.one("SELECT pg_relation_filepath('in_ts1')")  # pg_tblspc/<oid>/PG_15_.../<db>/<rel>
    assert relpath.split("/", 2)[2] in tablespace
    assert json.loads(manifest)["PostgreSQL-Backup-Manifest-Version"] == 1

    # WAL-G's own command: no progress, no manifest
    with env.open() as conn:
        order, archives, manifest = _collect(conn.base_backup("wal-g"))
    assert manifest == b""
    assert all(t.size_kb is None for t in order[1].tablespaces)  # (PostgreSQL 15 sends 'p' messages anyway)
    assert set(archives) == {f"{ts_oid}.tar", "base.tar"}


def test_abandoned_base_backup_is_aborted(env):
    conn = env.open()
    events = conn.base_backup("abandoned")
    for ev in events:
        if isinstance(ev, ArchiveData):
            break
    events.close()  # leaving the iteration closes the connection: the server aborts the backup
    env.wait_for("SELECT count(*) FROM pg_stat_progress_basebackup", (0,))
    with env.open() as again:  # and the next backup can start
        assert isinstance(next(again.base_backup("next")), BackupStarted)


def test_the_compiled_loop_takes_psycopgs_libpq_beside_the_distributions():
    """backup-push's SQL session (walrus.pg.libpq) loads the distribution's libpq beside the binary
    wheel's own; the COPY loop must call the one that made psycopg's connections."""
    import ctypes

    from psycopg import pq

    from walrus.pg import libpq

    assert libpq._libpq() is not None
    copyfill._libpq_functions.cache_clear()
    try:
        found = copyfill._libpq_functions()
        assert found is not None
        distributions = ctypes.CDLL("libpq.so.5", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        theirs = ctypes.cast(distributions.PQgetCopyData, ctypes.c_void_p).value
        assert (found[0] == theirs) == (pq.__impl__ != "binary")
    finally:
        copyfill._libpq_functions.cache_clear()


@pytest.mark.parametrize("path", ["compiled", "psycopg"])
def test_read_archive_fills_the_callers_buffers(env, path, monkeypatch):
    """read_archive() reads the archives' bytes straight into buffers of any size, through the compiled
    loop over libpq (this environment must have it) or psycopg's calls: the bytes the events carry."""
    if path == "psycopg":
        monkeypatch.setattr(copyfill, "_libpq_functions", lambda: None)
    else:
        assert copyfill._libpq_functions() is not None, "the compiled COPY loop cannot find psycopg's libpq"
    (ts_oid,) = env.one("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")
    with env.open() as conn:
        _, by_events, _ = _collect(conn.base_backup("events"))
    archives, order = {}, []
    with env.open() as conn:
        for ev in conn.base_backup("read_archive", progress=True):
            assert not isinstance(ev, ArchiveData), "read_archive took every byte"
            order.append(ev)
            if isinstance(ev, ArchiveStarted):
                got = bytearray()
                buf = memoryview(bytearray(7777))  # not a multiple of anything the server sends
                while n := conn.read_archive(buf):
                    got += buf[:n]
                    if n < len(buf):
                        assert conn.read_archive(buf) == 0  # the archive has ended
                        break
                archives[ev.name] = bytes(got)
        assert conn.read_archive(memoryview(bytearray(10))) == 0  # outside an archive: nothing
        conn.identify_system()  # the connection is free again
    assert isinstance(order[-1], BackupEnded)
    assert set(archives) == set(by_events) == {f"{ts_oid}.tar", "base.tar"}
    assert archives[f"{ts_oid}.tar"] == by_events[f"{ts_oid}.tar"]  # nothing writes to ts1 in between
    base = _members(archives["base.tar"])
    assert base["PG_VERSION"] == b"15\n" and b"LABEL: read_archive" in base["backup_label"]
    assert set(base) == set(_members(by_events["base.tar"]))


def _into_base_archive(conn: ReplicationConnection, label: str):
    """A base backup's events, taken up to base.tar's start (the tablespace's archive read away)."""
    events = conn.base_backup(label)
    buf = memoryview(bytearray(65536))
    while not isinstance(ev := next(events), ArchiveStarted) or ev.name != "base.tar":
        while conn.read_archive(buf):
            pass
    return events


def test_read_archive_bounded_by_the_timeout_and_interrupt(env):
    buf = memoryview(bytearray(65536))
    with env.open(timeout=1.0) as conn:
        events = _into_base_archive(conn, "stalled")
        assert conn.read_archive(buf) == len(buf)
        os.kill(conn.backend_pid, signal.SIGSTOP)  # the WAL sender hangs mid-archive
        try:
            began = time.monotonic()
            with pytest.raises(ReplicationTimeout, match="sent nothing for 1 s"):
                while conn.read_archive(buf):  # what is already on its way, then the silence
                    pass
            assert time.monotonic() - began < 5
        finally:
            os.kill(conn.backend_pid, signal.SIGCONT)
        events.close()  # the backup is abandoned: the server aborts it
    with env.open(timeout=60) as conn:
        events = _into_base_archive(conn, "interrupted")
        os.kill(conn.backend_pid, signal.SIGSTOP)
        try:
            threading.Timer(0.3, conn.interrupt).start()
            began = time.monotonic()
            with pytest.raises(ReplicationInterrupted):
                while conn.read_archive(buf):
                    pass
            assert time.monotonic() - began < 3
        finally:
            os.kill(conn.backend_pid, signal.SIGCONT)
        events.close()


# --- START_REPLICATION ----------------------------------------------------------------------------------

def _read_until(stream, end: int, batch: int = 0) -> bytes:
    """The WAL bytes from the stream's first XLogData up to `end`, checking that they are contiguous.
    With `batch`, read_wal() into a view of that size takes what it can, and after every third fill
    read() takes the next message (the rest of one a fill left part of, or whatever comes)."""
    got = bytearray()
    first = position = None
    deadline = time.monotonic() + TIMEOUT
    view = memoryview(bytearray(batch))
    fills = 0
    while position is None or position < end:
        assert time.monotonic() < deadline, "WAL did not arrive"
        if batch and position is not None and (n := stream.read_wal(view, position)):
            got += view[:n]
            position += n
            fills += 1
            if fills % 3:
                continue
        ev = stream.read(1.0)
        if isinstance(ev, XLogData):
            if position is None:
                first = position = ev.start
            assert ev.start == position, "the stream skipped or repeated WAL"
            got += ev.data
            position += len(ev.data)
        elif isinstance(ev, Keepalive) and ev.reply_requested:
            stream.send_status(0, 0, 0)
    return bytes(got[:end - first])


@pytest.mark.parametrize("reads", ["events", "read_wal", "read_wal-psycopg"])
def test_streamed_wal_equals_the_segment_file(env, reads, monkeypatch):
    if reads == "read_wal-psycopg":
        monkeypatch.setattr(copyfill, "_libpq_functions", lambda: None)
    with env.open() as conn:
        conn.create_physical_slot("walrus_wal", reserve_wal=True)
        try:
            reserved = conn.read_replication_slot("walrus_wal").restart_lsn
            env.sql.execute(f"CREATE TABLE wal_source_{reads.replace('-', '_')} AS SELECT generate_series(1, 5000) AS x")
            env.sql.execute("SELECT pg_switch_wal()")  # ends the slot's segment: the file is complete
            seg_start = reserved - reserved % SEGMENT
            seg_end = seg_start + SEGMENT
            stream = conn.start_replication("walrus_wal", seg_start, 2)
            wal = _read_until(stream, seg_end, batch=0 if reads == "events" else 10007)
            # pg_walfile_name() names the segment *before* a boundary: ask for the segment's second byte
            (name,) = env.one("SELECT pg_walfile_name(%s::pg_lsn)", format_lsn(seg_start + 1))
            with open(os.path.join(env.cluster.data, "pg_wal", name), "rb") as f:
                assert wal == f.read()

            # the reported flush position becomes the slot's restart_lsn
            stream.send_status(seg_end, seg_end, seg_end, reply=True)
            deadline = time.monotonic() + TIMEOUT
            while not isinstance(ev := stream.read(1.0), Keepalive):  # reply=True: the server answers at once
                assert time.monotonic() < deadline
            assert ev.server_end >= seg_end
            lsn = format_lsn(seg_end)
            restart = "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walrus_wal'"
            deadline = time.monotonic() + 10
            while env.one(restart) != (lsn,) and time.monotonic() < deadline:
                stream.read(0.05)
            assert env.one(restart) == (lsn,)
            assert env.one("SELECT flush_lsn::text FROM pg_stat_replication WHERE pid = %s", conn.backend_pid) == (lsn,)

            stream.end()  # our side ends the copy: the connection is free again
            conn.identify_system()
        finally:
            conn.drop_slot("walrus_wal")


def test_end_of_timeline(env):
    with env.open() as conn:
        _, history = conn.timeline_history(2)
        switch = parse_lsn(history.split(b"\t")[1].decode())
        start = switch - switch % SEGMENT
        stream = conn.start_replication(None, start, timeline=1)
        got = 0
        deadline = time.monotonic() + TIMEOUT
        while not isinstance(ev := stream.read(1.0), EndOfTimeline):
            assert time.monotonic() < deadline
            if isinstance(ev, XLogData):
                assert ev.start == start + got
                got += len(ev.data)
        assert (ev.next_timeline, ev.next_start) == (2, switch)
        assert got == switch - start  # timeline 1's WAL, to its very end
        with pytest.raises(ReplicationError, match="ended"):
            stream.read(0.1)
        assert conn.identify_system().timeline == 2  # the connection is free again


# --- failures: clear errors, never a hang -------------------------------------------------------------

def test_slot_active_elsewhere(env):
    with env.open() as first, env.open() as second:
        first.create_physical_slot("walrus_busy", reserve_wal=True)
        try:
            at = first.read_replication_slot("walrus_busy").restart_lsn
            first.start_replication("walrus_busy", at)
            with pytest.raises(ReplicationError, match="in use by another connection") as err:
                second.start_replication("walrus_busy", at)
            assert f"is active for PID {first.backend_pid}" in err.value.detail
            assert err.value.hint and err.value.sqlstate == "55006"
            assert second.identify_system().timeline == 2  # the refused command leaves the connection usable
        finally:
            first.close()
            env.wait_for("SELECT active FROM pg_replication_slots WHERE slot_name = 'walrus_busy'", (False,))
            second.drop_slot("walrus_busy")


def test_role_without_replication(env):
    env.sql.execute("CREATE ROLE walrus_norepl LOGIN")
    with pytest.raises(ReplicationError, match="may not open a replication connection") as err:
        ReplicationConnection.open(env.conninfo(user="walrus_norepl"), TIMEOUT)
    assert "ALTER ROLE" in err.value.hint and "must be superuser or replication role" in err.value.detail


def test_pg_hba_refusal(env):
    hba = os.path.join(env.cluster.data, "pg_hba.conf")
    with open(hba) as f:
        original = f.read()
    with open(hba, "w") as f:
        f.write("local replication walrus_nohba reject\n" + original)
    env.sql.execute("CREATE ROLE walrus_nohba LOGIN REPLICATION")
    env.sql.execute("SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 10
        while True:  # the reload is asynchronous
            try:
                ReplicationConnection.open(env.conninfo(user="walrus_nohba"), TIMEOUT).close()
            except ReplicationError as e:
                err = e
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "pg_hba.conf does not allow" in err.message and "replication" in err.hint
    finally:
        with open(hba, "w") as f:
            f.write(original)
        env.sql.execute("SELECT pg_reload_conf()")


def test_max_wal_senders_exhausted(env):
    opened = []
    try:
        with pytest.raises(ReplicationError, match="no free WAL sender") as err:
            for _ in range(11):  # max_wal_senders = 10
                opened.append(env.open())
        assert len(opened) == 10 and "max_wal_senders" in err.value.hint
    finally:
        for conn in opened:
            conn.close()


def test_quiet_server_is_pinged_not_timed_out(env):
    # wal_sender_timeout=0: the server sends no keepalives of its own, so a quiet server says nothing
    with env.open(timeout=1.0, options="-c wal_sender_timeout=0") as conn:
        stream = conn.start_replication(None, conn.identify_system().xlogpos)
        began = time.monotonic()
        events = []
        while time.monotonic() - began < 3:  # three times the timeout
            events.append(stream.read(0.3))  # None when quiet for 0.3 s
        assert any(isinstance(ev, Keepalive) for ev in events)  # the answers to read()'s pings


def test_unresponsive_server_times_out(env):
    with env.open(timeout=1.0) as conn:
        stream = conn.start_replication(None, conn.identify_system().xlogpos)
        os.kill(conn.backend_pid, signal.SIGSTOP)  # the WAL sender hangs: neither data nor answers
        try:
            began = time.monotonic()
            with pytest.raises(ReplicationTimeout, match="sent nothing for 1 s"):
                while time.monotonic() - began < TIMEOUT:
                    stream.read(0.3)
            assert time.monotonic() - began < 3
        finally:
            os.kill(conn.backend_pid, signal.SIGCONT)


def test_interrupt_from_another_thread(env):
    with env.open(timeout=60, options="-c wal_sender_timeout=0") as conn:
        stream = conn.start_replication(None, conn.identify_system().xlogpos)
        threading.Timer(0.3, conn.interrupt).start()
        began = time.monotonic()
        with pytest.raises(ReplicationInterrupted):
            while True:
                stream.read(30)
        assert time.monotonic() - began < 2


def test_terminated_wal_sender(env):
    with env.open() as conn:
        stream = conn.start_replication(None, conn.identify_system().xlogpos)
        env.one("SELECT pg_terminate_backend(%s)", conn.backend_pid)
        began = time.monotonic()
        with pytest.raises(ConnectionLost, match="closed the replication connection") as err:
            while True:
                stream.read(1.0)
        assert time.monotonic() - began < 5 and err.value.hint


def test_server_stopped_mid_stream(env):
    """Last: it stops the server (and starts it again)."""
    conn = env.open()
    try:
        stream = conn.start_replication(None, conn.identify_system().xlogpos)
        env.sql.close()
        env.cluster.stop("immediate")
        began = time.monotonic()
        with pytest.raises(ConnectionLost, match="closed the replication connection"):
            while True:
                stream.read(1.0)
        assert time.monotonic() - began < 5
        with pytest.raises(ReplicationError, match="could not open a replication connection"):
            env.open(timeout=5)
    finally:
        conn.close()
        env.cluster.start()
        env.sql = env.connect_sql()
