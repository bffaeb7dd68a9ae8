"""kill -9 at random moments of wal-push (file, S3), backup-push, backup-fetch and the daemon; invariants hold."""
from __future__ import annotations

import os
import signal

import pytest

from tests.faults import faulted, harness, pgenv
from tests.faults.figures import Outcome, rng, scenario, trials

pytestmark = pytest.mark.e2e

KILLS = trials(20, 200)
WORKERS = faulted.WORKERS
FAMILY = "kill -9"
SEGMENT_SIZE = 16 << 20  # a real segment: long enough that kills land in the upload, not only the start-up


def test_kill_wal_push_file(workdir):
    with scenario(FAMILY, "wal-push, file storage") as s:
        rig = faulted.file_rig(workdir, s.name, SEGMENT_SIZE)
        typical = rig.typical(2)
        s.note("typical s", round(typical, 3), add=False)
        s.run(KILLS, lambda i: rig.trial(i, signal.SIGKILL, rng(s.name, "at", i).uniform(0, typical)), WORKERS)
    s.check()


def test_kill_wal_push_s3(workdir, moto_server, s3_bucket):
    with scenario(FAMILY, "wal-push, S3") as s:
        rig = faulted.s3_rig(workdir, s.name, 1 << 20, moto_server, s3_bucket)  # four 256 KiB parts: multipart
        typical = rig.typical(2)
        s.note("typical s", round(typical, 3), add=False)
        s.run(KILLS, lambda i: rig.trial(i, signal.SIGKILL, rng(s.name, "at", i).uniform(0, typical)), WORKERS)
        # a kill -9 cannot abort its multipart upload: count what is left (S3 lifecycle rules clean these)
        s.note("multipart uploads left by kills", len(moto_server.pending_uploads(s3_bucket)), add=False)
    s.check()


def test_kill_backup_push(pg_env, workdir):
    """kill -9 backup-push of a running cluster: backup-list must list only complete backups after
    every kill, and at the end the latest listed backup restores to exactly what its parts hold and
    to the reference tree (the cluster is quiescent, so backups differ only in their label and pg_control)."""
    pg = pg_env
    with scenario(FAMILY, "backup-push") as s:
        typical = faulted.measure(lambda k: harness.walrus(["backup-push", pg.cluster.data], pg.env(), timeout=300))
        s.note("typical s", round(typical, 3), add=False)
        s.run(KILLS, lambda i: faulted.backup_push(pg, rng(s.name, "at", i).uniform(0, typical), signal.SIGKILL))

        listed, result = faulted.list_backups(pg.env())
        assert listed, f"no backup listed at the end: {result.describe()}"
        strays = {b["backup_name"]: pgenv.stray_parts(pg.store, b["backup_name"]) for b in listed}
        s.note("listed backups holding stray parts of killed pushes", sum(1 for v in strays.values() if v), add=False)
        s.add(_final_restore(pg, listed[-1]["backup_name"], os.path.join(workdir, "final")), "final restore")
    s.check()


def _final_restore(pg: pgenv.PgEnv, backup: str, target: str) -> Outcome:
    outcome = Outcome()
    fetched = harness.walrus(["backup-fetch", target, backup], pg.env(), timeout=300)
    if not harness.judge_exit(fetched, outcome):
        return outcome.worse("unclean", f"the latest listed backup {backup} does not restore: {fetched.describe()}")
    got = harness.tree_digest(target)
    if diff := harness.digest_diff(got, pgenv.manifest_digest(pg.store, backup)):
        outcome.worse("lost", f"{backup} against its own parts: {diff}")
    if diff := harness.digest_diff(pgenv.without(got, pgenv.PER_BACKUP), pgenv.without(pg.reference, pgenv.PER_BACKUP)):
        outcome.worse("lost", f"{backup} against the reference backup: {diff}")
    harness.remove(target)
    return outcome


def test_kill_backup_fetch(pg_env, workdir):
    """kill -9 backup-fetch: an interrupted restore must never be startable, i.e. hold global/pg_control
    unless it is already whole (pg_control is staged and renamed in last since c907f3d); a re-run into
    a fresh directory restores exactly the reference tree."""
    pg = pg_env
    with scenario(FAMILY, "backup-fetch") as s:
        typical = faulted.measure(
            lambda k: (harness.walrus(["backup-fetch", os.path.join(workdir, f"m{k}"), pg.backup], pg.golden_env()),
                       harness.remove(os.path.join(workdir, f"m{k}"))), 1, WORKERS)
        s.note("typical s", round(typical, 3), add=False)
        s.run(KILLS, lambda i: faulted.backup_fetch(pg, os.path.join(workdir, f"t{i}"),
                                                    rng(s.name, "at", i).uniform(0, typical), signal.SIGKILL), WORKERS)
    s.check()


def test_kill_daemon(workdir):
    """kill -9 the daemon while the archiver sends it segments, restart it, re-send what was not
    acknowledged: nothing acknowledged is lost, nothing partial is ever visible."""
    with scenario(FAMILY, "daemon") as s:
        typical = _measure_daemon(workdir, s.name)
        s.note("typical s", round(typical, 3), add=False)

        def trial(i: int) -> Outcome:
            outcome, _, acked = faulted.daemon(os.path.join(workdir, f"t{i}"), rng(s.name, i),
                                               rng(s.name, "at", i).uniform(0, typical), signal.SIGKILL)
            harness.remove(os.path.join(workdir, f"t{i}"))
            s.tally("faults before the last acknowledgement", acked < faulted.DAEMON_SEGMENTS)
            return outcome

        s.run(KILLS, trial, WORKERS)
    s.check()


def _measure_daemon(workdir: str, name: str) -> float:
    """The daemon's typical time from start to the last acknowledgement, two at once as the trials run."""
    seconds = []

    def once(k: int) -> None:
        outcome, drained, _ = faulted.daemon(os.path.join(workdir, f"measure{k}"), rng(name, "measure", k), None,
                                          signal.SIGKILL)
        assert outcome.kind == "success", f"the daemon fails without any fault: {outcome.what}"
        seconds.append(drained)

    faulted.measure(once, 1, WORKERS)
    return sorted(seconds)[len(seconds) // 2]


def test_reference_restore_matches_its_parts(pg_env):
    """The reference every restore is compared with is what the backup's parts hold (read with tarfile
    and the lz4 library, not with walrus)."""
    assert harness.digest_diff(pg_env.reference, pgenv.manifest_digest(pg_env.golden, pg_env.backup)) is None
