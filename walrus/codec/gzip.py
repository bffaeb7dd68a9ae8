"""gzip (read only): objects written by old WAL-G versions or other tools under the `gz` extension."""
from __future__ import annotations

import zlib
from typing import ClassVar

from walrus.codec.base import ChunkedReader
from walrus.pull import Source

_GZIP_WBITS = 16 + zlib.MAX_WBITS


class GzipReader(ChunkedReader):
    """Reads gzip members back to back, as Go's gzip reader does in its default multistream mode.

    zlib hands back the unconsumed input as a new bytes object on every bounded step; feed_limit
    keeps that copy small.
    """

    method: ClassVar[str] = "gzip"
    errors: ClassVar[tuple[type[BaseException], ...]] = (zlib.error,)
    feed_limit: ClassVar[int] = 64 << 10

    def __init__(self, raw: Source, name: str = ""):
        super().__init__(raw, name)
        self._decoder = zlib.decompressobj(_GZIP_WBITS)
        self._in_member = False

    def _step(self, window: memoryview, n: int) -> tuple[bytes, int]:
        if self._decoder.eof:
            if not window:
                return b"", 0
            self._decoder = zlib.decompressobj(_GZIP_WBITS)  # the next member
        out = self._decoder.decompress(window, n)
        if self._decoder.eof:
            self._in_member = False
            return out, len(window) - len(self._decoder.unused_data)
        self._in_member = self._in_member or bool(window)
        return out, len(window) - len(self._decoder.unconsumed_tail)

    def _at_clean_end(self) -> bool:
        return not self._in_member

    def _release(self) -> None:
        self._decoder = None
