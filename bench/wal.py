"""The WAL side of the bench: archiving under pgbench, draining a backlog, and replaying archived WAL."""
from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

from bench import report
from bench.cgroups import Cgroups
from bench.measure import drop_caches, machine_busy_s, tree_bytes
from bench.s3 import S3rver
from bench.tools import barman_compression, user_dir, user_env
from bench.waltools import (PREFETCH_WINDOW, BarmanWal, PgBackRestWal, WalE, WalSetup, WalTool, walg_tools,
                            walrus_tools)
from tests.pgcluster import Cluster, chown_to_user, pg_bindir, remove_tree, run, run_user, stop_process

MIB = 2 ** 20
WAL_OPS = ("archive", "drain", "replay")
BASE_TOOL = "walrus-daemon"  # every WAL table's ratio column is relative to it
DRAIN_PEERS = ("pgbackrest", "pgbackrest-async", "wal-e", "barman")  # the peers the drain target names
MAX_WAL_SENDERS = 10  # a restored copy must match it, or hot standby refuses to start recovery
SAMPLE_S = 0.05
RELOAD_SETTLE_S = 0.3
POLL_S = 0.01
DEFAULT_WAL_TOOLS = "walrus-daemon,walrus,walrus-bg4,walrus-noprefetch,pgbackrest,pgbackrest-async,wal-e,barman"

# Writes exactly `segments` whole WAL segments: range UPDATEs of pgbench_accounts (pgbench-like heap and index
# records, and full-page images after the CHECKPOINT that precedes it), committed in batches, until the insert
# position enters the segment `segments` after the one it started in. A batch never updates more rows than the
# bytes left to that boundary allow at row_budget bytes a row (the worst case: full-page images of the old and
# new heap page and of an index page that splits), so the last one crosses it by less than a segment.
WALGEN = """
CREATE OR REPLACE PROCEDURE bench_walgen(segments int, row_budget int, max_batch int) LANGUAGE plpgsql AS $$
DECLARE
  seg numeric := (SELECT setting::numeric FROM pg_settings WHERE name = 'wal_segment_size');
  target numeric := (floor((pg_current_wal_insert_lsn() - '0/0'::pg_lsn) / seg) + segments) * seg;
  accounts int := (SELECT max(aid) FROM pgbench_accounts);
  remaining numeric;
  batch int;
  first int;
BEGIN
  LOOP
    remaining := target - (pg_current_wal_insert_lsn() - '0/0'::pg_lsn);
    EXIT WHEN remaining <= 0;
    batch := least(max_batch, greatest(1, floor(remaining / row_budget)))::int;
    first := 1 + floor(random() * greatest(accounts - batch, 1))::int;
    UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN first AND first + batch - 1;
    COMMIT;
  END LOOP;
END $$;
"""
ROW_BUDGET = 40 * 1024  # worst-case WAL bytes of updating one row (see WALGEN)
MAX_BATCH = 5000


class StepFailed(RuntimeError):
    """A WAL step did not complete."""


def wal_storage(args: argparse.Namespace) -> str:
    """Where the WAL repositories live: s3 with --storage s3, else files (gcs and azure are backup/restore only)."""
    return "s3" if args.storage == "s3" else "file"


def select_wal_tools(args: argparse.Namespace, venv: str) -> tuple[list[WalTool], list[str]]:
    """The WAL tools named by --wal-tools (WAL-G's when --walg is given) that can run here on wal_storage();
    WAL-E is installed here if named and on files."""
    known: dict[str, WalTool] = {t.name: t for t in walrus_tools()}
    known.update({t.name: t for t in (PgBackRestWal(False), PgBackRestWal(True), BarmanWal())})
    names = [n.strip() for n in args.wal_tools.split(",") if n.strip()]
    warnings = []
    if args.walg:
        client = args.walg_daemon_client or _beside(args.walg, "walg-daemon-client")
        known.update({t.name: t for t in walg_tools(os.path.abspath(args.walg), client)})
        names += ["wal-g-daemon", "wal-g"]
        if client is None:
            warnings.append("WAL-G daemon: no walg-daemon-client beside the wal-g binary or given with "
                            "--walg-daemon-client; its archive_command/restore_command use walrus's "
                            "walg-daemon-client (the same socket protocol).")
    wale = WalE(venv)
    known[wale.name] = wale
    tools = []
    for name in dict.fromkeys(names):
        tool = known.get(name)
        if tool is None:
            raise SystemExit(f"unknown WAL tool {name!r}; known: {', '.join(known)}")
        reason = tool.storage_missing(wal_storage(args))
        if tool is wale and not reason:
            wale.install()
        reason = reason or tool.missing()
        if reason:
            warnings.append(f"skipped {tool.label}: {reason}")
        else:
            tools.append(tool)
    return tools, warnings


def _beside(binary: str, name: str) -> str | None:
    path = os.path.join(os.path.dirname(os.path.abspath(binary)), name)
    return path if os.access(path, os.X_OK) else None


def rounds(tools: list[WalTool], repeat: int, failed: dict[str, str]) -> Iterator[tuple[int, WalTool]]:
    """Every tool once per round, each round starting one tool later, so no tool always runs first."""
    for n in range(repeat):
        shift = n % len(tools) if tools else 0
        for tool in tools[shift:] + tools[:shift]:
            if tool.name not in failed:
                yield n, tool


def ready_count(status_dir: str) -> int:
    return sum(1 for n in os.listdir(status_dir) if n.endswith(".ready"))


@dataclass
class Window:
    """CPU counters at the start of a timed window."""

    t: float
    tool: float | None
    server: float | None
    groups: float | None
    machine: float
    own: float


def _own_cpu_s() -> float:
    """This process (its samplers and polls). Its children are not added: pgbench and pg_ctl are counted in
    their groups already, and what is left (sync) spends its time in the kernel's writeback."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


class WalSampler(threading.Thread):
    """20 Hz: the .ready backlog, optionally the server's WAL write position, and the tool group's summed RSS."""

    def __init__(self, status_dir: str | None, cg: Cgroups, group: str, conninfo: dict | None) -> None:
        super().__init__(daemon=True)
        self.status_dir, self.cg, self.group, self.conninfo = status_dir, cg, group, conninfo
        self.samples: list[tuple[float, int | None, int | None, int]] = []  # t, ready, lsn, rss
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        conn = psycopg.connect(**self.conninfo, autocommit=True) if self.conninfo else None
        try:
            while not self._stop_event.wait(0 if not self.samples else SAMPLE_S):
                self._sample(conn)
            self._sample(conn)  # the state at the end of the step
        finally:
            if conn:
                conn.close()

    def _sample(self, conn: psycopg.Connection | None) -> None:
        ready = ready_count(self.status_dir) if self.status_dir else None
        lsn = int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0]) if conn else None
        self.samples.append((time.monotonic() - self._t0, ready, lsn, self.cg.rss(self.group)))

    def finish(self) -> None:
        self._stop_event.set()
        self.join()

    def peak_rss(self) -> int:
        return max((s[3] for s in self.samples), default=0)


class WalBench:
    """One archiving cluster and every WAL tool's archive burst, backlog drain and replay."""

    def __init__(self, args: argparse.Namespace, ops: list[str], tools: list[WalTool], root: str, out: str,
                 say: Callable[[str], None]) -> None:
        self.args, self.ops, self.tools, self.root, self.say = args, ops, tools, root, say
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.cg = Cgroups()
        self.rows: list[dict] = []
        self.errors: list[str] = []
        self.leftover_notes: list[str] = []
        self.versions: dict[str, str] = {}
        self.samples: dict[str, dict[str, list]] = {op: {} for op in WAL_OPS}
        self.clusters: list[Cluster] = []
        self.daemons: list[subprocess.Popen] = []
        self.source: Cluster | None = None
        self.conn: psycopg.Connection | None = None
        self.setup: WalSetup | None = None
        self.segment = args.wal_segsize * MIB
        self.cold_failed = False
        self.replay_segment_mib: float | None = None
        self.replay_start_lsn = 0
        self.replay_last_segment = 0
        self.store = S3rver(root) if wal_storage(args) == "s3" else None

    # -- the archiving cluster ------------------------------------------------------------------
    def conninfo(self, c: Cluster) -> dict:
        return {"host": c.sockdir, "port": c.port, "dbname": "postgres", "user": run_user() or getpass.getuser()}

    def create_source(self) -> None:
        a = self.args
        if self.store:
            self.say(f"==> s3 endpoint for the WAL repositories: {self.store.version()} with TLS on 127.0.0.1")
            with self.cg.inside("storage"):  # its CPU is then neither a tool's nor noise
                self.store.start(os.path.join(self.logs, "wal-s3-emulator.log"))
        self.say(f"==> WAL cluster: initdb ({a.wal_segsize} MiB segments), pgbench -i -s {a.wal_scale}")
        c = Cluster.init(self.root, wal_segsize_mb=a.wal_segsize)
        self.clusters.append(c)
        c.configure(archive_mode="on", archive_command="", max_wal_senders=MAX_WAL_SENDERS, autovacuum="off",
                    max_wal_size="8GB", checkpoint_timeout="30min")
        with self.cg.inside("server"):
            c.start()
        self.source = c
        self.conn = psycopg.connect(**self.conninfo(c), autocommit=True)
        self.conn.execute(WALGEN)
        self.load_tables()
        self.setup = WalSetup(source=c, root=self.root, compression=a.compression, workers=a.workers,
                              segment_mib=a.wal_segsize, store=self.store)

    def load_tables(self) -> None:
        """pgbench's tables, loaded afresh (pgbench -i drops and recreates them). Every operation starts
        here, so what it measures does not depend on the operations run before it: after the archive
        bursts' updates and VACUUMs the table has free space on every page, its updates become small
        same-page records, and the same 1 GiB of WAL took PostgreSQL's redo twice the CPU."""
        c = self.source
        self.set_archive_command("/bin/true")  # the load's WAL is nobody's to archive
        run([os.path.join(pg_bindir(), "pgbench"), "-i", "-q", "-s", str(self.args.wal_scale), "-h", c.sockdir,
             "-p", str(c.port), "postgres"], timeout=3600)
        # one generation and VACUUM, so every measured one starts from a table with the same free space
        self.generate(2)
        self.housekeeping()

    @property
    def status_dir(self) -> str:
        return os.path.join(self.source.data, "pg_wal", "archive_status")

    def value(self, query: str):
        return self.conn.execute(query).fetchone()[0]

    def lsn(self) -> int:
        return int(self.value("SELECT pg_current_wal_lsn() - '0/0'"))

    def set_archive_command(self, command: str, reload: bool = True) -> None:
        """ALTER SYSTEM; with reload, also pg_reload_conf() and a pause for the archiver to apply it (it does
        so asynchronously, within milliseconds; no WAL is written meanwhile)."""
        self.conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(command)))
        if reload:
            self.conn.execute("SELECT pg_reload_conf()")
            time.sleep(RELOAD_SETTLE_S)

    def wait_backlog_empty(self, timeout: float, what: str) -> float:
        """Seconds until no .ready file is left; StepFailed after timeout."""
        t0 = time.monotonic()
        while ready_count(self.status_dir):
            if time.monotonic() - t0 > timeout:
                failed = self.value("SELECT failed_count FROM pg_stat_archiver")
                raise StepFailed(f"{ready_count(self.status_dir)} segment(s) still .ready after {timeout:.0f} s "
                                 f"waiting for {what} ({failed} archive_command failures so far; see the server log "
                                 f"{os.path.join(self.source.sockdir, f'log-{self.source.port}')})")
            time.sleep(POLL_S)
        return time.monotonic() - t0

    def quiesce(self) -> None:
        """The same starting state for every timed step: dead rows reclaimed, then a checkpoint (full-page
        images follow it)."""
        self.conn.execute("VACUUM")
        self.conn.execute("CHECKPOINT")

    def generate(self, segments: int) -> None:
        self.conn.execute(f"CALL bench_walgen({int(segments)}, {ROW_BUDGET}, {MAX_BATCH})")

    def housekeeping(self) -> None:
        """Before a step: archive_command /bin/true discards what earlier steps (and a failed tool) left and
        the WAL of VACUUM and CHECKPOINT, so the step starts with no backlog."""
        self.set_archive_command("/bin/true")
        self.quiesce()
        self.wait_backlog_empty(300, "the earlier WAL to be discarded")

    # -- shared pieces of a timed step -----------------------------------------------------------
    @contextlib.contextmanager
    def daemon(self, tool: WalTool, repo: str, pgdata: str, tag: str) -> Iterator[str | None]:
        """Run the tool's daemon (if it has one) for pgdata, in the tool's group, around the body."""
        socket_path = os.path.join(self.root, f"{tool.name}.sock")
        argv = tool.daemon(self.setup, repo, socket_path)
        if argv is None:
            yield None
            return
        log_path = os.path.join(self.logs, f"{tool.name}-{tag}-daemon.log")
        with open(log_path, "ab") as log, self.cg.inside(tool.name):
            proc = subprocess.Popen(argv, user=run_user(), env=user_env({"PGDATA": pgdata}), cwd=self.root,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.daemons.append(proc)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(socket_path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise StepFailed(f"{tool.label} daemon did not open {socket_path}; see {log_path}")
                time.sleep(0.05)
            yield socket_path
        finally:
            _stop(proc)
            self.daemons.remove(proc)

    def open_window(self, tool: WalTool) -> Window:
        return Window(time.monotonic(), self.cg.cpu_s(tool.name), self.cg.cpu_s("server"), self.cg.cpu_s(),
                      machine_busy_s(), _own_cpu_s())

    def close_window(self, w: Window, tool: WalTool) -> dict:
        """wall, tool CPU, server CPU and the CPU the rest of the machine used (noise) since open_window."""
        wall = time.monotonic() - w.t
        machine, own = machine_busy_s() - w.machine, _own_cpu_s() - w.own
        groups = self.cg.cpu_s()
        delta = (lambda now, then: None if now is None or then is None else now - then)
        groups_used = delta(groups, w.groups)
        return {"wall_s": wall, "cpu_s": delta(self.cg.cpu_s(tool.name), w.tool),
                "server_cpu_s": delta(self.cg.cpu_s("server"), w.server),
                "background_cpu_s": None if groups_used is None else max(0.0, machine - groups_used - own)}

    def cold(self) -> bool:
        ok = drop_caches()
        if not ok and not self.cold_failed:
            self.say("WARNING: cannot drop the page cache: drain and replay timings are from a WARM cache")
            self.cold_failed = True
        return ok

    def repo(self, tool: WalTool, op: str, n: int) -> str:
        return os.path.join(self.root, f"{tool.name}-{op}-repo-{n}")

    # a repository: a local directory, or with --storage s3 a key prefix named after it
    def repo_bytes(self, repo: str) -> int:
        return self.store.stored_bytes(repo) if self.store else tree_bytes(repo)

    def repo_files(self, repo: str) -> str:
        """The directory holding repo's objects as files (s3rver keeps one file per object, named by its key)."""
        return self.store.prefix_dir(repo) if self.store else repo

    def sync_repo(self, repo: str) -> None:
        """`sync -f` of the filesystem the repository's objects are on (s3rver does not fsync)."""
        subprocess.run(["sync", "-f", self.store.data if self.store else repo], check=True)

    def remove_repo(self, repo: str) -> None:
        if self.store:
            self.store.remove(repo)
        remove_tree(repo)

    def archive_command(self, tool: WalTool, repo: str, socket_path: str | None) -> str:
        return self.cg.shell_prefix(tool.name) + tool.push_command(self.setup, repo, socket_path)

    def log_tail(self, c: Cluster) -> str:
        return c.log()[-1500:]

    # -- archive: a pgbench burst with the tool as archive_command --------------------------------
    def archive(self) -> None:
        a = self.args
        self.measure("archive", f": pgbench -c {a.burst_clients} -T {a.burst_seconds}", self.archive_run,
                     lambda r: f"{r['wal_segments']} segments written, backlog at the end {r['backlog_end']}, "
                               f"max {r['backlog_max']}, caught up in {r['catchup_s']:.1f} s", "catchup_s")

    def archive_run(self, tool: WalTool, n: int) -> dict:
        a, c = self.args, self.source
        repo = self.repo(tool, "archive", n)
        tool.new_repo(self.setup, repo)
        with self.daemon(tool, repo, c.data, f"archive-{n}") as socket_path:
            self.housekeeping()
            self.set_archive_command(self.archive_command(tool, repo, socket_path))
            ready0, lsn0, failed0 = ready_count(self.status_dir), self.lsn(), self.value(
                "SELECT failed_count FROM pg_stat_archiver")
            sampler = WalSampler(self.status_dir, self.cg, tool.name, self.conninfo(c))
            log_path = os.path.join(self.logs, f"{tool.name}-archive-{n}.log")
            window = self.open_window(tool)
            sampler.start()
            try:
                with open(log_path, "ab") as log:
                    with self.cg.inside("load"):
                        proc = subprocess.Popen(
                            [os.path.join(pg_bindir(), "pgbench"), "-n", "-c", str(a.burst_clients), "-j",
                             str(min(a.burst_clients, os.cpu_count() or 1)), "-T", str(a.burst_seconds),
                             "-h", c.sockdir, "-p", str(c.port), "postgres"],
                            user=run_user(), env=user_env({}), stdout=subprocess.PIPE, stderr=log,
                            stdin=subprocess.DEVNULL)
                    out = proc.communicate(timeout=a.burst_seconds + 600)[0].decode(errors="replace")
                    log.write(out.encode())
                burst = time.monotonic() - window.t
                backlog_end, lsn1 = ready_count(self.status_dir), self.lsn()
                if proc.returncode != 0:
                    raise StepFailed(f"pgbench exited {proc.returncode}; see {log_path}")
                catchup = self.wait_backlog_empty(max(300.0, 10.0 * a.burst_seconds),
                                                  f"{tool.label} to archive the burst's WAL")
                self.sync_repo(repo)
                m = self.close_window(window, tool)
            finally:
                sampler.finish()
        failures = self.value("SELECT failed_count FROM pg_stat_archiver") - failed0
        seg0 = lsn0 // self.segment
        written = lsn1 // self.segment - seg0
        in_burst = [s for s in sampler.samples if s[0] <= burst]
        samples = [[round(t, 3), ready, lsn // self.segment - seg0, lsn // self.segment - seg0 - ready + ready0]
                   for t, ready, lsn, _rss in sampler.samples]
        tps = re.search(r"tps = ([0-9.]+)", out)
        stored = self.repo_bytes(repo)
        self.remove_repo(repo)
        archived = written - backlog_end + ready0
        return {"operation": "archive", "tool": tool.label, "tool_name": tool.name,
                "wall_s": burst, "tps": float(tps.group(1)) if tps else None,
                "wal_mib": (lsn1 - lsn0) / MIB, "wal_segments": written, "archived_segments": archived,
                "backlog_start": ready0, "backlog_end": backlog_end,
                "backlog_max": max((s[1] for s in in_burst), default=backlog_end),
                "catchup_s": catchup, "cpu_s": m["cpu_s"], "server_cpu_s": m["server_cpu_s"],
                "cpu_ms_per_segment": (m["cpu_s"] * 1000 / (written + ready0))
                if m["cpu_s"] is not None and written + ready0 else None,
                "peak_rss_mib": sampler.peak_rss() / MIB, "output_mib": stored / MIB,
                "archive_failures": failures, "window_s": m["wall_s"], "background_cpu_s": m["background_cpu_s"],
                "samples": samples}

    # -- drain: a backlog of N segments, then the tool's archive_command -------------------------
    def drain(self) -> None:
        self.measure("drain", f": a backlog of {self.args.drain_segments} segments", self.drain_run,
                     lambda r: f"{r['wall_s']:.2f} s, {r['segments_s']:.1f} segments/s, {r['verified']}", "wall_s")

    def drain_run(self, tool: WalTool, n: int) -> dict:
        want = self.args.drain_segments
        repo = self.repo(tool, "drain", n)
        tool.new_repo(self.setup, repo)
        with self.daemon(tool, repo, self.source.data, f"drain-{n}") as socket_path:
            self.housekeeping()
            self.set_archive_command("")  # archiving paused: an empty archive_command archives nothing
            for _ in range(3):  # tops up segments the previous command archived before the pause took effect
                self.generate(want - ready_count(self.status_dir))
                if ready_count(self.status_dir) >= want:
                    break
            names = sorted(f[:-len(".ready")] for f in os.listdir(self.status_dir) if f.endswith(".ready"))
            if len(names) != want:
                raise StepFailed(f"the backlog is {len(names)} segments, not {want}: {', '.join(names)}")
            self.set_archive_command(self.archive_command(tool, repo, socket_path), reload=False)
            cold = self.cold()
            sampler = WalSampler(self.status_dir, self.cg, tool.name, None)
            window = self.open_window(tool)
            sampler.start()
            try:
                self.conn.execute("SELECT pg_reload_conf()")
                self.wait_backlog_empty(max(600.0, 10.0 * want), f"{tool.label} to drain the backlog")
                self.sync_repo(repo)
                m = self.close_window(window, tool)
            finally:
                sampler.finish()
        missing = tool.missing_segments(self.repo_files(repo), names)
        stored = self.repo_bytes(repo)
        self.remove_repo(repo)
        wall = m["wall_s"]
        return {"operation": "drain", "tool": tool.label, "tool_name": tool.name, "wall_s": wall,
                "segments": want, "segments_s": want / wall, "mib_s": want * self.segment / MIB / wall,
                "cpu_s": m["cpu_s"], "server_cpu_s": m["server_cpu_s"], "peak_rss_mib": sampler.peak_rss() / MIB,
                "output_mib": stored / MIB, "cold_cache": cold, "background_cpu_s": m["background_cpu_s"],
                "verified": "verified" if not missing else f"MISSING {len(missing)} (first {missing[0]})",
                "samples": [[round(t, 3), ready] for t, ready, _lsn, _rss in sampler.samples]}

    # -- replay: recovery of a base backup through the tool's restore_command ---------------------
    def replay(self) -> None:
        tools = [t for t in self.tools if "replay" in t.ops]
        if not tools:
            return
        repos = self.replay_setup(tools)
        self.measure("replay", "", lambda tool, n: self.replay_run(tool, repos[tool.family], n),
                     lambda r: f"{r['wall_s']:.2f} s, {r['mib_s']:.1f} MiB/s of WAL, {r['verified']}", "wall_s")

    def measure(self, op: str, what: str, run_one: Callable[[WalTool, int], dict], summary: Callable[[dict], str],
                key: str) -> None:
        """Every tool's runs of `op`, in rounds; one row per tool: the median by `key`, or its failure."""
        a = self.args
        tools = [t for t in self.tools if op in t.ops]
        runs: dict[str, list[dict]] = {t.name: [] for t in tools}
        failed: dict[str, str] = {}
        label = (lambda t: t.replay_label) if op == "replay" else (lambda t: t.label)
        for n, tool in rounds(tools, a.repeat, failed):
            self.say(f"==> {op:<7} {label(tool)}{what} (run {n + 1}/{a.repeat})")
            try:
                runs[tool.name].append(run_one(tool, n))
                self.say(f"    {summary(runs[tool.name][-1])}")
            except StepFailed as e:
                self.say(f"    FAILED: {e}")
                failed[tool.name] = str(e)
        for tool in tools:
            if tool.name in failed:
                self.rows.append(_failed_row(label(tool), tool.name, op, failed[tool.name]))
            else:
                self.add_row(runs[tool.name], key)

    def replay_setup(self, tools: list[WalTool]) -> dict[str, str]:
        """A base backup, then N segments archived by every family into its own repository, at once: one
        composite archive_command. The archiving cluster is stopped afterwards."""
        want = self.args.replay_segments
        families: dict[str, WalTool] = {}
        for t in tools:
            families.setdefault(t.family, t)
        repos = {f: os.path.join(self.root, f"{f}-replay-repo") for f in families}
        self.say(f"==> replay setup: base backup, then {want} segments archived by "
                 f"{', '.join(families)} (one archive_command)")
        for family, t in families.items():
            t.new_repo(self.setup, repos[family])
        composite = " && ".join(f"( {t.push_command(self.setup, repos[f], None, solo=True)} )"
                                for f, t in families.items())
        self.housekeeping()
        self.set_archive_command(composite)
        c, base = self.source, os.path.join(self.root, "replay-base")
        run([os.path.join(pg_bindir(), "pg_basebackup"), "-D", base, "-Fp", "-X", "none", "--checkpoint=fast",
             "-h", c.sockdir, "-p", str(c.port)], timeout=3600)
        self.generate(want)
        self.wait_backlog_empty(max(600.0, 20.0 * want), "every family to archive the replay WAL")
        # the segment being written now is not archived: recovery ends in the one before it
        self.replay_last_segment = self.lsn() // self.segment - 1
        with open(os.path.join(base, "backup_label")) as f:
            start = re.search(r"START WAL LOCATION: ([0-9A-F]+)/([0-9A-F]+)", f.read())
        self.replay_start_lsn = (int(start.group(1), 16) << 32) + int(start.group(2), 16)
        self.replay_segment_mib = (self.replay_last_segment + 1) * self.segment / MIB - self.replay_start_lsn / MIB
        c.stop()
        self.conn.close()
        self.conn = None
        return repos

    def replay_run(self, tool: WalTool, repo: str, n: int) -> dict:
        target = os.path.join(self.root, f"{tool.name}-replay-{n}")
        scratch = user_dir(os.path.join(self.root, f"{tool.name}-replay-{n}-scratch"))
        subprocess.run(["cp", "-a", os.path.join(self.root, "replay-base"), target], check=True)
        signal_file = os.path.join(target, "recovery.signal")
        open(signal_file, "a").close()
        chown_to_user(signal_file)
        c = Cluster(data=target, sockdir=self.root)
        self.clusters.append(c)
        try:
            with self.daemon(tool, repo, target, f"replay-{n}") as socket_path:
                c.configure(archive_mode="off", max_wal_senders=MAX_WAL_SENDERS, autovacuum="off",
                            restore_command=self.cg.shell_prefix(tool.name)
                            + tool.fetch_command(self.setup, repo, target, socket_path, scratch))
                cold = self.cold()
                sampler = WalSampler(None, self.cg, tool.name, None)
                window = self.open_window(tool)
                sampler.start()
                try:
                    with self.cg.inside("server"):
                        c.start(wait=False)
                    replayed_lsn = self.wait_recovered(c)
                    m = self.close_window(window, tool)
                finally:
                    sampler.finish()
                    c.stop()
                    self.clusters.remove(c)
            # prefetchers and async helpers wind down before the next run; one that hangs is ended and reported
            leftovers = self.cg.end_leftovers(tool.name, 30)
            if leftovers:
                self.leftover_notes.append(
                    f"{tool.replay_label} replay run {n + 1}: {len(leftovers)} process(es) of the tool still ran 30 s "
                    f"after the server stopped and were ended: {'; '.join(leftovers)}")
        finally:
            log = c.log()
            with open(os.path.join(self.logs, f"{tool.name}-replay-{n}-server.log"), "w") as f:
                f.write(log)
            if not (self.args.keep and n == self.args.repeat - 1):
                remove_tree(target)
            remove_tree(scratch)
        reached = replayed_lsn // self.segment
        wal_mib = (replayed_lsn - self.replay_start_lsn) / MIB
        return {"operation": "replay", "tool": tool.replay_label, "tool_name": tool.name, "wall_s": m["wall_s"],
                "wal_mib": wal_mib, "mib_s": wal_mib / m["wall_s"], "cpu_s": m["cpu_s"],
                "server_cpu_s": m["server_cpu_s"], "peak_rss_mib": sampler.peak_rss() / MIB, "cold_cache": cold,
                "background_cpu_s": m["background_cpu_s"],
                "verified": "verified" if reached >= self.replay_last_segment else
                f"STOPPED {self.replay_last_segment - reached} segment(s) short",
                "left_running": len(leftovers),
                "samples": [[round(t, 3), rss] for t, _r, _l, rss in sampler.samples]}

    def add_row(self, runs: list[dict], key: str) -> None:
        row = _median_row(runs, key)
        self.samples[row["operation"]][row["tool"]] = row.pop("samples")
        self.rows.append(row)

    def wait_recovered(self, c: Cluster) -> int:
        """Poll until the server left recovery; returns the last replayed LSN (bytes)."""
        deadline = time.monotonic() + (120 if self.args.smoke else 3600)
        conn = None
        try:
            while time.monotonic() < deadline:
                if conn is None:
                    try:
                        conn = psycopg.connect(**self.conninfo(c), autocommit=True, connect_timeout=5)
                    except psycopg.OperationalError:
                        time.sleep(SAMPLE_S)  # not started, or not consistent yet
                        continue
                row = conn.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() - '0/0'").fetchone()
                if not row[0]:
                    return int(row[1])
                time.sleep(SAMPLE_S)
        finally:
            if conn:
                conn.close()
        raise StepFailed(f"recovery did not finish in time\n{self.log_tail(c)}")

    # -- the run ----------------------------------------------------------------------------------
    def run_all(self) -> None:
        """The cluster (a failure here ends the WAL part), then each operation; one that fails as a whole
        (its setup) is reported in errors and the next one still runs."""
        self.versions = {t.name: t.version() for t in self.tools}  # before close() removes WAL-E's venv
        self.create_source()
        fresh = True
        for op in WAL_OPS:
            if op in self.ops:
                try:
                    if not fresh:
                        self.say(f"==> {op}: pgbench -i -s {self.args.wal_scale} (each operation starts from the same tables)")
                        self.load_tables()
                    fresh = False
                    getattr(self, op)()
                except (StepFailed, AssertionError, psycopg.Error) as e:
                    self.say(f"    {op} FAILED: {e}")
                    self.errors.append(f"{op} FAILED: {e}")


    def close(self) -> list[str]:
        """Stop what is left; returns notes on tool processes that had to be ended."""
        for proc in list(self.daemons):
            _stop(proc)
        if self.conn is not None:
            self.conn.close()
        for c in self.clusters:
            c.stop("immediate")
        if self.store:
            self.store.stop()
        notes = self.cg.close()
        if self.args.keep:
            self.say(f"kept {self.root}")
        else:
            remove_tree(self.root)
        return notes

    # -- reporting --------------------------------------------------------------------------------
    def notes(self, warnings: list[str]) -> list[str]:
        a = self.args
        out = [
            f"WAL cluster: pgbench scale {a.wal_scale}, {a.wal_segsize} MiB segments, autovacuum off, fsync=off "
            "(PostgreSQL's own writes are not synced; every tool's stored objects are, see below); VACUUM and "
            f"CHECKPOINT before every timed step. Compression {a.compression} for every tool but WAL-E (lzop, its "
            f"only method) and Barman (below); {a.workers} workers: WALG_UPLOAD_CONCURRENCY (the daemons' "
            "look-ahead and WAL-G's parallel wal-push), pgBackRest process-max, WAL-E --pool-size (Barman has "
            "none). Each tool runs in its fast mode: "
            "pgBackRest --archive-async; the walrus and WAL-G daemons with PG_READY_RENAME=true (a segment stored "
            "ahead of the archiver is marked .done, so one archive_command call covers several, as WAL-E does).",
            f"archive: pgbench -n -c {a.burst_clients} -T {a.burst_seconds} (TPC-B-like) with the tool as "
            "archive_command. WAL MiB/segs: written during the burst (pg_current_wal_lsn); archived = segments "
            "completed minus those still .ready when pgbench exits (WAL-E and the daemons mark the segments they "
            "push ahead .done themselves, so pg_stat_archiver undercounts them); backlog end counts a segment "
            "being pushed at that instant; catch-up s = from then until no .ready is left; CPU s covers burst and "
            "catch-up.",
            f"drain: {a.drain_segments} whole segments written with archiving paused (archive_command = ''), by "
            "range UPDATEs of pgbench_accounts after a CHECKPOINT; then the tool's archive_command is set, the page "
            "cache dropped, and wall s runs from pg_reload_conf() until no .ready file is left, plus `sync -f` of "
            "the repository (WAL-E's file storage does not fsync). segs/s = segments / wall s; verified = every "
            "segment is in the repository.",
            f"replay: pg_basebackup -Fp -X none, then {a.replay_segments} segments "
            + (f"({self.replay_segment_mib:.0f} MiB from the backup's start) " if self.replay_segment_mib else "")
            + "archived by every family into its own repository with one composite archive_command; each run "
            "starts a copy of the base backup with recovery.signal and the tool's restore_command, from a cold "
            "page cache; wall s runs from pg_ctl start until pg_is_in_recovery() is false (end of the archive). "
            f"WAL MiB = last replayed LSN - backup start. Prefetch window {PREFETCH_WINDOW} segments for every "
            f"tool that prefetches (walrus/WAL-G WALG_DOWNLOAD_CONCURRENCY default, pgBackRest "
            f"archive-get-queue-max={PREFETCH_WINDOW * a.wal_segsize}MiB); walrus no prefetch = "
            "WALG_DOWNLOAD_CONCURRENCY=1; WAL-E --prefetch 0, because its prefetch does not run on Python 3 (each "
            "prefetch child dies in socket.fromfd() on stdin, ENOTSOCK, leaving a marker wal-fetch waits on). "
            "verified = recovery reached the last archived segment.",
        ]
        if self.store:
            out.append(f"WAL repositories: {S3rver.title}, {self.store.version()}, one key prefix per repository "
                       "(walrus: WALG_S3_PREFIX, AWS_ENDPOINT, path style, WALG_S3_CA_CERT_FILE in its config file; "
                       "pgBackRest: repo1-type=s3; Barman: --endpoint-url, boto3 with AWS_CA_BUNDLE). s3rver runs "
                       "in a cgroup of its own: its CPU is in no tool's CPU s and not in the noise figure. stored "
                       "MiB: s3rver's object files; `sync -f` of its folder ends drain's wall s. WAL-E runs on "
                       "files only (skipped on s3).")
        elif a.storage != "file":
            out.append(f"WAL repositories: local files (--storage {a.storage} applies to backup and restore only).")
        if any(t.family == "barman" for t in self.tools):
            out.append(f"Barman cloud: barman-cloud-wal-archive --{barman_compression()} %p (Barman 3.4 has gzip, "
                       f"bzip2 and snappy only: snappy stands for {a.compression} when python-snappy works, else gzip "
                       "at level 9, as for its backups), one Python process and one upload per segment, no "
                       "look-ahead or parallelism; replay: barman-cloud-wal-restore %f %p, one process per segment "
                       "that lists the segment's folder, downloads and decompresses it: 3.4 has no prefetch (no "
                       "option for it), so it runs without one, like walrus-noprefetch.")
        if self.cg.available:
            out.append("CPU s: every process of the tool (each archive/restore_command and its children, daemons, "
                       "pgBackRest's async processes, prefetchers), from a cgroup v2 group's cpu.stat: exact, "
                       "exited and detached processes included. srv CPU s: the PostgreSQL server's processes "
                       "(archiver, startup's replay, backends) likewise; pgbench is in neither. peak RSS: summed "
                       "VmRSS of the tool group's processes, sampled at 20 Hz (misses processes under 50 ms).")
        else:
            out.append(f"WARNING: CPU and memory of the WAL tools not measured ({self.cg.reason}).")
        return out + self.leftover_notes + warnings

    def targets(self) -> list[str]:
        """The issues' targets, met or not, from this run's rows; a failed or unverified run fails its target."""
        out = [f"{r['operation']}: {r['tool']} did not complete ({r.get('error') or r['verified']}): NOT MET"
               for r in self.rows if r["tool_name"] in (BASE_TOOL, "walrus") and not _completed(r)]
        by = {(r["operation"], r["tool_name"]): r for r in self.rows if _completed(r)}
        arch = by.get(("archive", BASE_TOOL))
        if arch:
            worst = max(arch["runs_backlog_end"])
            out.append(f"archive: walrus daemon's .ready backlog at the end of the burst: "
                       f"{', '.join(map(str, arch['runs_backlog_end']))} (target 0): {_verdict(worst == 0)}")
        base = by.get(("drain", BASE_TOOL))
        peers = [by[("drain", p)] for p in DRAIN_PEERS if ("drain", p) in by]
        if base and peers:
            best = max(peers, key=lambda r: r["segments_s"])
            ratio = base["segments_s"] / best["segments_s"]
            out.append(f"drain: walrus daemon {base['segments_s']:.2f} segments/s, fastest peer {best['tool']} "
                       f"{best['segments_s']:.2f}: {ratio:.2f}x (target >= 1.3x): {_verdict(ratio >= 1.3)}")
        for op in ("drain", "replay"):
            barman = by.get((op, "barman"))
            for name in (BASE_TOOL, "walrus"):
                r = by.get((op, name))
                if r and barman:
                    out.append(f"{op}: {r['tool']} is {r['wall_s'] / barman['wall_s']:.2f}x Barman's time "
                               f"({r['wall_s']:.2f} s against {barman['wall_s']:.2f} s)")
        slow, pgbr = by.get(("replay", "walrus-noprefetch")), by.get(("replay", "pgbackrest-async"))
        for name in (BASE_TOOL, "walrus"):
            r = by.get(("replay", name))
            if r and slow:
                ratio = slow["wall_s"] / r["wall_s"]
                out.append(f"replay: {r['tool']} is {ratio:.2f}x as fast as {slow['tool']} (target >= 2x): "
                           f"{_verdict(ratio >= 2)}")
            if r and pgbr:
                ratio = pgbr["wall_s"] / r["wall_s"]
                out.append(f"replay: {r['tool']} is {ratio:.2f}x as fast as {pgbr['tool']} (target > 1x): "
                           f"{_verdict(ratio > 1)}")
        return out

    def tables(self) -> list[str]:
        a = self.args
        text = []
        titles = {"archive": f"archive (pgbench -c {a.burst_clients} -T {a.burst_seconds}, {a.compression}, "
                             f"{a.workers} workers, {a.wal_segsize} MiB segments)",
                  "drain": f"drain (a backlog of {a.drain_segments} segments, {a.compression}, {a.workers} workers)",
                  "replay": f"replay ({a.replay_segments} archived segments through restore_command, "
                            f"{a.compression}, {a.workers} workers)"}
        for op in WAL_OPS:
            rows = [r for r in self.rows if r["operation"] == op]
            if rows:
                text += [titles[op], report.table_of(rows, report.WAL_COLUMNS[op]), ""]
        return text

    def plot(self, plt, out: str) -> None:
        a = self.args
        if self.samples["archive"]:
            report.plot_backlog(plt, os.path.join(out, "backlog-archive.png"), self.samples["archive"],
                                f"archive: pgbench -c {a.burst_clients} -T {a.burst_seconds}, {a.compression}, "
                                f"{a.workers} workers", progress=True, mark_s=a.burst_seconds)
        if self.samples["drain"]:
            report.plot_backlog(plt, os.path.join(out, "backlog-drain.png"), self.samples["drain"],
                                f"drain: {a.drain_segments} segments, {a.compression}, {a.workers} workers",
                                progress=False, mark_s=None)


def _completed(row: dict) -> bool:
    """Ran without error, and (drain, replay) verified."""
    return not row.get("error") and row.get("verified") in (None, "verified")


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM a daemon we started and wait for it; SIGKILL it after 30 s."""
    stop_process(proc, grace=30)


def _median_row(runs: list[dict], key: str) -> dict:
    """The run with the median `key` (the lower median for an even count) stands for the tool; every run's
    figures are kept in runs_* lists."""
    values = [r[key] for r in runs]
    row = dict(runs[values.index(statistics.median_low(values))])
    for r in runs:
        if r is not row:
            r.pop("samples", None)
    row.update(runs_wall_s=[round(r["wall_s"], 3) for r in runs],
               runs_window_s=[round(r.get("window_s", r["wall_s"]), 3) for r in runs],
               runs_background_cpu_s=[None if r["background_cpu_s"] is None else round(r["background_cpu_s"], 2)
                                      for r in runs],
               error=None, wall_ratio=None)
    if row["operation"] == "archive":
        row["runs_backlog_end"] = [r["backlog_end"] for r in runs]
    return row


def _failed_row(label: str, name: str, operation: str, error: str) -> dict:
    return {"operation": operation, "tool": label, "tool_name": name, "error": error,
            "verified": "FAILED" if operation in ("drain", "replay") else None}

