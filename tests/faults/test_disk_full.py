"""Disk full on small tmpfs mounts: backup-fetch target, wal-push and backup-push storage; retries then succeed."""
from __future__ import annotations

import json
import os
import re

import lz4.frame
import pytest

from tests.faults import faulted, harness, pgenv
from tests.faults.figures import Outcome, rng, scenario
from tests.faults.harness import TMP_RE

pytestmark = pytest.mark.e2e

FAMILY = "disk full"
# A restore of this backup takes about a second; a full disk must end it well within this.
BOUND = 20.0
SPACE_RE = re.compile(r"no space left|is full|out of (disk )?space|ENOSPC|quota", re.IGNORECASE)
MiB = 1 << 20


def says_space(result: harness.Result) -> bool:
    return bool(SPACE_RE.search(result.stderr))


def final_keys(store: str) -> list[str]:
    """Objects under final keys (temporary names are allowed to stay behind a failure)."""
    out = []
    for dirpath, _, filenames in os.walk(store):
        out += [os.path.relpath(os.path.join(dirpath, n), store) for n in filenames if not TMP_RE.search(n)]
    return sorted(out)


def test_backup_fetch_into_a_full_target(pg_env, workdir):
    """The target fills up while parts extract: backup-fetch exits non-zero within the bound, says the
    space ran out, and leaves no startable restore. (Before c907f3d it hung when another part was still
    extracting; the bound keeps the suite from hanging.)"""
    harness.require_root("backup-fetch into a full filesystem")
    pg = pg_env
    restored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(pg.golden)) for f in fs)
    cases = [(size, concurrency) for size in (8 * MiB, 24 * MiB) for concurrency in (1, 3)]
    with scenario(FAMILY, "backup-fetch, target fills") as s:
        def trial(i: int) -> tuple[str, Outcome]:
            size, concurrency = cases[i]
            outcome = Outcome()
            with harness.tmpfs(os.path.join(workdir, f"fs{i}"), size) as fs:
                target = os.path.join(fs, "restore")
                fetched = harness.walrus(["backup-fetch", target, pg.backup],
                                         pg.golden_env(WALG_DOWNLOAD_CONCURRENCY=str(concurrency)), timeout=BOUND)
                if harness.judge_exit(fetched, outcome):
                    outcome.worse("lost", f"backup-fetch exited 0 into a {size >> 20} MiB filesystem")
                elif not fetched.hung and not says_space(fetched):
                    outcome.worse("unclean", f"the error does not say the space ran out: {fetched.describe()}")
                if fetched.rc != 0 and (why := pgenv.startable_partial(target, pg.reference)):
                    outcome.worse("unclean", f"PostgreSQL could start the failed restore: {why}")
            return f"{size >> 20} MiB target, WALG_DOWNLOAD_CONCURRENCY={concurrency}", outcome

        s.note("compressed backup MiB", round(restored / MiB, 1), add=False)
        s.run(len(cases), trial)
    s.check()


def test_wal_push_into_a_full_storage(workdir):
    """wal-push into a file storage with no room: exit 1, a message about space, nothing under the final
    key; wal-fetch does not read what it left (74); with space again, a retry succeeds."""
    harness.require_root("wal-push into a full filesystem")
    wal = harness.mkdir(os.path.join(workdir, "pg_wal"))
    leaves = [0, 64 << 10, 512 << 10]  # room left: none, a little, half the segment
    with scenario(FAMILY, "wal-push, storage full") as s:
        def trial(i: int) -> tuple[str, Outcome]:
            name = harness.wal_name(i + 1)
            original = rng(s.name, i).randbytes(MiB)  # incompressible: needs its full size
            path = harness.write_file(os.path.join(wal, name), original)
            outcome = Outcome()
            with harness.tmpfs(os.path.join(workdir, f"fs{i}"), 4 * MiB) as store:
                harness.mkdir(os.path.join(store, "wal_005"))
                filler = harness.fill(store, leave=leaves[i])
                env = {"WALG_FILE_PREFIX": store, "WALG_PG_WAL_SIZE": "1"}
                pushed = harness.walrus(["wal-push", path], env, timeout=BOUND)
                if harness.judge_exit(pushed, outcome):
                    outcome.worse("lost", f"wal-push exited 0 with {leaves[i]} bytes free")
                elif pushed.rc != 1:
                    outcome.worse("unclean", f"wal-push exited {pushed.rc}, not 1")
                elif not says_space(pushed):
                    outcome.worse("unclean", f"the error does not say the space ran out: {pushed.describe()}")
                if keys := [k for k in final_keys(store) if k.startswith("wal_005/")]:
                    outcome.worse("lost", f"a failed wal-push left {keys} under final keys")
                # what a crash can leave (a failed push removes its own): a whole object under a temporary
                # name, which wal-fetch must never take for the segment
                os.unlink(filler)
                planted = os.path.join(store, "wal_005", f"{name}.lz4.tmp.20260101T000000Z-0badf00d")
                harness.write_file(planted, lz4.frame.compress(original))
                filler = harness.fill(store, leave=leaves[i])
                dest = os.path.join(harness.mkdir(os.path.join(workdir, f"dest{i}")), "RECOVERYXLOG")
                fetched = harness.walrus(["wal-fetch", name, dest], {**env, "WALG_DOWNLOAD_CONCURRENCY": "1"})
                if fetched.rc != 74 or os.path.lexists(dest):
                    outcome.worse("lost", f"wal-fetch after the failed push exited {fetched.rc} (expected 74, "
                                          f"the segment was never archived): {fetched.describe()}")
                os.unlink(filler)  # room again: the archiver's retry succeeds
                again = harness.walrus(["wal-push", path], env, timeout=BOUND)
                if again.rc != 0:
                    outcome.worse("unclean", f"the retry with space failed: {again.describe()}")
                fetched = harness.walrus(["wal-fetch", name, dest], {**env, "WALG_DOWNLOAD_CONCURRENCY": "1"})
                if fetched.rc != 0 or open(dest, "rb").read() != original:
                    outcome.worse("lost", f"after the retry wal-fetch does not give the segment: {fetched.describe()}")
            return f"{leaves[i] >> 10} KiB free", outcome

        s.run(len(leaves), trial)
    s.check()


def test_backup_push_into_a_full_storage(pg_env, workdir):
    """backup-push into a file storage that fills up: exit 1, a message about space, no partial object
    under a final key, nothing listed; with space again a retry succeeds, is listed complete and
    restores the reference tree."""
    harness.require_root("backup-push into a full filesystem")
    pg = pg_env
    sizes = [2 * MiB, 6 * MiB]
    with scenario(FAMILY, "backup-push, storage full") as s:
        def trial(i: int) -> tuple[str, Outcome]:
            outcome = Outcome()
            with harness.tmpfs(os.path.join(workdir, f"fs{i}"), sizes[i]) as store:
                env = pg.env(WALG_FILE_PREFIX=store)
                pushed = harness.walrus(["backup-push", pg.cluster.data], env, timeout=120)
                if harness.judge_exit(pushed, outcome):
                    outcome.worse("lost", f"backup-push exited 0 into {sizes[i] >> 20} MiB")
                elif pushed.rc != 1:
                    outcome.worse("unclean", f"backup-push exited {pushed.rc}, not 1")
                elif not says_space(pushed):
                    outcome.worse("unclean", f"the error does not say the space ran out: {pushed.describe()}")
                for problem in partial_objects(store):
                    outcome.worse("lost", problem)
                plant_temporary_sentinel(pg, store)
                listed, result = faulted.list_backups(env)
                if listed is None or listed:
                    outcome.worse("lost", f"after the failed push backup-list gives {listed}: {result.describe()}")

                harness.resize_tmpfs(store, 256 * MiB)
                again = harness.walrus(["backup-push", pg.cluster.data, "--json"], env, timeout=120)
                if again.rc != 0:
                    return f"{sizes[i] >> 20} MiB", outcome.worse("unclean", f"the retry failed: {again.describe()}")
                name = json.loads(again.stdout)["backup_name"]
                listed, result = faulted.list_backups(env)
                if listed is None or [b["backup_name"] for b in listed] != [name]:
                    outcome.worse("lost", f"after the retry backup-list gives {listed}, not [{name}]")
                for problem in pgenv.listed_backup_problems(store, listed or []):
                    outcome.worse("lost", problem)
                target = os.path.join(workdir, f"restore{i}")
                fetched = harness.walrus(["backup-fetch", target, name], env, timeout=120)
                if fetched.rc != 0:
                    outcome.worse("unclean", f"the retried backup does not restore: {fetched.describe()}")
                elif diff := harness.digest_diff(pgenv.without(harness.tree_digest(target), pgenv.PER_BACKUP),
                                                 pgenv.without(pg.reference, pgenv.PER_BACKUP)):
                    outcome.worse("lost", f"the retried backup: {diff}")
                harness.remove(target)
            return f"{sizes[i] >> 20} MiB storage", outcome

        s.run(len(sizes), trial)
    s.check()


def plant_temporary_sentinel(pg: pgenv.PgEnv, store: str) -> None:
    """A whole sentinel under a temporary name, as a crash between write and rename leaves it (a
    failed push removes its own): backup-list must not take it for a backup."""
    name = f"{pg.backup}_backup_stop_sentinel.json"
    with open(os.path.join(pg.golden, "basebackups_005", name), "rb") as f:
        data = f.read()
    harness.mkdir(os.path.join(store, "basebackups_005"))
    harness.write_file(os.path.join(store, "basebackups_005", name + ".tmp.20260101T000000Z-0badf00d"), data)


def partial_objects(store: str) -> list[str]:
    """Objects under final keys that are not whole: a tar part that does not decode to its end, a JSON
    document that does not parse."""
    problems = []
    for key in final_keys(store):
        path = os.path.join(store, key)
        with open(path, "rb") as f:
            data = f.read()
        if key.endswith(".json"):
            try:
                json.loads(data)
            except ValueError:
                problems.append(f"{key} is a partial JSON document")
        elif ".tar." in key:
            try:
                harness.decompress(data, "lz4")  # the frame's end mark and the seal: whole or not
            except Exception as e:
                problems.append(f"{key} is partial: it does not decode ({type(e).__name__}: {e})")
    return problems
