"""wal-push: compress one WAL file (segment, .history, .backup, .partial) into wal_005/ durably."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from walrus import codec
from walrus.archive.tar_write import open_for_backup
from walrus.backup import layout
from walrus.config import Settings
from walrus.errors import WalOverwriteError, WalrusError
from walrus.log import log
from walrus.storage.base import Storage
from walrus.stream.buffers import BufferPool
from walrus.stream.pipeline import file_buffers, upload_buffers
from walrus.stream.reader import open_reader
from walrus.stream.stages import Counter
from walrus.wal.archive import consume_decompressed, open_archived

PUSH_BUFFERS = 4


@dataclass
class WalPushResult:
    name: str
    key: str
    size: int
    stored: int
    status: str  # "uploaded" | "already archived"
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "size": self.size, "stored_bytes": self.stored,
                "status": self.status, "seconds": round(self.seconds, 3)}


class _Comparer:
    """Compares decompressed archive bytes with the local file, chunk by chunk."""

    def __init__(self, fd: int):
        self.fd = fd
        self.offset = 0
        self.same = True

    def feed(self, chunk: bytes) -> None:
        if self.same:
            local = os.pread(self.fd, len(chunk), self.offset)
            self.same = local == chunk
            self.offset += len(chunk)


async def wal_push(settings: Settings, storage: Storage, path: str) -> WalPushResult:
    began = time.monotonic()
    name = os.path.basename(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise WalrusError(f"cannot open WAL file {path}", detail=e.strerror,
                          hint="archive_command must pass %p, relative to the data directory") from None
    direct_fd = None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="walrus-wal")
    try:
        size = os.fstat(fd).st_size
        existing = await open_archived(storage, name, settings)
        if existing is not None:
            # Archived already (a retry after a crash, or a second cluster on the same prefix):
            # identical bytes are success, different bytes are never overwritten.
            key, ext, stream = existing
            comparer = _Comparer(fd)
            await consume_decompressed(stream, ext, key, executor, comparer.feed, settings.crypter)
            if comparer.same and comparer.offset == size:
                log.info(f"{name} is already archived with identical contents ({key}); not uploaded again")
                return WalPushResult(name, key, size, 0, "already archived", time.monotonic() - began)
            raise WalOverwriteError(f"{name} is already archived with different contents",
                                    detail=f"{key} in {storage.describe()} differs from {path}",
                                    hint="two clusters may be archiving into the same prefix; give each its own "
                                         "WALG_*_PREFIX, and keep the archived copy")
        key = layout.wal_key(layout.with_extension(name, codec.extension(settings.compression_method)))
        pool = BufferPool(PUSH_BUFFERS, settings.buffer_size)
        reader = open_reader(settings.io_method)
        counter = Counter()
        read_total = 0
        if settings.direct_io and size >= settings.direct_io_min:
            found = open_for_backup(path, direct=True)  # a segment is read once: keep it out of the cache
            if found is not None and found[1]:
                direct_fd = found[0]
            elif found is not None:
                os.close(found[0])

        async def counted():
            nonlocal read_total
            source = direct_fd if direct_fd is not None else fd
            async for buf in file_buffers(source, size, pool, reader, PUSH_BUFFERS - 2, direct_fd is not None):
                read_total += buf.length
                yield buf
            if read_total != size:  # raising here aborts the put: nothing lands under the key
                raise WalrusError(f"{path} shrank while it was being archived",
                                  detail=f"read {read_total} of {size} bytes")

        try:
            stored = await upload_buffers(storage, key, counted(), settings, executor, counter)
        finally:
            reader.close()
        log.info(f"archived {name} as {key} ({size} -> {stored} bytes)")
        return WalPushResult(name, key, size, stored, "uploaded", time.monotonic() - began)
    finally:
        os.close(fd)
        if direct_fd is not None:
            os.close(direct_fd)
        executor.shutdown(wait=False)
