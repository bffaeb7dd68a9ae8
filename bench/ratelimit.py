"""Benchmark: `walrus backup-push` of a pgbench cluster under WALG_NETWORK_RATE_LIMIT, under
WALG_DISK_RATE_LIMIT, and with both set and lifted by --turbo, on file storage with lz4; and the
network limit once more without compression, where the limit binds throughout.

    .venv/bin/python -m bench.ratelimit                    # scale 30, 50 MiB/s
    .venv/bin/python -m bench.ratelimit --scale 100 --rate 20971520

Each case backs up into a fresh repository from a cold page cache. The rate a limit governs is
measured over the data parts, from walrus's log: from "backup ... started" (after pg_backup_start)
to the last "uploaded part_N" line. The network case divides the bytes of the stored data parts
by that time, the disk case the bytes of files those parts read. The command's own start-up,
pg_backup_start/stop, the control-file parts and the wait for the archiver are fixed costs
outside any limit, shown in "command s".

A limit is a ceiling: it holds the rate only while the pipeline could go faster. pgbench's tables
compress about tenfold, so lz4 on a small machine may feed the storage less than the limit for
stretches, and the network case then stays under it; the uncompressed case feeds it the whole tar
stream.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from bench.measure import drop_caches, tree_bytes  # noqa: E402
from bench.report import table_of  # noqa: E402
from tests.pgcluster import (WALRUS, Cluster, chown_to_user, make_workdir, pg_bindir, remove_tree, run,  # noqa: E402
                             write_config)

MIB = 2 ** 20
DEFAULT_RATE = 50 * MIB
TOLERANCE = 0.1  # a limit is met when the achieved rate is within this fraction of it
LOG_LINE = re.compile(r"^\w+: (\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d{6}) (.*)$")
PART_LINE = re.compile(r"uploaded (part_\d+\.tar\S*) \((\d+) bytes of files\)")


@dataclass(frozen=True)
class Case:
    name: str
    settings: dict[str, str]
    turbo: bool
    measured: str  # "stored" | "read": the bytes whose rate the limit governs
    compression: str = "lz4"


@dataclass
class Result:
    case: Case
    limit: int
    read: int  # bytes of files in the data parts
    stored: int  # bytes of the data parts in the repository
    command_s: float
    transfer_s: float

    def mib_s(self, what: str) -> float:
        return (self.stored if what == "stored" else self.read) / MIB / self.transfer_s

    def row(self) -> dict:
        achieved = self.mib_s(self.case.measured)
        low, high = self.limit / MIB * (1 - TOLERANCE), self.limit / MIB * (1 + TOLERANCE)
        if self.case.turbo:
            verdict = f"lifted: {'yes' if achieved > high else 'NO'}"
        else:
            verdict = f"{low:.0f}-{high:.0f}: {'yes' if low <= achieved <= high else 'NO'}"
        return {"case": self.case.name, "compression": self.case.compression,
                "limit": f"{self.limit / MIB:g} MiB/s" + (" + --turbo" if self.case.turbo else ""),
                "read_mib": self.read / MIB, "stored_mib": self.stored / MIB, "command_s": self.command_s,
                "transfer_s": self.transfer_s, "measures": self.case.measured, "mib_s": achieved,
                "read_mib_s": self.mib_s("read"), "stored_mib_s": self.mib_s("stored"), "verdict": verdict,
                "ok": verdict.endswith("yes")}


COLUMNS = [("case", "case", "{}"), ("compression", "compression", "{}"), ("limit", "limit", "{}"),
           ("read MiB", "read_mib", "{:.1f}"), ("stored MiB", "stored_mib", "{:.1f}"),
           ("command s", "command_s", "{:.2f}"), ("transfer s", "transfer_s", "{:.2f}"),
           ("measures", "measures", "{}"), ("MiB/s", "mib_s", "{:.1f}"), ("read MiB/s", "read_mib_s", "{:.1f}"),
           ("stored MiB/s", "stored_mib_s", "{:.1f}"), ("within", "verdict", "{}")]


def say(text: str) -> None:
    print(text, flush=True)


def cases(rate: int) -> list[Case]:
    both = {"WALG_NETWORK_RATE_LIMIT": str(rate), "WALG_DISK_RATE_LIMIT": str(rate)}
    network = {"WALG_NETWORK_RATE_LIMIT": str(rate)}
    return [Case("network", network, False, "stored"),
            Case("disk", {"WALG_DISK_RATE_LIMIT": str(rate)}, False, "read"),
            Case("turbo", both, True, "read"),
            Case("network-raw", network, False, "stored", "none")]


def transfer_window(log: str) -> tuple[float, int, list[str]]:
    """Seconds from the backup's start to the last data part uploaded, the bytes of files those parts
    read, and the parts' object names, from walrus's log lines."""
    start = end = None
    read, parts = 0, []
    for line in log.splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        stamp, message = datetime.strptime(m.group(1), "%Y/%m/%d %H:%M:%S.%f"), m.group(2)
        if re.match(r"backup \S+ started at", message):
            start = stamp
        elif p := PART_LINE.match(message):
            end = stamp
            read += int(p.group(2))
            parts.append(p.group(1))
    if start is None or end is None:
        raise RuntimeError(f"no backup start or data part in walrus's log:\n{log[-2000:]}")
    return (end - start).total_seconds(), read, parts


def wait_archiver_idle(c: Cluster, timeout: float = 300) -> None:
    """No .ready file left, so the next case starts with a quiet server."""
    status = os.path.join(c.data, "pg_wal", "archive_status")
    deadline = time.monotonic() + timeout
    while any(n.endswith(".ready") for n in os.listdir(status)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the archiver did not go idle in {timeout:.0f} s\n{c.log()[-2000:]}")
        time.sleep(0.2)


def backup(c: Cluster, root: str, case: Case, rate: int) -> Result:
    repo = os.path.join(root, f"repo-{case.name}")
    os.makedirs(repo)
    chown_to_user(repo)
    env = {**c.env, "WALG_FILE_PREFIX": repo, "WALG_COMPRESSION_METHOD": case.compression, **case.settings}
    argv = [WALRUS] + (["--turbo"] if case.turbo else []) + ["backup-push", c.data, "--json"]
    c.psql("CHECKPOINT")  # pg_backup_start's checkpoint then has nothing to write
    cold = drop_caches()
    began = time.monotonic()
    proc = run(argv, env=env, timeout=3600)
    command_s = time.monotonic() - began
    log = proc.stderr.decode(errors="replace")
    with open(os.path.join(root, f"{case.name}.log"), "w") as f:
        f.write(log)
    name = json.loads(proc.stdout)["backup_name"]
    transfer_s, read, parts = transfer_window(log)
    folder = os.path.join(repo, "basebackups_005", name, "tar_partitions")
    stored = sum(os.path.getsize(os.path.join(folder, p)) for p in parts)
    wait_archiver_idle(c)
    say(f"    {case.name}: {command_s:.2f} s{'' if cold else ' (WARM cache: cannot drop it)'}")
    return Result(case, rate, read, stored, command_s, transfer_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=30, help="pgbench scale (default 30, about 450 MiB)")
    ap.add_argument("--rate", type=int, default=DEFAULT_RATE, help="the limit in bytes/s (default 52428800)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (cluster stopped)")
    ap.add_argument("--out", help="write tables.txt and results.json into this directory")
    args = ap.parse_args()

    root = make_workdir("walrus-ratelimit-")
    archive = write_config(os.path.join(root, "archive.json"),
                           {"WALG_FILE_PREFIX": os.path.join(root, "archive"), "WALG_COMPRESSION_METHOD": "lz4"})
    c = None
    results: list[Result] = []
    try:
        say(f"==> cluster: initdb, archive_command = walrus wal-push, pgbench -i -s {args.scale}")
        c = Cluster.init(root)
        c.configure(archive_mode="on", archive_command=f"{WALRUS} --config {archive} wal-push %p",
                    autovacuum="off", max_wal_size="4GB", checkpoint_timeout="30min")
        c.start()
        run([os.path.join(pg_bindir(), "pgbench"), "-i", "-q", "-s", str(args.scale), "-h", c.sockdir,
             "-p", str(c.port), "postgres"], timeout=3600)
        c.psql("CHECKPOINT")
        wait_archiver_idle(c)
        db = tree_bytes(c.data) - tree_bytes(os.path.join(c.data, "pg_wal"))
        say(f"    database: {db / MIB:.0f} MiB (PGDATA without pg_wal); limit {args.rate / MIB:g} MiB/s")
        for case in cases(args.rate):
            say(f"==> backup-push, {case.name}")
            results.append(backup(c, root, case, args.rate))
    finally:
        if c is not None:
            c.stop()
        if args.keep:
            say(f"work directory kept: {root}")
        else:
            remove_tree(root)
    rows = [r.row() for r in results]
    text = "\n".join([table_of(rows, COLUMNS), "",
                      "MiB/s: the column the case's limit governs (network: stored bytes, disk and turbo: bytes "
                      "read), over transfer s (backup start to the last data part); command s: the whole "
                      "walrus backup-push, start-up and the archiver's wait included. A limit is a ceiling: "
                      "where the pipeline feeds less than it for stretches (lz4's stored bytes on a small "
                      "machine), the rate over the transfer stays under it."])
    say("")
    say(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tables.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            git = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
            json.dump({"meta": {"args": vars(args), "nproc": os.cpu_count(), "walrus_commit": git.stdout.strip()},
                       "rows": rows}, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
