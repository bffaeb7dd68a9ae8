"""wal-fetch: a prefetched copy if there is one, else the archived object under any extension, to DEST atomically."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from walrus.config import Settings
from walrus.errors import WalrusError
from walrus.storage.base import Storage
from walrus.wal import prefetch
from walrus.wal.stored import download


@dataclass
class WalFetchResult:
    name: str
    key: str  # the object read, or "prefetched"
    destination: str
    size: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "destination": self.destination, "size": self.size,
                "seconds": round(self.seconds, 3)}


async def wal_fetch(settings: Settings, storage: Storage, name: str, destination: str) -> WalFetchResult:
    began = time.monotonic()
    _check_name(name)
    location = prefetch.location(settings, destination)
    size = await prefetch.take(location, name, destination, settings.segment_size)
    if size is not None:
        return WalFetchResult(name, "prefetched", destination, size, time.monotonic() - began)
    key, size = await download(settings, storage, name, destination)
    return WalFetchResult(name, key, destination, size, time.monotonic() - began)


def prefetch_before(settings: Settings, name: str, destination: str, config_path: str | None) -> None:
    """Before a wal-fetch process downloads `name` itself: start the prefetcher now, so its start-up
    overlaps this download instead of delaying recovery's next call, which asks it (prefetch.ask).
    For a segment not asked before, and for the .history file a recovery asks for first (no segment
    asked yet in this pg_wal). Not for a retry of the segment asked last, nor for .history files after
    that: a standby waiting for a segment not archived yet asks for both every few seconds, and those
    calls wait for a segment's success, as prefetch_after()."""
    if settings.download_concurrency <= 1:
        return
    location = prefetch.location(settings, destination)
    asked_last = prefetch.cursor(location)
    if prefetch.wanted(name, settings):
        if asked_last != name:
            prefetch_after(settings, name, destination, config_path)
    elif asked_last is None and "/" not in name:
        prefetch.spawn(name, destination, location, config_path)


def prefetch_after(settings: Settings, name: str, destination: str, config_path: str | None) -> None:
    """After a wal-fetch process restored `name`: record it for the running prefetcher, else start one."""
    if prefetch.wanted(name, settings):
        location = prefetch.location(settings, destination)
        prefetch.advance(location, name)
        prefetch.spawn(name, destination, location, config_path)


def _check_name(name: str) -> None:
    if "/" in name or not name:
        raise WalrusError(f"invalid WAL file name {name!r}", hint="restore_command must pass %f")
