"""What the storage tests share: a loop per storage call, the contract tests' Backend, chunk sources, test settings,
emulators and their fixtures."""
from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from typing import Any, Callable

import pytest

from tests.pgcluster import stop_process, wait_for_port
from walrus.config import Settings, load_settings
from walrus.storage.base import Storage


def run(storage: Storage, coro):
    """Await coro in an event loop of its own, as each walrus command has; the storage is closed at its end."""

    async def main():
        try:
            return await coro
        finally:
            await storage.close()

    return asyncio.run(main())


class Backend:
    """`storage` to test; `pending()` lists the keys of uploads begun and never finished or
    discarded that the service keeps (S3's multipart uploads); `atomic(request)` gives the same
    backend behind whatever makes the emulator's conditional writes atomic, as the service's are
    (moto needs the fault proxy for that; a backend whose emulator is atomic returns itself)."""

    def __init__(self, storage: Storage, pending: Callable[[], list[str]] = list,
                 atomic: Callable[[Any], "Backend"] | None = None):
        self.storage = storage
        self._pending = pending
        self._atomic = atomic

    def run(self, coro):
        """One event loop per call, as each walrus command has; the storage is closed at its end."""
        return run(self.storage, coro)

    def pending_uploads(self) -> list[str]:
        return self._pending()

    def atomic(self, request) -> "Backend":
        return self._atomic(request) if self._atomic is not None else self


async def chunks(data: bytes, size: int = 64 << 10):
    """data as a put's source: pieces of `size` bytes."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def settings_at(variables: dict[str, str], home) -> Settings:
    """walrus settings of these variables only, not the process's environment, with HOME at `home`:
    no ~/.walg.json of whoever runs the tests counts."""
    return load_settings(env={**variables, "HOME": str(home)})


def pulled_while_held(storage: Storage, pieces: int = 160, piece: int = 16 << 10, after: float = 1.0) -> int:
    """Put `pieces` random pieces of `piece` bytes under "obj", the endpoint holding the first
    requests (the test's proxy stalls them); return the bytes the put had pulled from its source
    `after` seconds in, once it has pulled them all. The storage is closed at the end."""
    pulled = 0

    async def source():
        nonlocal pulled
        for _ in range(pieces):
            pulled += piece
            yield os.urandom(piece)

    async def upload_and_look():
        upload = asyncio.ensure_future(storage.put("obj", source()))
        await asyncio.sleep(after)
        held = pulled
        await upload
        return held

    held = run(storage, upload_and_look())
    assert pulled == pieces * piece
    return held


class Emulator:
    """A storage emulator run as a subprocess that logs to a temporary file; a subclass whose
    emulator needs more (a front, a directory) ends that too in its own stop()."""

    proc: subprocess.Popen

    def launch(self, cmd: list[str], port: int, name: str, timeout: float = 30, **popen) -> None:
        """Start cmd and wait until it listens on `port`; if it does not, stop everything and raise."""
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, **popen)
        try:
            wait_for_port(port, self.proc, name, self.log, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def emulator_fixtures(server: str, root: str, proxy: str, start: Callable[[], Any],
                      new_root: Callable[[Any], str], make_proxy: Callable[[Any], Any]) -> tuple:
    """An emulator's three fixtures, under the names given: `server`, one emulator for the session
    (start() makes it, its stop() ends it); `root`, a bucket or container of the test's own
    (new_root(emulator)); `proxy`, a fault proxy in front of the emulator for the test
    (make_proxy(emulator), stopped after it). Assign them to those names in the module that
    conftest imports them from."""

    @pytest.fixture(scope="session", name=server)
    def emulator():
        running = start()
        yield running
        running.stop()

    @pytest.fixture(name=root)
    def fresh_root(request) -> str:
        return new_root(request.getfixturevalue(server))

    @pytest.fixture(name=proxy)
    def fault_proxy(request):
        made = make_proxy(request.getfixturevalue(server))
        yield made
        made.stop()

    return emulator, fresh_root, fault_proxy
