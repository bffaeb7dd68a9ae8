"""backup-fetch: restore a base backup (ours or WAL-G's) into an empty directory."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from walrus.aio import gather_all
from walrus.tar.read import ExtractStats, extract_tar, member_relpath
from walrus.backup.dto import FilesMetadata, Sentinel, TablespaceSpec
from walrus.backup.list import read_files_metadata, read_sentinel, resolve_backup
from walrus.backup.partial import restore_only_filter
from walrus.codec import Reader
from walrus.config import Settings
from walrus.errors import BackupError, CorruptObject
from walrus.fileio import open_sink
from walrus.fsutil import fsync_dir, syncfs
from walrus.log import log
from walrus.progress import Progress
from walrus.runtime import raise_nofile_limit
from walrus.storage import layout
from walrus.storage.base import ObjectInfo, Storage
from walrus.stream.download import consume_decoded
from walrus.stream.stages import metered

# Restored whatever files_metadata.json lists (WAL-G's UtilityFilePaths).
PG_CONTROL_RELPATH = "global/pg_control"
UTILITY_RELPATHS = frozenset({PG_CONTROL_RELPATH, "backup_label", "tablespace_map"})
# pg_control.tar is extracted here, inside the target, and its files renamed into place last: a
# restore stopped at any instant (a failure, SIGTERM, kill -9, power loss) leaves no
# global/pg_control, which PostgreSQL needs to start, so a partial restore can never be started.
STAGING = ".walrus-pg_control"
MISSING_SHOWN = 5  # missing parts or files named in an error; the count says how many in all


@dataclass
class BackupFetchResult:
    name: str
    directory: str
    parts: int
    files: int
    bytes: int
    seconds: float
    writer: str  # "io_uring", or "pwrite" where io_uring is refused or not chosen
    chain: list[str] = field(default_factory=list)  # the backups restored, the full one first

    def as_json(self) -> dict[str, Any]:
        return {"backup_name": self.name, "directory": self.directory, "parts": self.parts,
                "files": self.files, "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "writer": self.writer, "chain": self.chain}


@dataclass
class _Parts:
    """A backup's tar parts in restore order: data, then backup_label, then pg_control."""

    data: list[ObjectInfo]
    label: list[ObjectInfo]
    control: list[ObjectInfo]

    @property
    def count(self) -> int:
        return len(self.data) + len(self.label) + len(self.control)


@dataclass
class _Level:
    """One backup of the chain a restore goes through: a full backup, or a delta on the level below."""

    name: str
    sentinel: Sentinel
    files: FilesMetadata | None
    parts: _Parts
    restore: frozenset[str] | None = None  # relpaths this level restores (None: every file it lists)


MAX_CHAIN = 1000  # levels a chain may have before it is taken for a loop


async def backup_fetch(settings: Settings, storage: Storage, directory: str, name: str, *,
                       restore_spec: str | None = None, mask: str | None = None,
                       restore_only: list[str] | None = None, progress: Progress | None = None) -> BackupFetchResult:
    """mask (WAL-G's --mask): restore only the files whose path in the data directory matches this
    shell pattern (Go's filepath.Match: `*` stops at `/`), and download only the parts holding one.
    restore_only (WAL-G's --restore-only, one name a string): only these databases and tables, and
    the system ones (walrus.backup.partial); with mask, a file is restored if both keep it.
    A delta is restored through its chain, the full backup first, each level writing only the
    files the levels above it skip or increment (WAL-G's order); pg_control, backup_label and the
    tablespace links come from the backup asked for. `progress`: a status line fed the bytes of
    the parts as they are downloaded (of the sum of their stored sizes)."""
    began = time.monotonic()
    # init: every level's documents and parts, checked before anything is written
    name = await resolve_backup(storage, name)
    chain = await _load_chain(storage, name)
    leaf = chain[-1]
    spec = _load_restore_spec(restore_spec) if restore_spec else leaf.sentinel.spec
    selected = compile_mask(mask) if mask else None
    if restore_only is not None:
        keep = restore_only_filter(leaf.files.databases_by_names if leaf.files else None, restore_only, name)
        selected = keep if selected is None else (lambda rel, masked=selected: masked(rel) and keep(rel))
    if len(chain) > 1:
        _plan_chain(chain, selected)
    for level in chain:
        files = level.files
        keeps = (lambda rel, lv=level: rel in lv.restore) if level.restore is not None else selected
        if keeps is not None and files is not None and files.tar_file_sets:
            level.parts.data = [p for p in level.parts.data
                                if any(keeps(member_relpath(m)) for m in files.tar_file_sets.get(p.name, ()))]
    if progress is not None:
        fetched = [p for level in chain for p in level.parts.data] + leaf.parts.label + leaf.parts.control
        progress.set_total(sum(p.size for p in fetched), parts=len(fetched), note="compressed")

    # prepare: an empty target, its tablespace links
    directory = os.path.abspath(directory)
    _prepare_target(directory)
    _warn_if_short_of_space(directory, max(level.sentinel.uncompressed_size for level in chain))
    totals = ExtractStats()
    extraction: _Extraction | None = None
    try:
        links = _link_tablespaces(directory, spec) if spec else frozenset()
        # copy: each level's data parts side by side, the chain's full backup first; then the
        # asked-for backup's backup_label, then its pg_control into the staging folder
        for level in chain:
            if level is leaf:
                chosen = selected if level.restore is None else (
                    lambda rel, lv=level: (rel in lv.restore or rel in UTILITY_RELPATHS)
                    and (selected is None or selected(rel)))
            else:
                chosen = level.restore.__contains__
            extraction = _Extraction(settings, storage, directory, level.files, restore_spec is not None, chosen,
                                     incremented=_incremented(level) if level.sentinel.is_delta else None)
            extraction.allowed_links = links
            extraction.progress = progress
            await gather_all([extraction.part(info, directory) for info in level.parts.data])
            if level is leaf:
                await gather_all([extraction.part(info, directory) for info in level.parts.label])
            extraction.check_complete(level.name, level.restore)
            if level is not leaf:
                extraction.close()
                _add(totals, extraction.totals)
        assert extraction is not None
        staging = os.path.join(directory, STAGING)
        os.mkdir(staging, 0o700)
        await gather_all([extraction.part(info, staging) for info in leaf.parts.control])

        # stop: everything durable, then pg_control in place, which makes the directory startable
        if not settings.tar_disable_fsync:
            await asyncio.to_thread(_sync_filesystems, [directory, *(spec.locations.values() if spec else [])])
        await asyncio.to_thread(_publish_staged, staging, directory, not settings.tar_disable_fsync)
    except BaseException:
        if extraction is not None:
            extraction.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(os.path.join(directory, STAGING))
        log.warning(f"backup-fetch stopped: {directory} holds a partial restore, which PostgreSQL will not "
                    "start (it has no global/pg_control); empty it before running backup-fetch again")
        raise
    extraction.close()
    _add(totals, extraction.totals)
    # PostgreSQL refuses a data directory readable by others; WAL-G's root member is 0700 (or 0750).
    root_mode = totals.root_mode
    os.chmod(directory, root_mode if root_mode in (0o700, 0o750) else 0o700)
    return BackupFetchResult(name=name, directory=directory, parts=sum(level.parts.count for level in chain),
                             files=totals.files, bytes=totals.bytes, seconds=time.monotonic() - began,
                             writer=extraction.writer, chain=[level.name for level in chain])


def _add(totals: ExtractStats, more: ExtractStats) -> None:
    totals.files += more.files
    totals.bytes += more.bytes
    totals.restored |= more.restored
    if more.root_mode is not None:
        totals.root_mode = more.root_mode


async def _load_chain(storage: Storage, name: str) -> list[_Level]:
    """`name` and the backups it is built on, the full backup first, each with its file list and
    its parts; a base that is missing, of another cluster, or a chain that loops is an error."""
    levels: list[_Level] = []
    while True:
        sentinel = await read_sentinel(storage, name)
        if sentinel is None:  # gone since it was resolved or checked: a delete ran meanwhile
            raise BackupError(f"backup {name} vanished", hint="a delete ran meanwhile; choose another backup")
        files = await read_files_metadata(storage, name, sentinel)
        if sentinel.is_delta and files is None:
            raise CorruptObject(f"delta backup {name} has no {layout.FILES_METADATA}",
                                hint="without it the delta's increments cannot be told from whole files; "
                                     "restore an older full backup")
        levels.append(_Level(name, sentinel, files, await _list_parts(storage, name, files)))
        if not sentinel.is_delta:
            break
        base = sentinel.delta_from or ""
        if any(level.name == base for level in levels) or len(levels) >= MAX_CHAIN:
            raise CorruptObject(f"the delta chain of {levels[0].name} loops back to {base}",
                                hint="its sentinels are damaged; restore an older full backup")
        if "/" in base or not await storage.exists(layout.sentinel_key(base)):
            raise CorruptObject(f"delta backup {name} is built on {base}, which is not in storage",
                                detail=f"no {layout.sentinel_key(base)}",
                                hint="its base was deleted or never finished; restore a full backup "
                                     "(backup-list shows them)")
        name = base
    levels.reverse()
    ids = {level.sentinel.system_identifier for level in levels} - {None}
    if len(ids) > 1:
        raise CorruptObject(f"the delta chain of {levels[-1].name} mixes backups of different clusters",
                            detail="system identifiers: " + ", ".join(
                                f"{level.name}: {level.sentinel.system_identifier}" for level in levels),
                            hint="restore a full backup (backup-list shows them)")
    return levels


def _plan_chain(chain: list[_Level], selected: Callable[[str], bool] | None) -> None:
    """Set each level's `restore`: from the top, the files the asked-for backup lists (as selected);
    a level restores those it does not skip, and hands down those it skips or increments (WAL-G's
    GetBaseFilesToUnwrap)."""
    leaf = chain[-1]
    assert leaf.files is not None
    wanted = {rel for rel in (member_relpath(member) for member in leaf.files.files)
              if rel and rel not in UTILITY_RELPATHS and (selected is None or selected(rel))}
    for level in reversed(chain):
        files = level.files
        if files is None:  # only a chain's full backup can lack a file list
            level.restore = frozenset(wanted)
            break
        here, below = set(), set()
        for rel in wanted:
            desc = files.lookup("/" + rel)
            if desc is None:
                raise CorruptObject(f"backup {level.name} does not list {rel}, which the delta built on it needs",
                                    hint="the delta chain is damaged; restore an older full backup")
            if not desc.is_skipped:
                here.add(rel)
            if desc.is_skipped or desc.is_incremented:
                below.add(rel)
        level.restore = frozenset(here)
        wanted = below


def _incremented(level: _Level) -> Callable[[str], bool]:
    files = level.files
    assert files is not None

    def incremented(rel: str) -> bool:
        desc = files.lookup("/" + rel)
        return desc is not None and desc.is_incremented

    return incremented


class _Extraction:
    """Extracts parts, WALG_DOWNLOAD_CONCURRENCY at a time, each on its own thread, and tallies them.

    A part that fails ends the others (gather_all cancels them; consume_decoded stops their
    threads at their next read), so the command ends within seconds with the first error.
    """

    def __init__(self, settings: Settings, storage: Storage, directory: str, files_metadata: FilesMetadata | None,
                 relocated: bool, selected: Callable[[str], bool] | None = None, *,
                 incremented: Callable[[str], bool] | None = None):
        self.settings = settings
        self.storage = storage
        self.directory = directory
        self.files_metadata = files_metadata
        self.relocated = relocated  # --restore-spec: tablespace links were made from it, not from tablespace_map
        self.selected = selected  # --mask: only the files it matches (utility files too, as in WAL-G)
        self.incremented = incremented  # a delta's files stored as `wi1` increments
        self.allowed_links: frozenset[str] = frozenset()
        self.progress: Progress | None = None  # fed each part's stored bytes as they arrive
        self.totals = ExtractStats()
        self.writer = ""  # the sinks' kind, once one is open
        concurrency = settings.download_concurrency
        # each extraction thread owns a sink; together they keep to the memory budget, less what the
        # storage holds for ranges read ahead
        left = max(0, settings.memory_budget - storage.download_memory)
        self._sink_buffers = max(2, left // settings.buffer_size // concurrency)
        self._direct_min = settings.direct_io_min if settings.direct_io else 0
        raise_nofile_limit()
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="walrus-extract")
        self._slots = asyncio.Semaphore(concurrency)

    def wanted(self, relpath: str) -> bool:
        if self.selected is not None and not self.selected(relpath):
            return False
        if relpath in UTILITY_RELPATHS:
            return not (relpath == "tablespace_map" and self.relocated)  # links were relocated
        return self.files_metadata is None or self.files_metadata.lookup("/" + relpath) is not None

    def _not_pg_control(self, relpath: str) -> bool:
        return relpath != PG_CONTROL_RELPATH and self.wanted(relpath)

    async def part(self, info: ObjectInfo, dest: str) -> None:
        ext = layout.tar_extension(info.name)
        if ext is None:
            log.warning(f"{info.key} is not a tar part; ignored")
            return
        settings = self.settings
        wanted = self.wanted
        if dest == self.directory:
            # a remote-mode backup (WAL-G's or walrus's) also holds pg_control in a data part: it comes
            # from pg_control.tar alone, staged and put in place last, so a partial restore never starts
            wanted = self._not_pg_control

        def extract(source: Reader) -> ExtractStats:
            with contextlib.closing(open_sink(settings.io_method, direct_threshold=self._direct_min,
                                              buffer_size=settings.buffer_size, buffers=self._sink_buffers)) as sink:
                self.writer = sink.name
                try:
                    return extract_tar(source, dest, name=info.key, wanted=wanted,
                                       allowed_links=self.allowed_links if dest == self.directory else frozenset(),
                                       sink=sink, incremented=self.incremented)
                except OSError as e:  # a write that failed after its member was handed over
                    raise _write_failed(info.name, dest, e) from None

        async with self._slots:
            stream = await self.storage.get(info.key)
            if self.progress is not None:
                stream = metered(stream, self.progress.add)
            stats = await consume_decoded(stream, ext, info.key, settings.crypter, extract, self._executor)
        if self.progress is not None:
            self.progress.part_done()
        self.totals.files += stats.files
        self.totals.bytes += stats.bytes
        self.totals.restored |= stats.restored
        if stats.root_mode is not None:
            self.totals.root_mode = stats.root_mode
        log.info(f"restored {info.name}: {stats.files} files, {stats.bytes} bytes")

    def check_complete(self, name: str, expected: frozenset[str] | None = None) -> None:
        """Every file files_metadata.json lists (`expected`: every one of those) is in place (a part
        can be whole and still not the one the backup wrote: replaced, or cut at a member boundary
        and closed again)."""
        if self.files_metadata is None:
            return
        if expected is None:
            expected = frozenset(member_relpath(member) for member, desc in self.files_metadata.files.items()
                                 if not desc.is_skipped)
        missing = sorted(rel for rel in expected if rel and rel != PG_CONTROL_RELPATH and rel not in self.totals.restored
                         and self.wanted(rel))
        if missing:
            raise CorruptObject(f"backup {name} is incomplete: {len(missing)} of the files its "
                                 f"{layout.FILES_METADATA} lists are in none of its parts",
                                 detail="missing: " + ", ".join(missing[:MISSING_SHOWN]),
                                 hint="the backup is damaged; restore another one (backup-list shows them)")

    def close(self) -> None:
        # never wait here: a thread that did not stop in time is abandoned (see walrus.stream.download.consume_in_thread)
        self._executor.shutdown(wait=False, cancel_futures=True)


def compile_mask(pattern: str) -> Callable[[str], bool]:
    """Go's filepath.Match of "/" + pattern against "/" + a data-directory path, as WAL-G's --mask
    selects files: `*` and `?` never match `/`, `[...]` is a class (`[^...]` negated), `\\` escapes.
    A malformed pattern is an error before anything is restored."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i + 1 == len(pattern):
                raise _bad_mask(pattern, "it ends with an escape")
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] == "^" else i + 1)
            if end < 0:
                raise _bad_mask(pattern, "a [ class is not closed")
            body = pattern[i + 1:end]
            negated = body.startswith("^")
            body = body[1:] if negated else body
            if not body:
                raise _bad_mask(pattern, "an empty [] class")
            chars = body.replace("\\", "\\\\").replace("[", "\\[")
            out.append(f"[^/{chars}]" if negated else f"(?!/)[{chars}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    try:
        regex = re.compile("/" + "".join(out))
    except re.error as e:
        raise _bad_mask(pattern, str(e)) from None
    return lambda relpath: regex.fullmatch("/" + relpath) is not None


def _bad_mask(pattern: str, why: str) -> BackupError:
    return BackupError(f"--mask {pattern!r} is not a valid pattern", detail=why,
                       hint="a shell pattern relative to the data directory, e.g. 'base/16384/*' or 'global/*'")


def _write_failed(part: str, dest: str, e: OSError) -> BackupError:
    where = f"{e.filename}: " if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = f"the filesystem holding {dest} is full: free space (the backup holds its uncompressed size)"
    else:
        hint = "check free space and permissions of the target"
    return BackupError(f"restoring {part} into {dest} failed", detail=f"{where}{e.strerror or e}", hint=hint)


async def _list_parts(storage: Storage, name: str, files_metadata: FilesMetadata | None) -> _Parts:
    """The parts in storage, checked against the ones files_metadata.json names (TarFileSets)."""
    found = sorted([o async for o in storage.list(layout.backup_key(name, layout.TAR_FOLDER))], key=lambda o: o.key)
    present = {o.name for o in found}
    named = files_metadata.tar_file_sets if files_metadata is not None else {}
    missing = sorted(part for part in named if part not in present)
    if missing:
        raise CorruptObject(f"backup {name} is incomplete: {len(missing)} of its {len(named)} tar parts are "
                             "missing from storage", detail="missing: " + ", ".join(missing[:MISSING_SHOWN]),
                             hint="restore another backup (backup-list shows them); this one cannot be restored whole")
    if not found:
        raise CorruptObject(f"backup {name} has no tar parts", hint="the backup is damaged; fetch another one")
    data = [p for p in found if not layout.LAST_PARTS_RE.search(p.name)]
    unnamed = sorted(p.name for p in data if named and p.name not in named)
    if unnamed:  # its files would be skipped as not in the backup: a restore short of them, silently
        raise CorruptObject(f"backup {name} has {len(unnamed)} stored parts its {layout.FILES_METADATA} does not name",
                             detail="unnamed: " + ", ".join(unnamed[:MISSING_SHOWN]),
                             hint=f"its {layout.FILES_METADATA} is damaged, or something else wrote into its folder; "
                                  "restore another backup (backup-list shows them)")
    label = [p for p in found if p.name.startswith(layout.BACKUP_LABEL_TAR)]
    control = [p for p in found if p.name.startswith(layout.PG_CONTROL_TAR)]
    if not control:
        raise CorruptObject(f"backup {name} has no pg_control part", hint="the backup is incomplete; fetch another one")
    return _Parts(data, label, control)


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


def _warn_if_short_of_space(directory: str, needed: int) -> None:
    """A warning, not an error: a compressing filesystem (ZFS, btrfs) may hold more than it has free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        log.warning(f"{directory} has {free >> 20} MiB free, and the backup holds {needed >> 20} MiB of files; "
                    "the restore will fail when the filesystem is full unless it compresses")


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
            raise CorruptObject(f"tablespace spec names {oid!r}, which is not an OID")
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


def _publish_staged(staging: str, directory: str, durable: bool) -> None:
    """Rename every file extracted under `staging` to the same place under `directory`, then remove
    `staging`. Runs after everything, the staged files included, is durable (syncfs): these renames
    are what make the restore startable."""
    parents: set[str] = set()
    for root, _dirs, files in os.walk(staging):
        for file in files:
            source = os.path.join(root, file)
            target = os.path.join(directory, os.path.relpath(source, staging))
            parent = os.path.dirname(target)
            os.makedirs(parent, 0o700, exist_ok=True)
            os.replace(source, target)
            parents.add(parent)
    if durable:
        for parent in parents:
            fsync_dir(parent)
    shutil.rmtree(staging)


