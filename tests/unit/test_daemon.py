"""The daemon over its real Unix socket: WAL-G's bytes, look-ahead uploads, errors, clients and systemd."""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import lz4.frame
import pytest

from walrus.daemon import protocol
from walrus.daemon.server import FIRST_REQUEST_TIMEOUT, MAX_CONNECTIONS

BIN = os.path.dirname(sys.executable)
SEG = "000000010000000000000001"


def seg_name(n: int) -> str:
    return f"0000000100000000000000{n:02X}"


@contextlib.contextmanager
def running_daemon(tmp_path, nofile=None, **settings):
    """A daemon for a fresh PGDATA and file storage, optionally started under RLIMIT_NOFILE (soft, hard)."""
    pgdata = tmp_path / "pgdata"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    store = tmp_path / "store"
    sock = str(tmp_path / "walrus.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(10)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "PG"))}
    env.update(WALG_FILE_PREFIX=str(store), PGDATA=str(pgdata), NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
               WALG_UPLOAD_CONCURRENCY="4", WALG_PG_WAL_SIZE="1", **settings)  # write_segment: 1 MiB
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)) if nofile else None
    proc = subprocess.Popen([f"{BIN}/walrus", "daemon", sock], env=env, stderr=subprocess.PIPE, preexec_fn=limit)
    try:
        assert notify.recv(100) == b"READY=1"  # sent once the socket listens
        yield proc, sock, pgdata, store
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        notify.close()


@pytest.fixture
def daemon(tmp_path):
    with running_daemon(tmp_path) as running:
        yield running


def request(sock: str, raw: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(sock)
        s.sendall(raw)
        return s.recv(16)


def counted(*args: str | bytes) -> bytes:
    """A counted-argument body, whatever the number of arguments or their bytes."""
    raws = [a.encode() if isinstance(a, str) else a for a in args]
    return bytes([len(raws)]) + b"".join(len(r).to_bytes(2, "big") + r for r in raws)


def frame(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 3).to_bytes(2, "big") + body


def stop(proc) -> str:
    """SIGTERM, then the daemon's whole log, which must hold no exception escaped to asyncio."""
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=30)[1].decode()
    for escaped in ("Task exception was never retrieved", "Unhandled exception", "Traceback"):
        assert escaped not in log
    return log


def write_segment(pgdata, name, ready=True, size=1 << 20) -> bytes:
    data = os.urandom(size)
    (pgdata / "pg_wal" / name).write_bytes(data)
    if ready:
        (pgdata / "pg_wal" / "archive_status" / f"{name}.ready").write_bytes(b"")
    return data


def test_walg_request_bytes():
    assert protocol.encode(protocol.WAL_PUSH, SEG) == bytes.fromhex("46001B") + SEG.encode()
    fetch = protocol.encode(protocol.WAL_FETCH, SEG, "pg_wal/RECOVERYXLOG")
    assert fetch == bytes.fromhex("660033020018") + SEG.encode() + bytes.fromhex("0013") + b"pg_wal/RECOVERYXLOG"
    assert protocol.encode(protocol.CHECK) == bytes.fromhex("430003")
    assert protocol.split_args(fetch[3:]) == [SEG, "pg_wal/RECOVERYXLOG"]
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_header(b"F\x00\x02")
    with pytest.raises(protocol.ProtocolError):
        protocol.split_args(fetch[3:-1])
    assert protocol.request_args(protocol.CHECK, b"CHECK") == []  # the walg_archive module's check
    assert protocol.request_args(protocol.WAL_FETCH, fetch[3:]) == [SEG, "pg_wal/RECOVERYXLOG"]
    for kind, body in [(protocol.WAL_FETCH, counted(SEG)), (protocol.WAL_PUSH, b""), (ord("X"), b""),
                       (protocol.WAL_PUSH, b"\xff\xfe")]:
        with pytest.raises(protocol.ProtocolError):
            protocol.request_args(kind, body)


def test_check_push_fetch_and_errors(daemon, tmp_path):
    proc, sock, pgdata, store = daemon
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # check keeps the connection open
        s.connect(sock)
        s.sendall(bytes.fromhex("430003"))
        assert s.recv(1) == b"O"
        s.sendall(bytes.fromhex("430003"))
        assert s.recv(1) == b"O"
    data = write_segment(pgdata, SEG)
    assert request(sock, bytes.fromhex("46001B") + SEG.encode()) == b"O"
    assert (store / "wal_005" / f"{SEG}.lz4").is_file()
    # pushing a file that is not there: E, and the daemon lives on
    assert request(sock, protocol.encode(protocol.WAL_PUSH, seg_name(0x30))) == b"E"
    assert request(sock, b"F\x00\x01") == b"E"  # malformed length
    # fetch through the real client, as restore_command would
    dest = tmp_path / "restored"
    client = subprocess.run([f"{BIN}/walg-daemon-client", sock, "wal-fetch", SEG, str(dest)])
    assert client.returncode == 0 and dest.read_bytes() == data
    missing = subprocess.run([f"{BIN}/walrus", "daemon-client", sock, "wal-fetch", seg_name(0x31), str(dest)],
                             capture_output=True)
    assert missing.returncode == 74
    failed = subprocess.run([f"{BIN}/walrus", "daemon-client", sock, "wal-push", seg_name(0x32)], capture_output=True)
    assert failed.returncode == 1 and b"ERROR" in failed.stderr
    assert proc.poll() is None


def test_look_ahead_uploads_ready_segments(daemon):
    proc, sock, pgdata, store = daemon
    names = [seg_name(n) for n in range(0x10, 0x16)]
    for n in names:
        write_segment(pgdata, n)
    assert request(sock, protocol.encode(protocol.WAL_PUSH, names[0])) == b"O"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all((store / "wal_005" / f"{n}.lz4").exists() for n in names[1:5]):
        time.sleep(0.05)
    for n in names[1:5]:  # WALG_UPLOAD_CONCURRENCY=4 segments ahead, uploaded before anyone asked
        assert (store / "wal_005" / f"{n}.lz4").exists()
    os.unlink(pgdata / "pg_wal" / names[1])  # already durable: answered without reading the file again
    assert request(sock, protocol.encode(protocol.WAL_PUSH, names[1])) == b"O"
    # without PG_READY_RENAME the archive status is PostgreSQL's alone
    assert not [f for f in os.listdir(pgdata / "pg_wal" / "archive_status") if f.endswith(".done")]


def wait_stored(store, names, timeout=20.0, settle=1.0):
    """Until the objects are in storage, and then `settle` seconds more: the daemon counts an upload
    as stored only after its object appears (the folder's fsync, then the upload task's callback),
    which on a loaded machine can lag the rename by a good part of a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all((store / "wal_005" / f"{n}.lz4").exists() for n in names):
        time.sleep(0.02)
    assert all((store / "wal_005" / f"{n}.lz4").exists() for n in names)
    time.sleep(settle)


def test_pg_ready_rename_marks_stored_look_ahead_done_while_asked(tmp_path):
    """An archiver that asks for the oldest .ready segment, as PostgreSQL's does, and marks it .done after O."""
    names = [seg_name(n) for n in range(0x10, 0x20)]
    with running_daemon(tmp_path, PG_READY_RENAME="true") as (proc, sock, pgdata, store):
        status = pgdata / "pg_wal" / "archive_status"
        data = {n: write_segment(pgdata, n) for n in names}

        def done():
            return sorted(f[:-5] for f in os.listdir(status) if f.endswith(".done"))

        def archive(name):  # one archive_command call
            assert request(sock, protocol.encode(protocol.WAL_PUSH, name)) == b"O"
            assert (status / f"{name}.ready").exists()  # the daemon leaves the asked one to PostgreSQL
            os.rename(status / f"{name}.ready", status / f"{name}.done")

        def lowest_ready():
            return min((f[:-6] for f in os.listdir(status) if f.endswith(".ready")), default=None)

        archive(names[0])  # starts names[1..8] ahead (4 uploads x 2); those stored meanwhile are marked
        marked = done()
        wait_stored(store, names[1:9])
        time.sleep(0.2)
        assert done() == marked  # between requests nothing is renamed: the archiver may be picking one
        calls = 1
        while (name := lowest_ready()) is not None:  # PostgreSQL's archiver loop
            stored = {n for n in names if (store / "wal_005" / f"{n}.lz4").exists()} - {name}
            archive(name)  # marks all that is stored, then looks ahead past the .done ones; uploads it
            calls += 1  # starts may be stored and marked before the answer, leaving nothing .ready
            assert stored <= set(done())
            wait_stored(store, names[:names.index(name) + 9])
        assert done() == names and calls <= 3  # 16 segments, at most 3 archive_command calls
        for n in names:  # everything marked is stored, byte for byte
            assert lz4.frame.decompress((store / "wal_005" / f"{n}.lz4").read_bytes()) == data[n]
        log = stop(proc)
    for n in names:  # each segment archived once
        assert log.count(f"archived {n} ") == 1


def test_pg_ready_rename_failure_leaves_ready_and_still_answers_at_once(tmp_path):
    """A .ready that cannot be renamed stays .ready (PostgreSQL will ask), and the stored segment's finished
    upload answers that request without reading the file again."""
    names = [seg_name(n) for n in range(0x10, 0x16)]
    with running_daemon(tmp_path, PG_READY_RENAME="true") as (proc, sock, pgdata, store):
        status = pgdata / "pg_wal" / "archive_status"
        data = {n: write_segment(pgdata, n) for n in names}
        blocker = status / f"{names[2]}.done"  # rename(2) onto a non-empty directory fails, even for root
        blocker.mkdir()
        (blocker / "keep").write_bytes(b"")
        assert request(sock, protocol.encode(protocol.WAL_PUSH, names[0])) == b"O"
        wait_stored(store, names[1:])
        time.sleep(0.2)  # each upload task ends just after its object lands
        assert request(sock, protocol.encode(protocol.WAL_PUSH, names[1])) == b"O"  # marks what is stored
        assert all((status / f"{n}.done").is_file() for n in names[3:])
        assert (status / f"{names[2]}.ready").exists()
        os.unlink(pgdata / "pg_wal" / names[2])  # a re-read would fail: the answer must come from the task
        assert request(sock, protocol.encode(protocol.WAL_PUSH, names[2])) == b"O"
        assert lz4.frame.decompress((store / "wal_005" / f"{names[2]}.lz4").read_bytes()) == data[names[2]]
        log = stop(proc)
    assert log.count(f"cannot mark {names[2]} archived") == 1
    for n in names:
        assert log.count(f"archived {n} ") == 1


def test_daemon_client_imports_almost_nothing():
    code = ("import sys; from walrus.daemon.client import run; "
            "print(sorted(m for m in ('click', 'asyncio', 'walrus.config', 'lz4', 'psycopg', 'socket') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_daemon_client_stands_alone_without_site_packages(tmp_path):
    """The client module runs under `python -IS` (no site-packages, so no walrus to import)."""
    import walrus.daemon.client as client

    out = subprocess.run([sys.executable, "-IS", client.__file__, str(tmp_path / "none.sock"), "wal-push", SEG],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "ERROR: walrus daemon at" in out.stderr and "Traceback" not in out.stderr


def test_installed_client_script_is_the_module_behind_an_sh_prelude():
    """walg-daemon-client is built from client.py (the build would be stale otherwise) and runs python -IS."""
    import walrus.daemon.client as client

    with open(f"{BIN}/walg-daemon-client") as f:
        script = f.read()
    with open(client.__file__) as f:
        source = f.read()
    prelude, _, body = script.partition("\n'''\n")
    assert prelude.startswith("#!/bin/sh\n") and 'exec "$py" -IS "$0" "$@"' in prelude
    assert body == source


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path):
    pgdata = tmp_path / "pgdata"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    sock = str(tmp_path / "d.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock)
    stale.close()  # a socket file nobody listens on, as after a crash
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "PG"))}
    env.update(WALG_FILE_PREFIX=str(tmp_path / "s"), PGDATA=str(pgdata))
    first = subprocess.Popen([f"{BIN}/walrus", "daemon", sock], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                assert request(sock, bytes.fromhex("430003")) == b"O"
                break
            except (ConnectionRefusedError, FileNotFoundError):
                time.sleep(0.05)
        second = subprocess.run([f"{BIN}/walrus", "daemon", sock], env=env, capture_output=True, timeout=30)
        assert second.returncode == 1 and b"already listening" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
    assert not os.path.exists(sock)


def test_daemon_needs_pgdata(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "PG"))}
    env.update(WALG_FILE_PREFIX=str(tmp_path / "s"))
    proc = subprocess.run([f"{BIN}/walrus", "daemon", str(tmp_path / "x.sock")], env=env, capture_output=True,
                          timeout=30)
    assert proc.returncode == 1 and b"PGDATA" in proc.stderr


FLOOD = 1200


def closed_by_peer(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_flood_of_idle_connections_leaves_room_for_requests(tmp_path):
    """1,200 connections that send nothing, to a daemon started with a soft limit of 1,024 open files (a
    common default): it raises the limit, closes the connections waiting longest at its bound, says so
    once, and a wal-push through the client is answered as fast as ever."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FLOOD + 256  # this process holds the flood's sockets
    if soft < need and hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    flood = []
    try:
        with running_daemon(tmp_path, nofile=(1024, 2048)) as (proc, sock, pgdata, store):
            try:
                deadline = time.monotonic() + 20
                while len(flood) < FLOOD:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.setblocking(False)  # a full backlog fails at once (EAGAIN) instead of hanging the test
                    try:
                        s.connect(sock)
                        flood.append(s)
                    except BlockingIOError:
                        s.close()
                        assert time.monotonic() < deadline, f"the daemon stopped accepting after {len(flood)}"
                        time.sleep(0.01)
                data = write_segment(pgdata, SEG)
                start = time.monotonic()
                client = subprocess.run([f"{BIN}/walg-daemon-client", sock, "wal-push", SEG], capture_output=True,
                                        timeout=30)
                elapsed = time.monotonic() - start
                assert client.returncode == 0, client.stderr
                assert elapsed < 3.0  # made room at once, not after the idle connections' own timeout
                assert lz4.frame.decompress((store / "wal_005" / f"{SEG}.lz4").read_bytes()) == data
                assert sum(closed_by_peer(s) for s in flood) >= FLOOD - MAX_CONNECTIONS
                assert request(sock, protocol.encode(protocol.CHECK)) == b"O"
                with open(f"/proc/{proc.pid}/limits") as f:  # the soft limit raised to the hard one
                    assert [line.split()[3:5] for line in f if line.startswith("Max open files")] == [["2048", "2048"]]
            finally:
                for s in flood:  # before SIGTERM: shutdown gives those still open their FIRST_REQUEST_TIMEOUT
                    s.close()
            log = stop(proc)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # the first closure, then one summary (at shutdown): not a line per connection
    assert 1 <= log.count("connection limit reached") <= 3
    assert f"connection limit reached ({MAX_CONNECTIONS} open)" in log


def test_malformed_frames_get_E_and_nothing_escapes(daemon):
    proc, sock, pgdata, store = daemon
    malformed = {
        "unknown type": frame(b"X", b""),
        "length 0": b"C\x00\x00",
        "length 2": b"F\x00\x02",
        "wal-fetch, 1 argument": frame(b"f", counted(SEG)),
        "wal-fetch, 3 arguments": frame(b"f", counted(SEG, "pg_wal/RECOVERYXLOG", "x")),
        "wal-fetch, 0 arguments": frame(b"f", counted()),
        "wal-fetch, empty body": frame(b"f", b""),
        "wal-push, empty body": frame(b"F", b""),
        "wal-push, not UTF-8": frame(b"F", b"\xff\xfe" + SEG.encode()),
        "wal-fetch, not UTF-8": frame(b"f", counted(SEG, b"pg_wal/\xc3")),
        "bytes left over": frame(b"f", counted(SEG, "pg_wal/RECOVERYXLOG") + b"x"),
        "count past the body": frame(b"f", bytes([2]) + (24).to_bytes(2, "big") + SEG.encode()),
    }
    for what, raw in malformed.items():
        assert request(sock, raw) == b"E", what
    # the client half-closes: the rest of the frame cannot come, and the reply still goes out
    for what, raw in {"body short of its length": b"F\x00\x40" + SEG.encode(), "header cut short": b"F\x00"}.items():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(sock)
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(16) == b"E", what
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # ... and one gone before its reply
        s.connect(sock)
        s.sendall(b"F\x00\x40" + SEG.encode())
    # well framed, but the push fails: a name whose look-ahead has no next segment, and an impossible path
    beyond = "0000000100000000FFFFFFFF"
    assert request(sock, protocol.encode(protocol.WAL_PUSH, beyond)) == b"E"
    assert request(sock, protocol.encode(protocol.WAL_PUSH, SEG[:-1] + "\0")) == b"E"
    assert request(sock, protocol.encode(protocol.WAL_FETCH, SEG, "pg_wal/a\0b")) == b"E"
    # and the daemon serves on
    data = write_segment(pgdata, SEG)
    assert request(sock, protocol.encode(protocol.WAL_PUSH, SEG)) == b"O"
    assert lz4.frame.decompress((store / "wal_005" / f"{SEG}.lz4").read_bytes()) == data
    log = stop(proc)
    assert log.count("malformed request") == len(malformed) + 3
    for failed in (f"wal-push {beyond}", f"wal-push {SEG[:-1]}\0", "wal-fetch "):  # each logged once
        assert log.count(f"daemon: {failed}") == 1, failed


def test_idle_connections_are_closed_after_the_bound(daemon):
    """A new connection has FIRST_REQUEST_TIMEOUT to send its request; one kept open after a check
    waits longer; SIGTERM closes the kept-open one at once instead of waiting out the grace."""
    proc, sock, pgdata, store = daemon
    start = time.monotonic()
    silent, partial, checked = (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3))
    with silent, partial, checked:
        for s in (silent, partial, checked):
            s.settimeout(FIRST_REQUEST_TIMEOUT + 10)
            s.connect(sock)
        partial.sendall(b"F\x00\x1b" + SEG.encode()[:10])  # a request that never ends
        checked.sendall(b"C\x00\x08CHECK")  # as the walg_archive module checks
        assert checked.recv(1) == b"O"
        assert silent.recv(1) == b"" and partial.recv(1) == b""
        assert FIRST_REQUEST_TIMEOUT - 0.5 <= time.monotonic() - start <= FIRST_REQUEST_TIMEOUT + 3
        time.sleep(1)
        checked.sendall(b"C\x00\x03")
        assert checked.recv(1) == b"O"  # past the first bound, still open
        stopping = time.monotonic()
        stop(proc)
        assert time.monotonic() - stopping < 3.0  # not SHUTDOWN_GRACE: nothing was asked on it
        assert checked.recv(1) == b""
