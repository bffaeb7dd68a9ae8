"""End to end: the real-world WAL-G command lines of walg_command_lines.py, run against walrus installed as
`wal-g`, one PostgreSQL 15 cluster and file storage (issue 18: every line operators already run works).

The lines run in their list order, as one scenario. archive_command lines are set on the source cluster
and run by its archiver; restore_command lines are run by a restored cluster (a standby replaying the
archive, then an archive recovery to the end whose data is compared with the source's); the others run
with `bash -c` as the database's OS user. Each OK line has a check below, under its id, of what the line
did (not only its exit status); NOT_IMPLEMENTED lines must fail cleanly and write nothing.

WALRUS_WALG_LINES_LOG=FILE appends each line as run, its exit status and output to FILE;
WALRUS_KEEP_TEST_DIRS=1 keeps the cluster, the storage and the logs.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pytest

from tests.e2e.walg_command_lines import (ARCHIVE, CRON, LINES, NOT_IMPLEMENTED, OK, RESTORE, SYSTEMD, Line)
from tests.pgcluster import (WALRUS, Cluster, _user_env, as_user, chown_to_user, make_workdir, pg_bindir,
                             remove_tree, run, stop_process)

pytestmark = pytest.mark.e2e

SEGMENT_SIZE = 16 << 20
USER_DATA = {"x": [3], "y": 4}
SEGMENT_NAME = re.compile(r"([0-9A-F]{24})(\.[a-z0-9]+)?")
# crontab: five schedule fields (or an @macro); anything else is a command a cron job runs
CRON_SCHEDULE = re.compile(r"\s*(@\w+|[\d*/,-]+\s+[\d*/,-]+\s+[\d*/,-]+\s+[\w*/,-]+\s+[\w*/,-]+)\s+")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
LAST_RESTORE = [e.id for e in LINES if e.kind == RESTORE][-1]

SU = """#!/bin/bash
# test stand-in for su: `su [-] USER -c COMMAND` runs COMMAND in a login environment, as the user the
# tests already run as (the database's OS user): only HOME (and so ~/.walg.json) and PATH survive
cmd=
while [ $# -gt 0 ]; do
  case "$1" in -c) cmd=$2; shift 2 ;; *) shift ;; esac
done
cd "$HOME" || exit 1
exec env -i HOME="$HOME" USER="$(id -un)" LOGNAME="$(id -un)" SHELL=/bin/bash PATH="$PATH" LC_ALL=C.UTF-8 \\
  /bin/bash -c "$cmd"
"""
ENVDIR = """#!/bin/bash
# test stand-in for daemontools' envdir (not installed here): envdir DIR CHILD...
dir=$1; shift
for f in "$dir"/*; do
  name=${f##*/}
  if [ -s "$f" ]; then IFS= read -r value < "$f"; export "$name=$value"; else unset "$name"; fi
done
exec "$@"
"""


# ---------------------------------------------------------------- storage state


@dataclass
class State:
    backups: list[str]  # oldest first, by the sentinel's modification time (WAL-G's LastModified)
    mtimes: dict[str, float]
    permanent: set[str]
    files: dict[str, tuple[int, int]]  # every object: size, mtime_ns
    segments: set[str]  # archived WAL segments (24 hex digits)

    @property
    def newest(self) -> str:
        return self.backups[-1]


RETAIN_GAP = 5.0  # seconds between the two backups $RETAIN_TIME falls between: its second's rounding and
# the check's one-second margins on each side still leave each backup clearly before or after it


def read_state(storage: str) -> State:
    files = {}
    for dirpath, _dirs, names in os.walk(storage):
        for n in names:
            p = os.path.join(dirpath, n)
            try:
                st = os.stat(p)
            except FileNotFoundError:  # a temporary file renamed or removed meanwhile
                continue
            files[os.path.relpath(p, storage)] = (st.st_size, st.st_mtime_ns)
    sentinels = {k.split("/")[1][:-len("_backup_stop_sentinel.json")]: v[1] for k, v in files.items()
                 if k.startswith("basebackups_005/") and k.endswith("_backup_stop_sentinel.json")}
    backups = sorted(sentinels, key=lambda b: (sentinels[b], b))
    permanent = set()
    for b in backups:
        meta = os.path.join(storage, "basebackups_005", b, "metadata.json")
        if os.path.exists(meta) and json.loads(Path(meta).read_text()).get("is_permanent"):
            permanent.add(b)
    segments = set()
    for k in files:
        if k.startswith("wal_005/"):
            m = SEGMENT_NAME.fullmatch(k[len("wal_005/"):])
            if m:
                segments.add(m.group(1))
    return State(backups, {b: sentinels[b] / 1e9 for b in backups}, permanent, files, segments)


def segment_of(tli: int, lsn: int) -> str:
    return f"{tli:08X}{lsn >> 32:08X}{(lsn & 0xFFFFFFFF) // SEGMENT_SIZE:08X}"


def next_segment(name: str) -> str:
    number = int(name[8:16], 16) * 0x100 + int(name[16:24], 16) + 1
    return f"{name[:8]}{number // 0x100:08X}{number % 0x100:08X}"


def segment_range(first: str, last: str) -> list[str]:
    out, s = [first], first
    while s < last:
        s = next_segment(s)
        out.append(s)
    return out


def decoded(path: str) -> bytes:
    """A stored WAL object's bytes, decompressed as its extension says."""
    from walrus import codec

    ext = path.rsplit(".", 1)[1] if "." in os.path.basename(path) else ""
    out = bytearray()
    with open(path, "rb") as f:
        reader = codec.open_reader(ext, f, name=path)
        while piece := reader.read(1 << 20):
            out += piece
    return bytes(out)


def check_segment_file(path: str, name: str) -> None:
    """A whole WAL segment whose first (long) page header names it."""
    data = Path(path).read_bytes()
    assert len(data) == SEGMENT_SIZE, f"{path}: {len(data)} bytes"
    magic, _info, tli, pageaddr = struct.unpack_from("<HHIQ", data, 0)
    assert magic != 0 and tli == int(name[:8], 16), (hex(magic), tli)
    assert pageaddr == (int(name[8:16], 16) * 0x100 + int(name[16:24], 16)) * SEGMENT_SIZE


# ---------------------------------------------------------------- the world: cluster, storage, configs


@dataclass
class Result:
    line: Line
    text: str  # the line with its variables replaced
    rc: int
    out: str
    err: str
    before: State
    after: State
    vars: dict[str, str]


@dataclass
class World:
    root: str
    bin: str
    home: str
    work: str
    storage: str
    logs: str
    primary: Cluster
    env: dict[str, str]
    vars: dict[str, str]
    partial: dict[str, str] = field(default_factory=dict)  # table -> its file in the data directory
    standby: Cluster | None = None
    services: list[subprocess.Popen] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    archived: dict[str, list[str]] = field(default_factory=dict)  # line id -> the segments it archived
    archive_command: str = ""  # the source cluster's current one
    fetches: int = 0

    # -------------------------------------------------------- set-up

    @classmethod
    def create(cls) -> "World":
        root = make_workdir("walrus-walg-lines-")
        dirs = {n: os.path.join(root, n) for n in ("bin", "home", "work", "storage", "logs", "storage-copy",
                                                   "etc", "etc/wal-g.d", "etc/wal-g.d/env")}
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
            chown_to_user(d)
        os.symlink(WALRUS, os.path.join(dirs["bin"], "wal-g"))
        os.symlink(os.path.join(os.path.dirname(WALRUS), "walg-daemon-client"),
                   os.path.join(dirs["bin"], "walg-daemon-client"))
        shims = {"su": SU}
        if not shutil.which("envdir"):
            shims["envdir"] = ENVDIR
        for name, text in shims.items():
            p = os.path.join(dirs["bin"], name)
            Path(p).write_text(text)
            os.chmod(p, 0o755)

        primary = Cluster.init(root)
        try:
            return cls._create(root, dirs, primary)
        except BaseException:
            primary.stop("immediate")
            if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
                remove_tree(root)
            raise

    @classmethod
    def _create(cls, root: str, dirs: dict[str, str], primary: Cluster) -> "World":
        w = cls(root=root, bin=dirs["bin"], home=dirs["home"], work=dirs["work"], storage=dirs["storage"],
                logs=dirs["logs"], primary=primary,
                env={"PATH": f"{dirs['bin']}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": dirs["home"],
                     "PGDATA": primary.data, "LC_ALL": "C.UTF-8"}, vars={})
        server = {"PGHOST": primary.sockdir, "PGPORT": str(primary.port), "PGDATABASE": "postgres"}
        etc = dirs["etc"]
        w.write(os.path.join(dirs["home"], ".walg.json"), json.dumps({"WALG_FILE_PREFIX": w.storage, **server}))
        w.write(os.path.join(etc, "config.json"), json.dumps({"WALG_FILE_PREFIX": w.storage, **server}))
        w.write(os.path.join(etc, "wal-g.yaml"), "".join(
            f"{k}: {json.dumps(v)}\n" for k, v in {"WALG_FILE_PREFIX": w.storage, "WALG_COMPRESSION_METHOD": "brotli",
                                                    **server}.items()))
        w.write(os.path.join(etc, "wal-g.env"), "".join(
            f"{k}={v}\n" for k, v in {"WALG_FILE_PREFIX": w.storage, "WALG_COMPRESSION_METHOD": "lzma",
                                       **server}.items()))
        for k, v in {"WALG_FILE_PREFIX": w.storage, "WALG_COMPRESSION_METHOD": "zstd", **server}.items():
            w.write(os.path.join(etc, "wal-g.d/env", k), v + "\n")
        w.write(os.path.join(etc, "config-to.json"), json.dumps({"WALG_FILE_PREFIX": dirs["storage-copy"]}))
        testfile = os.path.join(w.work, "testfile")
        Path(testfile).write_bytes(secrets.token_bytes(1 << 20))
        chown_to_user(testfile)
        w.vars = {
            "PGDATA": primary.data, "PGHOST": primary.sockdir, "WALG_CONFIG": os.path.join(etc, "wal-g.yaml"),
            "WALG_CONFIG_JSON": os.path.join(etc, "config.json"), "WALG_ENV_FILE": os.path.join(etc, "wal-g.env"),
            "WALG_ENVDIR": os.path.join(etc, "wal-g.d/env"), "LOG_DIR": w.logs,
            "RESTORE_DIR": os.path.join(root, "restore"), "SOCKET": os.path.join(root, "wal-g.sock"),
            "RESTORE_SOCKET": os.path.join(root, "wal-g-restore.sock"),
            "TO_CONFIG": os.path.join(etc, "config-to.json"), "ACCESS_KEY": "AKIAIOSFODNN7EXAMPLE",
            "SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}

        w.archive_command = f"{WALRUS} wal-push %p"
        primary.configure(archive_mode="on", archive_command=w.archive_command, checkpoint_timeout="1h",
                          max_wal_senders=4)  # backup-push-remote's replication connection
        w.pg_ctl_start(primary, w.env)
        w.populate()
        return w

    def write(self, path: str, text: str) -> None:
        Path(path).write_text(text)
        chown_to_user(path)

    def pg_ctl_start(self, cluster: Cluster, env: dict[str, str]) -> None:
        """Cluster.start with an environment: archive_command and restore_command inherit it (PATH has
        `wal-g`, HOME has ~/.walg.json), as they inherit the postmaster's on a database host."""
        run([os.path.join(cluster.bindir, "pg_ctl"), "-D", cluster.data, "-l",
             os.path.join(cluster.sockdir, f"log-{cluster.port}"), "-w", "-t", "120", "start"], env=env)

    def populate(self) -> None:
        p = self.primary
        run([os.path.join(pg_bindir(), "pgbench"), "-i", "-q", "-s", "1", "-h", p.sockdir, "-p", str(p.port),
             "postgres"])
        p.psql("CREATE TABLE marker(id text PRIMARY KEY, at timestamptz DEFAULT now())")
        for db, tables in (("my_database", ["t1"]), ("another database", ["t2"]),
                           ("database", ["my_table", "other_table"]), ("other_db", ["t3"])):
            p.psql(f'CREATE DATABASE "{db}"')
            for t in tables:
                p.psql(f"CREATE TABLE {t} AS SELECT g, md5(g::text) AS v FROM generate_series(1, 2000) g", db=db)
                self.partial[f"{db}/{t}"] = p.psql(f"SELECT pg_relation_filepath('{t}')", db=db)
        before = self.mark()
        self.wait_archived([self.switch("setup")], before)

    # -------------------------------------------------------- the source cluster's archive

    def switch(self, marker: str) -> str:
        """Write a marker row and switch to a new segment; the name of the segment switched away from."""
        p = self.primary
        p.psql(f"INSERT INTO marker(id) VALUES ('{marker}')")
        segment = p.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        p.psql("SELECT pg_switch_wal()")
        return segment

    def archiver(self) -> tuple[int, int]:
        a, f = self.primary.psql("SELECT archived_count, failed_count FROM pg_stat_archiver").split("|")
        return int(a), int(f)

    def mark(self) -> tuple[int, int, int]:
        """What wait_archived measures from: archived_count, failed_count, the length of the server's log."""
        return (*self.archiver(), len(self.primary.log()))

    def wait_archived(self, segments: list[str], before: tuple[int, int, int], timeout: float = 120) -> None:
        """Until the archiver marked every segment .done and pg_stat_archiver's archived_count grew past
        before's (read before the switch). A failure of the current archive_command (failed_count grows,
        and the server's log names this command) fails at once; an earlier command's retries, still
        failing while the archiver takes the reload, do not count."""
        status = os.path.join(self.primary.data, "pg_wal", "archive_status")
        command = re.escape(self.archive_command).replace("%p", r"\S+").replace("%f", r"\S+")
        failure = re.compile("The failed archive command was: " + command + "$", re.M)
        log_start = before[2]
        deadline = time.monotonic() + timeout
        while True:
            archived, failed = self.archiver()
            if archived > before[0] and all(os.path.exists(os.path.join(status, s + ".done")) for s in segments):
                return
            if failed > before[1] and failure.search(self.primary.log()[log_start:]):
                raise AssertionError(f"archive_command failed on {segments}\n{self.primary.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {segments} to be archived\n{self.primary.log()[-3000:]}")
            time.sleep(0.1)

    def stored_copies(self, segment: str) -> list[str]:
        """The segment's objects. backup-push (lz4 here) stores its WAL itself while the archiver,
        under a line's config (brotli, lzma, zstd), may store the same segment at the same instant:
        then every copy must hold the same bytes (docs/WALG_COMPAT.md)."""
        found = sorted(n for n in os.listdir(os.path.join(self.storage, "wal_005")) if n.split(".")[0] == segment
                       and SEGMENT_NAME.fullmatch(n))
        assert found, segment
        contents = {decoded(os.path.join(self.storage, "wal_005", n)) for n in found}
        assert len(contents) == 1, (segment, found)
        return found

    def stored_segment(self, segment: str) -> str:
        return self.stored_copies(segment)[0]

    # -------------------------------------------------------- the restored cluster

    def restored_conf(self, restore_command: str) -> None:
        escaped = restore_command.replace("\\", "\\\\").replace("'", "''")
        with open(os.path.join(self.vars["RESTORE_DIR"], "postgresql.auto.conf"), "a") as f:
            f.write(f"restore_command = '{escaped}'\n")

    def restored_env(self) -> dict[str, str]:
        return {**self.env, "PGDATA": self.vars["RESTORE_DIR"]}

    def standby_replays(self, e: Line, text: str) -> None:
        """The restored cluster runs as a standby that replays the archive: started with the first
        restore_command line (reaching consistency needs the backup's WAL), reloaded with each next one;
        each must bring it a segment archived after it was set."""
        data = self.vars["RESTORE_DIR"]
        if self.standby is None:
            open(os.path.join(data, "standby.signal"), "w").close()
            chown_to_user(os.path.join(data, "standby.signal"))
            self.standby = Cluster(data=data, sockdir=self.root)
            # max_wal_senders as the primary's: a hot standby may not have fewer
            self.standby.configure(archive_mode="off", hot_standby="on", wal_retrieve_retry_interval="200ms",
                                   max_wal_senders=4)
            self.restored_conf(text)
            self.pg_ctl_start(self.standby, self.restored_env())
        else:
            self.restored_conf(text)
            run([os.path.join(self.standby.bindir, "pg_ctl"), "-D", data, "reload"])
        self.standby.wait_until("SHOW restore_command", text, timeout=30)
        before = self.mark()
        self.wait_archived([self.switch(e.id)], before)
        self.standby.wait_until(f"SELECT count(*) FROM marker WHERE id = '{e.id}'", "1", timeout=120)

    def recover_to_end(self, text: str) -> None:
        """Archive recovery (recovery.signal) to the end of the archive, then promotion: the restored
        cluster must hold exactly what the source holds."""
        data = self.vars["RESTORE_DIR"]
        assert self.standby is not None, "the restored cluster of the earlier restore_command lines is not running"
        self.standby.stop()
        os.unlink(os.path.join(data, "standby.signal"))
        assert os.path.exists(os.path.join(data, "recovery.signal"))
        self.restored_conf(text)
        expected = self.primary.digest()
        before = self.mark()
        self.wait_archived([self.switch("end-of-archive")], before)
        expected["public.marker"] = self.primary.digest()["public.marker"]
        self.pg_ctl_start(self.standby, self.restored_env())
        self.standby.wait_until("SELECT pg_is_in_recovery()", "f", timeout=180)
        got = self.standby.digest()
        assert got == expected, (got, expected)
        self.standby.stop()

    # -------------------------------------------------------- running a line

    def variables(self, e: Line, before: State) -> dict[str, str]:
        v = dict(self.vars)
        self.fetches += 1
        fetch = os.path.join(self.root, f"fetch-{self.fetches:03d}-{e.id}")
        os.mkdir(fetch, 0o700)
        chown_to_user(fetch)
        v["FETCH_DIR"] = fetch
        if before.backups:
            v["BACKUP_NAME"], v["FIRST_BACKUP"] = before.newest, before.backups[0]
            v["FIRST_NON_PERMANENT_BACKUP"] = next((b for b in before.backups if b not in before.permanent), "")
            if len(before.backups) >= 3:
                older, newer = before.backups[-3], before.backups[-2]
                short = RETAIN_GAP - (before.mtimes[newer] - before.mtimes[older])
                if short > 0:  # taken within seconds: spread in time (their order stays), so a whole-second
                    for b in before.backups[:-2]:  # time between them leaves each clearly on its side
                        path = os.path.join(self.storage, "basebackups_005", f"{b}_backup_stop_sentinel.json")
                        before.mtimes[b] -= short
                        os.utime(path, (before.mtimes[b], before.mtimes[b]))
                        key = os.path.relpath(path, self.storage)  # the state before the line is this one
                        before.files[key] = (before.files[key][0], os.stat(path).st_mtime_ns)
                t = (before.mtimes[older] + before.mtimes[newer]) / 2
                v["RETAIN_TIME"] = datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        segments = sorted(before.segments)
        with_next = [s for s in segments[:-1] if next_segment(s) in before.segments]
        if with_next:
            v["SEGMENT"] = with_next[-1]
            v["SEGMENT_OBJECT"] = "wal_005/" + self.stored_segment(with_next[-1])
        if "$LSN" in e.line:
            v["LSN"] = self.primary.psql("SELECT pg_current_wal_lsn()")
        return v

    def execute(self, e: Line) -> Result:
        before = read_state(self.storage)
        v = self.variables(e, before)
        text = VARIABLE.sub(lambda m: v.get(m.group(1) or m.group(2), m.group(0)), e.line)
        env = dict(self.env)
        for k, value in e.env:
            if value is None:
                env.pop(k, None)
            else:
                env[k] = VARIABLE.sub(lambda m: v.get(m.group(1) or m.group(2), m.group(0)), value)
        rc, out, err = 0, "", ""
        if e.kind == ARCHIVE:
            self.set_archive_command(e, text)
        elif e.kind == RESTORE:
            if e.id == LAST_RESTORE:
                self.recover_to_end(text)
            else:
                self.standby_replays(e, text)
        else:
            command = text
            if e.kind == CRON:
                command = cron_command(text)
            elif e.kind == SYSTEMD:
                command = re.sub(r"^Exec\w*=[-@:+!]*", "", text)
            argv = ["bash", "-c", command, e.id, *e.args]
            if e.kind == SYSTEMD and " daemon " in f" {command} ":
                rc, out, err = self.service(argv, env, v["SOCKET"])
            elif command.rstrip().endswith("&"):
                rc, out, err = self.background(argv, env)
            else:
                proc = run(argv, env=env, check=False, cwd=self.work, timeout=600)
                rc, out, err = proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        return Result(e, text, rc, out, err, before, read_state(self.storage), v)

    def set_archive_command(self, e: Line, text: str) -> None:
        p = self.primary
        before = self.mark()
        p.psql(f"ALTER SYSTEM SET archive_command TO $walg${text}$walg$")
        p.psql("SELECT pg_reload_conf()")
        p.wait_until("SHOW archive_command", text, timeout=30)
        self.archive_command = text
        segments = [self.switch(f"{e.id}-{i}") for i in range(3 if e.id == "archive-setting-flags" else 1)]
        self.wait_archived(segments, before)
        self.archived[e.id] = segments

    def service(self, argv: list[str], env: dict[str, str], socket: str) -> tuple[int, str, str]:
        """A systemd service: started, left running (stopped at the end)."""
        log = os.path.join(self.logs, f"service-{len(self.services)}.log")
        proc = subprocess.Popen(argv, env=_user_env(env), cwd=self.work, stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True, **as_user())
        self.services.append(proc)
        wait_for_socket(socket, proc, log)
        return 0, "", Path(log).read_text(errors="replace")

    def background(self, argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
        """A line ending in `&`: bash returns at once; what it started keeps running in its process group
        (ended at the end of the run)."""
        out, err = os.path.join(self.logs, "bg.out"), os.path.join(self.logs, "bg.err")
        proc = subprocess.Popen(argv, env=_user_env(env), cwd=self.work, stdout=open(out, "wb"),
                                stderr=open(err, "wb"), start_new_session=True, **as_user())
        rc = proc.wait(timeout=60)
        self.groups.append(proc.pid)
        return rc, Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace")

    def close(self) -> None:
        for c in (self.standby, self.primary):
            if c is not None:
                c.stop("immediate")
        for proc in self.services:
            stop_process(proc, grace=30)
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(self.root)


def cron_command(line: str) -> str:
    """What cron runs of a crontab line: no schedule (nor the user field of /etc/cron.d); an unescaped `%`
    ends the command (the rest is its standard input), `\\%` is a `%`."""
    m = CRON_SCHEDULE.match(line)
    if not m:
        return line
    command = line[m.end():]
    first, _, rest = command.partition(" ")
    if first in ("postgres", "root"):
        command = rest
    out, i = [], 0
    while i < len(command):
        if command.startswith("\\%", i):
            out.append("%")
            i += 2
        elif command[i] == "%":
            break
        else:
            out.append(command[i])
            i += 1
    return "".join(out)


def wait_for_socket(path: str, proc: subprocess.Popen | None, log: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc is None or proc.poll() is None, Path(log).read_text(errors="replace")
        assert time.monotonic() < deadline, f"{path} did not appear\n{Path(log).read_text(errors='replace')}"
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# ---------------------------------------------------------------- checks


def meta(w: World, name: str) -> dict:
    return json.loads(Path(w.storage, "basebackups_005", name, "metadata.json").read_text())


def sentinel(w: World, name: str) -> dict:
    return json.loads(Path(w.storage, "basebackups_005", f"{name}_backup_stop_sentinel.json").read_text())


def label_start(directory: str) -> int:
    text = Path(directory, "backup_label").read_text()
    hi, lo = re.search(r"START WAL LOCATION: ([0-9A-F]+)/([0-9A-F]+)", text).groups()
    return (int(hi, 16) << 32) | int(lo, 16)


def restored(w: World, directory: str, name: str) -> None:
    """directory holds backup `name`: its backup_label starts where the backup did, pg_control is there."""
    assert os.path.exists(os.path.join(directory, "global", "pg_control"))
    assert os.path.exists(os.path.join(directory, "PG_VERSION"))
    assert label_start(directory) == meta(w, name)["start_lsn"], name


def new_backup(r: Result) -> str:
    """Exactly one backup was added, nothing removed; its name."""
    assert r.rc == 0, f"exit {r.rc}\n{r.err[-3000:]}"
    assert r.after.backups[:-1] == r.before.backups, (r.before.backups, r.after.backups)
    assert len(r.after.backups) == len(r.before.backups) + 1
    return r.after.newest


def parts(w: World, name: str) -> list[str]:
    return sorted(os.listdir(os.path.join(w.storage, "basebackups_005", name, "tar_partitions")))


def wal_range(w: World, name: str) -> list[str]:
    m = meta(w, name)
    tli = int(name[5:13], 16)
    return segment_range(name[5:29], segment_of(tli, m["finish_lsn"] - 1))


def backups_kept(w: World, r: Result, keep: set[str]) -> None:
    """Retention with --confirm: exactly `keep` stays, in order; each kept backup keeps its WAL, and no
    WAL older than the oldest kept backup is left (WAL-G deletes it too)."""
    assert r.rc == 0, f"exit {r.rc}\n{r.out[-2000:]}\n{r.err[-3000:]}"
    assert r.after.backups == [b for b in r.before.backups if b in keep], \
        (r.before.backups, r.after.backups, sorted(keep))
    for b in r.after.backups:
        missing = [s for s in wal_range(w, b) if s not in r.after.segments]
        assert not missing, (b, missing)
    if r.after.backups:
        oldest = min(b[5:29] for b in r.after.backups)
        assert not [s for s in r.after.segments if s < oldest], oldest


def retain(n: int) -> Callable[[World, Result], None]:
    """WAL-G's retain N: the N newest (permanent ones count) and every permanent backup stay."""
    def check(w: World, r: Result) -> None:
        backups_kept(w, r, set(r.before.backups[-n:]) | r.before.permanent)
    return check


def nothing_written(r: Result) -> None:
    assert r.rc == 0, f"exit {r.rc}\n{r.err[-3000:]}"
    assert r.after.files == r.before.files


def check_backup_push_verify(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    deadline = time.monotonic() + 120  # nohup ... &: the backup goes on after the line returns
    while (now := read_state(w.storage)).backups == r.before.backups:
        assert time.monotonic() < deadline, "the background backup-push wrote no sentinel in 120 s"
        time.sleep(0.2)
    [name] = [b for b in now.backups if b not in r.before.backups]
    assert sentinel(w, name).get("UserData") == {"project_id": 7, "backup_id": 42}
    described = json.load(open(os.path.join(w.storage, "basebackups_005", name, "files_metadata.json")))
    assert not [f for f, d in described["Files"].items() if "CorruptBlocks" in d]
    assert "verifying data pages" in open(os.path.join(w.logs, "backup-push.log")).read()


def check_wal_verify(w: World, r: Result) -> None:
    nothing_written(r)
    assert "[wal-verify] integrity check status: OK" in r.out and "[wal-verify] timeline check status: OK" in r.out
    assert "Current cluster timeline: 1" in r.out


def check_wal_show(w: World, r: Result) -> None:
    nothing_written(r)
    rows = [line for line in r.out.splitlines() if line.startswith("|   1 |")]
    assert len(rows) == 1 and "| OK " in rows[0], r.out
    assert rows[0].rstrip(" |").split("|")[-1].strip() == str(len(r.before.backups)), r.out


def archived_as(ext: str, log: str | None = None) -> Callable[[World, Result], None]:
    def check(w: World, r: Result) -> None:
        for s in w.archived[r.line.id]:
            assert f"{s}.{ext}" in w.stored_copies(s)
        if log:
            assert os.path.exists(os.path.join(w.logs, log))
    return check


def one_backup(w: World, r: Result) -> None:
    new_backup(r)


def one_full_backup(w: World, r: Result) -> None:
    assert "DeltaFrom" not in sentinel(w, new_backup(r))


def check_backup_push_docs(w: World, r: Result) -> None:
    name = new_backup(r)
    assert meta(w, name)["pg_version"] // 10000 == 15
    assert os.path.exists(os.path.join(w.storage, "basebackups_005", name, "files_metadata.json"))
    assert [p for p in parts(w, name) if p.endswith(".tar.lz4")], parts(w, name)


def check_backup_push_remote(w: World, r: Result) -> None:
    name = new_backup(r)
    names = parts(w, name)
    assert "pg_control.tar.lz4" in names and not [p for p in names if p.startswith("backup_label.tar")], names
    assert sentinel(w, name)["Spec"]["tablespaces"] == []  # WAL-G's remote mode always writes Spec


def check_backup_push_cron_su(w: World, r: Result) -> None:
    new_backup(r)
    assert os.path.exists(os.path.join(w.logs, "walg_backup.log"))


def check_backup_push_systemd(w: World, r: Result) -> None:
    name = new_backup(r)
    assert parts(w, name) and all(p.endswith(".tar.br") for p in parts(w, name)), parts(w, name)


def check_permanent_push(w: World, r: Result) -> None:
    name = new_backup(r)
    assert meta(w, name)["is_permanent"] is True


def user_data_is(expected: object) -> Callable[[World, Result], None]:
    def check(w: World, r: Result) -> None:
        name = new_backup(r)
        assert sentinel(w, name).get("UserData") == expected, sentinel(w, name).get("UserData")
    return check


def listed_names(r: Result) -> list[str]:
    assert r.rc == 0, f"exit {r.rc}\n{r.err[-3000:]}"
    lines = [line for line in r.out.splitlines() if line.strip()]
    assert lines and "name" in lines[0].lower(), r.out  # the header
    return [line.split()[0] for line in lines[1:]]


def check_list_plain(w: World, r: Result) -> None:
    assert listed_names(r) == r.before.backups, r.out


def check_list_detail(w: World, r: Result) -> None:
    assert sorted(listed_names(r)) == sorted(r.before.backups), r.out


def check_list_pretty(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    for b in r.before.backups:
        assert b in r.out, (b, r.out)
    assert "+--" in r.out or "┌" in r.out, r.out


def check_list_json(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    assert [b["backup_name"] for b in json.loads(r.out)] == r.before.backups, r.out


def check_list_pretty_detail_json(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    listed = json.loads(r.out)
    assert "\n    " in r.out  # indented
    assert {b["backup_name"] for b in listed} == set(r.before.backups)
    assert {b["backup_name"] for b in listed if b["is_permanent"]} == r.before.permanent != set()


def check_list_tail_cut(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    assert r.out.strip() == r.before.newest, r.out


def check_list_spilo(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    rows = [line.split() for line in r.out.splitlines() if line.strip()]
    assert [row[0] for row in rows] == r.before.backups, r.out
    for row in rows:  # Spilo: `date +%s -ud "$last_modified"`
        assert subprocess.run(["date", "+%s", "-ud", row[1]], capture_output=True).returncode == 0, row


def permanent_newest(flag: bool) -> Callable[[World, Result], None]:
    def check(w: World, r: Result) -> None:
        assert r.rc == 0, r.err
        assert meta(w, r.before.newest)["is_permanent"] is flag
        assert r.after.backups == r.before.backups
    return check


def check_fetch_playground(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    d = r.vars["RESTORE_DIR"]
    restored(w, d, r.before.newest)
    assert os.path.exists(os.path.join(d, "recovery.signal"))


def check_daemon_restore(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    wait_for_socket(r.vars["RESTORE_SOCKET"], None, os.path.join(w.logs, "bg.err"))
    assert group_alive(w.groups[-1])


def check_daemon_service(w: World, r: Result) -> None:
    assert w.services[-1].poll() is None and os.path.exists(r.vars["SOCKET"])


def replayed(w: World, r: Result) -> None:
    pass  # World.standby_replays / recover_to_end checked it


def fetched(name_var: str) -> Callable[[World, Result], None]:
    def check(w: World, r: Result) -> None:
        assert r.rc == 0, f"exit {r.rc}\n{r.err[-3000:]}"
        restored(w, r.vars["FETCH_DIR"], r.vars[name_var])
    return check


def check_fetch_user_data(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    match = [b for b in r.before.backups if sentinel(w, b).get("UserData") == USER_DATA]
    assert len(match) == 1, match
    restored(w, r.vars["FETCH_DIR"], match[0])


def check_fetch_complete(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    d = r.vars["FETCH_DIR"]
    restored(w, d, r.before.newest)
    files = json.loads(Path(w.storage, "basebackups_005", r.before.newest, "files_metadata.json").read_text())["Files"]
    missing = [f for f in files if not os.path.lexists(os.path.join(d, f.lstrip("/")))]
    assert not missing, missing[:20]


def check_fetch_restore_only(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    d = r.vars["FETCH_DIR"]
    restored(w, d, r.before.newest)
    for table, path in w.partial.items():
        p = os.path.join(d, path)
        has = os.path.exists(p) and os.path.getsize(p) > 0
        assert has == (table in ("my_database/t1", "another database/t2", "database/my_table")), (table, path, has)


def check_fetch_mask(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    d = r.vars["FETCH_DIR"]
    got = []
    for dirpath, _dirs, names in os.walk(d):
        got += [os.path.relpath(os.path.join(dirpath, n), d) for n in names]
    assert [f for f in got if f.startswith("base/1/")], got
    others = [f for f in got if not f.startswith("base/1/") and f not in ("backup_label", "tablespace_map",
                                                                             "global/pg_control")]
    assert not others, others[:20]


def check_wal_fetch_manual(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    check_segment_file(os.path.join(r.vars["FETCH_DIR"], r.vars["SEGMENT"]), r.vars["SEGMENT"])


def check_wal_fetch_missing(w: World, r: Result) -> None:
    assert r.rc == 74, f"exit {r.rc}\n{r.err}"
    # nothing restored; the prefetcher, started before the call's own download, may have made its
    # folder (WAL-G's .wal-g/prefetch), which holds no segment
    assert [n for n in os.listdir(r.vars["FETCH_DIR"]) if n != ".wal-g"] == []
    assert not [f for _d, _s, files in os.walk(os.path.join(r.vars["FETCH_DIR"], ".wal-g"))
                for f in files if not f.startswith(".")]


def check_wal_prefetch(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    nxt = next_segment(r.vars["SEGMENT"])
    check_segment_file(os.path.join(r.vars["FETCH_DIR"], ".wal-g", "prefetch", nxt), nxt)


def check_st_ls(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    names = [line.split()[-1].rstrip("/") for line in r.out.splitlines()[1:] if line.strip()]
    assert {"basebackups_005", "wal_005"} <= set(names), r.out


def check_st_ls_r(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    assert f"basebackups_005/{r.before.newest}_backup_stop_sentinel.json" in r.out, r.out[-2000:]
    assert r.vars["SEGMENT_OBJECT"] in r.out


def check_st_cat(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    name = r.before.newest
    got = Path(r.vars["FETCH_DIR"], f"{name}_backup_stop_sentinel.json").read_bytes()
    assert got == Path(w.storage, "basebackups_005", f"{name}_backup_stop_sentinel.json").read_bytes()


def check_st_get(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    check_segment_file(os.path.join(r.vars["FETCH_DIR"], r.vars["SEGMENT"]), r.vars["SEGMENT"])


def check_st_put(w: World, r: Result) -> None:
    import brotli

    assert r.rc == 0, r.err
    stored = Path(w.storage, "testfolder", "testfile.br").read_bytes()
    assert brotli.decompress(stored) == Path(w.work, "testfile").read_bytes()


def check_st_put_duplicate(w: World, r: Result) -> None:
    assert r.rc != 0, r.out + r.err
    assert r.after.files == r.before.files


def check_st_get_testfile(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    assert Path(w.work, "fetched_testfile").read_bytes() == Path(w.work, "testfile").read_bytes()


def check_st_rm(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    assert "testfolder/testfile.br" in r.before.files and "testfolder/testfile.br" not in r.after.files


def exit_zero(w: World, r: Result) -> None:
    assert r.rc == 0, f"exit {r.rc}\n{r.err[-3000:]}"


def check_st_check_write(w: World, r: Result) -> None:
    nothing_written(r)


def check_copy(w: World, r: Result) -> None:
    assert r.rc == 0, r.err
    target = read_state(os.path.join(w.root, "storage-copy"))
    assert sorted(target.backups) == sorted(r.before.backups), (target.backups, r.before.backups)
    for b in target.backups:
        missing = [s for s in wal_range(w, b) if s not in target.segments]
        assert not missing, (b, missing)


def check_delete_target_user_data_dry(w: World, r: Result) -> None:
    nothing_written(r)
    match = [b for b in r.before.backups if sentinel(w, b).get("UserData") == USER_DATA]
    assert len(match) == 1 and match[0] in r.out + r.err, (match, r.out)


def check_retain_after(w: World, r: Result) -> None:
    assert r.rc == 0, f"exit {r.rc}\n{r.err[-3000:]}"
    t = datetime.strptime(r.vars["RETAIN_TIME"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    must_keep = {r.before.newest} | r.before.permanent | {b for b in r.before.backups if r.before.mtimes[b] > t + 1}
    must_go = {b for b in r.before.backups if r.before.mtimes[b] < t - 1} - must_keep
    assert must_go, "nothing to delete: the scenario changed"
    backups_kept(w, r, set(r.after.backups))
    assert must_keep <= set(r.after.backups) and not must_go & set(r.after.backups), \
        (r.before.backups, r.after.backups, r.vars["RETAIN_TIME"])


def check_delete_target(w: World, r: Result) -> None:
    assert r.rc == 0, f"exit {r.rc}\n{r.err[-3000:]}"
    gone = r.vars["FIRST_NON_PERMANENT_BACKUP"]
    assert r.after.backups == [b for b in r.before.backups if b != gone]
    assert r.after.segments == r.before.segments


def check_delete_garbage(w: World, r: Result) -> None:
    backups_kept(w, r, set(r.before.backups))


def check_delete_everything_refused(w: World, r: Result) -> None:
    assert r.before.permanent
    assert r.rc != 0, r.out
    assert r.after.files == r.before.files


def check_delete_everything_force(w: World, r: Result) -> None:
    assert r.rc == 0, f"exit {r.rc}\n{r.err[-3000:]}"
    assert r.after.backups == [] and r.after.segments == set()
    listed = run(["wal-g", "backup-list", "--json"], env=w.env, cwd=w.work)
    assert json.loads(listed.stdout) == []


CHECKS: dict[str, Callable[[World, Result], None]] = {
    "archive-plain": archived_as("lz4"),
    "archive-env-keys-log": archived_as("lz4", "archive_command.log"),
    "archive-timeout-config": archived_as("br"),
    "archive-envfile-config-after": archived_as("lzma"),
    "archive-envdir-spilo": archived_as("zst"),
    "archive-setting-flags": archived_as("lz4"),
    "archive-ready-rename": lambda w, r: (archived_as("br")(w, r), no_ready_left(w)),
    "daemon-service": check_daemon_service,
    "archive-daemon-client": archived_as("lz4"),
    "archive-ansible-role": archived_as("br", "wal-g-archive.log"),
    "backup-push-verify-supabase": check_backup_push_verify,
    "wal-verify": check_wal_verify,
    "wal-show": check_wal_show,
    "backup-push-docs": check_backup_push_docs,
    "backup-push-remote": check_backup_push_remote,
    "backup-push-cron-su": check_backup_push_cron_su,
    "backup-push-systemd": check_backup_push_systemd,
    "backup-push-permanent": check_permanent_push,
    "backup-push-f-playground": one_backup,
    "backup-push-full-after": one_backup,
    "backup-push-delta-from-name": one_full_backup,
    "backup-push-add-user-data": user_data_is(USER_DATA),
    "backup-push-sentinel-env": user_data_is({"backup_id": 42, "project_id": 7}),
    "backup-push-rating-composer": one_backup,
    "backup-push-pghost": one_backup,
    "backup-push-turbo": one_backup,
    "list-envdir-gitlab": check_list_plain,
    "list-detail": check_list_detail,
    "list-pretty": check_list_pretty,
    "list-json": check_list_json,
    "list-pretty-detail-json": check_list_pretty_detail_json,
    "list-tail-cut": check_list_tail_cut,
    "list-spilo-parse": check_list_spilo,
    "mark-permanent": permanent_newest(True),
    "mark-impermanent": permanent_newest(False),
    "fetch-playground": check_fetch_playground,
    "daemon-restore": check_daemon_restore,
    "restore-plain": replayed,
    "restore-config-after": replayed,
    "restore-echo": replayed,
    "restore-envdir": replayed,
    "restore-daemon-client": replayed,
    "restore-ansible-role": replayed,
    "fetch-config-between": fetched("FIRST_BACKUP"),
    "fetch-target-user-data": check_fetch_user_data,
    "fetch-reverse-skip": check_fetch_complete,
    "fetch-restore-only": check_fetch_restore_only,
    "fetch-mask": check_fetch_mask,
    "wal-fetch-manual": check_wal_fetch_manual,
    "wal-fetch-missing": check_wal_fetch_missing,
    "wal-prefetch": check_wal_prefetch,
    "st-ls": check_st_ls,
    "st-ls-r": check_st_ls_r,
    "st-cat-redirect": check_st_cat,
    "st-get": check_st_get,
    "st-put": check_st_put,
    "st-put-duplicate": check_st_put_duplicate,
    "st-get-testfile": check_st_get_testfile,
    "st-rm": check_st_rm,
    "st-check-read": exit_zero,
    "st-check-write": check_st_check_write,
    "copy-docs": check_copy,
    "delete-target-user-data-dry": check_delete_target_user_data_dry,
    "delete-garbage-archives-dry": lambda w, r: nothing_written(r),
    "delete-before-30-days-cron": lambda w, r: backups_kept(w, r, set(r.before.backups)),
    "delete-retain-10-weekly": retain(10),
    "delete-retain-full-7-unit": retain(7),
    "delete-retain-Full-5-envdir": retain(5),
    "delete-retain-full-5-sentinel-time": retain(5),
    "delete-retain-after": check_retain_after,
    "delete-target-first-non-permanent": check_delete_target,
    "delete-garbage-confirm": check_delete_garbage,
    "delete-everything-permanent": check_delete_everything_refused,
    "delete-everything-force": check_delete_everything_force,
}


def no_ready_left(w: World) -> None:
    left = [f for f in os.listdir(os.path.join(w.primary.data, "pg_wal", "archive_status")) if f.endswith(".ready")]
    assert left == [], left


def check_not_implemented(w: World, r: Result) -> None:
    """Exit 1 with ERROR and HINT on stderr naming the feature; nothing written to the storage or to
    $FETCH_DIR. A backgrounded line (`... >> LOG 2>&1 &`) is judged by its log, once it has finished."""
    text, rc = r.err, r.rc
    if r.text.rstrip().endswith("&"):
        deadline = time.monotonic() + 60
        while group_alive(w.groups[-1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(w.groups[-1]), "the backgrounded command is still running"
        log = re.search(r">>\s*(\S+)", r.text).group(1)
        text, rc = Path(log).read_text(errors="replace"), 1
        after = read_state(w.storage)
    else:
        after = r.after
    assert rc == 1, f"exit {rc}\n{r.out}\n{text}"
    assert "ERROR" in text and "HINT" in text, text
    assert r.line.what.lower() in text.lower(), (r.line.what, text)
    assert after.files == r.before.files
    assert os.listdir(r.vars["FETCH_DIR"]) == []


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def world():
    w = World.create()
    try:
        yield w
    finally:
        w.close()


def test_every_line_is_checked():
    ids = [e.id for e in LINES]
    assert len(ids) == len(set(ids))
    assert set(CHECKS) == {e.id for e in LINES if e.outcome == OK}
    for e in LINES:
        assert e.outcome in (OK, NOT_IMPLEMENTED) and e.what and e.origin
        assert "wal-g" in e.line or "walg-daemon-client" in e.line
        assert not re.search(r"/usr/(local/)?bin/wal-g|/opt/wal-g", e.line), e.line
    assert LINES[-1].id == "delete-everything-force"


@pytest.mark.parametrize("entry", LINES, ids=[e.id for e in LINES])
def test_line(world: World, entry: Line):
    r = world.execute(entry)
    if os.environ.get("WALRUS_WALG_LINES_LOG"):
        with open(os.environ["WALRUS_WALG_LINES_LOG"], "a") as f:
            f.write(f"\n===== {entry.id} rc={r.rc}\n$ {r.text}\n--- out\n{r.out[-3000:]}\n--- err\n{r.err[-3000:]}\n")
    if entry.outcome == NOT_IMPLEMENTED:
        check_not_implemented(world, r)
    else:
        CHECKS[entry.id](world, r)
