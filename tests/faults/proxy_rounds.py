"""1000+ requests through the fault proxy to any storage backend, judged alike; a Target says what differs."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import unquote

from tests.faults import harness
from tests.faults.figures import Outcome, Scenario, rng, scenario, trials
from tests.s3server import ACTIONS, FaultProxy
from tests.storage_helpers import chunks
from walrus.errors import StorageError
from walrus.log import log
from walrus.storage.base import Storage

OP_BOUND = 60.0  # seconds any one operation may take, retries and stalls included
MIN_REQUESTS = trials(1000, 5000)
RETRIED, EXHAUSTED = 8, 1  # retries per request: enough to outlast the faults, and too few on purpose


@dataclass
class Round:
    """One library round, done, as the target's `leftovers` gets it."""

    phase: str  # its keys are under walrus/<phase>/
    home: str
    put_ok: dict[str, bool]  # key (below walrus/) -> whether its put succeeded
    stored: set[str]  # the full keys the service holds under walrus/<phase>/ after the round
    doomed: int  # how many keys met their fault on every request
    warnings: list[str]  # what walrus logged at WARNING and above during the round


class Target:
    """A backend behind the fault proxy: what the rounds cannot know of it. `server` is its emulator,
    `root` the test's bucket or container; a subclass per backend sets the class attributes and
    defines the methods that raise NotImplementedError."""

    family: str  # the figures' family
    scenario: str  # the figures' scenario, a name of its own: the figures keep one scenario per name
    unit: int  # the part, chunk or block size the library opens the storage with
    piece: int = 64 << 10  # the size of the pieces a put's source yields
    noun: str = "object"  # what the service calls what a key holds, in findings
    exclusive: bool = False  # every other put of the library rounds is exclusive
    cli_actions: tuple[str, ...] = ACTIONS  # the faults the command line round meets

    def __init__(self, server, root: str) -> None:
        self.server, self.root = server, root

    def sizes(self) -> tuple[int, ...]:
        """The objects' sizes, in turn: one request's worth, and 3 and 5 units that do not end on a unit."""
        return 9_000, 2 * self.unit + 4_321, 5 * self.unit - 7

    def keys(self, prefix: str) -> list[str]:
        """The full keys under prefix as the emulator holds them, not through the proxy."""
        return self.server.keys(self.root, prefix)

    def read(self, key: str) -> bytes:
        return self.server.read(self.root, key)

    def proxy(self, stall_seconds: float) -> FaultProxy:
        """A FaultProxy in front of the emulator, speaking its API."""
        raise NotImplementedError

    def open(self, endpoint: str, home: str, retries: int) -> Storage:
        """The library's storage at `endpoint` (the proxy), with `retries` retries per request and
        a short per-request timeout, so that a stall costs about a second."""
        raise NotImplementedError

    def cli_settings(self, endpoint: str, prefix: str) -> dict[str, str]:
        """walrus settings for the command line at `endpoint` under `prefix`, retrying enough to
        outlast the faults."""
        raise NotImplementedError

    def leftovers(self, s: Scenario, done: Round) -> None:
        """Judge what the service keeps of the round's unfinished uploads: its invisible state."""
        raise NotImplementedError

    def notes(self, s: Scenario, proxy: FaultProxy) -> None:
        """Figures of the backend's own, at the end."""


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


def record(s: Scenario, kind: str, value, seconds: float, label: str) -> None:
    if kind == "ok":
        s.add(Outcome("success"), label)
    elif kind == "clean":
        s.add(Outcome("clean", seconds=seconds), label)
    elif kind == "hang":
        s.add(Outcome("hang", f"still running after {OP_BOUND:.0f}s"), label)
    else:
        s.add(Outcome("unclean", f"{type(value).__name__}: {value}"), label)


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def library_round(s: Scenario, proxy: FaultProxy, target: Target, home: str, phase: str, objects: int,
                  retries: int, doomed: int = 0) -> None:
    """Put `objects` objects through the proxy, 16 at a time, then read each one back; judge every
    operation, then check the emulator directly: a key holds its whole object or nothing, and what
    the service keeps of unfinished uploads is as the target allows. The first `doomed` keys meet
    their fault on every request (cycling through the actions), so their operations must fail,
    cleanly."""
    rnd = rng(s.name, phase)
    sizes = target.sizes()
    payloads = {}
    for i in range(objects):
        tag = f"doomed-{ACTIONS[i % len(ACTIONS)]}-" if i < doomed else ""
        payloads[f"{phase}/{tag}obj{i:04d}"] = rnd.randbytes(sizes[i % len(sizes)])
    put_ok: dict[str, bool] = {}

    async def main() -> None:
        storage = target.open(proxy.endpoint, home, retries)
        gate = asyncio.Semaphore(16)
        try:
            async def put(i: int, key: str, data: bytes) -> None:
                exclusive = target.exclusive and i % 2 == 1
                async with gate:
                    kind, value, seconds = await bounded(storage.put(key, chunks(data, target.piece),
                                                                     exclusive=exclusive))
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

            await asyncio.gather(*(put(i, k, d) for i, (k, d) in enumerate(payloads.items())))
            await asyncio.gather(*(get(k, d) for k, d in payloads.items() if put_ok[k]))
        finally:
            await storage.close()

    # what walrus warns of meanwhile: the clean-ups it gave up on say which uploads may stay behind
    warnings = _Warnings()
    log.addHandler(warnings)
    try:
        asyncio.run(main())
    finally:
        log.removeHandler(warnings)
    noun = target.noun
    stored = set(target.keys(f"walrus/{phase}/"))
    for key, data in payloads.items():
        full = f"walrus/{key}"
        if full in stored and target.read(full) != data:
            s.add(Outcome("lost", f"the stored {noun} is not the bytes put (partial or mixed)"), f"{phase} {key}")
        elif put_ok[key] and full not in stored:
            s.add(Outcome("lost", f"put succeeded but the {noun} is not stored"), f"{phase} {key}")
        elif not put_ok[key] and full in stored:
            s.note(f"failed puts whose {noun} was stored whole anyway")
    target.leftovers(s, Round(phase, home, put_ok, stored, doomed, warnings.messages))


def cli_round(s: Scenario, proxy: FaultProxy, target: Target, workdir: str, count: int) -> None:
    """wal-push then wal-fetch of `count` segments through the proxy with the command line: exit 0 with
    the segment, or a clean error (exit 1; 74 only for a segment that was never stored)."""
    wal = harness.mkdir(os.path.join(workdir, "pg_wal"))
    env = {**target.cli_settings(proxy.endpoint, "cli"), "WALG_PG_WAL_SIZE": "1", "WALG_DOWNLOAD_CONCURRENCY": "1"}

    def trial(i: int) -> tuple[str, Outcome]:
        name = harness.wal_name(i + 1)
        original = harness.segment_bytes(rng(s.name, "cli", i), 1 << 20)
        path = harness.write_file(os.path.join(wal, name), original)
        outcome = Outcome()
        pushed = harness.walrus(["wal-push", path], env, timeout=OP_BOUND)
        stored = harness.judge_exit(pushed, outcome)
        key = f"cli/wal_005/{name}.lz4"
        present = key in target.keys("cli/wal_005/")
        if present and (problem := harness.same_object(target.read(key), original)):
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


def thousand_requests(target: Target, workdir: str) -> FaultProxy:
    """Phase 'retried': a fault every 4th request, retries enough: nearly everything succeeds; then
    the command line round, a fault every 4th request of its own actions. Phase 'exhausted': a
    fault every 3rd request and one retry, and a quarter of the keys fail on every request: those
    operations fail, all of them cleanly. Asserts at least MIN_REQUESTS requests and no unclean
    outcome, hang or loss; returns the proxy (stopped) for the backend's own assertions."""
    proxy = target.proxy(stall_seconds=2.5)
    home = harness.mkdir(os.path.join(workdir, "home"))
    try:
        with scenario(target.family, target.scenario) as s:
            proxy.fail_every(4, ACTIONS, limit=10 ** 9)
            rounds = 0
            while len(proxy.log) < MIN_REQUESTS * 0.5:
                library_round(s, proxy, target, home, f"retried{rounds}", 60, RETRIED)
                rounds += 1
            proxy.clear()
            proxy.fail_every(4, target.cli_actions, limit=10 ** 9)
            cli_round(s, proxy, target, workdir, trials(6, 30))
            proxy.clear()
            proxy.fail_every(3, ACTIONS, limit=10 ** 9)
            for action in ACTIONS:  # object names are in the path, or (GCS) escaped in the path or query
                proxy.fail(action, 10 ** 9, lambda r, a=action: f"/doomed-{a}-" in unquote(r.path))
            while True:  # at least one round
                library_round(s, proxy, target, home, f"exhausted{rounds}", 40, EXHAUSTED, doomed=10)
                rounds += 1
                if len(proxy.log) >= MIN_REQUESTS:
                    break
            s.note("requests seen by the proxy", len(proxy.log), add=False)
            s.note("faults applied", len(proxy.applied), add=False)
            for action in ACTIONS:
                s.note(f"'{action}' applied", sum(1 for a, _ in proxy.applied if a == action), add=False)
            target.notes(s, proxy)
        assert len(proxy.log) >= MIN_REQUESTS
        s.check()
    finally:
        proxy.stop()
    return proxy
