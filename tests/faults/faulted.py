"""One trial of each command with a signal (KILL, TERM, INT) at a chosen moment, and the invariants after it."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from tests.faults import harness, pgenv
from tests.faults.figures import Outcome, rng
from tests.faults.harness import TMP_RE
from tests.pgcluster import WALRUS
from tests.s3server import s3_settings

# A command that gets SIGTERM or SIGINT must be gone within this many seconds.
SIGNAL_GRACE = 10.0
# Bounds of commands that should take well under a second or two (a hang is reported, never waited out).
CMD_TIMEOUT = 60.0


# Trials run this many at a time where they share nothing: the commands spend much of their time
# starting up on one core, and the suite has to finish in minutes on two.
WORKERS = max(2, min(4, os.cpu_count() or 2))


def measure(fn: Callable[[int], object], repeat: int = 1, workers: int = 1) -> float:
    """A command's typical duration, under the load its trials run with (`workers` at once): the
    median of repeat x workers runs of fn(k). Kill times are drawn uniformly below it."""
    times: list[float] = []

    def timed(k: int) -> None:
        began = time.monotonic()
        fn(k)
        times.append(time.monotonic() - began)

    for r in range(repeat):
        threads = [threading.Thread(target=timed, args=(r * workers + w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return sorted(times)[len(times) // 2]


# -- wal-push ------------------------------------------------------------------------------------

def wal_push(env: dict, path: str, original: bytes, read_key: Callable[[], bytes | None], fault_at: float,
             sig: int, pending: Callable[[], list[str]] | None = None) -> Outcome:
    """wal-push PATH with `sig` at fault_at. Invariants: the final key is absent or decodes to exactly
    the original bytes (also right after the fault); a re-run exits 0 and the archive holds them.
    Under SIGTERM/SIGINT also: the command exits quickly with a clear message or 0, and on S3 leaves
    no multipart upload pending (pending() lists them)."""
    outcome = Outcome()
    first = harness.walrus(["wal-push", path], env, timeout=CMD_TIMEOUT, fault_at=fault_at, sig=sig,
                           grace=SIGNAL_GRACE)
    ok = harness.judge_exit(first, outcome, sig=sig)
    problem = harness.same_object(read_key(), original)
    if ok and problem:
        outcome.worse("lost", f"wal-push exited 0 but the archived object {problem}")
    elif problem and problem != "absent":
        outcome.worse("lost", f"after {signal.Signals(sig).name} at {fault_at:.3f}s the final key {problem}")
    if sig != signal.SIGKILL and pending is not None and pending():
        outcome.worse("unclean", f"multipart uploads left pending after {signal.Signals(sig).name}: {pending()}")
    again = harness.walrus(["wal-push", path], env, timeout=CMD_TIMEOUT)
    if again.rc != 0:
        outcome.worse("hang" if again.hung else "unclean", f"the re-run failed: {again.describe()}")
    elif problem := harness.same_object(read_key(), original):
        outcome.worse("lost", f"the re-run exited 0 but the archived object {problem}")
    return outcome


@dataclass
class PushRig:
    """Segments written under pg_wal/ for wal-push trials, and how to read back what was archived."""

    wal: str  # the pg_wal directory the segments are written to
    env: dict  # walrus's settings: the storage
    size: int  # bytes of a segment
    seed: str  # the scenario's name: segment contents come from it
    read_object: Callable[[str], bytes | None]  # the object archived for a WAL name, or None
    pending: Callable[[str], list[str]] | None = None  # multipart uploads left for a WAL name (S3)

    def segment(self, n: int) -> tuple[str, bytes]:
        data = harness.segment_bytes(rng(self.seed, n), self.size)
        return harness.write_file(os.path.join(self.wal, harness.wal_name(n)), data), data

    def typical(self, repeat: int) -> float:
        """The push's duration under the trials' load; a fault time is drawn uniformly below it."""
        return measure(lambda k: harness.walrus(["wal-push", self.segment(1000 + k)[0]], self.env), repeat, WORKERS)

    def trial(self, i: int, sig: int, fault_at: float) -> Outcome:
        path, data = self.segment(i + 1)
        name = os.path.basename(path)
        pending = (lambda: self.pending(name)) if self.pending is not None else None
        outcome = wal_push(self.env, path, data, lambda: self.read_object(name), fault_at, sig, pending)
        os.unlink(path)  # what the trial checked; the scratch space stays small
        return outcome


def file_rig(workdir: str, seed: str, size: int) -> PushRig:
    store = harness.mkdir(os.path.join(workdir, "store"))
    return PushRig(harness.mkdir(os.path.join(workdir, "pg_wal")), {"WALG_FILE_PREFIX": store}, size, seed,
                   lambda name: harness.read_or_none(os.path.join(store, "wal_005", name + ".lz4")))


def s3_rig(workdir: str, seed: str, size: int, moto, bucket: str) -> PushRig:
    def read(name: str) -> bytes | None:
        try:
            return moto.read(bucket, f"walrus/wal_005/{name}.lz4")
        except moto.client.exceptions.NoSuchKey:
            return None

    return PushRig(harness.mkdir(os.path.join(workdir, "pg_wal")), s3_settings(moto.endpoint, bucket), size, seed,
                   read, lambda name: [k for k in moto.pending_uploads(bucket) if k.endswith(name + ".lz4")])


# -- wal-fetch -----------------------------------------------------------------------------------

def wal_fetch(env: dict, name: str, dest: str, original: bytes, fault_at: float, sig: int) -> Outcome:
    """wal-fetch NAME DEST with `sig` at fault_at: no file at DEST unless it exited 0 (then exactly
    the segment); a re-run restores it."""
    outcome = Outcome()
    first = harness.walrus(["wal-fetch", name, dest], env, timeout=CMD_TIMEOUT, fault_at=fault_at, sig=sig,
                           grace=SIGNAL_GRACE)
    ok = harness.judge_exit(first, outcome, sig=sig)
    if os.path.lexists(dest):
        with open(dest, "rb") as f:
            got = f.read()
        if not ok and got == original:
            at = f" at {first.signalled:.2f}s" if first.signalled is not None else ""
            outcome.worse("unclean", f"wal-fetch exited {first.rc} after {signal.Signals(sig).name}{at} but left "
                                     "the whole segment at DEST")
        elif not ok:
            outcome.worse("lost", f"wal-fetch exited {first.rc} after {signal.Signals(sig).name} but left "
                                  f"{len(got)} partial bytes at DEST")
        elif got != original:
            outcome.worse("lost", "wal-fetch exited 0 but DEST differs from the segment")
        os.unlink(dest)
    elif ok:
        outcome.worse("lost", "wal-fetch exited 0 and left no file at DEST")
    again = harness.walrus(["wal-fetch", name, dest], env, timeout=CMD_TIMEOUT)
    if again.rc != 0:
        outcome.worse("hang" if again.hung else "unclean", f"the re-run failed: {again.describe()}")
    elif open(dest, "rb").read() != original:
        outcome.worse("lost", "the re-run's DEST differs from the segment")
    with_leftovers = [n for n in os.listdir(os.path.dirname(dest)) if n != os.path.basename(dest)]
    if with_leftovers and sig != signal.SIGKILL:
        outcome.worse("unclean", f"wal-fetch left {with_leftovers} beside DEST after {signal.Signals(sig).name}")
    if os.path.lexists(dest):
        os.unlink(dest)
    return outcome


# -- backup-push ---------------------------------------------------------------------------------

def list_backups(env: dict) -> tuple[list[dict] | None, harness.Result]:
    listed = harness.walrus(["backup-list", "--json"], env, timeout=CMD_TIMEOUT)
    if listed.rc != 0:
        return None, listed
    return json.loads(listed.stdout or "[]"), listed


def backup_push(pg: pgenv.PgEnv, fault_at: float, sig: int) -> Outcome:
    """backup-push with `sig` at fault_at, then: backup-list lists only complete backups (sentinel,
    and every part files_metadata.json names, stored)."""
    outcome = Outcome()
    pushed = harness.walrus(["backup-push", pg.cluster.data], pg.env(), timeout=300, fault_at=fault_at, sig=sig,
                            grace=SIGNAL_GRACE)
    harness.judge_exit(pushed, outcome, sig=sig)
    listed, result = list_backups(pg.env())
    if listed is None:
        outcome.worse("unclean", f"backup-list failed after the fault: {result.describe()}")
    else:
        for problem in pgenv.listed_backup_problems(pg.store, listed):
            outcome.worse("lost", problem)
        if not problem_found(outcome):
            pgenv.prune(pg.store, listed)
    return outcome


def problem_found(outcome: Outcome) -> bool:
    return outcome.kind in ("unclean", "hang", "lost")


# -- backup-fetch --------------------------------------------------------------------------------

def backup_fetch(pg: pgenv.PgEnv, target: str, fault_at: float, sig: int, *, rerun: bool = True) -> Outcome:
    """backup-fetch of the reference backup with `sig` at fault_at. Invariants: the target never
    holds global/pg_control unless the command exited 0 or the restore was already whole (an
    interrupted restore must be impossible to start); a re-run into a fresh directory exits 0 and
    restores exactly the reference tree."""
    outcome = Outcome()
    fetched = harness.walrus(["backup-fetch", target, pg.backup], pg.golden_env(), timeout=120,
                             fault_at=fault_at, sig=sig, grace=SIGNAL_GRACE)
    ok = harness.judge_exit(fetched, outcome, sig=sig)
    if not ok and (why := pgenv.startable_partial(target, pg.reference)):
        how = "was killed" if fetched.rc is not None and fetched.rc < 0 else f"exited {fetched.rc}"
        outcome.worse("unclean", f"backup-fetch {how} ({signal.Signals(sig).name} at {fault_at:.2f}s) and "
                                 f"PostgreSQL could start the partial restore: {why}")
    if ok and (diff := harness.digest_diff(harness.tree_digest(target), pg.reference)):
        outcome.worse("lost", f"backup-fetch exited 0 but {diff}")
    harness.remove(target)
    if rerun:
        fresh = target + "-again"
        again = harness.walrus(["backup-fetch", fresh, pg.backup], pg.golden_env(), timeout=120)
        if again.rc != 0:
            outcome.worse("hang" if again.hung else "unclean", f"the re-run failed: {again.describe()}")
        elif diff := harness.digest_diff(harness.tree_digest(fresh), pg.reference):
            outcome.worse("lost", f"the re-run {diff}")
        harness.remove(fresh)
    return outcome


# -- the daemon ----------------------------------------------------------------------------------

DAEMON_SEGMENTS = 8
DAEMON_SEGMENT_SIZE = 1 << 20


class DaemonRig:
    """A fake PGDATA (pg_wal/, pg_wal/archive_status/, synthetic 1 MiB segments marked .ready), a
    file storage, and `walrus daemon SOCKET` serving them; requests go through `walrus daemon-client`
    one at a time, as PostgreSQL's archiver sends them, and an acknowledged segment is marked .done."""

    def __init__(self, directory: str, rnd, count: int = DAEMON_SEGMENTS):
        self.dir = directory
        self.pgdata = harness.mkdir(os.path.join(directory, "pgdata"))
        harness.mkdir(os.path.join(self.pgdata, "pg_wal"))
        self.status = harness.mkdir(os.path.join(self.pgdata, "pg_wal", "archive_status"))
        self.store = harness.mkdir(os.path.join(directory, "store"))
        self.sock = os.path.join(directory, "walrus.sock")
        self.env = {"WALG_FILE_PREFIX": self.store, "PGDATA": self.pgdata, "WALG_PG_WAL_SIZE": "1",
                    "WALG_UPLOAD_CONCURRENCY": "2"}
        self.segments: dict[str, bytes] = {}
        for n in range(1, count + 1):
            name = harness.wal_name(n)
            self.segments[name] = harness.segment_bytes(rnd, DAEMON_SEGMENT_SIZE)
            harness.write_file(os.path.join(self.pgdata, "pg_wal", name), self.segments[name])
            harness.write_file(os.path.join(self.status, name + ".ready"), b"")
        self.acked: list[str] = []
        self.proc = None
        self.stderr_path = os.path.join(directory, "daemon.log")

    def start(self) -> str | None:
        """Start the daemon; None once its socket answers, else why not."""
        log = open(self.stderr_path, "ab")
        self.proc = harness.spawn([WALRUS, "daemon", self.sock], self.env, stdout=log, stderr=log,
                                  stdin=harness.subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"the daemon exited {self.proc.returncode} at start: {self.log_tail()}"
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.sock)
                    return None
            except OSError:
                time.sleep(0.01)
        return "the daemon did not listen within 15 s"

    def log_tail(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-3:])[:400]

    def push_pending(self, stop: threading.Event | None = None) -> harness.Result | None:
        """Send wal-push for each segment not yet acknowledged, in order, until one fails (the
        archiver would retry it later); that failure, or None if all were acknowledged."""
        for name in self.segments:
            if name in self.acked:
                continue
            if stop is not None and stop.is_set():
                return None
            r = harness.run([WALRUS, "daemon-client", self.sock, "wal-push", name], self.env, timeout=CMD_TIMEOUT)
            if r.rc != 0:
                return r
            self.acked.append(name)
            os.rename(os.path.join(self.status, name + ".ready"), os.path.join(self.status, name + ".done"))
        return None

    def stored(self) -> dict[str, bytes]:
        """Final keys under wal_005/ (temporary names excluded), by WAL name."""
        folder = os.path.join(self.store, "wal_005")
        out = {}
        for n in os.listdir(folder) if os.path.isdir(folder) else []:
            if not TMP_RE.search(n):
                with open(os.path.join(folder, n), "rb") as f:
                    out[n.split(".")[0]] = f.read()
        return out

    def check(self, outcome: Outcome, when: str, require: list[str]) -> None:
        """No final key holds anything but its segment's exact bytes; every name in `require` is stored."""
        stored = self.stored()
        for name, data in stored.items():
            if problem := harness.same_object(data, self.segments[name]):
                outcome.worse("lost", f"{when}: the final key of {name} {problem}")
        for name in require:
            if name not in stored:
                outcome.worse("lost", f"{when}: {name} was acknowledged but is not stored")

    def stop(self, sig: int = signal.SIGTERM, grace: float = SIGNAL_GRACE) -> int | None:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=grace)
        except harness.subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self.proc = None


def daemon(directory: str, rnd, fault_at: float | None, sig: int) -> tuple[Outcome, float, int]:
    """Drive the daemon through the segments and send `sig` fault_at seconds after its start (None:
    no fault, to measure). Invariants: every acknowledged segment is stored with equal bytes, no final
    key holds a partial object, the daemon exits within the grace after SIGTERM/SIGINT; restarted,
    it takes the unacknowledged ones and then all are stored with equal bytes. Returns the outcome,
    the seconds from the start to the last acknowledgement of the first daemon, and how many
    segments it acknowledged."""
    outcome = Outcome()
    rig = DaemonRig(directory, rnd)
    began = time.monotonic()
    if why := rig.start():
        return outcome.worse("unclean", why), 0.0, 0
    name = signal.Signals(sig).name
    fired = threading.Event()
    exit_code: list[int | None] = []

    def fault() -> None:
        proc = rig.proc
        fired.set()
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            exit_code.append(proc.wait(timeout=SIGNAL_GRACE))
        except harness.subprocess.TimeoutExpired:
            exit_code.append(None)

    timer = None
    if fault_at is not None:
        timer = threading.Timer(max(0.0, fault_at - (time.monotonic() - began)), fault)
        timer.start()
    failed = rig.push_pending()
    drained = time.monotonic() - began
    if timer is None:
        if failed is not None:
            outcome.worse("unclean", f"a push failed without any fault: {failed.describe()}")
        rig.stop()
        rig.check(outcome, "without a fault", list(rig.segments))
        return outcome, drained, len(rig.acked)
    timer.join()
    code = exit_code[0]
    if code is None:
        rig.stop(signal.SIGKILL)
        outcome.worse("hang", f"the daemon was still running {SIGNAL_GRACE:.0f}s after {name}: {rig.log_tail()}")
    elif sig != signal.SIGKILL and code != 0:
        why = harness.unclean_reason(open(rig.stderr_path, errors="replace").read())
        if code < 0 or why:
            outcome.worse("unclean", f"the daemon exited {code} after {name}: {why or 'killed by it'}")
    if failed is not None and (why := harness.unclean_reason(failed.stderr)):
        outcome.worse("unclean", f"daemon-client failed without a clear message: {failed.describe()}")
    rig.proc = None
    rig.check(outcome, f"after {name} at {fault_at:.2f}s", rig.acked)
    acked = len(rig.acked)

    # the archiver retries what was not acknowledged, against a restarted daemon
    if why := rig.start():
        return outcome.worse("unclean", f"restart: {why}"), drained, acked
    failed = rig.push_pending()
    code = rig.stop()
    if failed is not None:
        outcome.worse("unclean", f"after the restart a re-sent push failed: {failed.describe()} ({rig.log_tail()})")
    if code != 0:
        outcome.worse("hang" if code is None else "unclean", f"the restarted daemon exited {code} after SIGTERM")
    rig.check(outcome, "at the end", list(rig.segments))
    return outcome, drained, acked
