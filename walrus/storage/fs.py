"""Local-directory storage (WALG_FILE_PREFIX), written the way WAL-G's file backend writes."""
from __future__ import annotations

import asyncio
import errno
import functools
import os
import re
import stat
import time
from datetime import datetime, timezone
from typing import AsyncIterable, AsyncIterator, Iterable

from walrus.config import Settings
from walrus.errors import ConfigError, ObjectExists, ObjectNotFound, StorageError, StorageMissing
from walrus.fsutil import (WorkerResource, discard, fsync_dir, group_name, rename_noreplace, start_writeback,
                           user_name, writev_all)
from walrus.storage.base import ByteStream, ObjectInfo, Storage, Upload, checked_key, join_key

# WAL-G's temporary names: <path>.tmp.<YYYYMMDDTHHMMSSZ>-<8 hex>; listings hide them.
TMP_RE = re.compile(r"\.tmp\.\d{8}T\d{6}Z-[0-9a-f]{8}$")
READ_CHUNK = 1 << 20
# Chunks are gathered up to this many bytes (or chunks: IOV_MAX is 1024) per writev.
WRITE_BATCH = 1 << 20
WRITE_BATCH_CHUNKS = 256
# Bytes written to an object between writeback starts: its fsync then waits for this much at most,
# and the disk writes while the backup reads, instead of all at the end of each part.
WRITEBACK_EVERY = 8 << 20


# Objects are 0640 and folders 0750 whatever the umask, so the storage's group (the group of a
# setgid root folder, inherited below it; else the writer's) can read everything: a restore or a
# `backup-list --detail` by another member of that group must not fail on one object.
OBJECT_MODE = 0o640
FOLDER_MODE = 0o750


@functools.cache
def _umask() -> int:
    """The process's umask, read once without changing it (os.umask would, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o077  # unknown: assume the strictest, which only costs a chmod per object


def _makedirs(path: str) -> None:
    """mkdir -p that fsyncs each parent it creates, so a new folder survives a crash too."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for p in reversed(missing):
        try:
            os.mkdir(p, FOLDER_MODE)
        except FileExistsError:
            continue
        if _umask() & FOLDER_MODE:  # keep the setgid bit the folder inherited
            os.chmod(p, FOLDER_MODE | (os.stat(p).st_mode & stat.S_ISGID))
        fsync_dir(os.path.dirname(p))


def _existing(path: str) -> str:
    """path, or its nearest ancestor that exists."""
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _owned(path: str) -> str:
    """`user:group mode` of path (or of its nearest existing ancestor), for a permission hint."""
    path = _existing(path)
    try:
        st = os.stat(path)
    except OSError:
        return path
    return f"{path} is {user_name(st.st_uid)}:{group_name(st.st_gid)} {stat.S_IMODE(st.st_mode):04o}"


class FsStorage(Storage):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.name = "default"
        self._writer_checked = False

    def describe(self) -> str:
        return f"file storage {self.root}"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, checked_key(key))

    def _fail(self, what: str, key: str, e: OSError) -> StorageError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = (f"the filesystem holding {self.root} is full (or this user's quota is): free space there "
                    "or give WALG_FILE_PREFIX a larger one; nothing partial was left under the key")
        elif e.errno == errno.EROFS:
            hint = f"the filesystem holding {self.root} is mounted read-only"
        elif e.errno in (errno.EACCES, errno.EPERM):
            path = self._path(key) if key else self.root
            me = user_name(os.geteuid())
            if what in _READS:
                hint = (f"{me} may not read it ({_owned(path)}): everything under {self.root} must be readable "
                        "by the user walrus runs as (the server's OS user, for restore_command); objects "
                        "written by another user, such as root, need a chown to that user")
            else:
                hint = (f"{me} may not write there ({_owned(os.path.dirname(path))}): {self.root} must be "
                        "writable by the user walrus runs as (the server's OS user, for archive_command)")
        elif e.errno == errno.ENOTDIR:
            hint = f"a file is where a folder should be under {self.root}: check WALG_FILE_PREFIX"
        else:
            hint = "check that the directory exists and this user may write to it"
        return StorageError(f"could not {what} {key!r} in {self.describe()}", detail=e.strerror or str(e), hint=hint)

    def _absent(self, key: str) -> StorageError:
        """What a missing path means: an absent object only when the storage root itself is a
        readable directory. A mistyped or unmounted WALG_FILE_PREFIX must never read as "not
        archived": wal-fetch's exit 74 would end a recovery early."""
        try:
            st = os.stat(self.root)
        except OSError as e:
            kind = StorageMissing if e.errno == errno.ENOENT else StorageError
            return kind(f"{self.describe()} cannot be read", detail=f"{self.root}: {e.strerror or e}",
                        hint="check WALG_FILE_PREFIX (a typo, or a filesystem that is not mounted); "
                             "the first wal-push or backup-push creates it")
        if not stat.S_ISDIR(st.st_mode):
            return StorageError(f"{self.describe()} cannot be read", detail=f"{self.root} is not a directory",
                                hint="WALG_FILE_PREFIX must name a directory")
        return ObjectNotFound(key)

    def object_owner(self, key: str) -> tuple[int, int, int] | None:
        st = os.stat(self._path(key))
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    def check_writer(self) -> None:
        """Root writing into a repository another user owns (the server's OS user, which archives
        and restores) would leave objects and folders that user can neither read nor delete."""
        if self._writer_checked or os.geteuid() != 0:
            return
        top = _existing(self.root)
        try:
            owner = os.stat(top).st_uid
        except OSError:
            owner = 0  # nothing to read the owner of: the write itself will say what is wrong
        if owner != 0:
            name = user_name(owner)
            raise StorageError(f"refusing to write to {self.describe()} as root: {top} belongs to {name}",
                               detail=f"objects written by root would be root's, and {name} could then not read "
                                      "or delete them",
                               hint=f"run walrus as {name} (sudo -u {name} walrus ...), as archive_command does")
        self._writer_checked = True

    async def put(self, key: str, stream: AsyncIterable[bytes], *, exclusive: bool = False) -> int:
        self.check_writer()
        path = self._path(key)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        tmp = f"{path}.tmp.{stamp}-{os.urandom(4).hex()}"
        for attempt in range(3):  # a delete may remove the emptied folder between the two calls
            try:
                await asyncio.to_thread(_makedirs, os.path.dirname(path))
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, OBJECT_MODE)
                if _umask() & OBJECT_MODE:
                    os.fchmod(fd, OBJECT_MODE)
                break
            except FileNotFoundError as e:
                if attempt == 2:
                    raise self._fail("create", key, e) from None
            except OSError as e:
                raise self._fail("create", key, e) from None
        total = flushed = 0
        batch: list = []  # chunks not yet written: one thread hop per WRITE_BATCH, not per chunk
        batched = 0
        owner = WorkerResource(lambda: discard(fd, tmp))  # a failed put discards the temporary
        try:
            async for chunk in stream:
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH or len(batch) >= WRITE_BATCH_CHUNKS:
                    total += await asyncio.to_thread(owner.call, writev_all, fd, batch)
                    batch, batched = [], 0
                    if total - flushed >= WRITEBACK_EVERY:
                        start_writeback(fd, flushed, total - flushed)
                        flushed = total
            if batch:
                total += await asyncio.to_thread(owner.call, writev_all, fd, batch)
            await asyncio.to_thread(owner.call, os.fsync, fd)
            os.close(fd)
            fd = -1
            if exclusive:
                try:
                    rename_noreplace(tmp, path)  # atomic: of racing writers exactly one publishes
                except FileExistsError:
                    raise ObjectExists(key) from None
            else:
                os.rename(tmp, path)
            await asyncio.to_thread(fsync_dir, os.path.dirname(path))
        except BaseException as e:
            if fd >= 0:
                owner.release()  # now, or when the write still running on its thread ends
            else:
                discard(fd, tmp)  # closed already: only the temporary name is left
            if isinstance(e, OSError):
                raise self._fail("write", key, e) from None
            raise
        return total

    async def get(self, key: str) -> ByteStream:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._absent(key) from None
        except OSError as e:
            raise self._absent_or(self._fail("open", key, e)) from None
        return self._read(fd, key)

    def _absent_or(self, error: StorageError) -> StorageError:
        """A bad root explains any failure below it best; otherwise `error` stands."""
        absent = self._absent("")
        return error if isinstance(absent, ObjectNotFound) else absent

    async def _read(self, fd: int, key: str) -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    chunk = await asyncio.to_thread(os.read, fd, READ_CHUNK)
                except OSError as e:
                    raise self._fail("read", key, e) from None
                if not chunk:
                    return
                yield chunk
        finally:
            os.close(fd)

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            absent = self._absent(key)
            if isinstance(absent, ObjectNotFound):
                return None
            raise absent from None
        except OSError as e:
            raise self._absent_or(self._fail("stat", key, e)) from None
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(join_key(key), st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    async def list(self, folder: str, *, recursive: bool = False, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        """Streams in directory order, LIST_BATCH entries per thread hop: a folder of a million WAL
        objects is listed in constant memory."""
        folder = join_key(folder)
        base = os.path.join(self.root, folder) if folder else self.root
        pending = [(base, folder)]  # folders still to list (recursive); a stack, so memory is the tree's depth
        while pending:
            path, key = pending.pop()
            try:
                entries = await asyncio.to_thread(os.scandir, path)
            except FileNotFoundError:
                if path != base:
                    continue  # a sub-folder removed meanwhile (a delete emptied it)
                absent = self._absent(folder)
                if not isinstance(absent, ObjectNotFound):
                    raise absent from None
                return  # the folder: empty if the root is there
            except OSError as e:
                raise self._absent_or(self._fail("list", folder, e)) from None
            # a listing cancelled mid-batch must not close the directory under the thread reading it
            owner = WorkerResource(entries.close)
            try:
                while batch := await asyncio.to_thread(owner.call, _next_entries, entries, recursive):
                    for name, size, mtime in batch:
                        if size < 0:
                            pending.append((os.path.join(path, name), join_key(key, name)))
                        elif start_after is None or join_key(key, name) > start_after:
                            yield ObjectInfo(join_key(key, name), size, datetime.fromtimestamp(mtime, timezone.utc))
            except OSError as e:
                raise self._absent_or(self._fail("list", folder, e)) from None
            finally:
                owner.release()

    async def abandoned_uploads(self, folder: str, started_before: datetime) -> list[Upload]:
        """Temporary files a killed writer left under folder (WAL-G's temporary
        names, which list() hides), last written before started_before; a writer still running
        keeps writing its file, so it is never among them when started_before leaves a margin."""
        base = os.path.join(self.root, join_key(folder)) if join_key(folder) else self.root
        found = await asyncio.to_thread(_temporaries, base, join_key(folder), started_before.timestamp())
        return [Upload(key, datetime.fromtimestamp(mtime, timezone.utc)) for key, mtime in found]

    async def discard_uploads(self, uploads: Iterable[Upload]) -> None:
        """Remove what abandoned_uploads found."""
        await self.delete([u.key for u in uploads])

    async def delete(self, keys: Iterable[str]) -> None:
        """Unlink each key, then remove the folders that emptied (never the root), deepest first."""
        dirs = set()
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
                dirs.add(os.path.dirname(path))
            except FileNotFoundError:
                pass
            except OSError as e:
                raise self._fail("delete", key, e) from None
        await asyncio.to_thread(self._prune, dirs)

    def _prune(self, dirs: set[str]) -> None:
        synced = set()
        for d in sorted(dirs, key=len, reverse=True):
            while d != self.root and d.startswith(self.root + os.sep):
                try:
                    os.rmdir(d)  # only succeeds on an empty folder: a concurrent put's folder stays
                except OSError:
                    break
                d = os.path.dirname(d)
            if d not in synced and os.path.isdir(d):
                fsync_dir(d)
                synced.add(d)


LIST_BATCH = 1000
_READS = ("open", "read", "stat", "list")  # the rest ("create", "write", "delete") change the storage


def _temporaries(base: str, folder: str, before: float, limit: int = 100_000) -> list[tuple[str, float]]:
    """(key, mtime) of the temporary files under base last written before `before` (at most limit),
    one directory entry at a time: a folder of a million WAL objects costs no memory."""
    out: list[tuple[str, float]] = []
    pending = [(base, folder)]
    while pending and len(out) < limit:
        path, key = pending.pop()
        try:
            entries = os.scandir(path)
        except FileNotFoundError:
            continue
        with entries:
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        pending.append((e.path, join_key(key, e.name)))
                    elif TMP_RE.search(e.name) and e.is_file(follow_symlinks=False):
                        mtime = e.stat(follow_symlinks=False).st_mtime
                        if mtime < before:
                            out.append((join_key(key, e.name), mtime))
                except FileNotFoundError:
                    continue
    return out[:limit]


def _next_entries(entries, recursive: bool) -> list[tuple[str, int, float]]:
    """The next LIST_BATCH files of an open scandir as (name, size, mtime), upload temporaries
    excluded; folders (when recursive) as (name, -1, 0). Files removed meanwhile are skipped."""
    out: list[tuple[str, int, float]] = []
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                if recursive:
                    out.append((e.name, -1, 0.0))
            elif e.is_file(follow_symlinks=False) and not TMP_RE.search(e.name):
                st = e.stat(follow_symlinks=False)
                out.append((e.name, st.st_size, st.st_mtime))
        except FileNotFoundError:
            continue
        if len(out) >= LIST_BATCH:
            break
    return out


def open_fs(settings: Settings) -> Storage:
    """File storage under WALG_FILE_PREFIX (a path, or file://localhost/path), WALG_STORAGE_PREFIX below it."""
    prefix = settings.file_prefix or ""
    root = prefix
    if prefix.startswith("file://"):
        from urllib.parse import urlparse  # here: only a file:// prefix needs it

        url = urlparse(prefix)
        if url.netloc not in ("", "localhost"):
            raise ConfigError(f"WALG_FILE_PREFIX {prefix!r} names a remote host",
                              hint="use a local path or file://localhost/path")
        root = url.path
    if not root.strip("/") and root != "/":
        raise ConfigError("WALG_FILE_PREFIX is empty", hint="set it to a directory such as /var/lib/walrus/backups")
    sub = join_key(settings.storage_prefix or "")
    return FsStorage(os.path.join(root, sub) if sub else root)
