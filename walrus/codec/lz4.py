"""lz4: one LZ4 frame per object, framed exactly as WAL-G's pierrec/lz4 v4 writer frames it."""
from __future__ import annotations

from typing import ClassVar

import lz4.frame as _frame

from walrus.codec.base import BytesLike, ChunkedReader, RawSource

EXTENSION = "lz4"


class Lz4Compressor:
    """Header 04 22 4D 18 64 70 B9: independent 4 MiB blocks, content checksum, no content size.

    Exactly one frame per object: WAL-G's reader stops after the first frame and would silently drop
    anything after it. Input is buffered by liblz4 until a block is full, so compress() often
    returns b"" and does its work (with the GIL released) once per 4 MiB.
    """

    def __init__(self) -> None:
        self._frame = _frame.LZ4FrameCompressor(
            block_size=_frame.BLOCKSIZE_MAX4MB,
            block_linked=False,
            content_checksum=True,
            block_checksum=False,
            auto_flush=False,
        )
        self._header = self._frame.begin()  # source_size=0: the header carries no content size

    def _take_header(self) -> bytes:
        header, self._header = self._header, b""
        return header

    def compress(self, data: BytesLike) -> bytes:
        out = self._frame.compress(data)
        return self._take_header() + out if self._header else out

    def finish(self) -> bytes:
        return self._take_header() + self._frame.flush()


class Lz4Reader(ChunkedReader):
    """Reads any lz4 frames (linked or independent blocks, content size, block checksums), back to back.

    liblz4 decodes straight from a view of the raw chunk and stops at max_length, so memory stays at
    n plus one block (at most 4 MiB) whatever the ratio; the input is never copied.
    """

    method: ClassVar[str] = "lz4"
    errors: ClassVar[tuple[type[BaseException], ...]] = (RuntimeError,)

    def __init__(self, raw: RawSource, name: str = ""):
        super().__init__(raw, name)
        self._context = _frame.create_decompression_context()
        self._in_frame = False  # bytes of a frame consumed and its end not yet seen

    def _step(self, window: memoryview, n: int) -> tuple[bytes, int]:
        out, used, frame_ended = _frame.decompress_chunk(self._context, window, max_length=n)
        if frame_ended:
            self._in_frame = False  # liblz4 resets the context: the next byte starts a new frame
        elif used:
            self._in_frame = True
        return out, used

    def _at_clean_end(self) -> bool:
        return not self._in_frame

    def _release(self) -> None:
        self._context = None
