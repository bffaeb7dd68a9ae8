"""walrus wal-receive (the real CLI, as a subprocess) against a real PostgreSQL 15 whose archive_command
is off, so only the receiver archives: every stored segment equals the server's pg_wal file, the slot
never passes what is stored, a server restart and a kill -9 of the receiver lose nothing, a backup
recovers from the received WAL to the last flushed commit, and refusals are clear errors."""
from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from walrus.pg.xlog import parse_wal_file_name, wal_file_name
from tests.pgcluster import (WALRUS, Cluster, _user_env, as_user, chown_to_user, free_port, make_workdir,
                             remove_tree, run, run_user, walrus, write_config)

pytestmark = pytest.mark.e2e

SEGMENT = 1024 * 1024  # 1 MiB segments: a switch or a little load completes several
SEGMENT_HEX = 24


class Env:
    def __init__(self, root: str):
        self.root = root
        self.storage = os.path.join(root, "storage")
        self.cluster = Cluster.init(root, wal_segsize_mb=1)
        # archiving off: wal-receive is the only archiver; wal_keep_size keeps every segment in pg_wal to compare
        self.cluster.configure(max_wal_senders=10, max_replication_slots=10, wal_keep_size="1GB",
                               archive_mode="off", wal_sender_timeout="10s")
        self.cluster.start()
        self.user = run_user() or getpass.getuser()
        self.config = write_config(os.path.join(root, "walg.json"), {
            "WALG_FILE_PREFIX": self.storage, "WALG_COMPRESSION_METHOD": "lz4", "WALG_PG_WAL_SIZE": "1",
            "WALG_DOWNLOAD_CONCURRENCY": "1"})
        self.fetched = os.path.join(root, "fetched")
        os.mkdir(self.fetched)
        chown_to_user(self.fetched)
        self.receiver: subprocess.Popen | None = None
        self.logs: list[str] = []

    def sql(self, query: str, *params):
        with psycopg.connect(host=self.cluster.sockdir, port=self.cluster.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchone() if cur.description else None

    def start_receiver(self, *, spool: str = "spool", user: str | None = None, slot: str | None = None
                       ) -> subprocess.Popen:
        log_path = os.path.join(self.root, f"receiver-{len(self.logs)}.log")
        self.logs.append(log_path)
        spool_dir = os.path.join(self.root, spool)
        env = {**self.cluster.env, **({"PGUSER": user} if user else {}), **({"WALG_SLOTNAME": slot} if slot else {})}
        with open(log_path, "wb") as log:
            return subprocess.Popen([WALRUS, "--config", self.config, "wal-receive", "--spool-dir", spool_dir],
                                    env=_user_env(env), stdout=log, stderr=subprocess.STDOUT, **as_user())

    def log(self, index: int = -1) -> str:
        with open(self.logs[index], errors="replace") as f:
            return f.read()

    def stored(self) -> dict[str, str]:
        """Segment name -> its object's name, for every complete segment in storage (not .partial, .history)."""
        try:
            names = os.listdir(os.path.join(self.storage, "wal_005"))
        except FileNotFoundError:
            return {}
        return {n.split(".")[0]: n for n in names
                if len(n.split(".")[0]) == SEGMENT_HEX and n.split(".")[1:] in (["lz4"], [])}

    def wait_stored(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while name not in self.stored():
            assert self.receiver is None or self.receiver.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{name} was not stored\n{self.log()[-3000:]}"
            time.sleep(0.1)

    def switch(self) -> str:
        """Write a little WAL and switch: the name of the segment closed."""
        self.sql("SELECT pg_logical_emit_message(false, 'walrus', 'x')")
        return self.sql("SELECT pg_walfile_name(pg_switch_wal())")[0]

    def slot_restart(self) -> int | None:
        row = self.sql("SELECT (restart_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = 'walg'")
        return None if row is None or row[0] is None else int(row[0])

    def check_segments(self) -> int:
        """Every stored segment, fetched with wal-fetch, equals the server's pg_wal file; none is missing
        between the first and the last. Returns how many were compared."""
        stored = sorted(self.stored())
        assert stored
        numbers = [parse_wal_file_name(n, SEGMENT)[1] for n in stored]  # one timeline
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), "a segment is missing"
        for name in stored:
            dest = os.path.join(self.fetched, name)
            walrus(["wal-fetch", name, dest], config=self.config)
            with open(dest, "rb") as got, open(os.path.join(self.cluster.data, "pg_wal", name), "rb") as want:
                assert got.read() == want.read(), f"{name} differs from the server's"
            os.unlink(dest)
        return len(stored)

    def stop_receiver(self) -> None:
        if self.receiver is not None and self.receiver.poll() is None:
            self.receiver.terminate()
            try:
                self.receiver.wait(10)
            except subprocess.TimeoutExpired:
                self.receiver.kill()
                self.receiver.wait()
                raise AssertionError("wal-receive did not stop within 10 s of SIGTERM")


def _segno(lsn: int) -> int:
    return lsn // SEGMENT


def _name(segno: int) -> str:
    return wal_file_name(1, segno, SEGMENT)


@pytest.fixture(scope="module")
def env():
    root = make_workdir("walrus-e2e-receive-")
    e = Env(root)
    try:
        yield e
    finally:
        e.stop_receiver()
        e.cluster.stop("immediate")
        remove_tree(root)


class Load:
    """Inserts in a loop on a thread, a commit each, until stopped; counts the rows committed."""

    def __init__(self, env: Env):
        self.env = env
        self.stop = threading.Event()
        self.committed = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    with psycopg.connect(host=self.env.cluster.sockdir, port=self.env.cluster.port,
                                         user=self.env.user, dbname="postgres", autocommit=True) as conn:
                        while not self.stop.is_set():
                            conn.execute("INSERT INTO load SELECT g, md5(g::text) FROM generate_series(1, 200) g")
                            self.committed += 200
                            time.sleep(0.01)  # a few MiB of WAL a second: some segments, not hundreds
                except psycopg.OperationalError:
                    time.sleep(0.2)  # the server restarts: connect again
        except BaseException as e:
            self.errors.append(e)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.errors, self.errors


def test_segments_stored_equal_the_servers_under_load(env):
    env.sql("CREATE TABLE load(id int, body text)")
    env.receiver = env.start_receiver()
    # the receiver creates the slot (reserving WAL) and starts from its restart_lsn's segment
    deadline = time.monotonic() + 20
    while env.slot_restart() is None:
        assert env.receiver.poll() is None and time.monotonic() < deadline, env.log()
        time.sleep(0.1)
    load = Load(env)
    violations = []
    try:
        began = time.monotonic()
        switches = 0
        while time.monotonic() - began < 6:
            # the slot's restart_lsn never passes what is stored: every segment below it is in storage
            restart = env.slot_restart()
            stored = env.stored()
            if restart is not None and stored:
                first = min(parse_wal_file_name(n, SEGMENT)[1] for n in stored)
                missing = [s for s in range(first, _segno(restart)) if _name(s) not in stored]
                if missing:
                    violations.append((restart, missing))
            if time.monotonic() - began > 1.5 * (switches + 1):
                env.switch()
                switches += 1
            time.sleep(0.1)
    finally:
        load.finish()
    assert not violations, violations[:3]
    last = env.switch()
    env.wait_stored(last)
    # the slot follows the storage: it reaches the end of the last stored segment within a status update
    end = (parse_wal_file_name(last, SEGMENT)[1] + 1) * SEGMENT
    deadline = time.monotonic() + 5
    while env.slot_restart() < end and time.monotonic() < deadline:
        time.sleep(0.1)
    assert env.slot_restart() >= end
    assert env.check_segments() >= 6
    assert env.receiver.poll() is None, env.log()


def test_server_restart_and_receiver_kill_lose_nothing(env):
    load = Load(env)
    try:
        time.sleep(1)
        env.cluster.stop("fast")  # the receiver's connection breaks; it connects again once the server is up
        env.cluster.start()
        time.sleep(1.5)
        env.switch()
        time.sleep(0.5)
        env.receiver.kill()  # kill -9 mid-stream: the spool's segment is lost; the slot kept its WAL
        env.receiver.wait()
        env.receiver = env.start_receiver()
        time.sleep(1.5)
    finally:
        load.finish()
    last = env.switch()
    env.wait_stored(last)
    assert "connecting again" in env.log(-2)  # the server restart was retried, with a log line
    assert "removed" in env.log() or "streaming from" in env.log()
    env.check_segments()


def test_recovery_from_received_wal_reaches_the_last_flushed_commit(env):
    """A backup (archiving off: --no-archive-check), then commits, a switch, and the receiver storing
    that segment: a restore to the end of the archive holds every row committed."""
    env.sql("CREATE TABLE marks(n int)")
    walrus(["backup-push", env.cluster.data, "--no-archive-check"], config=env.config, env=env.cluster.env)
    for n in range(5):
        env.sql("INSERT INTO marks SELECT generate_series(1, 1000)")
    expected = env.sql("SELECT count(*) FROM marks")[0]
    last = env.switch()
    env.wait_stored(last)
    port = free_port()
    directory = os.path.join(env.root, "restored")
    out = walrus(["restore", directory, "--start", "--json", "--set", f"port={port}",
                  "--set", f"unix_socket_directories={env.root}", "--set", "archive_mode=off",
                  "--set", "max_wal_senders=10", "--set", "max_replication_slots=10"], config=env.config)
    restored = Cluster(data=directory, sockdir=env.root, port=port)
    try:
        assert json.loads(out.stdout)["reached"] == "promoted", out.stdout
        assert restored.psql("SELECT count(*) FROM marks") == str(expected) == "5000"
    finally:
        restored.stop("immediate")


def test_refusals_are_clear_errors(env):
    env.sql("CREATE ROLE walrus_norepl LOGIN")
    began = time.monotonic()
    proc = env.start_receiver(spool="spool-norepl", user="walrus_norepl", slot="other")
    assert proc.wait(30) == 1
    assert time.monotonic() - began < 10
    out = env.log()
    assert "may not open a replication connection" in out and "ALTER ROLE" in out, out

    # the same spool directory: refused at once, by its lock
    proc = env.start_receiver()
    assert proc.wait(30) == 1
    assert "another wal-receive is using the spool directory" in env.log()

    # the same slot from another directory: the server refuses it; an error after a short grace
    began = time.monotonic()
    proc = env.start_receiver(spool="spool-second")
    assert proc.wait(60) == 1
    out = env.log()
    assert "replication slot walg is held by another connection" in out and "WALG_SLOTNAME" in out, out
    assert time.monotonic() - began < 30
    assert env.receiver.poll() is None  # the first receiver streams on


def test_sigterm_stops_it_promptly(env):
    env.switch()
    began = time.monotonic()
    env.receiver.send_signal(signal.SIGTERM)
    rc = env.receiver.wait(10)
    assert rc in (-signal.SIGTERM, 128 + signal.SIGTERM), (rc, env.log()[-2000:])
    assert time.monotonic() - began < 5
    # nothing partial under a final key: no temporary names, no .partial (the timeline did not end)
    names = os.listdir(os.path.join(env.storage, "wal_005"))
    assert not [n for n in names if ".tmp." in n or ".partial" in n], names


def test_a_promoted_standby_streams_on_the_new_timeline():
    """wal-receive on a cascading standby that is promoted: the old timeline's last segment is stored as
    the standby leaves it (.partial, equal to the server's), the new timeline's history file is stored,
    and streaming goes on on timeline 2, every segment equal to the new primary's."""
    root = make_workdir("walrus-e2e-receive-promote-")
    primary = Cluster.init(root, wal_segsize_mb=1)
    primary.configure(max_wal_senders=10, max_replication_slots=10, wal_keep_size="256MB", archive_mode="off")
    standby = Cluster(data=os.path.join(root, "standby"), sockdir=root)
    receiver = None
    try:
        primary.start()
        run_as = run_user() or getpass.getuser()
        run([os.path.join(primary.bindir, "pg_basebackup"), "-h", root, "-p", str(primary.port),
             "-D", standby.data, "-X", "stream", "-R", "--no-sync", "--checkpoint=fast"])
        standby.configure(max_wal_senders=10, max_replication_slots=10, wal_keep_size="256MB", archive_mode="off",
                          hot_standby="on")
        standby.start()
        storage = os.path.join(root, "storage")
        config = write_config(os.path.join(root, "walg.json"), {
            "WALG_FILE_PREFIX": storage, "WALG_COMPRESSION_METHOD": "lz4", "WALG_PG_WAL_SIZE": "1",
            "WALG_DOWNLOAD_CONCURRENCY": "1"})
        log_path = os.path.join(root, "receiver.log")
        with open(log_path, "wb") as log:
            receiver = subprocess.Popen([WALRUS, "--config", config, "wal-receive", "--spool-dir",
                                         os.path.join(root, "spool")],
                                        env=_user_env({**standby.env, "PGUSER": run_as}), stdout=log,
                                        stderr=subprocess.STDOUT, **as_user())

        def stored() -> set[str]:
            try:
                return set(os.listdir(os.path.join(storage, "wal_005")))
            except FileNotFoundError:
                return set()

        def wait_for(name: str, timeout: float = 60) -> None:
            deadline = time.monotonic() + timeout
            while name not in stored():
                with open(log_path, errors="replace") as f:
                    said = f.read()
                assert receiver.poll() is None, said
                assert time.monotonic() < deadline, f"{name} not stored: {sorted(stored())}\n{said[-3000:]}"
                time.sleep(0.1)

        primary.psql("CREATE TABLE t(n int); INSERT INTO t SELECT generate_series(1, 20000)")
        closed = primary.psql("SELECT pg_walfile_name(pg_switch_wal())")
        wait_for(closed + ".lz4")
        primary.psql("INSERT INTO t SELECT generate_series(1, 5000)")  # WAL in the segment the promotion cuts
        lsn = primary.psql("SELECT pg_current_wal_lsn()")
        standby.wait_until(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'", "t", timeout=60)
        primary.stop("fast")
        run([os.path.join(standby.bindir, "pg_ctl"), "-D", standby.data, "-w", "promote"])
        standby.wait_until("SELECT pg_is_in_recovery()", "f", timeout=60)
        assert standby.psql("SELECT left(pg_walfile_name(pg_current_wal_lsn()), 8)") == "00000002"

        wait_for("00000002.history.lz4")
        # the history file says where timeline 1 ended; its last segment is stored as WAL-G's .partial
        with open(os.path.join(standby.data, "pg_wal", "00000002.history")) as f:
            switch = f.read().split()[1]
        high, low = switch.split("/")
        switch_lsn = (int(high, 16) << 32) | int(low, 16)
        last_on_one = wal_file_name(1, switch_lsn // SEGMENT, SEGMENT)
        wait_for(last_on_one + ".partial.lz4")
        standby.psql("INSERT INTO t SELECT generate_series(1, 5000)")
        on_two = standby.psql("SELECT pg_walfile_name(pg_switch_wal())")
        assert on_two.startswith("00000002")
        wait_for(on_two + ".lz4")

        fetched = os.path.join(root, "fetched")
        os.mkdir(fetched)
        chown_to_user(fetched)

        def fetch(name: str) -> bytes:
            dest = os.path.join(fetched, name)
            walrus(["wal-fetch", name, dest], config=config)
            with open(dest, "rb") as f:
                return f.read()

        def server(name: str) -> bytes:
            with open(os.path.join(standby.data, "pg_wal", name), "rb") as f:
                return f.read()

        for name in ("00000002.history", on_two):
            assert fetch(name) == server(name), f"{name} differs from the server's"
        # the .partial holds timeline 1's WAL up to the switch, then zeros (PostgreSQL's own .partial, as
        # an archiving server leaves it); past the switch the server's file may hold timeline 2's or old bytes
        partial, own = fetch(last_on_one + ".partial"), server(last_on_one)
        cut = switch_lsn % SEGMENT
        assert len(partial) == SEGMENT and partial[:cut] == own[:cut] and partial[cut:] == bytes(SEGMENT - cut)
        assert receiver.poll() is None
    finally:
        if receiver is not None and receiver.poll() is None:
            receiver.terminate()
            receiver.wait(10)
        standby.stop("immediate")
        primary.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)
