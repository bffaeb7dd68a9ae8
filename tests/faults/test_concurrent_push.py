"""Two wal-push of one segment name at once (file storage, S3): different bytes, one wins; identical, both do."""
from __future__ import annotations

import os
import threading

import pytest

from tests.faults import harness
from tests.faults.figures import REGISTRY, Outcome, rng, scenario, trials
from tests.s3server import FaultProxy, s3_settings

pytestmark = pytest.mark.e2e

FAMILY = "concurrent wal-push"
RACES = trials(20, 200)
SAME = trials(5, 25)
# On S3 each push costs 0.6 s of start-up (botocore) on top: fewer races in CI, as many in the long mode.
S3_RACES = trials(10, 200)
S3_SAME = trials(3, 25)
REFUSED = "already archived with different contents"


def push_together(paths: list[str], env: dict) -> list[harness.Result]:
    """wal-push of each path, all started at the same moment."""
    barrier = threading.Barrier(len(paths))
    results: list[harness.Result | None] = [None] * len(paths)

    def one(k: int) -> None:
        barrier.wait()
        results[k] = harness.walrus(["wal-push", paths[k]], env, timeout=60)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results  # type: ignore[return-value]


def judge_race(results: list[harness.Result], originals: list[bytes], stored: bytes | None) -> Outcome:
    """Different bytes: exactly one exits 0, the other exits 1 saying the name is archived with
    different contents, and storage holds the winner's bytes."""
    outcome = Outcome()
    for r in results:
        if r.hung:
            outcome.worse("hang", r.describe())
    codes = [r.rc for r in results]
    winners = [k for k, rc in enumerate(codes) if rc == 0]
    if len(winners) == 2:
        kept = next((k for k in winners if harness.same_object(stored, originals[k]) is None), None)
        lost = "neither" if kept is None else f"#{1 - kept}'s"
        outcome.worse("lost", f"both exited 0 with different bytes: {lost} version is lost")
    elif len(winners) == 1:
        loser = results[1 - winners[0]]
        if loser.rc != 1 or REFUSED not in loser.stderr or harness.unclean_reason(loser.stderr):
            outcome.worse("unclean", f"the loser did not say '{REFUSED}': {loser.describe()}")
        else:
            outcome.seconds = loser.seconds
        if problem := harness.same_object(stored, originals[winners[0]]):
            outcome.worse("lost", f"the stored object is not the winner's bytes: it {problem}")
    elif not outcome.kind == "hang":
        outcome.worse("unclean", "neither exited 0: " + " / ".join(r.describe() for r in results))
    return outcome


def judge_same(results: list[harness.Result], original: bytes, stored: bytes | None) -> Outcome:
    """Identical bytes: both exit 0 (the second finds its own bytes archived) and storage holds them."""
    outcome = Outcome()
    for r in results:
        if r.rc != 0:
            outcome.worse("hang" if r.hung else "unclean", f"a push of identical bytes failed: {r.describe()}")
    if problem := harness.same_object(stored, original):
        outcome.worse("lost", f"the stored object {problem}")
    return outcome


def race_scenario(name: str, workdir: str, env: dict, size: int, read, races: int, same_count: int) -> None:
    with scenario(FAMILY, name) as s:
        def segment(i: int, k: int, data: bytes) -> str:
            d = harness.mkdir(os.path.join(workdir, f"t{i}-{k}"))
            return harness.write_file(os.path.join(d, harness.wal_name(i + 1)), data)

        def race(i: int) -> tuple[str, Outcome]:
            originals = [harness.segment_bytes(rng(s.name, i, k), size) for k in range(2)]
            paths = [segment(i, k, originals[k]) for k in range(2)]
            return f"race {i}", judge_race(push_together(paths, env), originals, read(harness.wal_name(i + 1)))

        def same(i: int) -> tuple[str, Outcome]:
            n = races + i
            original = harness.segment_bytes(rng(s.name, n), size)
            paths = [segment(n, k, original) for k in range(2)]
            return f"identical {i}", judge_same(push_together(paths, env), original, read(harness.wal_name(n + 1)))

        s.run(races, race)
        s.run(same_count, same)
    s.check()


def test_racing_pushes_on_file_storage(workdir):
    """Before the exclusive publish (c907f3d) both exited 0 in about half the races, one version lost."""
    store = harness.mkdir(os.path.join(workdir, "store"))

    def read(name: str) -> bytes | None:
        return harness.read_or_none(os.path.join(store, "wal_005", name + ".lz4"))

    race_scenario("race, file storage", workdir, {"WALG_FILE_PREFIX": store}, 8 << 20, read, RACES, SAME)


def test_racing_pushes_on_s3(workdir, moto_server, s3_bucket):
    """Through the fault proxy, which makes moto's conditional writes atomic, as S3's are (see
    tests/s3server.py CONDITIONAL_MODES)."""
    proxy = FaultProxy(moto_server.port)
    env = s3_settings(proxy.endpoint, s3_bucket)

    def read(name: str) -> bytes | None:
        try:
            return moto_server.read(s3_bucket, f"walrus/wal_005/{name}.lz4")
        except moto_server.client.exceptions.NoSuchKey:
            return None

    try:
        # four 256 KiB parts: the Complete is the publish
        race_scenario("race, S3", workdir, env, 1 << 20, read, S3_RACES, S3_SAME)
        REGISTRY["race, S3"].note("conditional writes serialized", proxy.serialised, add=False)
    finally:
        proxy.stop()
