"""Benchmark: backup and restore of one pgbench cluster by walrus, pgBackRest, pg_basebackup (and WAL-G if given),
WAL archiving, backlog draining and replay by walrus, pgBackRest and WAL-E (and WAL-G), (--ops delta) walrus
delta backups against pgBackRest incr/diff, and (--ops receive) walrus wal-receive's lag under a pgbench burst."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psycopg

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from bench import report  # noqa: E402
from bench.measure import StepMetrics, cold_read_mib_s, largest_file, run_timed, seq_write_mib_s, tree_bytes  # noqa: E402
from bench.azure_store import AzuriteStore  # noqa: E402
from bench.gcs_store import FakeGcs  # noqa: E402
from bench.s3 import S3rver  # noqa: E402
from bench.tools import (Barman, PgBackRest, PgBaseBackup, Setup, Tool, WalgLike, barman_compression,  # noqa: E402
                         WalrusRemote, user_dir, user_env, walrus_tool)
from bench.wal import DEFAULT_WAL_TOOLS, WAL_OPS, WalBench, select_wal_tools  # noqa: E402
from tests.pgcluster import (WALRUS, Cluster, chown_to_user, make_workdir, pg_bindir, remove_tree, run,  # noqa: E402
                             run_user, write_config)

MIB = 2 ** 20
STORES = {"s3": S3rver, "gcs": FakeGcs, "azure": AzuriteStore}
DEFAULT_TOOLS = "walrus,walrus-preadv,pgbackrest,pg_basebackup,barman"
ALL_OPS = ("backup", "restore") + WAL_OPS + ("delta", "receive")
DEFAULT_OPS = ("backup", "restore") + WAL_OPS  # delta, receive only when asked: a cluster of its own and minutes of load
MAX_WAL_SENDERS = 10  # restored clusters must match it, or hot standby refuses to start recovery
# --encryption: walrus again with a key, so the tables show what encryption costs (keys via the environment)
ENCRYPTION = {
    "libsodium": {"WALG_LIBSODIUM_KEY": "walrus_bench_libsodium_key_32byt"},
    "openpgp": {"WALG_PGP_KEY_PATH": os.path.join(REPO_ROOT, "tests", "fixtures", "walrus-cv25519.sec.asc")},
}


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=int, default=200,
                    help="pgbench scale of backup/restore, delta and receive (200 is ~3 GiB; default 200)")
    ap.add_argument("--compression", choices=["lz4", "zstd"], default="lz4")
    ap.add_argument("--storage", choices=["file", *STORES], default="file",
                    help="where backup/restore repositories live: local files (default), or an emulator on loopback "
                         "with TLS: s3 (s3rver from npm), gcs (fake-gcs-server from PyPI), azure (Azurite from "
                         "npm); the WAL operations use s3 with --storage s3, else files")
    ap.add_argument("--workers", type=int, default=2, help="parallel workers for every tool that has them (default 2)")
    ap.add_argument("--tools", default=DEFAULT_TOOLS,
                    help=f"comma-separated, in order (default {DEFAULT_TOOLS}); wal-g and walrus-rs are added "
                         "when their binaries are given")
    ap.add_argument("--walg", metavar="PATH", help="a WAL-G binary to include")
    ap.add_argument("--encryption", default="", metavar="KINDS",
                    help=f"comma-separated of {', '.join(ENCRYPTION)}: also back up and restore with walrus "
                         "(io_uring) encrypting that way, as tools walrus-<kind>")
    ap.add_argument("--budgets", default="", metavar="MIB",
                    help="comma-separated WALRUS_MEMORY_BUDGET values in MiB: also back up and restore with walrus "
                         "(io_uring) at each, as tools walrus-budget<MIB> (larger parts and chunks on cloud storage)")
    ap.add_argument("--walrus-rs", metavar="PATH", help="a WAL-RUS binary to include")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed runs per tool and operation; the row shown is the run with the median wall time")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (clusters stopped)")
    ap.add_argument("--out", help="results directory (default bench/results/<UTC stamp>)")
    ap.add_argument("--workdir", default=None, help="parent of the work directory (default: the system temp dir); "
                                                    "its filesystem is the one measured")
    ap.add_argument("--ops", default=",".join(DEFAULT_OPS),
                    help=f"comma-separated operations of {', '.join(ALL_OPS)} (default {','.join(DEFAULT_OPS)}); "
                         "restore needs backup")
    ap.add_argument("--wal-tools", default=DEFAULT_WAL_TOOLS,
                    help=f"WAL tools, in order (default {DEFAULT_WAL_TOOLS}); wal-g-daemon and wal-g are added "
                         "with --walg")
    ap.add_argument("--walg-daemon-client", metavar="PATH",
                    help="WAL-G's walg-daemon-client (default: beside --walg, else walrus's)")
    ap.add_argument("--wal-scale", type=int, default=20, help="pgbench scale of the WAL cluster (default 20)")
    ap.add_argument("--wal-segsize", type=int, default=16,
                    help="WAL segment size in MiB of the WAL and receive clusters (default 16)")
    ap.add_argument("--burst-seconds", type=int, default=60,
                    help="pgbench -T of the archive and receive bursts (default 60)")
    ap.add_argument("--burst-clients", type=int, default=4,
                    help="pgbench -c of the archive and receive bursts (default 4)")
    ap.add_argument("--drain-segments", type=int, default=50, help="backlog the drain starts from (default 50)")
    ap.add_argument("--replay-segments", type=int, default=64,
                    help="segments of WAL replayed (default 64: 1 GiB of 16 MiB segments)")
    ap.add_argument("--delta-share", type=float, default=10.0, metavar="PCT",
                    help="delta: pgbench updates accounts among the first PCT%% of aids only (default 10)")
    ap.add_argument("--delta-seconds", type=int, default=60,
                    help="delta: pgbench -T between the full backups and the deltas (default 60)")
    ap.add_argument("--delta-chain-seconds", type=int, default=20,
                    help="delta: pgbench -T before each of the chain's three deltas (default 20)")
    ap.add_argument("--delta-clients", type=int, default=4, help="delta: pgbench -c of those loads (default 4)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, one run each: checks the bench works (< 90 s)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.scale, args.repeat = 1, 1
        args.wal_scale, args.wal_segsize, args.burst_seconds = 1, 1, 2
        args.drain_segments, args.replay_segments = 8, 6
        args.delta_seconds, args.delta_chain_seconds = 2, 1
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in ALL_OPS]
    if unknown or not ops:
        ap.error(f"--ops: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(ALL_OPS)}")
    if "restore" in ops and "backup" not in ops:
        ap.error("--ops: restore needs backup (it restores the backups taken in the same run)")
    args.encryption = [k.strip() for k in args.encryption.split(",") if k.strip()]
    if any(k not in ENCRYPTION for k in args.encryption):
        ap.error(f"--encryption: choose from {', '.join(ENCRYPTION)}")
    args.ops = [o for o in ALL_OPS if o in ops]
    try:
        args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        ap.error("--budgets: MiB as whole numbers, e.g. 64,96")
    numbers = (args.repeat, args.workers, args.scale, args.wal_scale, args.wal_segsize, args.burst_seconds,
               args.burst_clients, args.drain_segments, args.replay_segments, args.delta_seconds,
               args.delta_chain_seconds, args.delta_clients)
    if min(numbers) < 1:
        ap.error("--repeat, --workers, the scales, sizes, seconds, clients and segment counts must be at least 1")
    if not 0 < args.delta_share <= 100:
        ap.error("--delta-share is a percentage above 0, at most 100")
    if args.wal_segsize & (args.wal_segsize - 1) or args.wal_segsize > 1024:
        ap.error("--wal-segsize must be a power of two from 1 to 1024 (initdb's rule)")
    return args


def select_tools(args: argparse.Namespace) -> tuple[list[Tool], list[str]]:
    """The tools named by --tools (and the extra ones), minus those that cannot run here or on --storage."""
    known: dict[str, Tool] = {t.name: t for t in (walrus_tool("io_uring"), walrus_tool("preadv"), WalrusRemote(),
                                                  PgBackRest(), PgBaseBackup(), Barman())}
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    for kind in args.encryption:
        name = f"walrus-{kind}"
        known[name] = WalgLike(name, f"walrus ({kind})", WALRUS, {"WALRUS_IO_METHOD": "io_uring", **ENCRYPTION[kind]})
        names.append(name)
    for mib in args.budgets:
        name = f"walrus-budget{mib}"
        known[name] = WalgLike(name, f"walrus ({mib} MiB budget)", WALRUS,
                               {"WALRUS_IO_METHOD": "io_uring", "WALRUS_MEMORY_BUDGET": f"{mib}MiB"})
        names.append(name)
    if args.walg:
        known["wal-g"] = WalgLike("wal-g", "WAL-G", os.path.abspath(args.walg))
        names.append("wal-g")
    if args.walrus_rs:
        known["walrus-rs"] = WalgLike("walrus-rs", "WAL-RUS", os.path.abspath(args.walrus_rs))
        names.append("walrus-rs")
    tools, warnings = [], []
    for name in dict.fromkeys(names):
        tool = known.get(name)
        if tool is None:
            raise SystemExit(f"unknown tool {name!r}; known: {', '.join(known)}")
        reason = tool.missing() or tool.storage_missing(args.storage)
        if reason:
            warnings.append(f"skipped {tool.label}: {reason}")
        else:
            tools.append(tool)
    if args.storage != "file" and (reason := STORES[args.storage].missing()):
        raise SystemExit(f"--storage {args.storage}: {reason}")
    return tools, warnings


def walrus_reads_io_method() -> bool:
    """Whether the installed walrus consults WALRUS_IO_METHOD at all (else both variants run one reader)."""
    import walrus
    pkg = os.path.dirname(walrus.__file__)
    for dirpath, _dirs, files in os.walk(pkg):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), errors="replace") as f:
                    if "WALRUS_IO_METHOD" in f.read():
                        return True
    return False


def walrus_source() -> str:
    """The commit walrus runs from, and whether its working tree differs (walrus is installed editable)."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line for line in git("status", "--porcelain", "--", "walrus").splitlines() if line]
    return head + (f" + uncommitted changes in {len(changed)} walrus file(s)" if changed else "")


def content_digest(c: Cluster) -> dict[str, str]:
    """Row count and the sum of 60 bits of every row's md5, per user table.

    tests/pgcluster.Cluster.digest aggregates each table into one text value, which passes PostgreSQL's
    1 GB limit from about scale 90 on; a sum is order-independent and needs no big value.
    """
    tables = c.psql("SELECT quote_ident(schemaname)||'.'||quote_ident(relname) FROM pg_stat_user_tables "
                    "ORDER BY 1").split()
    return {t: c.psql(f"SELECT count(*)||':'||coalesce(sum(('x'||left(md5(x::text), 15))::bit(60)::bigint), 0) "
                      f"FROM {t} x") for t in tables}


def verify_restore(target: str, sockdir: str, config: str, expected: dict[str, str], logs: str, name: str,
                   clusters: list[Cluster]) -> str:
    """Start a restored data directory with recovery.signal and restore_command = walrus wal-fetch,
    recover to the end of the archive, and compare its content_digest with `expected`: "verified",
    or what failed (the server's log in logs/<name>-verify.log). `clusters` holds it while it runs."""
    signal = os.path.join(target, "recovery.signal")
    open(signal, "a").close()
    chown_to_user(signal)
    c = Cluster(data=target, sockdir=sockdir)
    c.configure(archive_mode="off", restore_command=f"{WALRUS} --config {config} wal-fetch %f %p",
                max_wal_senders=MAX_WAL_SENDERS, autovacuum="off")
    clusters.append(c)
    try:
        c.start()
        c.wait_until("SELECT pg_is_in_recovery()", "f", timeout=3600)
        got = content_digest(c)
    except AssertionError as e:
        with open(os.path.join(logs, f"{name}-verify.log"), "w") as f:
            f.write(f"{e}\n\n{c.log()}")
        return f"FAILED (recovery; see logs/{name}-verify.log)"
    finally:
        c.stop()
        clusters.remove(c)
    if got != expected:
        return f"MISMATCH ({sum(got.get(t) != d for t, d in expected.items())} tables differ)"
    return "verified"


ARCHIVE_STALL_S = 300.0


def wait_for_archiver(c: Cluster, done: Callable[[], bool], what: str) -> None:
    """Wait until done(); fail once the archiver has neither archived nor failed a segment for ARCHIVE_STALL_S."""
    state, since = "", time.monotonic()
    while not done():
        now = c.psql("SELECT archived_count||' archived, '||failed_count||' failed, last '||"
                     "coalesce(last_archived_wal, 'none') FROM pg_stat_archiver")
        if now != state:
            state, since = now, time.monotonic()
        elif time.monotonic() - since > ARCHIVE_STALL_S:
            raise RuntimeError(f"archiving stalled while waiting for {what}: no WAL segment archived or failed "
                               f"for {ARCHIVE_STALL_S:.0f} s (pg_stat_archiver: {state}); archive_command "
                               f"(walrus wal-push) may be hanging\n{c.log()[-2000:]}")
        time.sleep(0.5)


def archive_everything(c: Cluster) -> None:
    """Switch to a new WAL segment and wait until the archiver has stored the one that holds everything so far."""
    last = c.psql("SELECT pg_walfile_name(pg_switch_wal())")
    wait_for_archiver(c, lambda: c.psql(f"SELECT last_archived_wal >= '{last}' FROM pg_stat_archiver") == "t",
                      f"segment {last}")


def wait_archiver_idle(c: Cluster) -> None:
    """No .ready file left: WAL a backup produced is archived before the next timed step starts."""
    status = os.path.join(c.data, "pg_wal", "archive_status")
    wait_for_archiver(c, lambda: not any(n.endswith(".ready") for n in os.listdir(status)), "the archiver to go idle")


class Bench:
    """One run: the source cluster, the WAL archive, and every tool's backup and restore."""

    def __init__(self, args: argparse.Namespace, tools: list[Tool], out: str) -> None:
        self.args, self.tools, self.out = args, tools, out
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.root = op_workdir(args.workdir)
        self.archive_config = write_config(os.path.join(self.root, "archive.json"), {
            "WALG_FILE_PREFIX": os.path.join(self.root, "archive"), "WALG_COMPRESSION_METHOD": args.compression})
        self.clusters: list[Cluster] = []
        self.warm_cache_warned = False
        self.rows: list[dict] = []
        self.samples: dict[str, dict[str, list[list[float]]]] = {"backup": {}, "restore": {}}
        self.db_bytes = 0
        # the cold read before each backup round: a shared VM's disk can drift within minutes, so
        # one figure could flatter or sink every ratio to it; a read soon after another of the same
        # file can come from the host's cache, and the median keeps one such sample out
        self.disk_reads: list[float] = []
        self.disk_writes: list[float] = []  # the same for the sequential write, before each restore round
        self.source: Cluster | None = None
        self.setup: Setup | None = None
        self.store = STORES[args.storage](self.root) if args.storage != "file" else None

    # a repository: a local directory, or with --storage s3|gcs|azure a key prefix named after it
    def repo_bytes(self, repo: str) -> int:
        return self.store.stored_bytes(repo) if self.store else tree_bytes(repo)

    def repo_flush_dir(self, repo: str) -> str:
        return self.store.data if self.store else repo  # what `sync -f` makes durable after a backup

    def remove_repo(self, repo: str) -> None:
        if self.store:
            self.store.remove(repo)
        remove_tree(repo)

    def create_source(self) -> None:
        scale = self.args.scale
        say(f"==> source cluster: initdb, archive_command = walrus wal-push, pgbench -i -s {scale}")
        c = Cluster.init(self.root)
        self.clusters.append(c)
        c.configure(archive_mode="on", archive_command=f"{WALRUS} --config {self.archive_config} wal-push %p",
                    max_wal_senders=MAX_WAL_SENDERS, autovacuum="off", max_wal_size="4GB",
                    checkpoint_timeout="30min")
        c.start()
        run([os.path.join(pg_bindir(), "pgbench"), "-i", "-q", "-s", str(scale), "-h", c.sockdir, "-p", str(c.port),
             "postgres"], timeout=4 * 3600)
        c.psql("CHECKPOINT")
        archive_everything(c)
        self.db_bytes = tree_bytes(c.data) - tree_bytes(os.path.join(c.data, "pg_wal"))
        self.source = c
        if self.store:
            say(f"==> {self.args.storage} endpoint: {self.store.version()} with TLS on 127.0.0.1")
            self.store.start(os.path.join(self.logs, f"{self.args.storage}-emulator.log"))
        self.setup = Setup(cluster=c, root=self.root, compression=self.args.compression, workers=self.args.workers,
                           store=self.store)
        say(f"    database: {self.db_bytes / MIB:.0f} MiB (PGDATA without pg_wal)")

    def write_after_backups(self) -> dict[str, str]:
        """pgbench writes after every backup, archived, so each restore must replay WAL to match."""
        c = self.source
        say("==> pgbench writes after the backups; archive them; digest of the source")
        run([os.path.join(pg_bindir(), "pgbench"), "-n", "-c", "2", "-j", "2", "-t",
             "200" if self.args.smoke else "2000", "-h", c.sockdir, "-p", str(c.port), "postgres"], timeout=3600)
        archive_everything(c)
        return content_digest(c)

    def timed(self, tool: Tool, operation: str, n: int, argv: list[str], env: dict, flush_dir: str) -> StepMetrics:
        log = os.path.join(self.logs, f"{tool.name}-{operation}-{n}.log")
        m = run_timed(argv, user=run_user(), env=user_env(env), cwd=self.root, log_path=log, flush_dir=flush_dir,
                      server_pid=self._postmaster_pid() if operation == "backup" else None, cold=True)
        if not m.cold_cache and not self.warm_cache_warned:
            say("WARNING: cannot drop the page cache (needs root and a writable /proc/sys/vm/drop_caches): "
                "timings are from a WARM cache")
            self.warm_cache_warned = True
        if m.returncode != 0:
            raise StepFailed(f"{tool.label} {operation} exited {m.returncode}; see {log}")
        return m

    def _postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.source.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def backups(self) -> dict[str, str]:
        """Every tool's backup, in rounds; returns the repository each tool's restore reads."""
        repos: dict[str, str] = {}
        runs: dict[str, list[tuple[StepMetrics, int]]] = {t.name: [] for t in self.tools}
        failed: dict[str, str] = {}
        for n, tool in self.rounds(failed, before_round=self.sample_disk):
            repo = os.path.join(self.root, f"{tool.name}-repo-{n}")
            say(f"==> backup  {tool.label} (run {n + 1}/{self.args.repeat})")
            try:
                tool.new_repo(self.setup, repo)
                cmd = tool.backup(self.setup, repo)
                m = self.timed(tool, "backup", n, cmd.argv, cmd.env, self.repo_flush_dir(repo))
                runs[tool.name].append((m, self.repo_bytes(repo)))
                wait_archiver_idle(self.source)
            except (StepFailed, RuntimeError, AssertionError) as e:
                say(f"    FAILED: {e}")
                failed[tool.name] = str(e)
                continue
            if tool.name in repos:
                self.remove_repo(repos[tool.name])
            repos[tool.name] = repo
        for tool in self.tools:
            if tool.name in failed:
                self.rows.append(self.failed_row(tool, "backup", failed[tool.name]))
                repos.pop(tool.name, None)
            else:
                self.rows.append(self.row(tool, "backup", runs[tool.name]))
        return repos

    def restores(self, repos: dict[str, str], expected: dict[str, str]) -> None:
        """Every backed-up tool's restore, in rounds; the last round's restore is verified."""
        runs: dict[str, list[tuple[StepMetrics, int]]] = {t.name: [] for t in self.tools}
        failed = {t.name: "no backup" for t in self.tools if t.name not in repos}
        verified: dict[str, str] = {}
        last = self.args.repeat - 1
        for n, tool in self.rounds(failed, before_round=self.sample_write):
            target = user_dir(os.path.join(self.root, f"{tool.name}-restore-{n}"))
            say(f"==> restore {tool.label} (run {n + 1}/{self.args.repeat})")
            try:
                cmd = tool.restore(self.setup, repos[tool.name], target)
                m = self.timed(tool, "restore", n, cmd.argv, cmd.env, target)
                runs[tool.name].append((m, tree_bytes(target)))
                if n == last:
                    verified[tool.name] = self.verify(tool, target, expected)
                    say(f"    {verified[tool.name]}")
            except (StepFailed, RuntimeError, AssertionError) as e:
                say(f"    FAILED: {e}")
                failed[tool.name] = str(e)
            if not (self.args.keep and n == last):
                remove_tree(target)
        for tool in self.tools:
            if tool.name not in repos:
                continue
            if tool.name in failed:
                self.rows.append(self.failed_row(tool, "restore", failed[tool.name]))
            else:
                self.rows.append({**self.row(tool, "restore", runs[tool.name]), "verified": verified[tool.name]})

    def sample_disk(self) -> None:
        """One more cold sequential read of the largest relation file."""
        got = cold_read_mib_s(largest_file(os.path.join(self.source.data, "base")))
        if got:
            self.disk_reads.append(got)

    def sample_write(self) -> None:
        """One more durable sequential write into the work directory, where the restores write."""
        got = seq_write_mib_s(self.root)
        if got:
            self.disk_writes.append(got)

    @property
    def disk_read_mib_s(self) -> float | None:
        """The median of the cold reads; None before any (or where the cache cannot be dropped)."""
        return statistics.median(self.disk_reads) if self.disk_reads else None

    @property
    def disk_write_mib_s(self) -> float | None:
        """The median of the durable writes; None before any (or where the probe could not write)."""
        return statistics.median(self.disk_writes) if self.disk_writes else None

    def rounds(self, failed: dict[str, str],
               before_round: Callable[[], None] | None = None) -> Iterator[tuple[int, Tool]]:
        """(round, tool) pairs: every tool once per round, so background load spreads evenly over the tools.
        `before_round` runs before each round's first step (a disk probe), not for a round with none."""
        for n in range(self.args.repeat):
            shift = n % len(self.tools)  # each round starts one tool later: no tool always runs first
            first = True
            for tool in self.tools[shift:] + self.tools[:shift]:
                if tool.name not in failed:
                    if first and before_round is not None:
                        before_round()
                    first = False
                    yield n, tool

    def verify(self, tool: Tool, target: str, expected: dict[str, str]) -> str:
        """Start the restored cluster, recover to the end of the walrus archive, compare the digest."""
        return verify_restore(target, self.root, self.archive_config, expected, self.logs, tool.name, self.clusters)

    def row(self, tool: Tool, operation: str, runs: list[tuple[StepMetrics, int]]) -> dict:
        """The run with the median wall time (the lower median for an even count) stands for the tool."""
        walls = [m.wall_s for m, _ in runs]
        median = statistics.median_low(walls)
        m, size = runs[walls.index(median)]
        self.samples[operation][tool.label] = [[s.t, s.rss, s.vmsize] for s in m.samples]
        return {"operation": operation, "tool": tool.label, "tool_name": tool.name,
                "wall_s": m.wall_s, "mib_s": self.db_bytes / MIB / m.wall_s, "cpu_s": m.cpu_s,
                "server_cpu_s": m.server_cpu_s, "peak_rss_mib": m.peak_rss / MIB, "vmpeak_mib": m.peak_vmpeak / MIB,
                "output_mib": size / MIB, "wall_ratio": None, "verified": None, "peak_procs": m.peak_procs,
                "left_running": m.left_running, "cold_cache": m.cold_cache,
                "background_cpu_s": round(m.background_cpu_s, 2),
                "runs_background_cpu_s": [round(r.background_cpu_s, 2) for r, _ in runs], "runs_wall_s": [round(w, 3) for w in walls],
                "output_bytes": size, "error": None}

    @staticmethod
    def failed_row(tool: Tool, operation: str, error: str) -> dict:
        return {"operation": operation, "tool": tool.label, "tool_name": tool.name, "error": error,
                "verified": "FAILED" if operation == "restore" else None}

    def close(self) -> None:
        for c in self.clusters:
            c.stop("immediate")
        if self.store:
            self.store.stop()
        if self.args.keep:
            say(f"kept {self.root}")
        else:
            remove_tree(self.root)


class StepFailed(Exception):
    """A timed step exited non-zero."""


def op_workdir(parent: str | None, prefix: str = "walrus-bench-") -> str:
    """An operation's work directory: a temporary one, or a dated one under --workdir (kept with --keep)."""
    if parent is None:
        return make_workdir(prefix)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, prefix + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return user_dir(path)


FAMILY_LABELS = {"walrus": "walrus", "pgbackrest": "pgBackRest", "wal-e": "WAL-E", "wal-g": "WAL-G",
                 "barman": "Barman cloud"}
RATIO_BASE = {"backup": "walrus", "restore": "walrus", "drain": "walrus-daemon", "replay": "walrus-daemon"}


def add_ratios(rows: list[dict]) -> None:
    """wall_ratio: wall time over the base tool's for the same operation (the archive burst has none: its wall
    time is fixed)."""
    for op, base_name in RATIO_BASE.items():
        base = next((r["wall_s"] for r in rows if r["operation"] == op and r["tool_name"] == base_name
                     and r.get("wall_s") and r.get("verified") in (None, "verified")), None)
        for r in rows:
            if r["operation"] == op and base and r.get("wall_s"):
                r["wall_ratio"] = r["wall_s"] / base


def backup_targets(rows: list[dict]) -> list[str]:
    """walrus (io_uring) against Barman cloud: the wall-time ratio of each operation both completed."""
    out = []
    for op in ("backup", "restore"):
        by = {r["tool_name"]: r for r in rows if r["operation"] == op}
        walrus, barman = by.get("walrus"), by.get("barman")
        if not (walrus and barman):
            continue
        failed = [r["tool"] for r in (walrus, barman) if r.get("error") or r.get("verified") not in (None, "verified")]
        if failed:
            out.append(f"{op}: walrus / Barman: no ratio ({' and '.join(failed)} did not complete)")
        else:
            out.append(f"{op}: walrus {op} is {walrus['wall_s'] / barman['wall_s']:.2f}x Barman's time "
                       f"({walrus['wall_s']:.2f} s against {barman['wall_s']:.2f} s)")
    return out


def notes(args: argparse.Namespace, b: Bench, warnings: list[str]) -> list[str]:
    rows = [r for r in b.rows if r.get("wall_s") is not None]
    cold = all(r["cold_cache"] for r in rows) if rows else False
    out = [
        f"pgbench scale {args.scale}: {b.db_bytes / MIB:.0f} MiB of database (PGDATA without pg_wal), "
        f"compression {args.compression} at each tool's default level, {args.workers} workers.",
        "wall s: from exec to the end of `sync -f <output dir>` (syncfs) run after the tool exits, on top of the "
        "tools' own fsyncs (walrus/WAL-G: every stored object and restored file; pgBackRest: repository and "
        "restored files; pg_basebackup: its output; the tar restore: syncfs only).",
        ("each timed step starts from a cold page cache (sync; echo 3 > /proc/sys/vm/drop_caches)." if cold else
         "WARNING: the page cache could NOT be dropped; timings are from a warm cache."),
        "MiB/s: database MiB / wall s. CPU s: user+sys of the tool's whole process tree (RUSAGE_CHILDREN delta). "
        "srv CPU s: PostgreSQL server processes during the step (postmaster tree sampled at 20 Hz, so a lower "
        "bound); pg_basebackup reads and builds its tar there, in the walsender; it also includes the archiver "
        "running walrus wal-push for the backup's last segment.",
        "peak RSS / VmPeak: highest sum over the tool's live processes, sampled from /proc at 20 Hz.",
        "output MiB: backup = bytes in the repository; restore = bytes of the restored data directory.",
        *([f"storage: {STORES[args.storage].title}: {STORES[args.storage](b.root).version()}; its CPU is not in the "
           "tools' CPU s; wall s of a backup ends with `sync -f` of its directory."] if args.storage != "file" else []),
        *(["gcs: every tool at its default chunk size (walrus: the part plan of its memory budget; pgBackRest: "
           "repo1-storage-upload-chunk-size's default); nginx adds the x-guploader-uploadid header pgBackRest "
           "reads, and bench/gcs_front.py streams each resumable upload's chunks to fake-gcs-server as one request "
           "(it rehashes the whole object at every chunk; GCS does not). fake-gcs-server keeps objects in memory "
           "with GOMAXPROCS=1, and runs, with nginx and the front, on the same two cores as the tools."]
          if args.storage == "gcs" else []),
        f"workers: walrus/WAL-G WALG_UPLOAD_DISK_CONCURRENCY = WALG_DOWNLOAD_CONCURRENCY = {args.workers}; pgBackRest "
        f"process-max={args.workers}; pg_basebackup and tar have no worker option (PostgreSQL 15 client "
        "compression is single-threaded).",
        "pgBackRest: posix repo, backup --type=full, start-fast=y, archive-check=n (WAL goes to walrus's archive); "
        "restore into an empty directory without --delta. pg_basebackup: -Ft -X none --checkpoint=fast "
        f"--compress=client-{args.compression}; restore = `{args.compression} -dc base.tar.* | tar -x`.",
        "verified: the restored cluster started with recovery.signal and restore_command = walrus wal-fetch, "
        "recovered to the end of the archive (pgbench writes made after all backups), and every table's row "
        "count and summed row md5 equal the source's.",
    ]
    if b.disk_read_mib_s:
        spread = (f" (median of {len(b.disk_reads)}, one before each backup round: "
                  f"{min(b.disk_reads):.0f}-{max(b.disk_reads):.0f})" if len(b.disk_reads) > 1 else "")
        out.append(f"disk: {b.disk_read_mib_s:.0f} MiB/s sequential read of the largest relation file just after "
                   f"drop_caches{spread}; in a VM, \"cold\" is the guest's cache only (the host may still cache "
                   "the disk).")
    if b.disk_write_mib_s:
        spread = (f"; median of {len(b.disk_writes)}, one before each restore round: "
                  f"{min(b.disk_writes):.0f}-{max(b.disk_writes):.0f}" if len(b.disk_writes) > 1 else "")
        restores = ", ".join(f"{r['tool']} {r['mib_s']:.0f} ({r['mib_s'] / b.disk_write_mib_s:.2f}x)"
                             for r in rows if r["operation"] == "restore")
        out.append(f"disk: {b.disk_write_mib_s:.0f} MiB/s durable sequential write (1 GiB preallocated, written in "
                   f"1 MiB buffered writes, then one fsync, as a restore writes{spread}); every restore writes the "
                   f"whole database and ends with a flush: restore MiB/s against it: {restores or 'none completed'} "
                   "(the probe writes random bytes, which a virtual disk may take slower than a database's pages).")
    if args.repeat > 1:
        out.append(f"each row is the run with the median wall time of {args.repeat} (lower median for an even count); "
                   "the tools take turns, each round starting one tool later; every run's wall time is in "
                   "results.json (runs_wall_s).")
    names = {t.name for t in b.tools}
    if "barman" in names:
        out.append(f"Barman cloud (barman-cloud-backup and -restore, Debian's barman-cli-cloud): "
                   f"--{barman_compression()} for {args.compression} (Barman has gzip, bzip2 and snappy only; snappy "
                   "when python-snappy works, else gzip at level 9, Python's default; Debian 12's python3-snappy "
                   f"fails on Python 3.11), --jobs={args.workers} upload processes, "
                   "--immediate-checkpoint, libpq over the server's socket; WAL stays with walrus's archive_command "
                   "(as for pgBackRest). barman-cloud-restore has no parallelism: it downloads and untars one archive "
                   "at a time, by the backup's name (3.4 has no \"latest\"). boto3 gets the credentials, "
                   "AWS_CA_BUNDLE and path-style addressing (AWS_CONFIG_FILE) from the environment.")
    if {"walrus", "walrus-preadv"} <= names and not walrus_reads_io_method():
        out.append("WARNING: this walrus does not read WALRUS_IO_METHOD yet: walrus (io_uring) and walrus (preadv) "
                   "ran the same reader.")
    for r in rows:
        if r["left_running"]:
            out.append(f"{r['tool']} {r['operation']}: {r['left_running']} process(es) still running after it "
                       "exited (daemonized); their work after that is not measured.")
    for r in b.rows:
        if r.get("error"):
            out.append(f"{r['tool']} {r['operation']} FAILED: {r['error']}")
    return out + warnings


def background_note(rows: list[dict], nproc: int) -> str:
    """How much CPU the rest of the machine took during the timed steps: the noise in the numbers."""
    steps = [(bg / (nproc * wall), bg, wall, r) for r in rows if r.get("wall_s")
             for bg, wall in zip(r["runs_background_cpu_s"], r.get("runs_window_s", r["runs_wall_s"]))
             if bg is not None]
    if not steps:
        return "no timed step completed."
    share, bg, wall, r = max(steps, key=lambda x: x[0])
    text = (f"other processes used at most {share:.0%} of the machine's CPU during a timed step ({r['tool']} "
            f"{r['operation']}: {bg:.1f} CPU s in {wall:.1f} s; every run's figure is in results.json, "
            "runs_background_cpu_s).")
    return ("WARNING: " + text + " The numbers may be noisy.") if share > 0.1 else text


def describe(args: argparse.Namespace, b: Bench | None, w: WalBench | None, warnings: list[str], stamp: str,
             duration_s: float, loadavg: list[tuple[float, float, float]], d=None, recv=None) -> dict:
    """The run's metadata; also stamps each row with tool version, settings and machine facts.
    d: the delta operation's bench.delta.DeltaBench, recv: the receive operation's bench.receive.ReceiveBench,
    when they ran."""
    rows = (b.rows if b else []) + (w.rows if w else [])
    add_ratios(rows)
    rows += (d.rows if d else []) + (recv.rows if recv else [])
    machine = report.machine_facts(os.path.dirname((b or w or d or recv).root))
    machine["cold_read_mib_s"] = round(b.disk_read_mib_s, 1) if b and b.disk_read_mib_s else None
    machine["cold_read_samples_mib_s"] = [round(x, 1) for x in b.disk_reads] if b else []
    machine["seq_write_mib_s"] = round(b.disk_write_mib_s, 1) if b and b.disk_write_mib_s else None
    machine["seq_write_samples_mib_s"] = [round(x, 1) for x in b.disk_writes] if b else []
    facts = {f"machine_{k}": v for k, v in machine.items()}
    versions: dict[str, str] = {}
    out_notes: list[str] = []
    if b:
        for t in b.tools:
            versions[t.label] = t.version() + (f" ({walrus_source()})" if t.binary == WALRUS else "")
        for r in b.rows:
            r.update(tool_version=versions[r["tool"]], scale=args.scale, compression=args.compression,
                     workers=args.workers, db_mib=round(b.db_bytes / MIB, 1), **facts)
        out_notes += notes(args, b, [] if w else warnings)
    if w:
        by_name = {}
        for t in w.tools:
            by_name[t.name] = w.versions[t.name] + (f" ({walrus_source()})" if t.binary == WALRUS else "")
            versions.setdefault(FAMILY_LABELS.get(t.family, t.family), by_name[t.name])
        for r in w.rows:
            r.update(tool_version=by_name[r["tool_name"]], compression=args.compression, workers=args.workers,
                     wal_scale=args.wal_scale, wal_segment_mib=args.wal_segsize, **facts)
        out_notes += w.notes(warnings) + w.errors
    if d:
        delta_versions = d.versions()
        delta_versions["walrus"] += f" ({walrus_source()})"
        for r in d.rows:
            r.update(tool_version=delta_versions["pgBackRest" if r["tool_name"] == "pgbackrest" else "walrus"],
                     scale=args.scale, compression=args.compression, workers=args.workers, **facts)
        for k, v in delta_versions.items():
            versions.setdefault(k, v)
        out_notes += d.notes() + ([] if b or w else warnings)
    if recv:
        receive_versions = recv.versions()
        receive_versions["walrus"] += f" ({walrus_source()})"
        for row in recv.rows:
            row.update(tool_version=receive_versions["walrus"], scale=args.scale, compression=args.compression,
                       wal_segment_mib=args.wal_segsize, **facts)
        for k, v in receive_versions.items():
            versions.setdefault(k, v)
        out_notes += recv.notes() + ([] if b or w or d else warnings)
    return {"started_utc": stamp, "args": vars(args), "machine": machine, "versions": versions,
            "loadavg_before": loadavg[0], "loadavg_after": loadavg[1], "duration_s": round(duration_s, 1),
            "targets": (backup_targets(b.rows) if b else []) + (w.targets() if w else []) + (recv.targets() if recv else []),
            **({"delta": d.facts} if d else {}), **({"receive": recv.facts} if recv else {}),
            "notes": out_notes + [background_note(rows, machine["nproc"])]}


def render(args: argparse.Namespace, b: Bench | None, w: WalBench | None, meta: dict, d=None, recv=None) -> str:
    machine = meta["machine"]
    text = []
    for op in ("backup", "restore"):
        rows = [r for r in b.rows if r["operation"] == op] if b else []
        if rows:
            text += [f"{op} ({args.compression}, scale {args.scale}, {args.workers} workers, {args.storage} storage)",
                     report.table(rows, op), ""]
    if w:
        text += w.tables()
    if d:
        text += d.tables()
    if recv:
        text += recv.tables()
    if meta["targets"]:
        text += ["targets:"] + [f"- {t}" for t in meta["targets"]] + [""]
    text += ["notes:"] + [f"- {n}" for n in meta["notes"]]
    text += ["", "versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items()),
             f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_mib']} MiB, kernel "
             f"{machine['kernel']}, {machine['fs']}"]
    return "\n".join(text) + "\n"


def write_results(out: str, text: str, meta: dict, b: Bench | None, w: WalBench | None, plt, d=None,
                  recv=None) -> None:
    with open(os.path.join(out, "tables.txt"), "w") as f:
        f.write(text)
    rows = (b.rows if b else []) + (w.rows if w else []) + (d.rows if d else []) + (recv.rows if recv else [])
    report.write_json(os.path.join(out, "results.json"), meta, rows)
    report.write_csv(os.path.join(out, "results.csv"), rows)
    with open(os.path.join(out, "samples.json"), "w") as f:
        json.dump({**(b.samples if b else {}), **(w.samples if w else {}), **(d.samples if d else {}),
                   **(recv.samples if recv else {})}, f)
    if plt is None:
        say("matplotlib is not available: no plots (pip install matplotlib)")
        return
    if d:
        d.plot(plt, out)
    if recv:
        recv.plot(plt, out)
    if not (b or w):
        return
    args = (b or w).args
    for op in ("backup", "restore") if b else ():
        if b.samples[op]:
            report.plot_memory(plt, os.path.join(out, f"memory-{op}.png"), op, b.samples[op],
                               f"pgbench scale {args.scale}, {args.compression}, {args.workers} workers, "
                               f"{args.storage} storage")
    if w:
        w.plot(plt, out)


def run_backups(args: argparse.Namespace, tools: list[Tool], out: str) -> Bench | None:
    """backup (and restore) of the pgbench cluster; None if the run could not go on."""
    b = Bench(args, tools, out)
    try:
        b.create_source()
        repos = b.backups()
        if "restore" in args.ops:
            expected = b.write_after_backups()
            b.restores(repos, expected)
    except RuntimeError as e:
        say(f"ERROR: {e}")
        return None
    finally:
        b.close()
    return b


def run_wal(args: argparse.Namespace, out: str, warnings: list[str]) -> WalBench | None:
    """archive, drain and replay; None if the WAL cluster could not be set up or no WAL tool can run."""
    root = op_workdir(args.workdir, "walrus-walbench-")
    tools, tool_warnings = select_wal_tools(args, os.path.join(root, "wale-venv"))
    for text in tool_warnings:
        say(f"WARNING: {text}")
    warnings += tool_warnings
    w = WalBench(args, [o for o in args.ops if o in WAL_OPS], tools, root, out, say)
    try:
        if not tools:
            say("no WAL tool to run")
            return None
        w.run_all()
    except (RuntimeError, AssertionError, psycopg.Error) as e:
        say(f"ERROR: {e}")
        return None
    finally:
        warnings += w.close()
    return w


def run_delta(args: argparse.Namespace, out: str):
    """The delta operation (bench/delta.py); None if it could not run to the end of its setup."""
    from bench.delta import DeltaBench, StepFailed as DeltaStepFailed  # imported here: bench.delta imports this module

    d = DeltaBench(args, out, say)
    try:
        d.run_all()
    except (DeltaStepFailed, RuntimeError, AssertionError, psycopg.Error) as e:
        say(f"ERROR: {e}")
        return None
    finally:
        d.close()
    return d


def run_receive(args: argparse.Namespace, out: str):
    """The receive operation (bench/receive.py); None if it could not run to the end of its setup."""
    from bench.receive import ReceiveBench, StepFailed as ReceiveStepFailed  # bench.receive imports this module

    r = ReceiveBench(args, out, say)
    try:
        r.run_all()
    except (ReceiveStepFailed, RuntimeError, AssertionError, psycopg.Error, subprocess.TimeoutExpired) as e:
        say(f"ERROR: {e}")
        return None
    finally:
        r.close()
    return r


def _terminate(signum: int, _frame) -> None:
    """SIGTERM unwinds like Ctrl-C: every finally stops its clusters and daemons and removes its cgroups."""
    raise SystemExit(128 + signum)


def compile_walrus() -> None:
    """Byte-compile walrus's modules, as its packages do at install (packaging/build.py): a source
    tree run as another user, or with PYTHONDONTWRITEBYTECODE, would compile every changed module
    in every archive_command and backup, a cost no installed walrus pays."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO_ROOT, "walrus")], env=env,
                   check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = os.path.abspath(args.out or os.path.join(REPO_ROOT, "bench", "results", stamp))
    os.makedirs(out, exist_ok=True)
    tools, warnings = select_tools(args) if "backup" in args.ops else ([], [])
    for text in warnings:
        say(f"WARNING: {text}")
    if "backup" in args.ops and not tools:
        say("no tool to run")
        return 2
    for op in ("delta", "receive"):
        if op in args.ops and args.storage != "file":
            say(f"WARNING: {op} runs on file storage only; --storage applies to backup and restore")
    plt = report.load_matplotlib(install=not args.smoke)
    compile_walrus()
    load_before, started = os.getloadavg(), time.monotonic()
    b = w = d = recv = None
    if "backup" in args.ops and (b := run_backups(args, tools, out)) is None:
        return 2
    if any(op in WAL_OPS for op in args.ops) and (w := run_wal(args, out, warnings)) is None:
        return 2
    if "delta" in args.ops and (d := run_delta(args, out)) is None:
        return 2
    if "receive" in args.ops and (recv := run_receive(args, out)) is None:
        return 2
    meta = describe(args, b, w, warnings, stamp, time.monotonic() - started, [load_before, os.getloadavg()], d, recv)
    text = render(args, b, w, meta, d, recv)
    say("\n" + text)
    write_results(out, text, meta, b, w, plt, d, recv)
    say(f"results in {out}")
    rows = (b.rows if b else []) + (w.rows if w else []) + (d.rows if d else []) + (recv.rows if recv else [])
    ok = all(not r.get("error") for r in rows) and not (w and w.errors) and all(
        r["verified"] == "verified" for r in rows if r["operation"] in ("restore", "drain", "replay", "delta-restore"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
