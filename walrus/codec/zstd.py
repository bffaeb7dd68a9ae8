"""zstd: standard frames, one per chunk, levels named as WALG_ZSTD_LEVEL names them."""
from __future__ import annotations

import threading

import zstandard as _zstd

from walrus.codec.base import BytesLike, corrupt
from walrus.errors import ConfigError
from walrus.pull import READ_SIZE, Source

METHOD = "zstd"

# WALG_ZSTD_LEVEL names are klauspost/compress EncoderLevel names (matched case-insensitively, as
# zstd.EncoderLevelFromString does). klauspost documents each as roughly a reference zstd level:
# SpeedFastest ~ the fastest mode (1), SpeedDefault ~ 3, SpeedBetterCompression ~ 7-8,
# SpeedBestCompression ~ 11 (its README's table). Ratios differ slightly between the two encoders;
# the frames are standard either way.
ZSTD_LEVELS: dict[str, int] = {"fastest": 1, "default": 3, "better": 7, "best": 11}
DEFAULT_LEVEL = "default"

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
_DICT_ID_SIZES = (0, 1, 2, 4)
_CONTENT_SIZE_SIZES = (0, 2, 4, 8)  # by Frame_Content_Size_flag; flag 0 means 1 byte if single-segment


def zstd_level(name: str | None) -> int:
    """The zstd level for a WALG_ZSTD_LEVEL name (None or "" means the default)."""
    key = (name or DEFAULT_LEVEL).lower()
    if key not in ZSTD_LEVELS:
        raise ConfigError(
            f"unknown zstd level {name!r}",
            detail="WALG_ZSTD_LEVEL must be one of: " + ", ".join(ZSTD_LEVELS),
        )
    return ZSTD_LEVELS[key]


_contexts = threading.local()  # per thread: {level: zstandard.ZstdCompressor}, which is not thread safe


def _context(level: int) -> _zstd.ZstdCompressor:
    cache = getattr(_contexts, "by_level", None)
    if cache is None:
        cache = _contexts.by_level = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = _zstd.ZstdCompressor(level=level, write_checksum=True)
    return cctx


class ZstdCompressor:
    """Each chunk is one whole frame, with its content size and a content checksum.

    An object is the frames of its chunks back to back, which every zstd reader decodes as one
    stream (the format allows it; WAL-G's klauspost decoder, libzstd and the zstd CLI read on to the
    end). Independent frames let the chunks of one object compress on several threads at once
    (walrus.stream.stages.compressed), and one-shot compression of a known-size chunk is faster than
    a streaming frame over the same chunks, at the same ratio (docs/DESIGN.md).
    The block form: start() and digest() have nothing to do; encode() runs on any thread.
    """

    independent_blocks = True

    def __init__(self, level: str | None = None):
        self._level = zstd_level(level)
        self._encoded = False

    def start(self) -> bytes:
        return b""

    def digest(self, encoded: BytesLike) -> None:
        """Each frame carries its own checksum."""

    def encode(self, data: BytesLike) -> bytes:
        self._encoded = True
        return _context(self._level).compress(data)

    def compress(self, data: BytesLike) -> bytes:
        return self.encode(data) if len(data) else b""

    def finish(self) -> bytes:
        # an empty object is still one (empty) frame, never zero bytes
        return b"" if self._encoded else self.encode(b"")


class _NotZstd(Exception):
    """The bytes where a frame should start are not a zstd or skippable frame magic."""


class _FrameWalker:
    """Follows frame and block boundaries through the compressed bytes without decoding them.

    zstandard's stream reader ends quietly when its input stops inside a frame; walking the block
    headers is what tells a complete object from a truncated one. Cost: one small parse per block.
    """

    def __init__(self) -> None:
        self._head = bytearray()  # a fixed-size header being collected
        self._need = 4  # its size
        self._state = "magic"
        self._skip = 0  # payload bytes to pass over before the next header
        self._checksum = False

    def at_boundary(self) -> bool:
        return self._state == "magic" and not self._skip and not self._head

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._need - len(self._head), end - pos)
            self._head += data[pos:pos + take]
            pos += take
            if len(self._head) == self._need:
                head = int.from_bytes(self._head, "little")
                self._head.clear()
                self._advance(head)

    def _expect(self, state: str, size: int) -> None:
        self._state, self._need = state, size

    def _advance(self, head: int) -> None:
        if self._state == "magic":
            if head == _ZSTD_MAGIC:
                self._expect("descriptor", 1)
            elif head & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._expect("skippable size", 4)
            else:
                raise _NotZstd(f"no zstd frame magic where a frame should start (found {head:08x})")
        elif self._state == "descriptor":
            single_segment = bool(head & 0x20)
            size_flag = head >> 6
            self._checksum = bool(head & 0x04)
            self._skip = (
                (0 if single_segment else 1)  # window descriptor
                + _DICT_ID_SIZES[head & 0x03]
                + (_CONTENT_SIZE_SIZES[size_flag] or (1 if single_segment else 0))
            )
            self._expect("block", 3)
        elif self._state == "block":
            block_type, size = (head >> 1) & 0x03, head >> 3
            self._skip = 1 if block_type == 1 else size  # an RLE block stores one byte
            if head & 0x01:  # last block of the frame
                self._skip += 4 if self._checksum else 0
                self._expect("magic", 4)
        else:  # skippable size
            self._skip = head
            self._expect("magic", 4)


class _WalkedSource:
    """The raw source as zstandard sees it, with every chunk shown to the frame walker first."""

    def __init__(self, raw: Source):
        self._raw = raw
        self.walker = _FrameWalker()
        self.received = 0
        self.exhausted = False

    def read(self, n: int) -> bytes:
        if self.exhausted:
            return b""
        chunk = self._raw.read(n)
        if not chunk:
            self.exhausted = True
            return b""
        self.received += len(chunk)
        self.walker.feed(chunk)
        return chunk


class ZstdReader:
    """Reads zstd frames back to back; read(n) decodes at most n bytes (memory: n plus the window).

    The window is capped by libzstd's default limit (128 MiB), well above the 8 MiB klauspost uses.
    """

    def __init__(self, raw: Source, name: str = ""):
        self._name = name
        self._source = _WalkedSource(raw)
        self._stream = _zstd.ZstdDecompressor().stream_reader(
            self._source, read_size=READ_SIZE, read_across_frames=True, closefd=False
        )

    def read(self, n: int) -> bytes:
        if n < 1:
            raise ValueError(f"read size must be positive, got {n}")
        try:
            out = self._stream.read(n)
        except (_zstd.ZstdError, _NotZstd) as e:
            raise corrupt(METHOD, self._name, "the data is not a valid zstd stream", e) from e
        if out:
            return out
        # b"" comes only once the source is exhausted (empty and skippable frames included)
        if not self._source.received:
            raise corrupt(METHOD, self._name, "the object is empty")
        if not self._source.walker.at_boundary():
            raise corrupt(METHOD, self._name, "the zstd stream stops before its end (truncated object)")
        return b""

    def close(self) -> None:
        self._stream.close()
