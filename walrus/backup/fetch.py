"""backup-fetch: restore a base backup (ours or WAL-G's) into an empty directory."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from walrus import codec
from walrus.archive.tar_read import ExtractStats, extract_tar
from walrus.backup import layout
from walrus.backup.dto import FilesMetadata, Sentinel, TablespaceSpec
from walrus.backup.list import resolve_backup
from walrus.config import Settings
from walrus.crypto import decrypting
from walrus.errors import BackupError, CorruptArchive, ObjectNotFound
from walrus.fsutil import syncfs
from walrus.log import log
from walrus.storage.base import Storage
from walrus._uring.writer import open_sink
from walrus.stream.pipeline import raise_nofile_limit
from walrus.stream.stages import SyncReader, gather_all

# Restored whatever files_metadata.json lists (WAL-G's UtilityFilePaths).
UTILITY_RELPATHS = frozenset({"global/pg_control", "backup_label", "tablespace_map"})


@dataclass
class BackupFetchResult:
    name: str
    directory: str
    parts: int
    files: int
    bytes: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"backup_name": self.name, "directory": self.directory, "parts": self.parts,
                "files": self.files, "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def _prepare_target(directory: str) -> None:
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise BackupError(f"restore target {directory} exists and is not a directory")
        if os.listdir(directory):
            raise BackupError(f"restore target {directory} is not empty",
                              hint="backup-fetch restores only into an empty or missing directory; "
                                   "move the old data directory aside first")
    else:
        os.makedirs(directory, 0o700)
    os.chmod(directory, 0o700)


def _link_tablespaces(directory: str, spec: TablespaceSpec) -> frozenset[str]:
    """pg_tblspc/<oid> links under the target, pointing at each (possibly relocated) location.

    WAL-G creates them under the source's base_prefix instead (wal-g issue #196); see WALG_COMPAT.md.
    """
    links = set()
    if not spec.locations:
        return frozenset()
    os.makedirs(os.path.join(directory, "pg_tblspc"), 0o700, exist_ok=True)
    for oid, location in sorted(spec.locations.items()):
        if not oid.isdigit():
            raise CorruptArchive(f"tablespace spec names {oid!r}, which is not an OID")
        if os.path.isdir(location) and os.listdir(location):
            raise BackupError(f"tablespace location {location} (OID {oid}) is not empty",
                              hint="restore elsewhere with --restore-spec, or empty that directory")
        os.makedirs(location, 0o700, exist_ok=True)
        os.symlink(location, os.path.join(directory, "pg_tblspc", oid))
        links.add(f"pg_tblspc/{oid}")
    return frozenset(links)


def _load_restore_spec(path: str) -> TablespaceSpec:
    try:
        with open(path, encoding="utf-8") as f:
            return TablespaceSpec.from_json_obj(json.load(f))
    except (OSError, ValueError) as e:
        raise BackupError(f"cannot read restore spec {path}", detail=str(e),
                          hint='it has the shape of the sentinel\'s Spec: {"base_prefix": ..., "tablespaces": [...], "<oid>": {"loc": ...}}') from None


def _sync_filesystems(paths: list[str]) -> None:
    """One syncfs per filesystem restored into: every file and directory durable, no per-file fsync."""
    seen = set()
    for path in paths:
        dev = os.stat(path).st_dev
        if dev not in seen:
            seen.add(dev)
            syncfs(path)


async def backup_fetch(settings: Settings, storage: Storage, directory: str, name: str, *,
                       restore_spec: str | None = None) -> BackupFetchResult:
    began = time.monotonic()
    name = await resolve_backup(storage, name)
    sentinel = Sentinel.from_json(await storage.get_bytes(layout.sentinel_key(name)))
    if sentinel.is_delta:
        raise BackupError(f"{name} is a delta backup, which walrus cannot restore yet",
                          hint="restore it with WAL-G, or fetch a full backup")
    files_metadata = await _files_metadata(storage, name, sentinel)

    spec = _load_restore_spec(restore_spec) if restore_spec else sentinel.spec
    directory = os.path.abspath(directory)
    _prepare_target(directory)
    allowed_links = _link_tablespaces(directory, spec) if spec else frozenset()

    parts = [o async for o in storage.list(layout.backup_key(name, layout.TAR_FOLDER))]
    if not parts:
        raise CorruptArchive(f"backup {name} has no tar parts", hint="the backup is damaged; fetch another one")
    first = [p for p in parts if not layout.LAST_PARTS_RE.search(p.name)]
    last = [p for p in parts if layout.LAST_PARTS_RE.search(p.name)]
    if not any(p.name.startswith(layout.PG_CONTROL_TAR) for p in last):
        raise CorruptArchive(f"backup {name} has no pg_control part", hint="the backup is incomplete; fetch another one")

    def wanted(relpath: str) -> bool:
        if relpath in UTILITY_RELPATHS:
            return not (relpath == "tablespace_map" and restore_spec)  # links were relocated
        return files_metadata is None or files_metadata.lookup("/" + relpath) is not None

    loop = asyncio.get_running_loop()
    concurrency = settings.download_concurrency
    # each extraction thread owns a sink; together they keep to the memory budget
    sink_buffers = max(2, settings.memory_budget // settings.buffer_size // concurrency)
    direct_min = settings.direct_io_min if settings.direct_io else 0
    raise_nofile_limit()
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="walrus-extract")
    semaphore = asyncio.Semaphore(concurrency)
    totals = ExtractStats()

    async def restore_part(info) -> None:
        ext = layout.tar_extension(info.name)
        if ext is None:
            log.warning(f"{info.key} is not a tar part; ignored")
            return
        async with semaphore:
            stream = await storage.get(info.key)
            try:
                def work() -> ExtractStats:
                    raw = decrypting(SyncReader(stream, loop), settings.crypter, info.key)
                    with contextlib.closing(open_sink(settings.io_method, direct_threshold=direct_min,
                                                      buffer_size=settings.buffer_size,
                                                      buffers=sink_buffers)) as sink:
                        try:
                            return extract_tar(codec.open_reader(ext, raw, name=info.key), directory,
                                               name=info.key, wanted=wanted, allowed_links=allowed_links,
                                               sink=sink)
                        except OSError as e:  # a write that failed after its member was handed over
                            raise BackupError(f"restoring {info.name} into {directory} failed",
                                              detail=f"{e.filename or ''}: {e.strerror or e}",
                                              hint="check free space and permissions of the target") from None

                stats = await loop.run_in_executor(executor, work)
            finally:
                await stream.aclose()
        totals.files += stats.files
        totals.bytes += stats.bytes
        if stats.root_mode is not None:
            totals.root_mode = stats.root_mode
        log.info(f"restored {info.name}: {stats.files} files, {stats.bytes} bytes")

    try:
        await gather_all([restore_part(p) for p in first])
        await gather_all([restore_part(p) for p in last])  # pg_control and backup_label after all data
    finally:
        executor.shutdown(wait=True)

    # PostgreSQL refuses a data directory readable by others; WAL-G's root member is 0700 (or 0750).
    os.chmod(directory, totals.root_mode if totals.root_mode in (0o700, 0o750) else 0o700)
    if not settings.tar_disable_fsync:
        await asyncio.to_thread(_sync_filesystems, [directory, *(spec.locations.values() if spec else [])])
    return BackupFetchResult(name=name, directory=directory, parts=len(parts), files=totals.files,
                             bytes=totals.bytes, seconds=time.monotonic() - began)


async def _files_metadata(storage: Storage, name: str, sentinel: Sentinel) -> FilesMetadata | None:
    try:
        return FilesMetadata.from_json(await storage.get_bytes(layout.backup_key(name, layout.FILES_METADATA)))
    except ObjectNotFound:
        legacy = sentinel.legacy_files_metadata()
        if legacy is not None:
            return legacy
        if sentinel.version >= 2 and not sentinel.files_metadata_disabled:
            raise CorruptArchive(f"backup {name} has no {layout.FILES_METADATA}",
                                 hint="a version-2 backup needs it; the backup may be incomplete") from None
        return None

