"""Stored WAL objects: found under any compression extension (WAL-G's probe order), downloaded to a file."""
from __future__ import annotations

import os

from walrus import codec
from walrus.config import Settings
from walrus.errors import ArchiveNotFound, CorruptObject, ObjectNotFound, WalrusError
from walrus.fsutil import WorkerResource, discard, write_all
from walrus.pg.xlog import classify_wal_name
from walrus.storage import layout
from walrus.storage.base import ByteStream, Storage
from walrus.stream.download import copy_decoded


def candidate_keys(name: str, configured_method: str) -> list[tuple[str, str]]:
    """(key, extension) pairs to try: the configured method first (the common case costs one GET),
    then WAL-G's order (including v3.0.8's trailing-dot 'none' keys), then the bare name."""
    exts = [codec.extension(configured_method) or "."]
    exts += [e for e in codec.WAL_PROBE_EXTENSIONS if e not in exts]
    out = []
    for ext in exts:
        if ext == ".":
            out.append((layout.wal_key(name + "."), ""))
        else:
            out.append((layout.wal_key(f"{name}.{ext}"), ext))
    out.append((layout.wal_key(name), ""))
    return out


async def open_archived(storage: Storage, name: str, settings: Settings) -> tuple[str, str, ByteStream] | None:
    candidates = candidate_keys(name, settings.compression_method)
    present = await storage.keys_with_prefix(layout.wal_key(name))
    if present is not None:  # one LIST instead of a GET per extension (S3)
        candidates = [(key, ext) for key, ext in candidates if key in present]
    for key, ext in candidates:
        try:
            return key, ext, await storage.get(key)
        except ObjectNotFound:
            continue
    return None


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
    tmp = partial or os.path.join(directory, f".{os.path.basename(destination)}.walrus-{os.urandom(4).hex()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        await stream.aclose()
        raise WalrusError(f"cannot create {tmp}", detail=e.strerror,
                          hint="restore_command must pass %p and run as the server's OS user") from None
    size = 0
    # the decode thread writes; a cancelled fetch must not close the file under a write still running
    owner = WorkerResource(lambda: discard(fd, tmp))

    def sink(chunk: bytes) -> None:
        nonlocal size
        owner.call(write_all, fd, chunk)
        size += len(chunk)

    try:
        await copy_decoded(stream, ext, key, settings.crypter, sink)
        if size != settings.segment_size and classify_wal_name(name) == "segment":
            # what a truncation the format cannot see looks like: uncompressed objects, and zstd
            # frames cut at a frame boundary
            raise CorruptObject(f"the archived copy of {name} is not a whole WAL segment",
                                 detail=f"{key} decompresses to {size} bytes, a segment is {settings.segment_size}",
                                 hint="the object is truncated or damaged; or WALG_PG_WAL_SIZE is not the "
                                      "server's wal_segment_size in MiB")
        os.close(fd)
        fd = -1
        os.rename(tmp, destination)
    except BaseException:
        if fd >= 0:
            owner.release()  # now, or when the write still running on the decode thread ends
        else:
            discard(fd, tmp)
        raise
    return key, size


async def read_archived(settings: Settings, storage: Storage, name: str) -> bytes | None:
    """A small archived file (a .history file) decoded whole into memory; None when it is not archived."""
    found = await open_archived(storage, name, settings)
    if found is None:
        return None
    key, ext, stream = found
    out = bytearray()
    await copy_decoded(stream, ext, key, settings.crypter, out.extend)
    return bytes(out)
