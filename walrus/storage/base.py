"""The small async storage interface every backend implements, and key helpers shared by all."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterable, AsyncIterator, Iterable, Sequence

from walrus.errors import StorageError

ByteStream = AsyncIterator[bytes]


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # full key relative to the storage root, e.g. "basebackups_005/base_X_backup_stop_sentinel.json"
    size: int
    mtime: datetime  # LastModified; LATEST keys off this (WAL-G compatibility)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Upload:
    """An upload a writer began and never finished (Storage.abandoned_uploads): a temporary file in
    file storage, an S3 multipart upload never completed or aborted."""

    key: str  # the key it would have been published under (file storage: the temporary file's key)
    started: datetime
    upload_id: str | None = None  # S3's UploadId


def join_key(*parts: str) -> str:
    """WAL-G's storage.JoinPath: pieces trimmed of slashes and joined with single '/'."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def checked_key(key: str) -> str:
    """`key` as every backend stores it below its root (join_key's form); an empty key, or one that
    would climb out of the root ('..'), is refused."""
    rel = join_key(key)
    if not rel or ".." in rel.split("/"):
        raise StorageError(f"invalid storage key {key!r}")
    return rel


class Storage(abc.ABC):
    """put a stream, get a stream, stat, list, delete. Keys are relative to the backend's root.

    Invariants every backend keeps: `put` makes the object visible only once it is complete and
    durable (no partial object under a final key, ever); an exclusive `put` never replaces an
    object, however many writers race for the key (one wins, the others get ObjectExists); `get`
    raises ObjectNotFound before the first byte when the storage answers that the key is absent,
    and a plain StorageError when it cannot tell (unreachable, unreadable, misconfigured root).
    """

    name = "default"
    # Bytes of transfer buffers the backend holds at most for all its uploads together (parts being
    # filled and in flight) and for its downloads (ranges read ahead), out of WALRUS_MEMORY_BUDGET:
    # the data path sizes its own buffers from what is left. File storage streams: none.
    upload_memory = 0
    download_memory = 0

    @abc.abstractmethod
    async def put(self, key: str, stream: AsyncIterable[bytes], *, exclusive: bool = False) -> int:
        """Store the stream under key atomically; return the bytes stored.

        exclusive: publish only if no object is under key at that instant, else raise ObjectExists
        (the stream's bytes are then discarded). Atomic with respect to other writers."""

    @abc.abstractmethod
    async def get(self, key: str) -> ByteStream:
        """Open key for reading; raise ObjectNotFound at once when absent."""

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectInfo | None:
        """Size and mtime of key, or None when absent."""

    # Whether list() yields keys in ascending order (S3 does; a file system lists in directory order).
    # A caller that may skip ahead restarts a listing with start_after only when this is true.
    lists_in_key_order = False

    @abc.abstractmethod
    def list(self, folder: str, *, recursive: bool = False, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        """Objects under folder (direct children only unless recursive), only keys greater than
        start_after when it is given (a full key, relative to the root)."""

    @abc.abstractmethod
    async def delete(self, keys: Iterable[str]) -> None:
        """Delete keys; absent keys are not an error."""

    # -- optional capabilities: each default is what a caller can rely on where a backend has nothing
    # better, so callers never ask whether a backend has one

    async def keys_with_prefix(self, prefix: str) -> set[str] | None:
        """The keys that start with `prefix`, found in one request; None where the backend has no
        cheaper way than asking for each candidate key (the caller then does)."""
        return None

    async def abandoned_uploads(self, folder: str, started_before: datetime) -> Sequence[Upload]:
        """Uploads begun under `folder` before `started_before` and never finished (none where the
        backend's writes leave nothing behind)."""
        return []

    async def discard_uploads(self, uploads: Iterable[Upload]) -> None:
        """Remove what abandoned_uploads found; an upload already gone is fine."""

    def check_writer(self) -> None:
        """Raise StorageError where this process must not write (file storage: root in a repository
        another user owns); nothing where objects have no owners. A command that writes calls it
        before anything else, so the refusal comes before a backup starts."""

    def object_owner(self, key: str) -> tuple[int, int, int] | None:
        """(uid, gid, permission bits) of a stored object where objects have owners (file storage)."""
        return None

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    async def get_bytes(self, key: str) -> bytes:
        """Whole small objects (JSON documents) only."""
        chunks = [c async for c in await self.get(key)]
        return b"".join(chunks)

    async def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> int:
        async def one():
            yield data

        return await self.put(key, one(), exclusive=exclusive)

    async def close(self) -> None:
        return None

    def describe(self) -> str:
        return self.name
