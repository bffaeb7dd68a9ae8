"""Storage tools (WAL-G's `st`): list, stat, read, write and delete raw objects of the configured storage."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from walrus import codec
from walrus.config import Settings
from walrus.errors import CorruptObject, ObjectExists, ObjectNotFound, StorageError, StorageMissing, WalrusError
from walrus.fileio import BufferPool
from walrus.fsutil import WorkerResource, discard, fsync_dir, rename_noreplace, write_all
from walrus.log import log
from walrus.storage.base import ObjectInfo, Storage, join_key
from walrus.stream.download import copy_decoded
from walrus.stream.upload import PoolPlan, upload_buffers, upload_threads

# --target values: walrus has one storage, so WAL-G's failover names (WALG_FAILOVER_STORAGES) do not exist.
DEFAULT_TARGET, ALL_TARGETS = "default", "all"
DELETE_BATCH = 1000  # keys deleted per call while `rm` lists a folder: memory does not grow with it
GO_ZERO_TIME = "0001-01-01 00:00:00 +0000 UTC"  # time.Time{}.String(), a folder's time in a listing


class StorageToolError(WalrusError):
    """An `st` command that cannot do what was asked (bad argument, missing object, refused option)."""


def check_target(target: str, *, allow_all: bool = True) -> None:
    """--target: 'default' (and 'all', which is the same one storage here); any other name is a
    WAL-G failover storage, which walrus does not implement."""
    if target == DEFAULT_TARGET or (allow_all and target == ALL_TARGETS):
        return
    if target == ALL_TARGETS:
        raise StorageToolError("'all' target is not supported for this command", hint="use --target default")
    raise StorageToolError(f"storage {target!r} is not configured",
                           detail="walrus has one storage, 'default'; WAL-G's failover storages "
                                  "(WALG_FAILOVER_STORAGES) are not implemented",
                           hint="omit --target, or pass --target default")


async def _exists(storage: Storage, key: str) -> bool:
    """Whether key is stored; a file storage whose root is not made yet holds nothing (a put makes it)."""
    try:
        return await storage.exists(key)
    except StorageMissing:
        return False


def missing(key: str) -> ObjectNotFound:
    e = ObjectNotFound(key)
    e.hint = "keys are relative to the storage root; `walrus st ls -r` lists them"
    return e


# -- listing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: str  # "obj" or "dir", WAL-G's type column
    name: str  # relative to the folder listed; a folder's ends in "/"
    size: int = 0
    mtime: datetime | None = None  # None for folders (Go's zero time)

    def as_json(self) -> dict[str, Any]:
        return {"type": self.kind, "name": self.name, "size": self.size,
                "last_modified": self.mtime.astimezone(timezone.utc).isoformat() if self.mtime else None}


@dataclass
class Listing:
    entries: list[Entry]
    local_time: bool  # file storage shows local times, as Go's os.FileInfo does; S3 shows UTC
    folder: str | None = None  # with --glob: the folder this listing is of, printed above it

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"objects": [e.as_json() for e in self.entries]}
        if self.folder is not None:
            out["folder"] = self.folder
        return out

    def render(self) -> str:
        """WAL-G's table: Go's tabwriter (padding 1, spaces) over 'type size last modified name'.
        Rows carry two more tab-terminated cells (version id, extra info; empty here), so the name
        is padded as a column and each row ends in a space, as WAL-G's do."""
        rows = [(e.kind, str(e.size), go_time(e.mtime, self.local_time), e.name) for e in self.entries]
        header = ("type", "size", "last modified")
        widths = [max([len(h)] + [len(r[i]) for r in rows]) + 1 for i, h in enumerate(header)]
        name_width = max((len(r[3]) for r in rows), default=0) + 1
        lines = ["".join(h.ljust(w) for h, w in zip(header, widths)) + "name"]
        lines += ["".join(c.ljust(w) for c, w in zip(r, widths)) + r[3].ljust(name_width) + " " for r in rows]
        text = "\n".join(lines)
        return f"{self.folder}:\n{text}\n" if self.folder is not None else text


def go_time(dt: datetime | None, local: bool) -> str:
    """Go's time.Time.String() ('2006-01-02 15:04:05.999999999 -0700 MST'), to the microsecond."""
    if dt is None:
        return GO_ZERO_TIME
    dt = dt.astimezone() if local else dt.astimezone(timezone.utc)
    fraction = f".{dt.microsecond:06d}".rstrip("0") if dt.microsecond else ""
    return f"{dt:%Y-%m-%d %H:%M:%S}{fraction} {dt:%z} {dt.tzname() or dt.strftime('%z')}"


def local_times(settings: Settings) -> bool:
    """Whether listings show local times: file storage's, as Go's os.FileInfo gives them (S3's are UTC).
    File storage is the one chosen when no S3 prefix is set (open_storage's order)."""
    return not settings.s3_prefix


async def list_folder(settings: Settings, storage: Storage, path: str, recursive: bool) -> Listing:
    """`st ls [PATH] [-r]`: the folder's sub-folders then its objects, each sorted by name (WAL-G's
    order on both backends); recursive: every object below, folder by folder breadth first."""
    folder = join_key(path)
    if recursive:
        objects = [o async for o in storage.list(folder, recursive=True)]
        objects.sort(key=lambda o: (o.key.count("/"), o.key.split("/")))  # breadth first, by name
        cut = len(folder) + 1 if folder else 0
        entries = [Entry("obj", o.key[cut:], o.size, o.mtime) for o in objects]
    else:
        dirs, objects = await _children(storage, folder)
        entries = [Entry("dir", d) for d in sorted(dirs)]
        entries += [Entry("obj", o.name, o.size, o.mtime) for o in sorted(objects, key=lambda o: o.name)]
    return Listing(entries, local_times(settings))


async def _children(storage: Storage, folder: str) -> tuple[set[str], list[ObjectInfo]]:
    """The sub-folders ("name/") and objects directly in `folder`. Storage.list yields objects only,
    so a sub-folder is the first component of a deeper key. Where the storage lists in key order
    (S3), the listing restarts past each sub-folder it meets, so a folder holding a million WAL
    objects costs a request or two per sub-folder, not one per thousand keys below it."""
    prefix = folder + "/" if folder else ""
    dirs: set[str] = set()
    objects: list[ObjectInfo] = []
    after: str | None = None
    while True:
        skip_to = None
        async with contextlib.aclosing(storage.list(folder, recursive=True, start_after=after)) as listing:
            async for obj in listing:
                head, slash, _ = obj.key[len(prefix):].partition("/")
                if not slash:
                    objects.append(obj)
                    continue
                dirs.add(head + "/")
                if storage.lists_in_key_order:
                    skip_to = prefix + head + "/\U0010ffff"  # above every key below that sub-folder
                    break
        if skip_to is None:
            return dirs, objects
        after = skip_to


def go_glob(pattern: str) -> Callable[[str], bool]:
    """Go's path.Match for one path segment ('*', '?', '[a-z]', '[^a-z]', '\\' escapes) as a
    predicate; a malformed pattern is an error, as Go's ErrBadPattern is."""
    def bad(why: str) -> StorageToolError:
        return StorageToolError(f"invalid glob pattern {pattern!r}", detail=why,
                                hint="the syntax is Go's path.Match: * ? [a-z] [^a-z] and \\ to escape")

    n = len(pattern)

    def one(i: int, in_class: bool) -> tuple[str, int]:
        """The (unescaped) character at i and the index after it."""
        if in_class and (i >= n or pattern[i] in "-]"):
            raise bad("a character class is unterminated or has a bare '-' or ']'")
        if pattern[i] == "\\":
            i += 1
            if i >= n:
                raise bad("it ends in a backslash")
        return pattern[i], i + 1

    out, i = [], 0
    while i < n:
        if pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[":
            negate = pattern.startswith("^", i + 1)
            i += 1 + negate
            ranges: list[str] = []
            while not (ranges and pattern.startswith("]", i)):
                lo, i = one(i, True)
                hi = lo
                if pattern.startswith("-", i):
                    hi, i = one(i + 1, True)
                if hi < lo:
                    raise bad(f"the range {lo}-{hi} is empty")
                ranges.append(f"{re.escape(lo)}-{re.escape(hi)}")
            i += 1
            out.append(("[^" if negate else "[") + "".join(ranges) + "]")
        else:
            c, i = one(i, False)
            out.append(re.escape(c))
    regex = re.compile("".join(out), re.S)
    return lambda segment: regex.fullmatch(segment) is not None


async def glob(storage: Storage, pattern: str) -> tuple[list[str], list[str]]:
    """WAL-G's storage.Glob: the object keys and folders ("a/b/") whose path segments each match the
    pattern's, sorted. The pattern's leading literal segments narrow the listing."""
    if pattern == "/":
        return [], ["/"]
    parts = pattern.lstrip("/").removesuffix("/").split("/")
    matchers = [go_glob(p) for p in parts]
    literal = []
    for p in parts[:-1]:
        if re.search(r"[*?\[\\]", p):
            break
        literal.append(p)
    objects, folders = set(), set()
    async for obj in storage.list("/".join(literal), recursive=True):
        segments = obj.key.split("/")
        if len(segments) < len(parts) or not all(m(s) for m, s in zip(matchers, segments)):
            continue
        if len(segments) == len(parts):
            objects.add(obj.key)
        else:
            folders.add("/".join(segments[:len(parts)]) + "/")
    return sorted(objects), sorted(folders)


async def list_glob(settings: Settings, storage: Storage, pattern: str, recursive: bool) -> list[Listing]:
    """`st ls --glob PATTERN`: a listing of each folder the pattern matches (objects it matches are not listed, as in WAL-G)."""
    _, folders = await glob(storage, pattern)
    out = []
    for folder in folders:
        listing = await list_folder(settings, storage, folder, recursive)
        listing.folder = folder
        out.append(listing)
    return out


async def stat_object(settings: Settings, storage: Storage, key: str) -> Listing:
    """`st stat KEY`: one object's row in the listing's format, from a stat, not a listing."""
    info = await storage.stat(join_key(key))
    if info is None:
        raise missing(join_key(key))
    return Listing([Entry("obj", key, info.size, info.mtime)], local_times(settings))


# -- reading ----------------------------------------------------------------------------------------


def decoder_extension(key: str) -> str:
    """The compression extension to decompress `key` by, or "" (stored as is) when its extension
    is not a codec's: WAL-G then warns and copies the bytes unchanged."""
    name = key.rsplit("/", 1)[-1]
    ext = name.rsplit(".", 1)[1] if "." in name else ""
    try:
        codec.method_for_extension(ext)
        return ext
    except CorruptObject:
        log.warning(f"no decompressor for extension {'.' + ext!r} of {key}; its bytes are written as stored")
        return ""


async def read_object(settings: Settings, storage: Storage, key: str, sink: Callable[[bytes], None], *,
                      decrypt: bool, decompress: bool) -> None:
    """Stream object `key` to sink (called on a worker thread), decrypted and decompressed as asked:
    memory stays one chunk or a codec's block whatever the object's size."""
    key = join_key(key)
    try:
        stream = await storage.get(key)
    except ObjectNotFound:
        raise missing(key) from None
    ext = decoder_extension(key) if decompress else ""
    await copy_decoded(stream, ext, key, settings.crypter if decrypt else None, sink)


@dataclass
class GetResult:
    key: str
    destination: str
    size: int

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "destination": self.destination, "size": self.size}


async def get_object(settings: Settings, storage: Storage, key: str, destination: str, *,
                     decrypt: bool = True, decompress: bool = True) -> GetResult:
    """`st get KEY DEST`: into DEST (or DEST/<object name> when DEST is a folder), which must not
    exist. Written to a temporary file beside it, fsynced, then renamed without replacing: DEST
    never holds a partial object, and an existing file is never overwritten."""
    key = join_key(key)
    if os.path.isdir(destination):
        destination = os.path.join(destination, key.rsplit("/", 1)[-1])
    if os.path.lexists(destination):
        raise StorageToolError(f"{destination} already exists", hint="remove it, or name another destination")
    tmp = os.path.join(os.path.dirname(os.path.abspath(destination)),
                       f".{os.path.basename(destination)}.walrus-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise StorageToolError(f"cannot create {tmp}", detail=e.strerror,
                               hint="the destination's folder must exist and be writable") from None
    size = 0
    owner = WorkerResource(lambda: discard(fd, tmp))  # a cancelled get never closes fd under a write in flight

    def sink(chunk: bytes) -> None:
        nonlocal size
        size += owner.call(write_all, fd, chunk)

    try:
        await read_object(settings, storage, key, sink, decrypt=decrypt, decompress=decompress)
        await asyncio.to_thread(owner.call, os.fsync, fd)
        os.close(fd)
        fd = -1
        try:
            rename_noreplace(tmp, destination)
        except FileExistsError:
            raise StorageToolError(f"{destination} appeared while {key} was downloaded; it was left as it is",
                                   hint="something else writes there; name another destination") from None
        fsync_dir(os.path.dirname(os.path.abspath(destination)))
    except BaseException:
        if fd >= 0:
            owner.release()
        else:
            discard(fd, tmp)
        raise
    log.info(f"downloaded {key} to {destination} ({size} bytes)")
    return GetResult(key, destination, size)


# -- writing ----------------------------------------------------------------------------------------


@dataclass
class PutResult:
    key: str
    size: int  # bytes read from the local file
    stored: int  # bytes stored, after compression and encryption

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "stored_bytes": self.stored}


async def put_object(settings: Settings, storage: Storage, source: str | None, destination: str, *,
                     compress: bool = True, encrypt: bool = True, force: bool = False) -> PutResult:
    """`st put LOCAL DEST`: the file (standard input when `source` is None) compressed with
    WALG_COMPRESSION_METHOD (DEST gets its extension) and encrypted with the configured key, through
    the upload chain's pool buffers. Without `force` the put is exclusive: an existing object is
    never replaced, even by a racing writer. The object appears whole or not at all (Storage.put)."""
    method = settings.compression_method if compress else "none"
    key = join_key(destination)
    if not key:
        raise StorageToolError("the destination path is empty", hint="name the object's key, e.g. folder/file")
    key = f"{key}.{codec.extension(method)}" if codec.extension(method) else key
    settings = dataclasses.replace(settings, compression_method=method, crypter=settings.crypter if encrypt else None)
    if not force and await _exists(storage, key):
        raise _taken(key)
    fd = 0 if source is None else _open_local(source)
    plan = PoolPlan.for_settings(settings, lanes=1, parallel=2, reserved=storage.upload_memory)
    pool = BufferPool(plan.count, plan.buffer_size)
    executor = ThreadPoolExecutor(max_workers=upload_threads(plan.parallel), thread_name_prefix="walrus-st-put")
    read = 0

    async def buffers():
        nonlocal read
        while True:
            buf = await pool.acquire()
            try:
                buf.length = await asyncio.to_thread(_fill, fd, buf.view)
            except BaseException:
                buf.release()
                raise
            if not buf.length:
                buf.release()
                return
            read += buf.length
            yield buf

    try:
        stored = await upload_buffers(storage, key, buffers(), settings, executor, parallel=plan.parallel,
                                      exclusive=not force)
    except ObjectExists:
        raise _taken(key) from None
    finally:
        executor.shutdown(wait=False, cancel_futures=True)  # then the pool: a job still running keeps its mapping
        pool.close()
        if fd:
            os.close(fd)
    log.info(f"uploaded {source or 'standard input'} as {key} ({read} -> {stored} bytes)")
    return PutResult(key, read, stored)


def _taken(key: str) -> StorageToolError:
    return StorageToolError(f"object {key} already exists", hint="to overwrite it, add the -f flag")


def _open_local(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StorageToolError(f"cannot open the local file {path}", detail=e.strerror,
                               hint="check the path and that this user may read it") from None
    if os.path.isdir(path):
        os.close(fd)
        raise StorageToolError(f"the local path {path} is a directory", hint="st put uploads one file")
    return fd


def _fill(fd: int, view: memoryview) -> int:
    """Read into view until it is full or the input ends (a pipe gives less per read)."""
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if not n:
            break
        got += n
    return got


# -- deleting and checking ----------------------------------------------------------------------------


@dataclass
class RemoveResult:
    prefix: str
    deleted: int

    def as_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "deleted": self.deleted}


async def remove(storage: Storage, prefix: str) -> RemoveResult:
    """`st rm PREFIX`, as WAL-G: the object named PREFIX if there is one (unless PREFIX ends in '/'),
    else everything in the folder PREFIX (a path prefix by whole components: rm a/b never touches
    a/bc). No confirmation, as in WAL-G; deleted in batches while the folder is listed."""
    key = join_key(prefix)
    if key and not prefix.endswith("/") and await storage.stat(key) is not None:
        await storage.delete([key])
        return RemoveResult(prefix, 1)
    deleted, batch = 0, []
    async for obj in storage.list(key, recursive=True):
        batch.append(obj.key)
        if len(batch) == DELETE_BATCH:
            await storage.delete(batch)
            deleted, batch = deleted + len(batch), []
    if batch:
        await storage.delete(batch)
        deleted += len(batch)
    if not deleted:
        raise StorageToolError(f"object or folder {prefix!r} does not exist",
                               hint="keys are relative to the storage root; `walrus st ls -r` lists them")
    log.info(f"deleted {deleted} objects under {key or 'the storage root'}")
    return RemoveResult(prefix, deleted)


@dataclass
class CheckResult:
    kind: str  # "read" or "write"
    checked: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"check": self.kind, "ok": True, "objects": self.checked}


async def check_read(storage: Storage, names: list[str]) -> CheckResult:
    """`st check read [NAME...]`: the root can be listed and every NAME exists."""
    async with contextlib.aclosing(storage.list("")) as listing:
        async for _ in listing:
            break
    absent = [n for n in names if not await storage.exists(join_key(n))]
    if absent:
        raise StorageToolError(f"files are missing: {', '.join(absent)}",
                               hint="keys are relative to the storage root; `walrus st ls -r` lists them")
    log.info("Read check OK")
    return CheckResult("read", names)


async def check_write(storage: Storage) -> CheckResult:
    """`st check write`: an object of a fresh random name is written and deleted again. The put is
    exclusive and only a put that succeeded is deleted, so nobody else's object is ever touched."""
    name = secrets.token_hex(16)
    while await _exists(storage, name):
        name = secrets.token_hex(16)
    try:
        await storage.put_bytes(name, b"test", exclusive=True)
    except WalrusError as e:
        raise StorageError("failed to write to the storage", detail=e.message + (f" ({e.detail})" if e.detail else ""),
                           hint=e.hint or "check the storage's permissions and free space") from None
    try:
        await storage.delete([name])
    except WalrusError:
        log.warning(f"failed to clean up: {name} is left in the storage")
    log.info("Write check OK")
    return CheckResult("write", [name])
