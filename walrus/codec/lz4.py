"""lz4: one LZ4 frame per object, framed exactly as WAL-G's pierrec/lz4 v4 writer frames it."""
from __future__ import annotations

import struct
from typing import ClassVar

import lz4.block as _block
import lz4.frame as _frame
import xxhash

from walrus.codec.base import BytesLike, ChunkedReader
from walrus.pull import Source


# The frame header WAL-G's pierrec/lz4 v4 writer produces: magic 184D2204, FLG 0x64 (version 1,
# independent blocks, content checksum, no content size, no block checksums), BD 0x70 (blocks of
# at most 4 MiB), header checksum 0xB9.
FRAME_HEADER = bytes.fromhex("04224D186470B9")
BLOCK_MAX = 4 << 20
_END_MARK = bytes(4)
_UNCOMPRESSED = 0x80000000  # high bit of a block's size word: the block is stored as is
_SIZE = struct.Struct("<I")


def encode_blocks(data: BytesLike) -> bytes:
    """`data` as frame blocks of at most 4 MiB, each independent of all others.

    Pure and thread safe (liblz4 runs with the GIL released), so the blocks of one frame can be
    encoded on several threads at once and concatenated in input order. A block that does not
    shrink is stored uncompressed, as the frame format (and liblz4's own writer) does.
    """
    view = memoryview(data)
    out: list[BytesLike] = []
    for start in range(0, len(view), BLOCK_MAX):
        block = view[start:start + BLOCK_MAX]
        packed = _block.compress(block, store_size=False)
        if len(packed) < len(block):
            out += (_SIZE.pack(len(packed)), packed)
        else:
            out += (_SIZE.pack(len(block) | _UNCOMPRESSED), block)
    return b"".join(out)


class Lz4Compressor:
    """One frame per object with WAL-G's header: independent blocks, an XXH32 content checksum.

    Exactly one frame per object: WAL-G's reader stops after the first frame and would silently drop
    anything after it. Each compress() call becomes its own block(s), so callers hand it whole pool
    buffers (1 MiB by default); the frame stays valid for any sizes, since BD only caps a block.

    Besides compress()/finish() it offers the block form that walrus.stream.stages.compressed uses
    to spread one frame over several cores: start() once, then for each chunk in order checksum(),
    and encode() in any order on any thread.
    """

    independent_blocks = True

    def __init__(self) -> None:
        self._checksum = xxhash.xxh32()
        self._started = False

    def start(self) -> bytes:
        """The frame header the first time, then b""."""
        if self._started:
            return b""
        self._started = True
        return FRAME_HEADER

    def checksum(self, data: BytesLike) -> None:
        """Adds `data` to the content checksum; calls must follow the input order."""
        self._checksum.update(data)

    encode = staticmethod(encode_blocks)

    def compress(self, data: BytesLike) -> bytes:
        self.checksum(data)
        head = self.start()
        return head + encode_blocks(data) if len(data) else head

    def finish(self) -> bytes:
        return self.start() + _END_MARK + _SIZE.pack(self._checksum.intdigest())


class Lz4Reader(ChunkedReader):
    """Reads any lz4 frames (linked or independent blocks, content size, block checksums), back to back.

    liblz4 decodes straight from a view of the raw chunk and stops at max_length, so memory stays at
    n plus one block (at most 4 MiB) whatever the ratio; the input is never copied.
    """

    method: ClassVar[str] = "lz4"
    errors: ClassVar[tuple[type[BaseException], ...]] = (RuntimeError,)

    def __init__(self, raw: Source, name: str = ""):
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
