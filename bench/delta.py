"""The bench's `delta` operation (issue 20): walrus delta backups, built from the WAL block map and by the
page scan, beside a walrus full backup and pgBackRest's incr and diff, after a pgbench load that changes a
known share of pgbench_accounts; the changed pages compressed with the same codec as a reference size; and
the restore of the full backup alone against the full backup plus a chain of three deltas.

One source cluster of its own (as the `postgres` user when we are root, like bench/run.py's):
archive_command = `walrus wal-push && pgbackrest archive-push`, so walrus records its block map
(WALG_DELTA_MAX_STEPS > 0 in its config) and pgBackRest has its WAL for its archive check.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import time
from collections.abc import Callable

from bench import report
from bench.measure import StepMetrics, replay_reads_s, run_timed, tree_bytes
from bench.ratelimit import transfer_window
from bench.run import (MAX_WAL_SENDERS, archive_everything, content_digest, op_workdir, verify_restore,
                       wait_archiver_idle)
from bench.tools import first_line, pgbackrest_argv, pgbackrest_stanza, user_dir, user_env
from tests.pgcluster import (WALRUS, Cluster, chown_to_user, pg_bindir, remove_tree, run, run_user,
                             write_config)

MIB = 2 ** 20
PAGE = 8192  # BLCKSZ
SEGMENT_PAGES = (1 << 30) // PAGE  # a relation's segment files hold 1 GiB each
CHUNK = 4 * MIB  # the reference compresses the changed pages in chunks of this many bytes
DELTA_STEPS = 3  # WALG_DELTA_MAX_STEPS: the chain full + 3 deltas is the longest it allows
CHAIN = 3  # successive deltas restored on top of the full backup
STEP_TIMEOUT_S = 600  # a timed step still running after max(this, 3 s a unit of scale) is killed and reported
# FAILED: a hang, not a slow step (at scale 200 every step here takes seconds)
ACCOUNTS_PER_SCALE = 100_000  # pgbench: rows of pgbench_accounts per unit of scale
STANZA_DIR = "bench"  # tools.STANZA: pgBackRest's backups of the stanza are under <repo>/backup/bench/
_LSN = struct.Struct("<II")  # pd_lsn: xlogid, xrecoff
_RELATION_FILE = re.compile(r"(\d+)(?:\.(\d+))?")  # a relation's main fork and its segments: 16384, 16384.1
_PGBR_LABEL = re.compile(r"\d{8}-\d{6}F(_\d{8}-\d{6}[DI])?")
FLOOR_DEPTH = 64  # reads in flight when fio reads the changed pages: past where this kind of disk stops gaining

BACKUP_COLUMNS = [  # (header, row key, format)
    ("backup", "tool", "{}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("CPU s", "cpu_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
    ("stored MiB", "stored_mib", "{:.1f}"),
    ("x full wall", "wall_x_full", "{:.3f}"),
    ("x full stored", "stored_x_full", "{:.3f}"),
    ("x reference", "stored_x_reference", "{:.2f}"),
    ("data s", "data_s", "{:.2f}"),
    ("srv CPU s", "server_cpu_s", "{:.1f}"),
    ("delta_method", "method", "{}"),
]
RESTORE_COLUMNS = [
    ("restore", "tool", "{}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("CPU s", "cpu_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
    ("output MiB", "output_mib", "{:.1f}"),
    ("x full restore", "wall_x_full", "{:.2f}"),
    ("verified", "verified", "{}"),
]


class StepFailed(Exception):
    """A timed step exited non-zero, or did not produce what it should have."""


def _say(text: str) -> None:
    print(text, flush=True)


def hot_script(scale: int, share: float) -> tuple[str, int]:
    """pgbench's TPC-B-like transaction with the account drawn among the first `share` percent of aids only
    (branches, tellers and history as usual); returns the script and that last hot aid."""
    hot = max(1, int(ACCOUNTS_PER_SCALE * scale * share / 100))
    script = "\n".join([
        f"\\set aid random(1, {hot})",
        f"\\set bid random(1, {scale})",
        f"\\set tid random(1, {10 * scale})",
        "\\set delta random(-5000, 5000)",
        "BEGIN;",
        "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;",
        "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;",
        "UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;",
        "UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, "
        "CURRENT_TIMESTAMP);",
        "END;",
    ]) + "\n"
    return script, hot


# -- the reference: changed pages, compressed, read without walrus -----------------------------------------
def _compressor(method: str) -> Callable[[bytes], bytes]:
    """One chunk in, its compressed form out: lz4 frames of independent 4 MiB blocks with a content checksum
    (walrus's lz4 framing), or zstd at level 3 (walrus's default level)."""
    if method == "lz4":
        import lz4.frame
        return lambda data: lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX4MB, block_linked=False,
                                               content_checksum=True)
    if method == "zstd":
        import zstandard
        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
        return cctx.compress
    raise ValueError(f"no reference codec for {method}")


def relation_files(pgdata: str) -> list[str]:
    """Paths (inside pgdata) of every relation main-fork file with whole pages: base/<db>/<digits>[.N] and the
    same under each tablespace in pg_tblspc (followed through its symlink)."""
    out = []
    for top in ("base", "pg_tblspc"):
        for dirpath, _dirs, files in os.walk(os.path.join(pgdata, top), followlinks=True):
            for name in files:
                path = os.path.join(dirpath, name)
                if _RELATION_FILE.fullmatch(name) is None:
                    continue
                size = os.path.getsize(path)
                if size > 0 and size % PAGE == 0:
                    out.append(os.path.relpath(path, pgdata))
    return sorted(out)


def scan_changed_pages(pgdata: str, since: int, method: str, watch: set[str]) -> dict:
    """Every page of every relation file whose pd_lsn >= since, concatenated and compressed CHUNK bytes at a
    time; `watch` (relation paths without the .N suffix) gets the block numbers of its changed pages, and
    `reads` holds each run of consecutive changed pages as (file, offset, length)."""
    compress = _compressor(method)
    pending = bytearray()
    pages = changed = stored = 0
    blocks: dict[str, list[int]] = {w: [] for w in watch}
    sizes: dict[str, int] = {w: 0 for w in watch}
    reads: list[tuple[str, int, int]] = []
    t0 = time.monotonic()
    for rel in relation_files(pgdata):
        head, name = os.path.split(rel)
        m = _RELATION_FILE.fullmatch(name)
        node = os.path.join(head, m.group(1))
        block = int(m.group(2) or 0) * SEGMENT_PAGES
        mine = blocks.get(node)
        path, at = os.path.join(pgdata, rel), 0
        with open(path, "rb", buffering=0) as f:
            while data := f.read(MIB):
                view = memoryview(data)
                for off in range(0, len(data) - PAGE + 1, PAGE):
                    xlogid, xrecoff = _LSN.unpack_from(data, off)
                    if (xlogid << 32 | xrecoff) >= since:
                        pending += view[off:off + PAGE]
                        changed += 1
                        if mine is not None:
                            mine.append(block)
                        last = reads[-1] if reads else None
                        if last is not None and last[0] == path and last[1] + last[2] == at + off:
                            reads[-1] = (path, last[1], last[2] + PAGE)
                        else:
                            reads.append((path, at + off, PAGE))
                        if len(pending) >= CHUNK:
                            stored += len(compress(bytes(pending)))
                            pending.clear()
                    block += 1
                    pages += 1
                at += len(data)
        if node in sizes:
            sizes[node] = max(sizes[node], block)
    if pending:
        stored += len(compress(bytes(pending)))
    return {"relation_pages": pages, "changed_pages": changed, "changed_bytes": changed * PAGE,
            "stored_bytes": stored, "seconds": round(time.monotonic() - t0, 1), "blocks": blocks, "sizes": sizes,
            "reads": reads}


def _walrus_result(log_path: str) -> dict:
    """backup-push --json's result object: the last line of the step's log that is one."""
    found = None
    with open(log_path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith('{"backup_name"'):
                try:
                    found = json.loads(line)
                except ValueError:
                    continue
    if found is None:
        raise StepFailed(f"walrus backup-push --json printed no result object; see {log_path}")
    return found


def _data_phase_s(log_path: str) -> float | None:
    """Seconds from walrus's line that the backup started (pg_backup_start returned, the maps read) to its
    last data part's line (bench/ratelimit.transfer_window); None if the log lacks either line."""
    with open(log_path, errors="replace") as f:
        try:
            return transfer_window(f.read())[0]
        except RuntimeError:
            return None


def _method_lines(log_path: str) -> list[str]:
    """walrus's log lines about how it found the changed pages (block map, page scan, fallback)."""
    out = []
    with open(log_path, errors="replace") as f:
        for line in f:
            low = line.lower()
            if ("block map" in low or "page scan" in low or "blockmap" in low) and not line.startswith("{"):
                out.append(line.strip())
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class DeltaBench:
    """One run of the delta operation: its own cluster, walrus and pgBackRest repositories, and the rows."""

    def __init__(self, args: argparse.Namespace, out: str, say: Callable[[str], None] = _say) -> None:
        self.args, self.out, self.say = args, out, say
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.root = op_workdir(args.workdir, "walrus-deltabench-")
        self.walrus_repo = os.path.join(self.root, "walrus-repo")
        self.pgbr_repo = os.path.join(self.root, "pgbackrest-repo")
        self.config = write_config(os.path.join(self.root, "walrus.json"), {
            "WALG_FILE_PREFIX": self.walrus_repo, "WALG_COMPRESSION_METHOD": args.compression,
            "WALG_DELTA_MAX_STEPS": str(DELTA_STEPS), "WALG_UPLOAD_DISK_CONCURRENCY": str(args.workers),
            "WALG_DOWNLOAD_CONCURRENCY": str(args.workers)})
        self.script, self.hot_aid = hot_script(args.scale, args.delta_share)
        self.script_path = os.path.join(self.root, "hot.sql")
        with open(self.script_path, "w") as f:
            f.write(self.script)
        chown_to_user(self.script_path)
        self.cluster: Cluster | None = None
        self.clusters: list[Cluster] = []
        self.rows: list[dict] = []
        self.samples: dict[str, dict[str, list[list[float]]]] = {"delta": {}, "delta-restore": {}}
        self.run_samples: dict[str, list[list[list[float]]]] = {}  # label -> each run's samples
        self.facts: dict = {"share_percent": args.delta_share, "hot_aids": self.hot_aid,
                            "seconds": args.delta_seconds, "chain_seconds": args.delta_chain_seconds,
                            "clients": args.delta_clients, "delta_max_steps": DELTA_STEPS}
        self.errors: list[str] = []
        self.changed_reads: list[tuple[str, int, int]] = []  # the reference's runs of changed pages
        self.warm_cache = False
        self.db_bytes = 0

    # -- setup --------------------------------------------------------------------------------------------
    def archive_command(self) -> str:
        walrus = f"{shlex.quote(WALRUS)} --config {shlex.quote(self.config)} wal-push %p"
        pgbr = " ".join(map(shlex.quote, pgbackrest_argv(self.pgbr_repo, "archive-push"))) + " %p"
        return f"{walrus} && {pgbr}"

    def create_source(self) -> None:
        a = self.args
        self.say(f"==> delta: source cluster: initdb, archive_command = walrus wal-push && pgbackrest archive-push, "
                 f"pgbench -i -s {a.scale}")
        c = Cluster.init(self.root)
        self.clusters.append(c)
        c.configure(archive_mode="on", archive_command=self.archive_command(), max_wal_senders=MAX_WAL_SENDERS,
                    autovacuum="off", max_wal_size="4GB", checkpoint_timeout="30min")
        c.start()
        self.cluster = c
        # the stanza before the first segment is complete, so pgBackRest's archive-push never fails
        user_dir(self.pgbr_repo)
        compress = {"lz4": "lz4", "zstd": "zst"}[a.compression]
        pgbackrest_stanza(self.pgbr_repo, c, self.root, [
            f"repo1-path={self.pgbr_repo}", "repo1-type=posix", "repo1-retention-full=2",
            f"compress-type={compress}", f"process-max={a.workers}", "start-fast=y", "archive-timeout=600"])
        run([os.path.join(pg_bindir(), "pgbench"), "-i", "-q", "-s", str(a.scale), "-h", c.sockdir, "-p",
             str(c.port), "postgres"], timeout=4 * 3600)
        c.psql("CHECKPOINT")
        archive_everything(c)
        wait_archiver_idle(c)
        self.db_bytes = tree_bytes(c.data) - tree_bytes(os.path.join(c.data, "pg_wal"))
        self.facts["db_mib"] = round(self.db_bytes / MIB, 1)
        self.say(f"    database: {self.db_bytes / MIB:.0f} MiB (PGDATA without pg_wal)")

    def settle(self) -> None:
        """Before each backup: changed pages flushed to disk, all WAL so far archived, the archiver idle."""
        c = self.cluster
        c.psql("CHECKPOINT")
        archive_everything(c)
        wait_archiver_idle(c)

    def load(self, seconds: int, tag: str) -> dict:
        """pgbench -T seconds of the hot script; its TPS and transactions."""
        c, a = self.cluster, self.args
        threads = max(1, min(a.delta_clients, os.cpu_count() or 1))
        self.say(f"==> delta: pgbench -T {seconds} -c {a.delta_clients}, accounts among aid <= {self.hot_aid} "
                 f"({a.delta_share:g}%) [{tag}]")
        proc = run([os.path.join(pg_bindir(), "pgbench"), "-n", "-c", str(a.delta_clients), "-j", str(threads),
                    "-T", str(seconds), "-f", self.script_path, "-h", c.sockdir, "-p", str(c.port), "postgres"],
                   timeout=seconds + 3600)
        text = proc.stdout.decode(errors="replace")
        with open(os.path.join(self.logs, f"delta-pgbench-{tag}.log"), "w") as f:
            f.write(text + proc.stderr.decode(errors="replace"))
        tps = re.search(r"tps = ([\d.]+)", text)
        txns = re.search(r"number of transactions actually processed: (\d+)", text)
        got = {"seconds": seconds, "tps": float(tps.group(1)) if tps else None,
               "transactions": int(txns.group(1)) if txns else None}
        self.say(f"    {got['transactions']} transactions, {got['tps'] or 0:.0f} TPS")
        return got

    # -- timed steps --------------------------------------------------------------------------------------
    def _postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.cluster.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def timed(self, key: str, argv: list[str], env: dict, flush_dir: str, server: bool) -> tuple[StepMetrics, str]:
        log = os.path.join(self.logs, f"delta-{key}.log")
        timeout = max(STEP_TIMEOUT_S, 3 * self.args.scale)
        try:
            m = run_timed(argv, user=run_user(), env=user_env(env), cwd=self.root, log_path=log,
                          flush_dir=flush_dir, server_pid=self._postmaster_pid() if server else None, cold=True,
                          timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"{key} was still running after {timeout} s and was killed; see {log}") from None
        if not m.cold_cache and not self.warm_cache:
            self.say("WARNING: cannot drop the page cache: timings are from a WARM cache")
            self.warm_cache = True
        if m.returncode != 0:
            raise StepFailed(f"{key} exited {m.returncode}; see {log}")
        return m, log

    def row(self, operation: str, key: str, label: str, family: str, m: StepMetrics, **extra) -> dict:
        self.samples[operation][label] = [[s.t, s.rss, s.vmsize] for s in m.samples]
        return {"operation": operation, "step": key, "tool": label, "tool_name": family, "wall_s": m.wall_s,
                "cpu_s": m.cpu_s, "server_cpu_s": m.server_cpu_s, "peak_rss_mib": m.peak_rss / MIB,
                "vmpeak_mib": m.peak_vmpeak / MIB, "peak_procs": m.peak_procs, "left_running": m.left_running,
                "cold_cache": m.cold_cache, "background_cpu_s": round(m.background_cpu_s, 2),
                "runs_background_cpu_s": [round(m.background_cpu_s, 2)], "runs_wall_s": [round(m.wall_s, 3)],
                "verified": None, "error": None, **extra}

    def failed(self, operation: str, key: str, label: str, family: str, error: str) -> dict:
        self.say(f"    FAILED: {error}")
        self.errors.append(f"{label} FAILED: {error}")
        row = {"operation": operation, "step": key, "tool": label, "tool_name": family, "error": error,
               "verified": "FAILED" if operation == "delta-restore" else None}
        self.rows.append(row)
        return row

    def walrus_stored(self, name: str) -> int:
        folder = os.path.join(self.walrus_repo, "basebackups_005")
        sentinel = os.path.join(folder, name + "_backup_stop_sentinel.json")
        return tree_bytes(os.path.join(folder, name)) + (os.path.getsize(sentinel) if os.path.exists(sentinel) else 0)

    def walrus_backup(self, key: str, label: str, *, full: bool = False, base: str | None = None,
                      block_map: bool | None = None, run: int | None = None, **extra) -> dict:
        """One timed backup-push; `run`: its number among a repeated step's runs (from 0; each run after
        the first logs to a file of its own)."""
        self.settle()
        self.say(f"==> delta: {label}" + (f" (run {run + 1}/{self.args.repeat})" if run is not None and self.args.repeat > 1 else ""))
        argv = [WALRUS, "--config", self.config, "backup-push", "--json"]
        argv += ["--full"] if full else []
        argv += ["--delta-from-name", base] if base else []
        env = {**self.cluster.env, "WALRUS_IO_METHOD": "io_uring"}
        if block_map is not None:
            env["WALRUS_BLOCK_MAP"] = "true" if block_map else "false"
        try:
            m, log = self.timed(key if not run else f"{key}-{run + 1}", argv + [self.cluster.data], env,
                                self.walrus_repo, server=True)
            result = _walrus_result(log)
            wait_archiver_idle(self.cluster)
        except (StepFailed, RuntimeError, AssertionError) as e:
            return self.failed("delta", key, label, "walrus", str(e))
        name = result["backup_name"]
        if not full and not result.get("delta_from"):
            return self.failed("delta", key, label, "walrus", f"walrus took a full backup ({name}), not a delta")
        method = "full" if full else (result.get("delta_method") or "not reported")
        stored = self.walrus_stored(name)
        row = self.row("delta", key, label, "walrus", m, stored_bytes=stored, stored_mib=stored / MIB,
                       backup_name=name, delta_from=result.get("delta_from"), start_lsn=result.get("start_lsn"),
                       finish_lsn=result.get("finish_lsn"), delta_method=result.get("delta_method"), method=method,
                       block_map_setting=block_map, walrus_log_lines=_method_lines(log),
                       uncompressed_bytes=result.get("uncompressed_size"), files=result.get("files"),
                       data_s=_data_phase_s(log), **extra)
        self.rows.append(row)
        self.run_samples.setdefault(label, []).append(self.samples["delta"][label])
        self.say(f"    {name}: {m.wall_s:.1f} s, {stored / MIB:.1f} MiB stored, delta_method: {method}")
        return row

    def keep_median(self, runs: list[dict]) -> None:
        """The runs of one step become one row: the run with the median wall time (the lower median for
        an even count), with every run's wall time and background CPU. A failed run stays as it is.
        A restore's row says what its first run's verification found, which holds for every run of
        the same backup."""
        if len(runs) < 2 or any(row.get("error") for row in runs):
            return
        walls = [row["wall_s"] for row in runs]
        chosen = walls.index(statistics.median_low(walls))
        keep = dict(runs[chosen], runs_wall_s=[round(w, 3) for w in walls],
                    runs_background_cpu_s=[row["background_cpu_s"] for row in runs], runs=len(runs))
        if keep["operation"] == "delta-restore":
            keep["verified"] = runs[0]["verified"]
        self.rows = [row for row in self.rows if not any(row is r for r in runs)] + [keep]
        label = keep["tool"]
        self.samples[keep["operation"]][label] = self.run_samples[label][chosen]

    def pgbr_labels(self) -> set[str]:
        folder = os.path.join(self.pgbr_repo, "backup", STANZA_DIR)
        try:
            return {n for n in os.listdir(folder) if _PGBR_LABEL.fullmatch(n)}
        except OSError:
            return set()

    def pgbackrest_backup(self, kind: str) -> dict:
        label = f"pgBackRest {kind}"
        self.settle()
        self.say(f"==> delta: {label}")
        before = self.pgbr_labels()
        try:
            m, _log = self.timed(f"pgbackrest-{kind}", pgbackrest_argv(self.pgbr_repo, f"--type={kind}", "backup"),
                                 {}, self.pgbr_repo, server=True)
            wait_archiver_idle(self.cluster)
        except (StepFailed, RuntimeError, AssertionError) as e:
            return self.failed("delta", f"pgbackrest-{kind}", label, "pgbackrest", str(e))
        new = sorted(self.pgbr_labels() - before)
        if len(new) != 1:
            return self.failed("delta", f"pgbackrest-{kind}", label, "pgbackrest",
                               f"expected one new backup in the repository, found {new}")
        stored = tree_bytes(os.path.join(self.pgbr_repo, "backup", STANZA_DIR, new[0]))
        row = self.row("delta", f"pgbackrest-{kind}", label, "pgbackrest", m, stored_bytes=stored,
                       stored_mib=stored / MIB, backup_name=new[0], method=kind)
        self.rows.append(row)
        self.say(f"    {new[0]}: {m.wall_s:.1f} s, {stored / MIB:.1f} MiB stored")
        return row

    def restore(self, key: str, label: str, name: str, expected: dict[str, str], backups: int,
                run: int | None = None) -> dict:
        """One timed backup-fetch into an empty directory; the first run of a step is verified (recovery
        and the contents' digest), a later one of the same backup only timed."""
        target = user_dir(os.path.join(self.root, f"restore-{key}"))
        self.say(f"==> delta: {label}" + (f" (run {run + 1}/{self.args.repeat})" if run is not None and self.args.repeat > 1 else ""))
        try:
            m, _log = self.timed(key if not run else f"{key}-{run + 1}",
                                 [WALRUS, "--config", self.config, "backup-fetch", target, name],
                                 {"WALRUS_IO_METHOD": "io_uring"}, target, server=False)
            size = tree_bytes(target)
            verified = self.verify(key, target, expected) if not run else "timed only"
        except (StepFailed, RuntimeError, AssertionError) as e:
            remove_tree(target)
            return self.failed("delta-restore", key, label, "walrus", str(e))
        if not self.args.keep or (run is not None and run + 1 < self.args.repeat):
            remove_tree(target)
        self.say(f"    {m.wall_s:.1f} s, {size / MIB:.0f} MiB: {verified}")
        row = self.row("delta-restore", key, label, "walrus", m, output_bytes=size, output_mib=size / MIB,
                       backup_name=name, backups=backups, verified=verified)
        self.rows.append(row)
        self.run_samples.setdefault(label, []).append(self.samples["delta-restore"][label])
        return row

    def verify(self, key: str, target: str, expected: dict[str, str]) -> str:
        """As bench/run.py verifies a restore (verify_restore)."""
        return verify_restore(target, self.root, self.config, expected, self.logs, f"delta-{key}", self.clusters)

    # -- the run ------------------------------------------------------------------------------------------
    def relation_facts(self) -> dict:
        """Where pgbench_accounts and its primary key live, their size in pages and the last hot page."""
        c = self.cluster
        out = {}
        for rel in ("pgbench_accounts", "pgbench_accounts_pkey"):
            out[rel] = {"path": c.psql(f"SELECT pg_relation_filepath('{rel}')"),
                        "pages": int(c.psql(f"SELECT pg_relation_size('{rel}') / {PAGE}"))}
        out["pgbench_accounts"]["hot_pages"] = 1 + int(c.psql(
            f"SELECT (ctid::text::point)[0]::bigint FROM pgbench_accounts WHERE aid = {self.hot_aid}"))
        return out

    def reference(self, base_lsn: int, at_base: dict) -> None:
        """The changed pages (pd_lsn >= the full backup's start LSN) of the data directory, compressed with
        the same codec; and the share of pgbench_accounts that changed."""
        self.say("==> delta: reference: pages with pd_lsn >= the full backup's start LSN, compressed "
                 f"({self.args.compression}, {CHUNK // MIB} MiB chunks)")
        paths = {r: at_base[r]["path"] for r in ("pgbench_accounts", "pgbench_accounts_pkey")}
        scan = scan_changed_pages(self.cluster.data, base_lsn, self.args.compression, set(paths.values()))
        ref = {k: scan[k] for k in ("relation_pages", "changed_pages", "changed_bytes", "stored_bytes", "seconds")}
        ref["codec"] = self.args.compression
        ref["runs"] = len(scan["reads"])
        self.facts["reference"] = ref
        self.changed_reads = scan["reads"]
        for rel, path in paths.items():
            blocks, now, then = scan["blocks"][path], scan["sizes"][path], at_base[rel]["pages"]
            facts = {"pages_now": now, "pages_at_base": then, "changed_pages": len(blocks),
                     "changed_share": len(blocks) / now if now else None,
                     "changed_existing": sum(b < then for b in blocks), "appended": sum(b >= then for b in blocks)}
            facts["existing_share"] = facts["changed_existing"] / then if then else None
            if "hot_pages" in at_base[rel]:
                hot = at_base[rel]["hot_pages"]
                facts.update(hot_pages=hot, changed_hot=sum(b < hot for b in blocks),
                             changed_cold=sum(hot <= b < then for b in blocks))
            self.facts[rel] = facts
        acc = self.facts["pgbench_accounts"]
        self.say(f"    {ref['changed_pages']} of {ref['relation_pages']} relation pages changed, "
                 f"{ref['stored_bytes'] / MIB:.1f} MiB compressed; pgbench_accounts: {acc['changed_pages']} of "
                 f"{acc['pages_now']} pages ({acc['changed_share']:.1%}), {acc.get('changed_hot')} of its "
                 f"{acc.get('hot_pages')} hot pages, {acc['appended']} appended")

    def disk_floor(self) -> None:
        """The disk's own time for the changed pages: fio reads the reference's runs of them, `repeat` times
        from a cold page cache (bench/measure.replay_reads_s). A map delta reads these pages and little
        else, so its data phase cannot take less; none of a process's or a backup's fixed costs are in it."""
        if not self.changed_reads:
            return
        self.say(f"==> delta: the disk's time for the changed pages (fio, O_DIRECT, {FLOOR_DEPTH} in flight, "
                 "cold cache)")
        samples = [replay_reads_s(self.changed_reads, FLOOR_DEPTH) for _ in range(max(1, self.args.repeat))]
        if any(x is None for x in samples):
            self.say("    not measured: fio is missing, the page cache cannot be dropped, or fio failed")
            return
        total = sum(length for _, _, length in self.changed_reads)
        seconds = statistics.median(samples)
        mib_s = total / MIB / seconds if seconds else None  # None: fio's clock (ms) saw no time pass
        self.facts["disk_floor"] = {"seconds": seconds, "samples_s": samples, "bytes": total,
                                    "runs": len(self.changed_reads), "depth": FLOOR_DEPTH, "mib_s": mib_s}
        self.say(f"    {total / MIB:.0f} MiB in {len(self.changed_reads)} runs: {seconds:.3f} s "
                 f"({_fmt(mib_s, '{:.0f}')} MiB/s)")

    def run_all(self) -> None:
        """The source, the base point (walrus full, pgBackRest full), the load, the reference, the two walrus
        deltas of the full, pgBackRest incr and diff, the chain of three deltas, the two restores."""
        a = self.args
        self.create_source()
        at_base = self.relation_facts()
        # the walrus full and its two deltas run `repeat` times (one after the other, no writes between):
        # the ratios the issue sets sit within one run's noise on this VM. The first full is the base of
        # every delta; the row of each is the run with the median wall time, as in bench/run.py.
        runs = max(1, a.repeat)
        fulls = [self.walrus_backup("walrus-full", "walrus full", full=True, run=i) for i in range(runs)]
        failed = next((row for row in fulls if row.get("error")), None)
        if failed is not None:
            raise StepFailed(f"the walrus full backup failed: {failed['error']}")
        full = fulls[0]
        self.keep_median(fulls)
        self.pgbackrest_backup("full")
        self.facts["load"] = self.load(a.delta_seconds, "load")
        self.settle()
        base_lsn = _parse_lsn(full["start_lsn"])
        self.reference(base_lsn, at_base)
        self.disk_floor()
        maps, scans = [], []
        for i in range(runs):  # in turns, so a slower spell of the VM's disk does not fall on one method
            maps.append(self.walrus_backup("walrus-map", "walrus delta (block map)", base=full["backup_name"],
                                           block_map=True, run=i))
            scans.append(self.walrus_backup("walrus-scan", "walrus delta (page scan)", base=full["backup_name"],
                                            block_map=False, run=i))
        self.keep_median(maps)
        self.keep_median(scans)
        self.pgbackrest_backup("incr")  # since the full: nothing was taken in between
        self.pgbackrest_backup("diff")  # since the full as well
        chain, base = [], full["backup_name"]
        for i in range(1, CHAIN + 1):
            self.facts[f"chain_load_{i}"] = self.load(a.delta_chain_seconds, f"chain-{i}")
            row = self.walrus_backup(f"walrus-chain-{i}", f"walrus chain delta {i}/{CHAIN}", base=base,
                                     chain_step=i)
            if row.get("error"):
                break
            chain.append(row)
            base = row["backup_name"]
        # writes after every backup, so each restore must also replay WAL (as bench/run.py does)
        self.say("==> delta: pgbench writes after the backups; archive them; digest of the source")
        c = self.cluster
        run([os.path.join(pg_bindir(), "pgbench"), "-n", "-c", "2", "-j", "2", "-t",
             "200" if a.smoke else "2000", "-h", c.sockdir, "-p", str(c.port), "postgres"], timeout=3600)
        archive_everything(c)
        wait_archiver_idle(c)
        expected = content_digest(c)
        # the two restores run `repeat` times in turns, the first of each verified; rows are the medians
        alone, whole = [], []
        for i in range(runs if len(chain) == CHAIN else 1):
            alone.append(self.restore("restore-full", "walrus full alone", full["backup_name"], expected, 1, run=i))
            if len(chain) == CHAIN:
                whole.append(self.restore("restore-chain", f"walrus full + {CHAIN} deltas", chain[-1]["backup_name"],
                                          expected, 1 + CHAIN, run=i))
        self.keep_median(alone)
        self.keep_median(whole)
        if len(chain) != CHAIN:
            self.failed("delta-restore", "restore-chain", f"walrus full + {CHAIN} deltas", "walrus",
                        "the chain of deltas was not completed")
        self.facts["walrus_repo_mib"] = {
            d: round(tree_bytes(os.path.join(self.walrus_repo, d)) / MIB, 1)
            for d in sorted(os.listdir(self.walrus_repo))} if os.path.isdir(self.walrus_repo) else {}
        self.facts["pgbackrest_archive_mib"] = round(tree_bytes(os.path.join(self.pgbr_repo, "archive")) / MIB, 1)
        self.add_ratios()

    # -- reporting ----------------------------------------------------------------------------------------
    def _get(self, step: str) -> dict | None:
        return next((r for r in self.rows if r.get("step") == step and not r.get("error")), None)

    def add_ratios(self) -> None:
        full = self._get("walrus-full")
        ref = self.facts.get("reference", {}).get("stored_bytes")
        for r in self.rows:
            if r.get("error"):
                continue
            if r["operation"] == "delta" and full:
                r["wall_x_full"] = _ratio(r["wall_s"], full["wall_s"])
                r["stored_x_full"] = _ratio(r["stored_bytes"], full["stored_bytes"])
                if r.get("method") != "full":  # a full backup over the changed pages means nothing
                    r["stored_x_reference"] = _ratio(r["stored_bytes"], ref)
        restore_full = self._get("restore-full")
        for r in self.rows:
            if r["operation"] == "delta-restore" and not r.get("error") and restore_full:
                r["wall_x_full"] = _ratio(r["wall_s"], restore_full["wall_s"])
        m, s, i = self._get("walrus-map"), self._get("walrus-scan"), self._get("pgbackrest-incr")
        ratios = {}

        def pair(key: str, a: dict | None, b: dict | None, size_key: str = "stored_bytes") -> None:
            if a and b:
                ratios[key] = {"wall": _ratio(a["wall_s"], b["wall_s"]),
                               "stored": _ratio(a.get(size_key), b.get(size_key))}

        pair("map_delta/walrus_full", m, full)
        pair("map_delta/pgbackrest_incr", m, i)
        pair("scan_delta/walrus_full", s, full)
        pair("map_delta/scan_delta", m, s)
        for key, r in (("map_delta", m), ("scan_delta", s), ("pgbackrest_incr", i)):
            if r and ref:
                ratios[f"{key}_stored/reference"] = r["stored_bytes"] / ref
        chain_restore = self._get("restore-chain")
        if chain_restore and restore_full:
            ratios["chain_restore/full_restore"] = {"wall": _ratio(chain_restore["wall_s"], restore_full["wall_s"]),
                                                    "cpu": _ratio(chain_restore["cpu_s"], restore_full["cpu_s"]),
                                                    "peak_rss": _ratio(chain_restore["peak_rss_mib"],
                                                                       restore_full["peak_rss_mib"])}
        floor = self.facts.get("disk_floor")
        if floor and m and full:
            ratios["disk_floor/walrus_full"] = _ratio(floor["seconds"], full["wall_s"])
            ratios["map_data/disk_floor"] = _ratio(m.get("data_s"), floor["seconds"])
        self.facts["ratios"] = ratios

    def reference_row(self) -> dict | None:
        ref = self.facts.get("reference")
        if not ref:
            return None
        return {"tool": f"reference: changed pages, {ref['codec']}", "stored_mib": ref["stored_bytes"] / MIB,
                "stored_x_full": _ratio(ref["stored_bytes"], (self._get("walrus-full") or {}).get("stored_bytes")),
                "stored_x_reference": 1.0, "method": f"{ref['changed_pages']} pages"}

    def tables(self) -> list[str]:
        a = self.args
        text = []
        backups = [r for r in self.rows if r["operation"] == "delta"]
        ref = self.reference_row()
        acc = self.facts.get("pgbench_accounts")
        load = self.facts.get("load") or {}
        head = (f"delta ({a.compression}, scale {a.scale}, {a.workers} workers, file storage; pgbench -T "
                f"{a.delta_seconds} -c {a.delta_clients} over aid <= {self.hot_aid} = first {a.delta_share:g}% of "
                f"pgbench_accounts, {load.get('tps') or 0:.0f} TPS)")
        if acc:
            head += (f"\npgbench_accounts pages changed since the full: {acc['changed_pages']} of {acc['pages_now']} "
                     f"({acc['changed_share']:.1%}); of its {acc['pages_at_base']} pages at the full: "
                     f"{acc['changed_existing']} ({acc['existing_share']:.1%}: {acc['changed_hot']} of the "
                     f"{acc['hot_pages']} hot pages, {acc['changed_cold']} others), plus {acc['appended']} appended")
        if self.facts.get("reference"):
            r = self.facts["reference"]
            head += (f"\nall relation pages changed: {r['changed_pages']} of {r['relation_pages']} "
                     f"({r['changed_bytes'] / MIB:.0f} MiB raw, {r['stored_bytes'] / MIB:.1f} MiB {r['codec']})")
        text += [head, report.table_of(backups + ([ref] if ref else []), BACKUP_COLUMNS), ""]
        restores = [r for r in self.rows if r["operation"] == "delta-restore"]
        if restores:
            text += [f"delta restore ({a.compression}, {a.workers} workers; the chain: the full and "
                     f"{CHAIN} deltas, each after pgbench -T {a.delta_chain_seconds} over the same share)",
                     report.table_of(restores, RESTORE_COLUMNS), ""]
        lines = self.ratio_lines()
        if lines:
            text += ["delta ratios:"] + [f"- {line}" for line in lines] + [""]
        return text

    def ratio_lines(self) -> list[str]:
        ratios = self.facts.get("ratios", {})
        out = []
        names = {"map_delta/walrus_full": "map delta / walrus full",
                 "map_delta/pgbackrest_incr": "map delta / pgBackRest incr",
                 "scan_delta/walrus_full": "scan delta / walrus full",
                 "map_delta/scan_delta": "map delta / scan delta"}
        for key, label in names.items():
            if key in ratios:
                r = ratios[key]
                out.append(f"{label}: wall {_fmt(r['wall'])}, stored {_fmt(r['stored'])}")
        parts = [f"{label} {ratios[key]:.2f}" for key, label in (
            ("map_delta_stored/reference", "map delta"), ("scan_delta_stored/reference", "scan delta"),
            ("pgbackrest_incr_stored/reference", "pgBackRest incr")) if key in ratios]
        if parts:
            out.append("stored / reference: " + ", ".join(parts))
        floor, m = self.facts.get("disk_floor"), self._get("walrus-map")
        if floor and "disk_floor/walrus_full" in ratios:
            line = (f"the changed pages at the disk's speed (fio, cold, {floor['depth']} in flight, median of "
                    f"{len(floor['samples_s'])}): {floor['seconds']:.3f} s for {floor['bytes'] / MIB:.0f} MiB in "
                    f"{floor['runs']} runs ({_fmt(floor['mib_s'], '{:.0f}')} MiB/s), "
                    f"{ratios['disk_floor/walrus_full']:.3f} of walrus full's wall")
            if m.get("data_s") is not None:
                over = _fmt(ratios["map_data/disk_floor"], "{:.2f}")
                line += (f"; map delta's data phase {m['data_s']:.2f} s ({over}x that), the rest of its wall "
                         f"{m['wall_s'] - m['data_s']:.2f} s")
            out.append(line)
        if "chain_restore/full_restore" in ratios:
            r = ratios["chain_restore/full_restore"]
            out.append(f"chain restore / full restore: wall {_fmt(r['wall'])}, CPU {_fmt(r['cpu'])}, "
                       f"peak RSS {_fmt(r['peak_rss'])}")
        return out

    def notes(self) -> list[str]:
        a = self.args
        out = [
            f"delta: one source cluster of its own (pgbench -i -s {a.scale}, autovacuum off), archive_command = "
            "`walrus wal-push %p && pgbackrest archive-push %p` (walrus with WALG_DELTA_MAX_STEPS="
            f"{DELTA_STEPS}, so it records the WAL block map); CHECKPOINT, pg_switch_wal and an idle archiver "
            "before each backup; each timed step from a cold page cache.",
            "delta: walrus full = backup-push --full; both walrus deltas are built on that full "
            "(--delta-from-name), the block map one with WALRUS_BLOCK_MAP=true, the page scan one with "
            "WALRUS_BLOCK_MAP=false, taken one after the other with no writes in between; pgBackRest full "
            "right after walrus's full (no writes in between), then incr and diff after the deltas (both "
            "relative to that full: nothing was backed up in between); pgBackRest archive-check on "
            "(its WAL is archived), start-fast=y, process-max=workers.",
            "delta: stored MiB = the backup's own objects (walrus: basebackups_005/<name>/ and its sentinel; "
            "pgBackRest: backup/bench/<label>/), WAL not included. x full = over walrus full's; x reference = "
            "stored over the reference.",
            "delta: reference = every page of base/<db>/<n>[.N] and pg_tblspc whose pd_lsn >= the walrus full's "
            f"start LSN, read by the bench itself (not walrus) after the load's CHECKPOINT, concatenated and "
            f"compressed in {CHUNK // MIB} MiB chunks with python "
            + ("lz4.frame (independent 4 MiB blocks)" if a.compression == "lz4" else "zstandard level 3")
            + "; a delta also holds whole changed non-relation files (fsm, vm, pg_xact, catalogs' ...), "
            "pg_control and backup_label.",
            f"delta: chain = the full, then {CHAIN} deltas each of the one before (the first of the full), each "
            f"after pgbench -T {a.delta_chain_seconds} of the same hot script; restore = backup-fetch of the "
            "full alone, and of the last delta of the chain (the full and every delta), each into an empty "
            "directory, then verified as the restores above (recovery to the end of the archive after more "
            "pgbench writes, every table's row count and summed row md5).",
            "delta: data s = from walrus's log line that the backup started (pg_backup_start done, the block "
            "maps read) to its last data part's line: the data's reads, compression and writes, without the "
            "process's start, the backup's stop, its WAL and sentinel. The disk's time for the changed pages: "
            f"fio 'read_iolog' replays the reference's runs of changed pages (at most 1 MiB a read), O_DIRECT "
            f"through io_uring with {FLOOR_DEPTH} in flight, from a cold page cache, right after the reference; "
            "a map delta must read those pages, so its data phase cannot take less on this disk.",
        ]
        unreported = [r["tool"] for r in self.rows if r.get("tool_name") == "walrus" and r["operation"] == "delta"
                      and not r.get("error") and r.get("delta_from") and not r.get("delta_method")]
        if unreported:
            out.append("delta: WARNING: walrus's backup-push --json result had no delta_method for "
                       + ", ".join(unreported) + " (shown as \"not reported\"): which way those deltas found "
                       "their pages is only in walrus's own log lines quoted below, where it wrote any; a walrus "
                       "without the block map scans pages whatever WALRUS_BLOCK_MAP says, and then the block "
                       "map and page scan rows measure the same thing.")
        for r in self.rows:
            for line in r.get("walrus_log_lines") or []:
                out.append(f"delta: walrus log, {r['tool']}: {line}")
        for key, value in sorted(self.facts.items()):
            if key.startswith("chain_load_") and value.get("tps"):
                out.append(f"delta: chain load {key[-1]}: {value['transactions']} transactions, "
                           f"{value['tps']:.0f} TPS")
        if self.facts.get("walrus_repo_mib"):
            out.append("delta: walrus repository at the end, MiB by folder: " + ", ".join(
                f"{k} {v}" for k, v in self.facts["walrus_repo_mib"].items())
                + f"; pgBackRest WAL archive {self.facts.get('pgbackrest_archive_mib')} MiB.")
        if a.repeat > 1:
            out.append(f"delta: walrus full ran {a.repeat} times before the load, and the two walrus deltas "
                       f"{a.repeat} times each after it, in turns, each built on the first full; each row is the run with "
                       "the median wall time (lower median for an even count), every run's time is in results.json "
                       "(runs_wall_s); the two restores ran as many times, in turns, the first of each verified and the "
                       "others only timed; pgBackRest's backups and the chain ran once.")
        return out + self.errors

    def versions(self) -> dict[str, str]:
        return {"walrus": first_line([WALRUS, "--version"]),
                "pgBackRest": first_line([shutil.which("pgbackrest") or "pgbackrest", "version"])}

    def plot(self, plt, out: str) -> None:
        a = self.args
        for op, name in (("delta", "memory-delta.png"), ("delta-restore", "memory-delta-restore.png")):
            if self.samples[op]:
                report.plot_memory(plt, os.path.join(out, name), op, self.samples[op],
                                   f"pgbench scale {a.scale}, {a.compression}, {a.workers} workers")

    def close(self) -> None:
        for c in self.clusters:
            c.stop("immediate")
        if self.cluster is not None:
            log = self.cluster.log()
            if log:
                with open(os.path.join(self.logs, "delta-source-server.log"), "w") as f:
                    f.write(log)
        if self.args.keep:
            self.say(f"kept {self.root}")
        else:
            remove_tree(self.root)  # pgBackRest's -etc directory is in it too


def _parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return int(hi, 16) << 32 | int(lo, 16)


def _fmt(value: float | None, form: str = "{:.3f}") -> str:
    return "-" if value is None else form.format(value)
