"""SIGTERM/SIGINT at random moments of every command: out in seconds, a clear message or 0, nothing partial."""
from __future__ import annotations

import os
import signal

import pytest

from tests.faults import faulted, harness
from tests.faults.figures import rng, scenario, trials

pytestmark = pytest.mark.e2e

FAMILY = "SIGTERM/SIGINT"
SIGNALS = [signal.SIGTERM, signal.SIGINT]
IDS = [s.name for s in SIGNALS]
WORKERS = faulted.WORKERS
CHEAP = trials(6, 60)  # wal-push, wal-fetch: a fraction of a second each
DEAR = trials(4, 40)  # backups and the daemon: a second or more each
SEGMENT_SIZE = 16 << 20


def name_of(sig: int, what: str) -> str:
    return f"{what} ({signal.Signals(sig).name})"


@pytest.mark.parametrize("sig", SIGNALS, ids=IDS)
def test_signal_wal_push(workdir, sig):
    with scenario(FAMILY, name_of(sig, "wal-push")) as s:
        rig = faulted.file_rig(workdir, s.name, SEGMENT_SIZE)
        typical = rig.typical(1)
        s.run(CHEAP, lambda i: rig.trial(i, sig, rng(s.name, "at", i).uniform(0, typical)), WORKERS)
    s.check()


@pytest.mark.parametrize("sig", SIGNALS, ids=IDS)
def test_signal_wal_push_s3(workdir, moto_server, s3_bucket, sig):
    """On S3 a signal must also abort the multipart upload in progress (none left pending)."""
    with scenario(FAMILY, name_of(sig, "wal-push, S3")) as s:
        rig = faulted.s3_rig(workdir, s.name, 1 << 20, moto_server, s3_bucket)
        typical = rig.typical(1)
        s.run(DEAR, lambda i: rig.trial(i, sig, rng(s.name, "at", i).uniform(0, typical)), WORKERS)
    s.check()


@pytest.mark.parametrize("sig", SIGNALS, ids=IDS)
def test_signal_wal_fetch(workdir, sig):
    with scenario(FAMILY, name_of(sig, "wal-fetch")) as s:
        store = harness.mkdir(os.path.join(workdir, "store"))
        wal = harness.mkdir(os.path.join(workdir, "pg_wal"))
        env = {"WALG_FILE_PREFIX": store, "WALG_DOWNLOAD_CONCURRENCY": "1"}  # no prefetcher to outlive a trial
        original = harness.segment_bytes(rng(s.name), SEGMENT_SIZE)
        name = harness.wal_name(1)
        pushed = harness.walrus(["wal-push", harness.write_file(os.path.join(wal, name), original)], env)
        assert pushed.rc == 0, pushed.describe()

        def fetch(k: int) -> None:
            dest = os.path.join(harness.mkdir(os.path.join(workdir, f"m{k}")), "RECOVERYXLOG")
            harness.walrus(["wal-fetch", name, dest], env)

        typical = faulted.measure(fetch, 1, WORKERS)

        def trial(i: int):
            dest = os.path.join(harness.mkdir(os.path.join(workdir, f"t{i}")), "RECOVERYXLOG")
            return faulted.wal_fetch(env, name, dest, original, rng(s.name, "at", i).uniform(0, typical), sig)

        s.run(CHEAP, trial, WORKERS)
    s.check()


@pytest.mark.parametrize("sig", SIGNALS, ids=IDS)
def test_signal_backup_push(pg_env, sig):
    pg = pg_env
    with scenario(FAMILY, name_of(sig, "backup-push")) as s:
        typical = faulted.measure(lambda k: harness.walrus(["backup-push", pg.cluster.data], pg.env(), timeout=300))
        s.run(DEAR, lambda i: faulted.backup_push(pg, rng(s.name, "at", i).uniform(0, typical), sig))
    s.check()


@pytest.mark.parametrize("sig", SIGNALS, ids=IDS)
def test_signal_backup_fetch(pg_env, workdir, sig):
    pg = pg_env
    with scenario(FAMILY, name_of(sig, "backup-fetch")) as s:
        typical = faulted.measure(
            lambda k: (harness.walrus(["backup-fetch", os.path.join(workdir, f"m{k}"), pg.backup], pg.golden_env()),
                       harness.remove(os.path.join(workdir, f"m{k}"))), 1, WORKERS)
        s.run(DEAR, lambda i: faulted.backup_fetch(pg, os.path.join(workdir, f"t{i}"),
                                                   rng(s.name, "at", i).uniform(0, typical), sig), WORKERS)
    s.check()


@pytest.mark.parametrize("sig", SIGNALS, ids=IDS)
def test_signal_daemon(workdir, sig):
    with scenario(FAMILY, name_of(sig, "daemon")) as s:
        outcome, typical, _ = faulted.daemon(os.path.join(workdir, "measure"), rng(s.name, "measure"), None, sig)
        assert outcome.kind == "success", f"the daemon fails without any fault: {outcome.what}"

        def trial(i: int):
            outcome, _, acked = faulted.daemon(os.path.join(workdir, f"t{i}"), rng(s.name, i),
                                        rng(s.name, "at", i).uniform(0, typical), sig)
            harness.remove(os.path.join(workdir, f"t{i}"))
            s.tally("faults before the last acknowledgement", acked < faulted.DAEMON_SEGMENTS)
            return outcome

        s.run(DEAR, trial, WORKERS)
    s.check()
