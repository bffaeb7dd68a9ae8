"""lz4: one LZ4 frame per object, with WAL-G's block layout, then walrus's checksum seal."""
from __future__ import annotations

import struct
from typing import ClassVar

import lz4.block as _block
import lz4.frame as _frame
import xxhash

from walrus.codec.base import BytesLike, ChunkedReader
from walrus.pull import Source


# The frame header: magic 184D2204, FLG 0x60 (version 1, independent blocks; no content size, no
# block checksums, no content checksum: see Lz4Compressor), BD 0x70 (blocks of at most 4 MiB),
# header checksum 0x73. WAL-G's pierrec/lz4 v4 writer sets FLG 0x64 (a content checksum, 0xB9).
FRAME_HEADER = bytes.fromhex("04224D18607073")
BLOCK_MAX = 4 << 20
_END_MARK = bytes(4)
_UNCOMPRESSED = 0x80000000  # high bit of a block's size word: the block is stored as is
_SIZE = struct.Struct("<I")

# walrus's seal, a skippable frame right after the lz4 frame: magic, payload size (16), a tag
# naming the seal's kind and version, the XXH3-64 of every byte of the frame before it.
SEAL = struct.Struct("<II8sQ")
SEAL_MAGIC = 0x184D2A5E  # one of the 16 skippable-frame magics the LZ4 format reserves
SEAL_TAG = b"walrus\x00\x01"
_SEAL_MAGIC_BYTES = _SIZE.pack(SEAL_MAGIC)


def seal(digest: int) -> bytes:
    return SEAL.pack(SEAL_MAGIC, SEAL.size - 8, SEAL_TAG, digest)


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
    """One lz4 frame per object (independent blocks, as WAL-G's), then walrus's seal.

    The frame carries no XXH32 content checksum: that sum runs over the decoded bytes in order,
    one core at 1.5 GB/s, as much CPU as the encoding and the serial bound of a part. Instead the
    seal after the frame holds an XXH3-64 of the frame's stored bytes (a tenth of the input on
    database pages, hashed ten times faster), which walrus's reader checks: a damaged or truncated
    object is still an error. pierrec/lz4 (WAL-G) and liblz4 read the frame and skip the seal as the
    format's skippable frame (or stop before it); they cannot check it.

    Exactly one lz4 frame per object: older pierrec readers stop after the first frame and would
    silently drop any frame after it. Each compress() call becomes its own block(s), so callers hand
    it whole pool buffers (1 MiB by default); the frame stays valid for any sizes, since BD only caps
    a block.

    Besides compress()/finish() it offers the block form that walrus.stream.stages.compressed uses
    to spread one frame over several cores: start() once, encode() on any thread in any order, and
    digest() of each encoded chunk in input order.
    """

    independent_blocks = True

    def __init__(self) -> None:
        self._digest = xxhash.xxh3_64()
        self._started = False

    def start(self) -> bytes:
        """The frame header the first time, then b""."""
        if self._started:
            return b""
        self._started = True
        self._digest.update(FRAME_HEADER)
        return FRAME_HEADER

    def digest(self, encoded: BytesLike) -> None:
        """Adds encoded blocks to the seal's digest; calls must follow the input order."""
        self._digest.update(encoded)

    encode = staticmethod(encode_blocks)

    def compress(self, data: BytesLike) -> bytes:
        head = self.start()
        if not len(data):
            return head
        out = encode_blocks(data)
        self.digest(out)
        return head + out

    def finish(self) -> bytes:
        head = self.start()
        self._digest.update(_END_MARK)
        return head + _END_MARK + seal(self._digest.intdigest())


class Lz4Reader(ChunkedReader):
    """Reads any lz4 frames (linked or independent blocks, content size, block checksums), back to back,
    and checks walrus's seal where one follows a frame.

    liblz4 decodes straight from a view of the raw chunk and stops at max_length, so memory stays at
    n plus one block (at most 4 MiB) whatever the ratio; the input is never copied. Every byte a
    frame consumes is hashed; after a frame's end the next bytes are held back until they show
    whether they are a seal (checked against the hash) or the start of something liblz4 judges.
    """

    method: ClassVar[str] = "lz4"
    errors: ClassVar[tuple[type[BaseException], ...]] = (RuntimeError,)

    def __init__(self, raw: Source, name: str = ""):
        super().__init__(raw, name)
        self._context = _frame.create_decompression_context()
        self._in_frame = False  # bytes of a frame consumed and its end not yet seen
        self._digest = xxhash.xxh3_64()  # of the bytes consumed since the last frame ended
        self._ended_digest = 0  # of the frame that ended last
        self._after: bytearray | None = None  # bytes after a frame's end, while telling a seal

    def _step(self, window: memoryview, n: int) -> tuple[bytes, int]:
        if self._after is not None and window:
            return self._take_after(window, n)
        return self._decode(window, n)

    def _decode(self, window: BytesLike, n: int) -> tuple[bytes, int]:
        out, used, frame_ended = _frame.decompress_chunk(self._context, window, max_length=n)
        if used:
            self._digest.update(window[:used])
        if frame_ended:
            self._in_frame = False  # liblz4 resets the context: the next byte starts a new frame
            self._ended_digest = self._digest.intdigest()
            self._digest.reset()
            self._after = bytearray()
        elif used:
            self._in_frame = True
        return out, used

    def _take_after(self, window: memoryview, n: int) -> tuple[bytes, int]:
        after = self._after
        want = (4 if len(after) < 4 else SEAL.size) - len(after)
        taken = min(want, len(window))
        after += window[:taken]
        if len(after) < 4:
            return b"", taken
        if after[:4] != _SEAL_MAGIC_BYTES:  # another frame (or what liblz4 refuses): decode it
            self._after = None
            out, used = self._decode(bytes(after), n)
            if used != len(after):
                raise RuntimeError("liblz4 did not take a frame's first bytes")
            return out, taken
        if len(after) == SEAL.size:
            _, size, tag, digest = SEAL.unpack(after)
            if size != SEAL.size - 8 or tag != SEAL_TAG:
                raise RuntimeError("walrus's seal after the frame is damaged")
            if digest != self._ended_digest:
                raise RuntimeError(f"checksum mismatch: the frame hashes to {self._ended_digest:016x}, "
                                   f"its seal says {digest:016x}")
            self._after = None
        return b"", taken

    def _at_clean_end(self) -> bool:
        return not self._in_frame and not self._after  # no frame open, no seal half read

    def _release(self) -> None:
        self._context = None
