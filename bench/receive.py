"""The bench's `receive` operation (issue 24): `walrus wal-receive` streaming a source cluster's WAL into file
storage while `pgbench -c 4` writes, and how far behind the server it falls.

One source cluster of its own (as the `postgres` user when we are root, like bench/run.py's), archive_mode off
(the receiver is the archive), replication allowed (initdb's pg_hba.conf trusts local replication
connections), wal_keep_size large enough that every segment of the run is still in pg_wal at the end, to be
compared with what the receiver stored.

Lag, sampled every 100 ms from the server (pg_current_wal_lsn(), pg_stat_replication) and from the receiver's
spool directory (the bytes it has written there):
- receive lag = pg_current_wal_lsn() - write_lsn: WAL the server wrote that the receiver has not reported
  received. wal-receive reports its write position once 1 MiB more has arrived or 0.25 s after WAL
  arrived (and when a segment is stored), so this lag includes up to that reporting delay. spool lag = pg_current_wal_lsn() - the
  end of what is written in the spool, the same without it.
- archive lag = segment number of write_lsn - segment number of flush_lsn: completed segments received but
  not yet in storage (flush_lsn is the end of the last segment durable in storage, so it moves a whole
  segment at a time); spooled = completed segments in the spool directory (received, not yet stored and
  removed), the same count without the update's delay.
"""
from __future__ import annotations

import argparse
import getpass
import io
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import psycopg

from bench import report
from bench.measure import _cpu_children, _cpu_self, descendants, machine_busy_s, tree_bytes
from bench.run import MAX_WAL_SENDERS, op_workdir
from bench.tools import first_line, user_dir, user_env
from tests.pgcluster import (WALRUS, Cluster, as_user, pg_bindir, remove_tree, run, run_user,
                             walrus, write_config)

KIB, MIB, GIB = 2 ** 10, 2 ** 20, 2 ** 30
SLOT = "walrus_bench"
APPLICATION = f"walrus wal-receive {SLOT}"  # what wal-receive names its replication connection
SAMPLE_S = 0.1
STREAMING_TIMEOUT_S = 60.0  # the receiver's first connection, the slot's creation
DRAIN_TIMEOUT_S = 60.0  # after the burst: the switched segment stored and its end confirmed as flushed
STOP_GRACE_S = 15.0  # SIGTERM, then SIGKILL
WAL_KEEP = "4GB"  # pg_wal keeps this much, so the stored segments can be compared with the server's
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_SEGMENT_NAME = re.compile(r"[0-9A-F]{24}")
_EXTENSION = {"lz4": "lz4", "zstd": "zst"}

COLUMNS = [  # (header, row key, format)
    ("receive", "tool", "{}"),
    ("burst s", "wall_s", "{:.1f}"),
    ("TPS", "tps", "{:.0f}"),
    ("WAL MiB", "wal_mib", "{:.0f}"),
    ("WAL MiB/s", "wal_mib_s", "{:.1f}"),
    ("recv lag max KiB", "recv_lag_max_kib", "{:.0f}"),
    ("recv lag p99 KiB", "recv_lag_p99_kib", "{:.0f}"),
    ("spool lag max KiB", "spool_lag_max_kib", "{:.0f}"),
    ("archive lag max segs", "archive_lag_max", "{}"),
    ("spooled max", "spooled_max", "{}"),
    ("flush lag max MiB", "flush_lag_max_mib", "{:.1f}"),
    ("drain s", "drain_s", "{:.2f}"),
    ("CPU s", "cpu_s", "{:.1f}"),
    ("CPU s/GiB", "cpu_s_per_gib", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
    ("srv CPU s", "server_cpu_s", "{:.1f}"),
    ("verified", "verified", "{}"),
]
# a sample: [t_s, current, sent, write, flush, spool received, spooled]; LSNs as byte positions (None: unknown)
SAMPLE_FIELDS = ["t_s", "current_lsn", "sent_lsn", "write_lsn", "flush_lsn", "spool_received_lsn", "spooled"]


class StepFailed(Exception):
    """The receiver died, did not keep up within the bounds, or stored something wrong."""


def _say(text: str) -> None:
    print(text, flush=True)


def segment_name(segno: int, size: int, timeline: int = 1) -> str:
    per_id = 0x100000000 // size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def segment_number(name: str, size: int) -> int:
    return int(name[8:16], 16) * (0x100000000 // size) + int(name[16:24], 16)


def _ceil(lsn: int, size: int) -> int:
    return -(-lsn // size) * size


def _format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _pct(values: list[int], p: float) -> int | None:
    """The nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))]


def tree_cpu_s(pid: int) -> float | None:
    """user+sys CPU of pid and its live descendants, plus the children it has reaped (cutime, cstime)."""
    total, found = 0, False
    for n, p in enumerate(descendants(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        found = True
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        if n == 0:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime (fields 16, 17)
    return total / _CLK_TCK if found else None


def vm_hwm(pid: int) -> int | None:
    """Peak RSS (VmHWM) of pid and its live descendants, summed, in bytes."""
    total, found = 0, False
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * KIB
                        found = True
        except OSError:
            continue
    return total if found else None


def spool_state(path: str, size: int) -> tuple[int | None, int | None]:
    """(the end of the WAL written in the spool, completed segments waiting there) of wal-receive's spool
    directory: <segment>.receiving is the segment being received (written in order, so its size is how much
    of it has arrived); a file named as a segment is a completed one not yet stored and removed."""
    for _attempt in range(3):  # a rename between listdir and stat: look again
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            return None, None
        done = [n for n in names if _SEGMENT_NAME.fullmatch(n)]
        received, moved = None, False
        for n in names:
            if n.endswith(".receiving") and _SEGMENT_NAME.fullmatch(n[:24]):
                try:
                    got = os.stat(os.path.join(path, n)).st_size
                except FileNotFoundError:
                    moved = True
                    break
                received = max(received or 0, segment_number(n, size) * size + got)
        if moved:
            continue
        if done:
            received = max(received or 0, (max(segment_number(n, size) for n in done) + 1) * size)
        return received, len(done)
    return None, None


class Sampler(threading.Thread):
    """Every SAMPLE_S: the spool, then pg_current_wal_lsn() and the receiver's pg_stat_replication row (the
    spool first, so a lag is never understated by the query's own delay)."""

    QUERY = ("SELECT (pg_current_wal_lsn() - '0/0')::bigint, (r.sent_lsn - '0/0')::bigint, "
             "(r.write_lsn - '0/0')::bigint, (r.flush_lsn - '0/0')::bigint "
             "FROM (SELECT 1) one LEFT JOIN pg_stat_replication r ON r.application_name = %s")

    def __init__(self, conninfo: dict, spool: str, size: int, t0: float) -> None:
        super().__init__(name="receive-sampler", daemon=True)
        self.conninfo, self.spool, self.size, self.t0 = conninfo, spool, size, t0
        self.samples: list[list] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(**self.conninfo, autocommit=True) as conn:
                due = time.monotonic()
                while not self.halt.is_set():
                    received, spooled = spool_state(self.spool, self.size)
                    current, sent, write, flush = conn.execute(self.QUERY, (APPLICATION,)).fetchone()
                    self.samples.append([round(time.monotonic() - self.t0, 3), current, sent, write, flush,
                                         received, spooled])
                    due += SAMPLE_S
                    self.halt.wait(max(0.0, due - time.monotonic()))
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self) -> None:
        self.halt.set()
        self.join(10)
        if self.error is not None:
            raise StepFailed(f"sampling failed: {self.error}")


class ReceiveBench:
    """One run of the receive operation: its own cluster, storage and receiver, one row."""

    def __init__(self, args: argparse.Namespace, out: str, say: Callable[[str], None] = _say) -> None:
        self.args, self.out, self.say = args, out, say
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.root = op_workdir(args.workdir, "walrus-receivebench-")
        self.size = args.wal_segsize * MIB
        self.storage = os.path.join(self.root, "storage")
        self.spool_root = os.path.join(self.root, "spool")
        self.spool = os.path.join(self.spool_root, SLOT)  # wal-receive's directory for the slot
        self.config = write_config(os.path.join(self.root, "walrus.json"), {
            "WALG_FILE_PREFIX": self.storage, "WALG_COMPRESSION_METHOD": args.compression,
            "WALG_PG_WAL_SIZE": str(args.wal_segsize),
            # the verification's wal-fetch: no prefetch process left behind, reading a removed directory
            "WALG_DOWNLOAD_CONCURRENCY": "1"})
        self.receiver_log = os.path.join(self.logs, "receive-walrus.log")
        self.cluster: Cluster | None = None
        self.conn: psycopg.Connection | None = None
        self.receiver: subprocess.Popen | None = None
        self.rows: list[dict] = []
        self.samples: dict[str, dict[str, list[list]]] = {"receive": {}}
        self.facts: dict = {"slot": SLOT, "segment_mib": args.wal_segsize, "clients": args.burst_clients,
                            "seconds": args.burst_seconds, "sample_s": SAMPLE_S, "sample_fields": SAMPLE_FIELDS,
                            "wal_keep_size": WAL_KEEP}
        self.errors: list[str] = []

    # -- the source and the receiver ----------------------------------------------------------------------
    @property
    def conninfo(self) -> dict:
        c = self.cluster
        return {"host": c.sockdir, "port": c.port, "dbname": "postgres", "user": run_user() or getpass.getuser()}

    def value(self, query: str, *params):
        return self.conn.execute(query, params).fetchone()[0]

    def create_source(self) -> None:
        a = self.args
        self.say(f"==> receive: source cluster: initdb ({a.wal_segsize} MiB segments), archive_mode off, "
                 f"replication allowed, pgbench -i -s {a.scale}")
        c = Cluster.init(self.root, wal_segsize_mb=a.wal_segsize)
        c.configure(archive_mode="off", max_wal_senders=MAX_WAL_SENDERS, max_replication_slots=10,
                    wal_keep_size=WAL_KEEP, autovacuum="off", max_wal_size="8GB", checkpoint_timeout="30min")
        self.cluster = c
        c.start()
        run([os.path.join(pg_bindir(), "pgbench"), "-i", "-q", "-s", str(a.scale), "-h", c.sockdir, "-p",
             str(c.port), "postgres"], timeout=4 * 3600)
        self.conn = psycopg.connect(**self.conninfo, autocommit=True)
        # a fresh redo point: a physical slot reserves WAL from the last checkpoint's redo LSN, where the
        # receiver starts (rounded down to its segment)
        self.conn.execute("CHECKPOINT")
        user_dir(self.spool_root)

    def receiver_alive(self) -> None:
        if self.receiver is None or self.receiver.poll() is not None:
            code = None if self.receiver is None else self.receiver.returncode
            raise StepFailed(f"walrus wal-receive exited ({code}); see logs/receive-walrus.log:\n"
                             + self.receiver_tail())

    def receiver_tail(self, chars: int = 1500) -> str:
        try:
            with open(self.receiver_log, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def start_receiver(self) -> None:
        """walrus wal-receive as the cluster's user, in the background; returns once the server shows it
        streaming from the slot (which it creates)."""
        c = self.cluster
        self.say(f"==> receive: walrus wal-receive (WALG_SLOTNAME={SLOT}, {self.args.compression}, file storage)")
        env = user_env({**c.env, "WALG_SLOTNAME": SLOT})
        with open(self.receiver_log, "ab") as log:
            self.receiver = subprocess.Popen(
                [WALRUS, "--config", self.config, "wal-receive", "--spool-dir", self.spool_root], env=env,
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **as_user())
        deadline = time.monotonic() + STREAMING_TIMEOUT_S
        while self.value("SELECT count(*) FROM pg_stat_replication WHERE application_name = %s "
                         "AND state = 'streaming'", APPLICATION) == 0:
            self.receiver_alive()
            if time.monotonic() > deadline:
                raise StepFailed(f"wal-receive was not streaming {STREAMING_TIMEOUT_S:.0f} s after its start:\n"
                                 + self.receiver_tail())
            time.sleep(0.1)
        restart = self.value("SELECT (restart_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = %s",
                             SLOT)
        if restart is None:
            raise StepFailed(f"slot {SLOT} reserves no WAL")
        self.facts["first_segment"] = segment_name(restart // self.size, self.size)
        self.facts["slot_restart_lsn_at_start"] = _format_lsn(restart)
        self.facts["walsender_pid"] = self.value("SELECT pid FROM pg_stat_replication WHERE application_name = %s",
                                                 APPLICATION)
        self.say(f"    streaming from segment {self.facts['first_segment']} (the slot's restart_lsn "
                 f"{_format_lsn(restart)})")

    def flush_lsn(self) -> int | None:
        return self.value("SELECT (flush_lsn - '0/0')::bigint FROM pg_stat_replication WHERE application_name = %s",
                          APPLICATION)

    def switch_and_wait(self, timeout: float) -> dict:
        """pg_switch_wal(), then wait until the receiver's flush_lsn reaches the end of the switched segment;
        also when its object appeared in storage."""
        t0 = time.monotonic()
        switch = int(self.value("SELECT (pg_switch_wal() - '0/0')::bigint"))
        target = _ceil(switch, self.size)
        last = segment_name(target // self.size - 1, self.size)
        obj = os.path.join(self.storage, "wal_005", f"{last}.{_EXTENSION[self.args.compression]}")
        stored_at = None
        while True:
            self.receiver_alive()
            now = time.monotonic()
            if stored_at is None and os.path.exists(obj):
                stored_at = now
            flush = self.flush_lsn()
            if flush is not None and flush >= target:
                return {"switch_lsn": switch, "target": target, "last_segment": last, "flushed_s": now - t0,
                        "stored_s": None if stored_at is None else stored_at - t0}
            if now - t0 > timeout:
                raise StepFailed(f"the receiver's flush_lsn ({_format_lsn(flush) if flush is not None else 'NULL'}) "
                                 f"did not reach {_format_lsn(target)} (the end of {last}) within {timeout:.0f} s "
                                 f"of pg_switch_wal()" + ("; the segment is in storage" if stored_at else ""))
            time.sleep(0.05)

    def stop_receiver(self) -> None:
        proc, self.receiver = self.receiver, None
        if proc is None or proc.poll() is not None:
            return
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
            self.facts["receiver_stop"] = {"signal": "SIGTERM", "seconds": round(time.monotonic() - t0, 2),
                                           "returncode": proc.returncode}
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.facts["receiver_stop"] = {"signal": "SIGKILL", "returncode": proc.returncode}
            self.errors.append(f"receive: wal-receive did not stop within {STOP_GRACE_S:.0f} s of SIGTERM; killed")

    def postmaster_pid(self) -> int:
        with open(os.path.join(self.cluster.data, "postmaster.pid")) as f:
            return int(f.readline())

    # -- the measurement ----------------------------------------------------------------------------------
    def burst(self) -> dict:
        a, c = self.args, self.cluster
        self.conn.execute("CHECKPOINT")  # the burst starts with full-page writes, as the archive burst does
        settle = self.switch_and_wait(DRAIN_TIMEOUT_S)  # everything so far stored: the burst starts at lag 0
        self.say(f"==> receive: pgbench -c {a.burst_clients} -j {min(a.burst_clients, os.cpu_count() or 1)} "
                 f"-T {a.burst_seconds}, sampling every {SAMPLE_S * 1000:.0f} ms")
        pid, postmaster = self.receiver.pid, self.postmaster_pid()
        walsender = self.facts["walsender_pid"]
        cpu0, wsnd0, srv0 = tree_cpu_s(pid), tree_cpu_s(walsender), tree_cpu_s(postmaster)
        machine0, self0, children0 = machine_busy_s(), _cpu_self(), _cpu_children()
        lsn0 = int(self.value("SELECT (pg_current_wal_lsn() - '0/0')::bigint"))
        t0 = time.monotonic()
        sampler = Sampler(self.conninfo, self.spool, self.size, t0)
        sampler.start()
        try:
            proc = run([os.path.join(pg_bindir(), "pgbench"), "-n", "-c", str(a.burst_clients), "-j",
                        str(min(a.burst_clients, os.cpu_count() or 1)), "-T", str(a.burst_seconds), "-h",
                        c.sockdir, "-p", str(c.port), "postgres"], check=False, timeout=a.burst_seconds + 600)
            burst_s = time.monotonic() - t0
            lsn1 = int(self.value("SELECT (pg_current_wal_lsn() - '0/0')::bigint"))
            text = proc.stdout.decode(errors="replace")
            with open(os.path.join(self.logs, "receive-pgbench.log"), "w") as f:
                f.write(text + proc.stderr.decode(errors="replace"))
            if proc.returncode != 0:
                raise StepFailed(f"pgbench exited {proc.returncode}; see logs/receive-pgbench.log")
            self.receiver_alive()
            self.say(f"    {(lsn1 - lsn0) / MIB:.0f} MiB of WAL in {burst_s:.1f} s; pg_switch_wal(), waiting for the "
                     "receiver to store it")
            drain = self.switch_and_wait(DRAIN_TIMEOUT_S)
            window_s = time.monotonic() - t0
        finally:
            sampler.finish()
        cpu1, wsnd1, srv1 = tree_cpu_s(pid), tree_cpu_s(walsender), tree_cpu_s(postmaster)
        machine = machine_busy_s() - machine0
        own, pgbench_cpu = _cpu_self() - self0, _cpu_children() - children0
        hwm = vm_hwm(pid)
        tps = re.search(r"tps = ([\d.]+)", text)
        txns = re.search(r"number of transactions actually processed: (\d+)", text)
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        server = None if srv0 is None or srv1 is None else srv1 - srv0
        handled = drain["target"] - lsn0  # WAL the receiver got in the window, to the switched segment's end
        background = None
        if cpu is not None and server is not None:
            background = max(0.0, machine - cpu - server - own - pgbench_cpu)
        self.facts.update(settle=settle, drain=drain, wal_start_lsn=_format_lsn(lsn0), wal_end_lsn=_format_lsn(lsn1),
                          switch_lsn=_format_lsn(drain["switch_lsn"]), window_s=round(window_s, 3),
                          pgbench_cpu_s=round(pgbench_cpu, 2), bench_cpu_s=round(own, 2),
                          machine_busy_cpu_s=round(machine, 2), transactions=int(txns.group(1)) if txns else None)
        return {"burst_s": burst_s, "lsn0": lsn0, "lsn1": lsn1, "tps": float(tps.group(1)) if tps else None,
                "drain": drain, "window_s": window_s, "cpu_s": cpu, "handled": handled, "hwm": hwm,
                "walsender_cpu_s": None if wsnd0 is None or wsnd1 is None else wsnd1 - wsnd0,
                "server_cpu_s": server, "background_cpu_s": background, "samples": sampler.samples}

    def lags(self, samples: list[list], burst_s: float) -> dict:
        """The lag figures over the burst's samples (t <= its end)."""
        size = self.size
        during = [s for s in samples if s[0] <= burst_s]
        recv = [s[1] - s[3] for s in during if s[3] is not None]
        spool = [s[1] - s[5] for s in during if s[5] is not None]
        flush = [s[1] - s[4] for s in during if s[4] is not None]
        archive = [s[3] // size - s[4] // size for s in during if s[3] is not None and s[4] is not None]
        spooled = [s[6] for s in during if s[6] is not None]
        missing = sum(s[3] is None or s[4] is None for s in during)
        return {"samples_in_burst": len(during), "samples_without_write_or_flush": missing,
                "recv_lag_max": max(recv, default=None), "recv_lag_p99": _pct(recv, 99),
                "recv_lag_p50": _pct(recv, 50), "spool_lag_max": max(spool, default=None),
                "spool_lag_p99": _pct(spool, 99), "flush_lag_max": max(flush, default=None),
                "flush_lag_p99": _pct(flush, 99), "archive_lag_max": max(archive, default=None),
                "spooled_max": max(spooled, default=None)}

    def verify(self, first: str, last: str) -> dict:
        """Every segment from the receiver's first through the switched one is in storage; each whose copy is
        still in pg_wal is decompressed (the lz4 or zstandard module, not walrus) and compared byte for
        byte; the last one is also fetched with `walrus wal-fetch` and compared."""
        ext = _EXTENSION[self.args.compression]
        folder = os.path.join(self.storage, "wal_005")
        lo, hi = segment_number(first, self.size), segment_number(last, self.size)
        names = [segment_name(n, self.size) for n in range(lo, hi + 1)]
        try:
            stored = set(os.listdir(folder))
        except FileNotFoundError:
            stored = set()
        missing = [n for n in names if f"{n}.{ext}" not in stored]
        verified, differ, absent = 0, [], []
        for n in names:
            if n in missing:
                continue
            server = os.path.join(self.cluster.data, "pg_wal", n)
            if not os.path.exists(server):
                absent.append(n)
                continue
            with open(os.path.join(folder, f"{n}.{ext}"), "rb") as f:
                got = _decompress(f.read(), self.args.compression)
            with open(server, "rb") as f:
                want = f.read()
            if got == want:
                verified += 1
            else:
                differ.append(n)
        fetched = None
        if last not in missing:
            dest = os.path.join(user_dir(os.path.join(self.root, "fetched")), last)
            proc = walrus(["wal-fetch", last, dest], config=self.config, check=False)
            fetched = proc.returncode == 0 and os.path.exists(dest) and _read(dest) == _read(
                os.path.join(self.cluster.data, "pg_wal", last))
            if not fetched:
                differ.append(f"{last} (walrus wal-fetch)")
        others = sorted(n for n in stored if n.split(".")[0] not in set(names))
        return {"segments": len(names), "verified": verified, "missing": missing, "differ": differ,
                "not_in_pg_wal": absent, "wal_fetch_last": fetched, "other_objects": others[:20],
                "other_objects_count": len(others)}

    def run_all(self) -> None:
        """The source (its failures end the operation), then the receiver, the burst, the drain and the
        verification (theirs are a FAILED row)."""
        self.create_source()
        label = "walrus wal-receive"
        try:
            self.start_receiver()
            got = self.burst()
        except StepFailed as e:
            self.failed(label, str(e))
            return
        lag = self.lags(got["samples"], got["burst_s"])
        hwm = got["hwm"]
        self.stop_receiver()
        self.say("==> receive: verifying the stored segments against pg_wal")
        v = self.verify(self.facts["first_segment"], got["drain"]["last_segment"])
        self.facts["verify"] = v
        problems = []
        if v["missing"]:
            problems.append(f"{len(v['missing'])} segment(s) missing from storage: {', '.join(v['missing'][:5])}")
        if v["differ"]:
            problems.append(f"{len(v['differ'])} segment(s) differ from pg_wal: {', '.join(v['differ'][:5])}")
        verified = f"{v['verified']}/{v['segments']} segs" if not problems else "FAILED"
        wal = got["lsn1"] - got["lsn0"]
        row = {"operation": "receive", "step": "receive", "tool": label, "tool_name": "walrus",
               "wall_s": got["burst_s"], "tps": got["tps"], "wal_bytes": wal, "wal_mib": wal / MIB,
               "wal_mib_s": wal / MIB / got["burst_s"], "wal_segments": wal / self.size,
               "recv_lag_max_kib": kib(lag["recv_lag_max"]), "recv_lag_p99_kib": kib(lag["recv_lag_p99"]),
               "recv_lag_p50_kib": kib(lag["recv_lag_p50"]), "spool_lag_max_kib": kib(lag["spool_lag_max"]),
               "spool_lag_p99_kib": kib(lag["spool_lag_p99"]), "archive_lag_max": lag["archive_lag_max"],
               "spooled_max": lag["spooled_max"],
               "flush_lag_max_mib": None if lag["flush_lag_max"] is None else lag["flush_lag_max"] / MIB,
               "flush_lag_p99_mib": None if lag["flush_lag_p99"] is None else lag["flush_lag_p99"] / MIB,
               "drain_s": got["drain"]["flushed_s"], "drain_stored_s": got["drain"]["stored_s"],
               "cpu_s": got["cpu_s"],
               "cpu_s_per_gib": got["cpu_s"] / (got["handled"] / GIB) if got["cpu_s"] is not None and got["handled"]
               else None,
               "cpu_wal_bytes": got["handled"], "peak_rss_mib": None if hwm is None else hwm / MIB,
               "walsender_cpu_s": got["walsender_cpu_s"], "server_cpu_s": got["server_cpu_s"],
               "samples_in_burst": lag["samples_in_burst"],
               "samples_without_write_or_flush": lag["samples_without_write_or_flush"],
               "segment_mib": self.args.wal_segsize, "verified": verified, "verified_segments": v["verified"],
               "background_cpu_s": got["background_cpu_s"],
               "runs_background_cpu_s": [None if got["background_cpu_s"] is None else round(got["background_cpu_s"], 2)],
               "runs_wall_s": [round(got["burst_s"], 3)], "runs_window_s": [round(got["window_s"], 3)],
               "error": "; ".join(problems) or None, "samples": got["samples"]}
        self.rows.append(row)
        self.samples["receive"][label] = got["samples"]
        for p in problems:
            self.errors.append(f"receive FAILED: {p}")
        self.say(f"    {verified}; receive lag max {kib(lag['recv_lag_max']) or 0:.0f} KiB, archive lag max "
                 f"{lag['archive_lag_max']} segment(s), drain {got['drain']['flushed_s']:.2f} s")

    def failed(self, label: str, error: str) -> None:
        self.say(f"    FAILED: {error}")
        self.errors.append(f"receive FAILED: {error}")
        self.rows.append({"operation": "receive", "step": "receive", "tool": label, "tool_name": "walrus",
                          "error": error, "verified": "FAILED"})

    # -- reporting ----------------------------------------------------------------------------------------
    def targets(self) -> list[str]:
        out = []
        for r in self.rows:
            if r.get("error"):
                out.append(f"receive: {r['tool']} did not complete ({r['error'][:200]}): NOT MET")
                continue
            seg_kib = self.size / KIB
            arch = max(r["archive_lag_max"] or 0, r["spooled_max"] or 0)
            out.append(f"receive: completed segments awaiting storage during the burst, max {r['archive_lag_max']} "
                       f"(pg_stat_replication: write_lsn's segment - flush_lsn's) and {r['spooled_max']} (spool "
                       f"directory) (target <= 1): {_verdict(arch <= 1)}")
            recv, spool = r["recv_lag_max_kib"], r["spool_lag_max_kib"]
            out.append(f"receive: receive lag max {_num(recv)} KiB (current_wal_lsn - write_lsn; p99 "
                       f"{_num(r['recv_lag_p99_kib'])}), {_num(spool)} KiB from the spool (target < one segment, "
                       f"{seg_kib:.0f} KiB): {_verdict(recv is not None and recv < seg_kib)} (write_lsn), "
                       f"{_verdict(spool is not None and spool < seg_kib)} (spool)")
        return out

    def tables(self) -> list[str]:
        a = self.args
        if not self.rows:
            return []
        head = (f"receive (walrus wal-receive under pgbench -c {a.burst_clients} -T {a.burst_seconds}, scale {a.scale}, "
                f"{a.compression}, {a.wal_segsize} MiB segments, file storage)")
        return [head, report.table_of(self.rows, COLUMNS), ""]

    def notes(self) -> list[str]:
        a = self.args
        seg = f"{a.wal_segsize} MiB"
        out = [
            f"receive: one source cluster of its own (pgbench -i -s {a.scale}, {seg} segments, autovacuum off, "
            f"fsync off, archive_mode off, wal_keep_size {WAL_KEEP}, max_wal_size 8GB), and `walrus wal-receive "
            f"--spool-dir DIR` as the cluster's user with WALG_SLOTNAME={SLOT} (it creates the physical slot), "
            f"{a.compression}, file storage in the work directory. CHECKPOINT and pg_switch_wal() before the burst, "
            "and the receiver's flush_lsn at the end of that segment: the burst starts with nothing awaiting "
            f"storage. pgbench -n -c {a.burst_clients} -j {min(a.burst_clients, os.cpu_count() or 1)} -T "
            f"{a.burst_seconds} (TPC-B-like), on the same cores as the server and the receiver.",
            f"receive: lag, sampled every {SAMPLE_S * 1000:.0f} ms during the burst (samples in results.json, "
            f"fields {', '.join(SAMPLE_FIELDS)}). recv lag = pg_current_wal_lsn() - write_lsn of the receiver's "
            "pg_stat_replication row (max and p99). wal-receive reports its write position once 1 MiB more has "
            "arrived or 0.25 s after WAL arrived (and when a segment is stored), so recv lag includes that "
            "reporting delay; spool lag = pg_current_wal_lsn() - the end of the WAL "
            "written in its spool directory (<segment>.receiving's size), the receive lag without it.",
            "receive: wal-receive confirms a flush only for segments durable in storage (flush_lsn = the end of "
            "the last stored segment), so flush lag has a one-segment granularity: flush lag max = max of "
            "pg_current_wal_lsn() - flush_lsn, shown for transparency, is at least the part of the segment being "
            f"received. The target \"lag under one segment\" is checked as: at most one completed segment awaiting "
            "storage (archive lag max segs = max of write_lsn's segment number - flush_lsn's, i.e. completed "
            "segments received but not yet stored, the one being uploaded included; spooled max = the same count "
            "read from the spool directory, without the status update's delay), and receive lag under one "
            f"segment ({seg}).",
            "receive: drain s = from pgbench's exit to the receiver's flush_lsn at the end of the segment "
            "pg_switch_wal() closed (storage and the next status update; wal-receive reads with a 0.1 s "
            "timeout, so up to that much of it is the update's delay); drain_stored_s in results.json is when that "
            "segment's object appeared in storage.",
            "receive: CPU s = user+sys of the receiver process tree from /proc/<pid>/stat, from pgbench's start to "
            "the end of the drain; CPU s/GiB over the WAL it received meanwhile (to the end of the switched "
            "segment). peak RSS = its VmHWM (since its start). srv CPU s = every PostgreSQL process (postmaster "
            "tree, reaped backends included; walsender_cpu_s in results.json is the walsender alone).",
            "receive: verified = segments from the one the receiver started in (the slot's restart_lsn) to the "
            "one pg_switch_wal() closed, each in storage as wal_005/<segment>."
            + _EXTENSION[a.compression] + ", decompressed with the Python "
            + ("lz4 module" if a.compression == "lz4" else "zstandard module")
            + " and equal to the server's pg_wal file; the last also fetched with `walrus wal-fetch` and compared.",
        ]
        v = self.facts.get("verify")
        if v and v["not_in_pg_wal"]:
            out.append(f"receive: {len(v['not_in_pg_wal'])} stored segment(s) no longer in pg_wal (wal_keep_size "
                       f"{WAL_KEEP}), not compared: {', '.join(v['not_in_pg_wal'][:5])}")
        stop = self.facts.get("receiver_stop")
        if stop:
            out.append(f"receive: wal-receive stopped by {stop['signal']}"
                       + (f" in {stop['seconds']} s" if "seconds" in stop else "") + f", exit {stop['returncode']}.")
        for r in self.rows:
            if r.get("samples_without_write_or_flush"):
                out.append(f"receive: {r['samples_without_write_or_flush']} of {r['samples_in_burst']} samples had "
                           "no write_lsn or flush_lsn (NULL: none reported yet, or an invalid flush position).")
        return out + self.errors

    def versions(self) -> dict[str, str]:
        return {"walrus": first_line([WALRUS, "--version"])}

    def plot(self, plt, out: str) -> None:
        a = self.args
        for label, samples in self.samples["receive"].items():
            plot_lags(plt, os.path.join(out, "lag-receive.png"), samples, self.size,
                      next((r["wall_s"] for r in self.rows if r.get("wall_s")), None),
                      f"receive: {label}, pgbench -c {a.burst_clients} -T {a.burst_seconds}, {a.compression}, "
                      f"{a.wal_segsize} MiB segments")

    def close(self) -> None:
        try:
            self.stop_receiver()
        finally:
            if self.conn is not None:
                self.conn.close()
            if self.cluster is not None:
                self.cluster.stop("immediate")
                log = self.cluster.log()
                if log:
                    with open(os.path.join(self.logs, "receive-source-server.log"), "w") as f:
                        f.write(log)
            self.facts["storage_mib"] = round(tree_bytes(self.storage) / MIB, 1) if os.path.isdir(self.storage) else 0
            if self.args.keep:
                self.say(f"kept {self.root}")
            else:
                remove_tree(self.root)


def plot_lags(plt, path: str, samples: list[list], size: int, burst_s: float | None, title: str) -> None:
    """Top: receive lag (write_lsn and spool) and flush lag in MiB over time, a dashed line at one segment;
    bottom: completed segments awaiting storage (pg_stat_replication and spool), a dashed line at 1."""
    fig, (ax_lag, ax_seg) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    t = [s[0] for s in samples]

    def series(f):
        return [float("nan") if v is None else v for v in (f(s) for s in samples)]

    ax_lag.plot(t, series(lambda s: None if s[3] is None else (s[1] - s[3]) / MIB), label="current - write_lsn",
                linewidth=1.2)
    ax_lag.plot(t, series(lambda s: None if s[5] is None else (s[1] - s[5]) / MIB), label="current - spool",
                linewidth=1.0)
    ax_lag.plot(t, series(lambda s: None if s[4] is None else (s[1] - s[4]) / MIB), label="current - flush_lsn",
                linewidth=1.0, linestyle="--")
    ax_lag.axhline(size / MIB, color="red", linestyle="--", linewidth=1.0, label="one segment")
    ax_seg.step(t, series(lambda s: None if s[3] is None or s[4] is None else s[3] // size - s[4] // size),
                where="post", label="write_lsn seg - flush_lsn seg")
    ax_seg.step(t, series(lambda s: s[6]), where="post", label="spooled (spool directory)", linestyle=":")
    ax_seg.axhline(1, color="red", linestyle="--", linewidth=1.0, label="target")
    ax_lag.set_ylabel("lag, MiB")
    ax_seg.set_ylabel("completed segments not stored")
    ax_seg.set_xlabel("seconds since pgbench started")
    from matplotlib.ticker import MaxNLocator

    ax_seg.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_lag, ax_seg):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        if burst_s is not None:
            ax.axvline(burst_s, color="grey", linestyle=":", linewidth=1.2)
        ax.legend(loc="upper right", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _decompress(blob: bytes, method: str) -> bytes:
    if method == "lz4":
        import lz4.frame
        data, used = lz4.frame.decompress(blob, return_bytes_read=True)
        rest = blob[used:]  # walrus's seal: one skippable frame (magic 0x184D2A50-5F) after the lz4 frame
        if rest and not (len(rest) >= 8 and int.from_bytes(rest[:4], "little") & 0xFFFFFFF0 == 0x184D2A50):
            raise StepFailed("unexpected bytes after the lz4 frame")
        return data
    import zstandard
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()


def kib(value: int | None) -> float | None:
    return None if value is None else value / KIB


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
