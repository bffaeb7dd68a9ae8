"""`walrus daemon` started by systemd's socket activation (walrus-daemon.socket): it serves the listening
socket passed as descriptor 3, leaves the socket file alone, and a stop does not take it away."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

BIN = os.path.dirname(sys.executable)
SEG = "000000010000000000000001"
# What systemd does between fork and exec: the listening socket as descriptor 3, LISTEN_FDS=1 and
# LISTEN_PID naming the process that execs the daemon (its own pid, which exec keeps).
SHIM = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='walrus-daemon.socket'); "
        "os.execv(sys.argv[2], sys.argv[2:])")


def _env(tmp_path, pgdata, store, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "LISTEN_"))}
    env.update(WALG_FILE_PREFIX=str(store), PGDATA=str(pgdata), WALG_PG_WAL_SIZE="1",
               NOTIFY_SOCKET=str(tmp_path / "notify.sock"), **extra)
    return env


def _listening(path: str) -> socket.socket:
    """The socket as walrus-daemon.socket makes it: bound, 0660, listening, before any daemon runs."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o660)
    sock.listen(16)
    return sock


def test_daemon_serves_the_socket_systemd_passes_in(tmp_path):
    pgdata, store = tmp_path / "pgdata", tmp_path / "store"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    data = os.urandom(1 << 20)
    (pgdata / "pg_wal" / SEG).write_bytes(data)
    (pgdata / "pg_wal" / "archive_status" / f"{SEG}.ready").write_bytes(b"")
    path = str(tmp_path / "walrus.sock")
    listener = _listening(path)
    inode = os.stat(path).st_ino
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)

    # the client connects before the daemon even runs, as the archiver's first call does: the
    # connection waits in the listening socket's backlog
    early = subprocess.Popen([f"{BIN}/walg-daemon-client", path, "wal-push", f"pg_wal/{SEG}"],
                             stderr=subprocess.PIPE)
    daemon = subprocess.Popen([sys.executable, "-c", SHIM, str(listener.fileno()), f"{BIN}/walrus", "daemon", path],
                              env=_env(tmp_path, pgdata, store), pass_fds=(listener.fileno(),),
                              stderr=subprocess.PIPE)
    try:
        assert notify.recv(100) == b"READY=1"
        assert early.wait(60) == 0, early.stderr.read().decode()
        assert (store / "wal_005" / f"{SEG}.lz4").is_file()

        # later calls, both spellings archive_command may use (%p, %f), and a fetch back
        for arg in (f"pg_wal/{SEG}", SEG):
            pushed = subprocess.run([f"{BIN}/walg-daemon-client", path, "wal-push", arg], capture_output=True)
            assert pushed.returncode == 0, pushed.stderr.decode()
        fetched = tmp_path / "fetched"
        got = subprocess.run([f"{BIN}/walg-daemon-client", path, "wal-fetch", SEG, str(fetched)], capture_output=True)
        assert got.returncode == 0, got.stderr.decode()
        assert fetched.read_bytes() == data
        # the daemon neither replaced nor re-moded systemd's socket file
        st = os.stat(path)
        assert st.st_ino == inode and stat.S_IMODE(st.st_mode) == 0o660
    finally:
        daemon.send_signal(signal.SIGTERM)
        log = daemon.communicate(timeout=60)[1].decode()
        notify.close()
    assert daemon.returncode == 0, log
    assert "(passed in by systemd)" in log, log
    assert "Traceback" not in log, log
    # stopped: the file is still there and still listening (systemd's copy of the descriptor), so the
    # next client's connection waits for the next start instead of failing
    assert os.path.exists(path) and os.stat(path).st_ino == inode
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(path)
    listener.close()


def test_daemon_binds_its_own_socket_when_the_variables_are_for_another_process(tmp_path):
    """LISTEN_PID of another process (a parent's leftovers): the descriptors are not the daemon's;
    it binds the path itself, and its children do not see the variables."""
    pgdata, store = tmp_path / "pgdata", tmp_path / "store"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    path = str(tmp_path / "walrus.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    env = _env(tmp_path, pgdata, store, LISTEN_PID="1", LISTEN_FDS="1")
    daemon = subprocess.Popen([f"{BIN}/walrus", "daemon", path], env=env, stderr=subprocess.PIPE)
    try:
        assert notify.recv(100) == b"READY=1"
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        (pgdata / "pg_wal" / SEG).write_bytes(os.urandom(1 << 20))
        pushed = subprocess.run([f"{BIN}/walg-daemon-client", path, "wal-push", SEG], capture_output=True)
        assert pushed.returncode == 0, pushed.stderr.decode()
    finally:
        daemon.send_signal(signal.SIGTERM)
        log = daemon.communicate(timeout=60)[1].decode()
        notify.close()
    assert daemon.returncode == 0, log
    assert "passed in by systemd" not in log
    assert not os.path.exists(path)  # its own socket: removed on a clean stop


def test_inherited_listener_reads_and_clears_the_variables(monkeypatch):
    from walrus.daemon.server import inherited_listener

    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "walrus-daemon.socket")
    assert inherited_listener() is None
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert inherited_listener() is None
    assert inherited_listener() is None  # nothing set at all
