"""A storage under test for the contract tests, with what only the backend itself can tell."""
from __future__ import annotations

from typing import Any, Callable

from tests.storage_helpers import run
from walrus.storage.base import Storage


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
