"""Storage whose transfers keep to WALG_NETWORK_RATE_LIMIT: every byte put or got waits for one shared bucket."""
from __future__ import annotations

from datetime import datetime
from typing import AsyncIterable, AsyncIterator, Iterable, Sequence

from walrus.ratelimit import RateLimiter
from walrus.storage.base import ByteStream, ObjectInfo, Storage, Upload


class LimitedStorage(Storage):
    """Any backend with the bytes of each put stream and get stream paced by `limiter`, which every
    transfer of the command shares (WAL-G's LimitedFolder); everything else is delegated as is.

    It wraps the outermost storage (the retrying one), so a retried piece is not paced again: the
    limit applies to what the command moves, as WAL-G's does."""

    def __init__(self, inner: Storage, limiter: RateLimiter):
        self.inner = inner
        self.limiter = limiter
        self.name = inner.name
        self.upload_memory = inner.upload_memory
        self.download_memory = inner.download_memory

    def describe(self) -> str:
        return self.inner.describe()

    async def _paced(self, stream: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        chunks = aiter(stream)
        try:
            async for chunk in chunks:
                await self.limiter.take(len(chunk))
                yield chunk
        finally:
            # `async for` never closes what it iterates: an abandoned get must still release its file
            # or connection
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def put(self, key: str, stream: AsyncIterable[bytes], *, exclusive: bool = False) -> int:
        return await self.inner.put(key, self._paced(stream), exclusive=exclusive)

    async def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> int:
        # the inner put_bytes, not put: the retrying storage retries a whole put_bytes
        await self.limiter.take(len(data))
        return await self.inner.put_bytes(key, data, exclusive=exclusive)

    async def get(self, key: str) -> ByteStream:
        return self._paced(await self.inner.get(key))

    async def get_bytes(self, key: str) -> bytes:
        data = await self.inner.get_bytes(key)
        await self.limiter.take(len(data))
        return data

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self.inner.stat(key)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    def list(self, folder: str, *, recursive: bool = False, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        return self.inner.list(folder, recursive=recursive, start_after=start_after)

    async def delete(self, keys: Iterable[str]) -> None:
        await self.inner.delete(keys)

    @property
    def lists_in_key_order(self) -> bool:
        return self.inner.lists_in_key_order

    async def keys_with_prefix(self, prefix: str) -> set[str] | None:
        return await self.inner.keys_with_prefix(prefix)

    async def abandoned_uploads(self, folder: str, started_before: datetime) -> Sequence[Upload]:
        return await self.inner.abandoned_uploads(folder, started_before)

    async def discard_uploads(self, uploads: Iterable[Upload]) -> None:
        await self.inner.discard_uploads(uploads)

    def check_writer(self) -> None:
        self.inner.check_writer()

    def object_owner(self, key: str) -> tuple[int, int, int] | None:
        return self.inner.object_owner(key)

    async def close(self) -> None:
        await self.inner.close()
