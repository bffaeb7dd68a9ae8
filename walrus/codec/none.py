"""none: objects stored as is (WAL-G v3.0.8+); the key has no extension, or a trailing dot in v3.0.8."""
from __future__ import annotations

from walrus.codec.base import BytesLike
from walrus.pull import Source


class IdentityCompressor:
    independent_blocks = False

    def compress(self, data: BytesLike) -> bytes:
        # a copy when data is a view: the caller recycles the buffer behind it once this returns
        return bytes(data)

    def finish(self) -> bytes:
        return b""


class IdentityReader:
    def __init__(self, raw: Source, name: str = ""):
        self._raw: Source | None = raw

    def read(self, n: int) -> bytes:
        if self._raw is None:
            raise ValueError("read from a closed reader")
        if n < 1:
            raise ValueError(f"read size must be positive, got {n}")
        return self._raw.read(n)

    def close(self) -> None:
        self._raw = None
