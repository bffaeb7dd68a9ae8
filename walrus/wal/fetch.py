"""wal-fetch: find a WAL file under any extension and write it to DEST atomically (prefetched copies first)."""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from walrus.config import Settings
from walrus.errors import ArchiveNotFound, WalrusError
from walrus.fsutil import write_all
from walrus.storage.base import Storage
from walrus.wal import prefetch
from walrus.wal.archive import consume_decompressed, open_archived


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


async def download(settings: Settings, storage: Storage, name: str, destination: str,
                   partial: str | None = None) -> tuple[str, int]:
    """Decompress archived `name` into `destination` via `partial` (a temporary file in the same
    directory by default), then rename: a reader never sees a partial file under `destination`.

    Not fsynced: what restore_command writes is PostgreSQL's to keep, and it makes the segment durable
    itself (durable_rename in KeepFileRestoredFromArchive) when fsync is on; after a crash before
    that, recovery asks for the segment again. WAL-G does not fsync it either. (Prefetched copies are
    not fsynced for the same reason; prefetch.take() refuses any written before the last boot.)"""
    found = await open_archived(storage, name, settings)
    if found is None:
        raise ArchiveNotFound(f"WAL file {name} is not in the archive")
    key, ext, stream = found
    directory = os.path.dirname(os.path.abspath(destination))
    tmp = partial or os.path.join(directory, f".{os.path.basename(destination)}.walrus-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        await stream.aclose()
        raise WalrusError(f"cannot create {tmp}", detail=e.strerror,
                          hint="restore_command must pass %p and run as the server's OS user") from None
    size = 0

    def sink(chunk: bytes) -> None:
        nonlocal size
        write_all(fd, chunk)
        size += len(chunk)

    try:
        await consume_decompressed(stream, ext, key, None, sink, settings.crypter)
        os.close(fd)
        fd = -1
        os.rename(tmp, destination)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return key, size


async def wal_fetch(settings: Settings, storage: Storage, name: str, destination: str) -> WalFetchResult:
    began = time.monotonic()
    if "/" in name or not name:
        raise WalrusError(f"invalid WAL file name {name!r}", hint="restore_command must pass %f")
    location = prefetch.location(settings, destination)
    size = await prefetch.take(location, name, destination, settings.segment_size)
    if size is not None:
        return WalFetchResult(name, "prefetched", destination, size, time.monotonic() - began)
    key, size = await download(settings, storage, name, destination)
    return WalFetchResult(name, key, destination, size, time.monotonic() - began)
