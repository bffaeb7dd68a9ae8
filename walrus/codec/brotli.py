"""brotli: a raw brotli stream at quality 3, as WAL-G's cbrotli writer produces."""
from __future__ import annotations

from typing import ClassVar

import brotli as _brotli

from walrus.codec.base import BytesLike, ChunkedReader
from walrus.pull import Source

QUALITY = 3  # WAL-G: cbrotli.WriterOptions{Quality: 3}; window left at the default 22 bits


class BrotliCompressor:
    independent_blocks = False

    def __init__(self) -> None:
        self._stream = _brotli.Compressor(quality=QUALITY)

    def compress(self, data: BytesLike) -> bytes:
        return self._stream.process(data)

    def finish(self) -> bytes:
        return self._stream.finish()


class BrotliReader(ChunkedReader):
    """Bounded through brotli 1.2's output_buffer_limit.

    That limit is applied per decoder block, so a step may return up to about twice n (the base
    class hands the excess to the next reads). When the limit stops a step, the binding copies the
    unconsumed input aside, and again on every following step until it is used up: feed_limit keeps
    that copy small.
    """

    method: ClassVar[str] = "brotli"
    errors: ClassVar[tuple[type[BaseException], ...]] = (_brotli.error,)
    feed_limit: ClassVar[int] = 64 << 10

    def __init__(self, raw: Source, name: str = ""):
        super().__init__(raw, name)
        self._decoder = _brotli.Decompressor()

    def _step(self, window: memoryview, n: int) -> tuple[bytes, int]:
        if not self._decoder.can_accept_more_data():
            return self._decoder.process(b"", output_buffer_limit=n), 0
        if self._decoder.is_finished():
            if window:
                raise self._corrupt("unexpected bytes after the end of the brotli stream")
            return b"", 0
        return self._decoder.process(window, output_buffer_limit=n), len(window)

    def _at_clean_end(self) -> bool:
        return self._decoder.is_finished()

    def _release(self) -> None:
        self._decoder = None
