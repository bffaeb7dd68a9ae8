"""Test harness: real PostgreSQL clusters in temp dirs, run as an unprivileged OS user, and walrus as that user."""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")


def pg_bindir() -> str:
    if os.environ.get("WALRUS_PG_BIN"):
        return os.environ["WALRUS_PG_BIN"]
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    preferred = [c for c in candidates if "/15/" in c]
    if not (preferred or candidates):
        raise RuntimeError("PostgreSQL server binaries not found; install postgresql-15 (apt) or set WALRUS_PG_BIN")
    return os.path.dirname((preferred or candidates)[-1])


def run_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, everything runs as the 'postgres' OS user."""
    if os.geteuid() != 0:
        return None
    return os.environ.get("WALRUS_TEST_USER", "postgres")


def as_user() -> dict:
    """subprocess arguments that run a child as the test user with *its* groups, as a real server has
    (keeping root's group would let it read root:postgres 0640 files a real postgres could not)."""
    user = run_user()
    if not user:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(user, pw.pw_gid)}


def _user_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_"))}
    user = run_user()
    if user:
        pw = pwd.getpwnam(user)
        env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
    env["LC_ALL"] = "C.UTF-8"
    env.update(extra or {})
    return env


def run(cmd: list[str], *, env: dict | None = None, check: bool = True, cwd: str | None = None,
        timeout: float = 600, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run as the unprivileged test user (when we are root), capturing output."""
    proc = subprocess.run(cmd, env=_user_env(env), cwd=cwd, capture_output=True, timeout=timeout, input=input,
                          **as_user())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout.decode()}\n"
                             f"stderr: {proc.stderr.decode()}")
    return proc


def make_workdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    user = run_user()
    if user:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o700)
    return path


def chown_to_user(path: str) -> None:
    user = run_user()
    if user:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, name: str, log=None, timeout: float = 30) -> None:
    """Return once 127.0.0.1:`port` accepts connections. Raise, naming `name`, if `proc` exits first
    (with the end of `log`, the file it writes to, when given) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = ""
            if log is not None:
                log.seek(0)
                said = f": {log.read().decode(errors='replace')[-2000:]}"
            raise RuntimeError(f"{name} exited with {proc.returncode}{said}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout} s")


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if it still runs `grace` seconds later; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def walrus(args: list[str], *, config: str | None = None, env: dict | None = None, check: bool = True,
           cwd: str | None = None) -> subprocess.CompletedProcess:
    cmd = [WALRUS] + (["--config", config] if config else []) + args
    return run(cmd, env=env, check=check, cwd=cwd)


def write_config(path: str, settings: dict) -> str:
    Path(path).write_text(json.dumps(settings))
    chown_to_user(path)
    return path


@dataclass
class Cluster:
    """One PostgreSQL cluster: initdb'd (or restored) data dir, its own port and socket dir."""

    data: str
    sockdir: str
    port: int = field(default_factory=free_port)
    bindir: str = field(default_factory=pg_bindir)

    @classmethod
    def init(cls, root: str, *, wal_segsize_mb: int = 16, checksums: bool = False) -> "Cluster":
        data = os.path.join(root, "data")
        run([os.path.join(pg_bindir(), "initdb"), "-D", data, "-A", "trust", "-E", "UTF8", "--no-sync",
             f"--wal-segsize={wal_segsize_mb}"] + (["--data-checksums"] if checksums else []))
        return cls(data=data, sockdir=root)

    def configure(self, **settings) -> None:
        lines = [f"port = {self.port}", f"unix_socket_directories = '{self.sockdir}'", "listen_addresses = ''",
                 "fsync = off", "max_wal_senders = 0", "wal_level = replica", "log_min_messages = info"]
        lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in settings.items()]
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, wait: bool = True) -> None:
        run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", os.path.join(self.sockdir, f"log-{self.port}"),
             "-w" if wait else "-W", "-t", "120", "start"])

    def stop(self, mode: str = "fast") -> None:
        run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop"], check=False)

    def log(self) -> str:
        try:
            return Path(self.sockdir, f"log-{self.port}").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def env(self) -> dict:
        return {"PGHOST": self.sockdir, "PGPORT": str(self.port), "PGDATABASE": "postgres"}

    def psql(self, sql: str, db: str = "postgres", check: bool = True) -> str:
        proc = run([os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                    "-h", self.sockdir, "-p", str(self.port), "-d", db, "-c", sql], check=check)
        return proc.stdout.decode().strip()

    def wait_until(self, sql: str, expected: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.psql(sql)
                if last == expected:
                    return
            except AssertionError as e:
                last = str(e)
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {sql!r} = {expected!r} (last: {last})\n{self.log()[-4000:]}")

    def wait_archived(self, segment: str, timeout: float = 120) -> None:
        """Wait until the archiver has archived `segment`: its last_archived_wal reaches it or passes it
        (autovacuum may write further segments, and the archiver moves on while we poll)."""
        self.wait_until("SELECT coalesce(left(last_archived_wal, 24) > '%s' OR last_archived_wal = '%s', false)"
                        " FROM pg_stat_archiver" % (segment, segment), "t", timeout)

    def digest(self, db: str = "postgres") -> dict[str, str]:
        """md5 of every user table's rows in a stable order: what a restore must reproduce."""
        tables = self.psql("SELECT quote_ident(schemaname)||'.'||quote_ident(relname) FROM pg_stat_user_tables "
                           "ORDER BY 1", db).split()
        out = {}
        for t in tables:
            out[t] = self.psql(f"SELECT count(*)||':'||coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '')"
                               f" FROM {t} x", db)
        return out


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
