"""The failover drill (issue 21): from a command to a promoted server at the end of the archive, walrus
`restore --start` against pgBackRest `restore` + start with asynchronous archive-get, on the same backups
and WAL; and what checking costs: `backup-verify` of that backup beside its restore, and backup-push
--verify (page checksums) beside a plain backup-push.

    .venv/bin/python bench/failover.py --scale 200 --wal-mib 1024 --out bench/results/failover-$(date -u +%Y%m%dT%H%M%SZ)

One source cluster of its own, initialised with data checksums: pgbench -i -s SCALE, archive_command =
`walrus wal-push && pgbackrest archive-push`; walrus full backups with and without --verify and a
pgBackRest full backup; then pgbench until WAL-MIB of WAL were written after the backups, all archived,
and the source's contents digested and stopped (the failover). Each timed step starts from a cold page
cache; each restored server is checked against the source's digest.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import report  # noqa: E402
from bench.measure import run_timed, tree_bytes  # noqa: E402
from bench.run import (MAX_WAL_SENDERS, archive_everything, compile_walrus, content_digest, make_workdir,  # noqa: E402
                       say, wait_archiver_idle, walrus_source)
from bench.tools import first_line, pgbackrest_argv, pgbackrest_stanza, user_dir, user_env  # noqa: E402
from tests.pgcluster import (WALRUS, Cluster, free_port, pg_bindir, remove_tree, run, run_user,  # noqa: E402
                             write_config)

MIB = 2 ** 20
COLUMNS = [("step", "label", "{}"), ("wall s", "wall_s", "{:.1f}"), ("CPU s", "cpu_s", "{:.1f}"),
           ("peak RSS MiB", "peak_rss_mib", "{:.1f}"), ("verified", "verified", "{}")]


class Drill:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.root = make_workdir("walrus-failover-") if args.workdir is None else \
            user_dir(os.path.join(args.workdir, f"walrus-failover-{os.getpid()}"))
        self.repo = os.path.join(self.root, "walrus-repo")
        self.pgbr_repo = os.path.join(self.root, "pgbackrest-repo")
        self.config = write_config(os.path.join(self.root, "walrus.json"), {
            "WALG_FILE_PREFIX": self.repo, "WALG_COMPRESSION_METHOD": args.compression,
            "WALG_UPLOAD_DISK_CONCURRENCY": str(args.workers), "WALG_DOWNLOAD_CONCURRENCY": str(args.workers)})
        self.rows: list[dict] = []
        self.facts: dict = {"scale": args.scale, "wal_mib_target": args.wal_mib, "workers": args.workers}
        self.clusters: list[Cluster] = []
        self.source: Cluster | None = None

    def timed(self, key: str, label: str, argv: list[str], flush: str, env: dict | None = None) -> dict:
        log = os.path.join(self.logs, f"{key}.log")
        m = run_timed(argv, user=run_user(), env=user_env(env or {}), cwd=self.root, log_path=log, flush_dir=flush,
                      server_pid=None, cold=True, timeout=4 * 3600)
        row = {"step": key, "label": label, "wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_rss_mib": m.peak_rss / MIB,
               "cold_cache": m.cold_cache, "returncode": m.returncode, "verified": None}
        if m.returncode != 0:
            row["error"] = f"exited {m.returncode}; see logs/{key}.log"
        self.rows.append(row)
        say(f"    {label}: {m.wall_s:.1f} s" + (f" FAILED ({row['error']})" if m.returncode else ""))
        return row

    # -- source, backups, WAL ---------------------------------------------------------------------
    def prepare(self) -> None:
        a = self.args
        say(f"==> failover: source cluster with data checksums, pgbench -i -s {a.scale}")
        c = self.source = Cluster.init(self.root, checksums=True)
        self.clusters.append(c)
        walrus = f"{shlex.quote(WALRUS)} --config {shlex.quote(self.config)} wal-push %p"
        pgbr = " ".join(map(shlex.quote, pgbackrest_argv(self.pgbr_repo, "archive-push"))) + " %p"
        c.configure(archive_mode="on", archive_command=f"{walrus} && {pgbr}", max_wal_senders=MAX_WAL_SENDERS,
                    autovacuum="off", max_wal_size="4GB", checkpoint_timeout="30min")
        c.start()
        user_dir(self.pgbr_repo)
        compress = {"lz4": "lz4", "zstd": "zst"}[a.compression]
        pgbackrest_stanza(self.pgbr_repo, c, self.root, [
            f"repo1-path={self.pgbr_repo}", "repo1-type=posix", f"compress-type={compress}",
            f"process-max={a.workers}", "start-fast=y", "archive-timeout=600", "archive-async=y",
            f"spool-path={user_dir(os.path.join(self.root, 'pgbackrest-spool'))}"])
        run([os.path.join(pg_bindir(), "pgbench"), "-i", "-q", "-s", str(a.scale), "-h", c.sockdir, "-p",
             str(c.port), "postgres"], timeout=4 * 3600)
        c.psql("CHECKPOINT")
        archive_everything(c)
        wait_archiver_idle(c)
        self.facts["db_mib"] = round((tree_bytes(c.data) - tree_bytes(os.path.join(c.data, "pg_wal"))) / MIB, 1)
        env = {**c.env, "WALRUS_IO_METHOD": "io_uring"}
        for key, label, extra in (("push", "walrus backup-push", []),
                                  ("push-verify", "walrus backup-push --verify", ["--verify"])):
            c.psql("CHECKPOINT")
            say(f"==> failover: {label}")
            self.timed(key, label, [WALRUS, "--config", self.config, "backup-push", "--full", *extra, c.data],
                       self.repo, env)
            wait_archiver_idle(c)
        say("==> failover: pgBackRest full backup")
        self.timed("pgbackrest-backup", "pgBackRest backup --type=full",
                   pgbackrest_argv(self.pgbr_repo, "--type=full", "backup"), self.pgbr_repo)
        wait_archiver_idle(c)
        start = c.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        say(f"==> failover: pgbench until {a.wal_mib} MiB of WAL after the backups")
        while int(c.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")) - int(start) < a.wal_mib * MIB:
            run([os.path.join(pg_bindir(), "pgbench"), "-n", "-c", "4", "-j", "2", "-T", "10", "-h", c.sockdir,
                 "-p", str(c.port), "postgres"], timeout=3600)
        self.facts["wal_mib"] = round((int(c.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")) - int(start)) / MIB)
        archive_everything(c)
        wait_archiver_idle(c)
        self.expected = content_digest(c)
        c.stop()  # the failover: the primary is gone
        self.clusters.remove(c)

    # -- the drill --------------------------------------------------------------------------------
    def walrus_failover(self) -> None:
        port = free_port()
        target = os.path.join(self.root, "walrus-restored")
        say("==> failover: walrus restore --start (to the end of the archive, promoted)")
        row = self.timed("walrus-restore", "walrus restore --start",
                         [WALRUS, "--config", self.config, "restore", target, "--start", "--json",
                          "--set", f"port={port}", "--set", f"unix_socket_directories={self.root}",
                          "--set", "archive_mode=off"], target, {"WALRUS_IO_METHOD": "io_uring"})
        row["verified"] = self.check(target, port, row)
        try:
            with open(os.path.join(self.logs, "walrus-restore.log")) as f:
                result = json.loads(next(line for line in f if line.startswith("{")))
            self.facts["walrus_fetch_s"] = result["fetch"]["seconds"]
        except (OSError, StopIteration, ValueError, KeyError):
            pass

    def pgbackrest_failover(self) -> None:
        port = free_port()
        target = user_dir(os.path.join(self.root, "pgbackrest-restored"))
        say("==> failover: pgBackRest restore + pg_ctl start (asynchronous archive-get), until promoted")
        settings = (f"port = {port}\nunix_socket_directories = '{self.root}'\narchive_mode = off\n")
        pg_ctl = os.path.join(pg_bindir(), "pg_ctl")
        psql = os.path.join(pg_bindir(), "psql")
        script = " && ".join([
            " ".join(map(shlex.quote, pgbackrest_argv(self.pgbr_repo, f"--pg1-path={target}", "restore"))),
            f"printf %s {shlex.quote(settings)} >> {shlex.quote(os.path.join(target, 'postgresql.auto.conf'))}",
            f"{pg_ctl} -D {shlex.quote(target)} -l {shlex.quote(os.path.join(self.root, 'pgbr-restored.log'))} -W start",
            f"until [ \"$({psql} -h {self.root} -p {port} -d postgres -tAc 'SELECT NOT pg_is_in_recovery()' "
            f"2>/dev/null)\" = t ]; do sleep 0.2; done"])
        row = self.timed("pgbackrest-restore", "pgBackRest restore + start", ["bash", "-c", script], target)
        row["verified"] = self.check(target, port, row)

    def verify_cost(self) -> None:
        say("==> failover: walrus backup-verify LATEST")
        self.timed("backup-verify", "walrus backup-verify", [WALRUS, "--config", self.config, "backup-verify",
                                                              "LATEST", "--json"], self.repo)

    def check(self, target: str, port: int, row: dict) -> str:
        if row.get("error"):
            return "FAILED"
        c = Cluster(data=target, sockdir=self.root, port=port)
        self.clusters.append(c)
        try:
            c.wait_until("SELECT pg_is_in_recovery()", "f", timeout=600)
            got = content_digest(c)
        finally:
            c.stop()
            self.clusters.remove(c)
            if not self.args.keep:
                remove_tree(target)
        return "verified" if got == self.expected else "MISMATCH"

    # -- report -----------------------------------------------------------------------------------
    def ratios(self) -> list[str]:
        wall = {r["step"]: r["wall_s"] for r in self.rows if not r.get("error")}
        lines = []
        if "walrus-restore" in wall and "pgbackrest-restore" in wall:
            lines.append(f"- failover, walrus / pgBackRest: {wall['walrus-restore'] / wall['pgbackrest-restore']:.3f} "
                         "(target <= 0.7)")
        if "backup-verify" in wall and "walrus_fetch_s" in self.facts:
            lines.append(f"- backup-verify / walrus restore's fetch: {wall['backup-verify'] / self.facts['walrus_fetch_s']:.3f}"
                         f" ({wall['backup-verify']:.1f} s / {self.facts['walrus_fetch_s']:.1f} s; target <= 1)")
        if "push" in wall and "push-verify" in wall:
            lines.append(f"- backup-push --verify / backup-push: {wall['push-verify'] / wall['push']:.3f} (target <= 1.10)")
        return lines

    def write(self) -> None:
        text = [f"failover drill ({self.args.compression}, scale {self.args.scale}, {self.facts.get('db_mib')} MiB, "
                f"{self.facts.get('wal_mib')} MiB of WAL after the backups, {self.args.workers} workers, file storage)",
                report.table_of(self.rows, COLUMNS), "", "ratios:", *self.ratios(), "",
                f"versions: walrus ({walrus_source()}); {first_line([os.path.realpath(pgbackrest_argv(self.pgbr_repo)[0]), 'version'])}"]
        print("\n".join(text))
        with open(os.path.join(self.out, "tables.txt"), "w") as f:
            f.write("\n".join(text) + "\n")
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump({"rows": self.rows, "facts": self.facts}, f, indent=2)

    def close(self) -> None:
        for c in list(self.clusters):
            try:
                c.stop()
            except Exception:  # the drill is over: stop what still runs, whatever failed
                pass
        if not self.args.keep:
            remove_tree(self.root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=200)
    ap.add_argument("--wal-mib", type=int, default=1024, help="WAL written after the backups (default 1024)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compression", choices=("lz4", "zstd"), default="lz4")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "failover")
    compile_walrus()
    drill = Drill(args)
    try:
        drill.prepare()
        drill.walrus_failover()
        drill.pgbackrest_failover()
        drill.verify_cost()
    finally:
        drill.close()
    drill.write()
    return 0 if all(not r.get("error") and r["verified"] in (None, "verified") for r in drill.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
