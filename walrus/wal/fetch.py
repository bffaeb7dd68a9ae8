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


def prefetch_after(settings: Settings, name: str, destination: str, config_path: str | None) -> None:
    """After a wal-fetch process restored `name`: record it for the running prefetcher, else start one."""
    if prefetch.wanted(name, settings):
        location = prefetch.location(settings, destination)
        prefetch.advance(location, name)
        prefetch.spawn(name, destination, location, config_path)


def _check_name(name: str) -> None:
    if "/" in name or not name:
        raise WalrusError(f"invalid WAL file name {name!r}", hint="restore_command must pass %f")
