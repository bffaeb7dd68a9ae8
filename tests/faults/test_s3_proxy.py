"""Over 1000 S3 requests through the fault proxy: each operation succeeds whole or fails cleanly, nothing partial."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime, timezone

import pytest

from tests.faults import harness
from tests.faults.figures import Outcome, rng, scenario, trials
from tests.s3server import ACTIONS, MIN_PART_SIZE, FaultProxy, s3_settings
from walrus.config import load_settings
from walrus.errors import StorageError
from walrus.log import log
from walrus.storage import open_storage

pytestmark = pytest.mark.e2e

FAMILY = "S3 faults"
PART = MIN_PART_SIZE  # parts and ranges at moto's floor: many requests of few bytes
SIZES = (9_000, 2 * PART + 4_321, 5 * PART - 7)  # one PutObject; multipart of 3 and of 5 parts
OP_BOUND = 60.0  # seconds any one operation may take, retries and stalls included
MIN_REQUESTS = trials(1000, 5000)


def open_s3(endpoint: str, bucket: str, home: str, **extra: str):
    env = {**s3_settings(endpoint, bucket, WALG_S3_MAX_PART_SIZE=str(PART), WALRUS_S3_RANGE_SIZE=str(PART), **extra),
           "HOME": home, "AWS_EC2_METADATA_DISABLED": "true"}
    return open_storage(load_settings(env=env))


async def chunks(data: bytes, size: int = 64 << 10):
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def bounded(coro) -> tuple[str, object, float]:
    """('ok', value) | ('clean', StorageError) | ('unclean', other exception) | ('hang', None), and the seconds."""
    began = time.monotonic()
    try:
        value = await asyncio.wait_for(coro, OP_BOUND)
        return "ok", value, time.monotonic() - began
    except StorageError as e:
        return "clean", e, time.monotonic() - began
    except TimeoutError:
        return "hang", None, time.monotonic() - began
    except Exception as e:  # anything but a StorageError is a failure walrus did not understand
        return "unclean", e, time.monotonic() - began


def library_round(s, proxy, moto_server, bucket: str, home: str, phase: str, objects: int, doomed: int = 0,
                  **settings: str) -> None:
    """Put `objects` objects through the proxy, 16 at a time, then read each one back; judge every
    operation, then check storage directly: a key holds its whole object or nothing, and no
    multipart upload is left pending. The first `doomed` keys meet their fault on every request
    (cycling through the actions), so their operations must fail, cleanly."""
    rnd = rng(s.name, phase)
    payloads = {}
    for i in range(objects):
        tag = f"doomed-{ACTIONS[i % len(ACTIONS)]}-" if i < doomed else ""
        payloads[f"{phase}/{tag}obj{i:04d}"] = rnd.randbytes(SIZES[i % len(SIZES)])
    put_ok: dict[str, bool] = {}

    async def main() -> None:
        storage = open_s3(proxy.endpoint, bucket, home, **settings)
        gate = asyncio.Semaphore(16)
        try:
            async def put(key: str, data: bytes) -> None:
                async with gate:
                    kind, value, seconds = await bounded(storage.put(key, chunks(data)))
                put_ok[key] = kind == "ok"
                record(s, kind, value, seconds, f"{phase} put {key}")

            async def get(key: str, data: bytes) -> None:
                async with gate:
                    kind, value, seconds = await bounded(storage.get_bytes(key))
                if kind == "ok" and value != data:
                    s.add(Outcome("lost", f"read {len(value)} bytes that differ from the {len(data)} stored"),
                          f"{phase} get {key}")
                else:
                    record(s, kind, value, seconds, f"{phase} get {key}")

            await asyncio.gather(*(put(k, d) for k, d in payloads.items()))
            await asyncio.gather(*(get(k, d) for k, d in payloads.items() if put_ok[k]))
        finally:
            await storage.close()

    # The clean-up of a failed upload, or of a create whose answer was lost, is best effort: a few
    # tries (ABORT_ATTEMPTS), then a warning, whatever WALG_S3_MAX_RETRIES says; `delete garbage`
    # removes what it leaves. Those warnings say which uploads may stay pending.
    gave_up: list[str] = []

    class GaveUp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("could not abort"):
                gave_up.append(record.getMessage())

    handler = GaveUp(logging.WARNING)
    log.addHandler(handler)
    try:
        asyncio.run(main())
    finally:
        log.removeHandler(handler)
    # storage as S3 itself holds it, not through the proxy
    stored = set(moto_server.keys(bucket, f"walrus/{phase}/"))
    for key, data in payloads.items():
        full = f"walrus/{key}"
        if full in stored and moto_server.read(bucket, full) != data:
            s.add(Outcome("lost", "the stored object is not the bytes put (partial or mixed)"), f"{phase} {key}")
        elif put_ok[key] and full not in stored:
            s.add(Outcome("lost", "put succeeded but the object is not stored"), f"{phase} {key}")
        elif not put_ok[key] and full in stored:
            s.note("failed puts whose object was stored whole anyway")
    pending = sorted(set(k for k in moto_server.pending_uploads(bucket) if k.startswith(f"walrus/{phase}/")))
    for key in pending:
        if "/doomed-" in key:
            # every request for this key fails, the abort too: nothing could remove the upload
            s.note("pending uploads of keys whose every request fails")
        elif doomed or any(f" {key[len('walrus/'):]}:" in m for m in gave_up):
            # retries too few on purpose (one), or the clean-up's own few tries all met a fault: the
            # upload is invisible garbage, which `delete garbage` must then remove (below)
            s.note("uploads left pending where the clean-up's retries ran out, then removed by delete garbage")
        else:
            how = "succeeded" if put_ok[key[len("walrus/"):]] else "failed"
            s.add(Outcome("unclean", f"a multipart upload is left pending (the put {how}; its abort or the "
                                     "clean-up of a lost create gave up, with retries enough)"), f"{phase} {key}")
    if any("/doomed-" not in key for key in pending):
        async def reclaim() -> None:  # delete garbage's capabilities, straight to S3 (no faults now)
            storage = open_s3(moto_server.endpoint, bucket, home)
            try:
                # moto dates every upload 2010-11-10, so any cut-off takes them all
                found = await storage.abandoned_uploads(phase, datetime.now(timezone.utc))
                await storage.discard_uploads([u for u in found if "/doomed-" not in u.key])
            finally:
                await storage.close()

        asyncio.run(reclaim())
        for key in moto_server.pending_uploads(bucket):
            if key.startswith(f"walrus/{phase}/") and "/doomed-" not in key:
                s.add(Outcome("unclean", "delete garbage did not remove an abandoned multipart upload"),
                      f"{phase} {key}")


def record(s, kind: str, value, seconds: float, label: str) -> None:
    if kind == "ok":
        s.add(Outcome("success"), label)
    elif kind == "clean":
        s.add(Outcome("clean", seconds=seconds), label)
    elif kind == "hang":
        s.add(Outcome("hang", f"still running after {OP_BOUND:.0f}s"), label)
    else:
        s.add(Outcome("unclean", f"{type(value).__name__}: {value}"), label)


def cli_round(s, proxy, moto_server, bucket: str, workdir: str, count: int) -> None:
    """wal-push then wal-fetch of `count` segments through the proxy with the command line: exit 0 with
    the segment, or a clean error (exit 1; 74 only for a segment that was never stored)."""
    wal = harness.mkdir(os.path.join(workdir, "pg_wal"))
    env = s3_settings(proxy.endpoint, bucket, prefix="cli", WALRUS_S3_TIMEOUT="1", WALG_S3_MAX_RETRIES="6",
                      WALG_PG_WAL_SIZE="1", WALG_DOWNLOAD_CONCURRENCY="1")

    def trial(i: int) -> tuple[str, Outcome]:
        name = harness.wal_name(i + 1)
        original = harness.segment_bytes(rng(s.name, "cli", i), 1 << 20)
        path = harness.write_file(os.path.join(wal, name), original)
        outcome = Outcome()
        pushed = harness.walrus(["wal-push", path], env, timeout=OP_BOUND)
        stored = harness.judge_exit(pushed, outcome)
        key = f"cli/wal_005/{name}.lz4"
        present = key in moto_server.keys(bucket, "cli/wal_005/")
        if present and (problem := harness.same_object(moto_server.read(bucket, key), original)):
            outcome.worse("lost", f"the stored segment {problem}")
        elif stored and not present:
            outcome.worse("lost", "wal-push exited 0 but the segment is not stored")
        dest_dir = harness.mkdir(os.path.join(workdir, f"dest{i}"))
        dest = os.path.join(dest_dir, "RECOVERYXLOG")
        fetched = harness.walrus(["wal-fetch", name, dest], env, timeout=OP_BOUND)
        if harness.judge_exit(fetched, outcome):
            if open(dest, "rb").read() != original:
                outcome.worse("lost", "wal-fetch exited 0 with other bytes")
        else:
            if fetched.rc == 74 and present:
                outcome.worse("unclean", "wal-fetch said 'not archived' (74) of a stored segment")
            if os.path.lexists(dest):
                outcome.worse("unclean", f"wal-fetch exited {fetched.rc} and left a file at DEST")
        return f"cli {name}", outcome

    s.run(count, trial, count)  # all at once: they mostly wait out faults and backoffs


def test_a_thousand_requests_through_the_fault_proxy(moto_server, s3_bucket, workdir):
    """Phase 'retried': a fault every 4th request, retries enough: nearly everything succeeds. Phase
    'exhausted': a fault every 3rd request and one retry, and a quarter of the keys fail on every
    request: those operations fail, all of them cleanly."""
    proxy = FaultProxy(moto_server.port, stall_seconds=2.5)
    home = harness.mkdir(os.path.join(workdir, "home"))
    try:
        with scenario(FAMILY, "proxy, 1000+ requests") as s:
            proxy.fail_every(4, ACTIONS, limit=10 ** 9)
            rounds = 0
            while len(proxy.log) < MIN_REQUESTS * 0.5:
                library_round(s, proxy, moto_server, s3_bucket, home, f"retried{rounds}", 60,
                              WALRUS_S3_TIMEOUT="1", WALG_S3_MAX_RETRIES="8")
                rounds += 1
            cli_round(s, proxy, moto_server, s3_bucket, workdir, trials(6, 30))
            proxy.clear()
            proxy.fail_every(3, ACTIONS, limit=10 ** 9)
            for action in ACTIONS:
                proxy.fail(action, 10 ** 9, lambda r, a=action: f"/doomed-{a}-" in r.path)
            while True:  # at least one round
                library_round(s, proxy, moto_server, s3_bucket, home, f"exhausted{rounds}", 40, doomed=10,
                              WALRUS_S3_TIMEOUT="1", WALG_S3_MAX_RETRIES="1")
                rounds += 1
                if len(proxy.log) >= MIN_REQUESTS:
                    break
            s.note("requests seen by the proxy", len(proxy.log), add=False)
            s.note("faults applied", len(proxy.applied), add=False)
            for action in ACTIONS:
                s.note(f"'{action}' applied", sum(1 for a, _ in proxy.applied if a == action), add=False)
        assert len(proxy.log) >= MIN_REQUESTS
        s.check()
    finally:
        proxy.stop()
