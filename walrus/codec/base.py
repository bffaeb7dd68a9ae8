"""What every codec shares: the Compressor/Reader protocols, the bounded pull-reader loop, error building."""
from __future__ import annotations

from typing import ClassVar, Protocol, Union

from walrus.errors import CorruptObject
from walrus.pull import READ_SIZE, Source

BytesLike = Union[bytes, bytearray, memoryview]

CORRUPT_HINT = (
    "the object may be truncated (an interrupted upload), damaged, or encrypted; check that the "
    "WALG_LIBSODIUM_KEY* / WALG_PGP_KEY* settings match the ones the object was written with"
)


class Compressor(Protocol):
    """One compressed object in the making; data passed to compress() is not referenced afterwards."""

    # True for a BlockCompressor: its chunks may be encoded on several cores at once
    independent_blocks: ClassVar[bool]

    def compress(self, data: BytesLike) -> bytes: ...

    def finish(self) -> bytes: ...


class BlockCompressor(Compressor, Protocol):
    """A format of independent blocks (lz4, zstd): start() is the object's head; encode(chunk) makes a
    chunk's blocks, on any thread in any order; digest(encoded) feeds each chunk's blocks, in input
    order, to the object's running checksum (a no-op where the format has none); finish() is the
    tail. compress(chunk) is encode then digest."""

    def start(self) -> bytes: ...

    def encode(self, data: BytesLike) -> bytes: ...

    def digest(self, encoded: BytesLike) -> None: ...


class Reader(Protocol):
    """Decompressed bytes, pulled: read(n) returns 1..n bytes, b"" only at the clean end of the stream."""

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


def corrupt(method: str, name: str, problem: str, cause: BaseException | None = None) -> CorruptObject:
    """The error for bytes that do not decode as `method` promises."""
    subject = repr(name) if name else "object"
    detail = f"compression method {method}"
    if cause is not None:
        detail += f": {cause}"
    return CorruptObject(f"cannot decompress {subject}: {problem}", detail=detail, hint=CORRUPT_HINT)


class ChunkedReader:
    """A decoder driven by a window over the last raw chunk, so each read(n) holds O(n + block) memory.

    Subclasses implement `_step`, which hands the decoder `window` (possibly empty, meaning "flush what
    you hold") and returns (output, bytes of window consumed); output may exceed n only by the
    decoder's own block granularity, the excess is handed out by later reads. A step that neither
    produces nor consumes while input is waiting must leave the decoder ready to consume on the next
    step. `_at_clean_end` tells whether the input may stop here (no frame left open).
    """

    method: ClassVar[str]
    errors: ClassVar[tuple[type[BaseException], ...]]
    # Most input handed to the decoder per step; bounds what a decoder copies of its unconsumed input.
    feed_limit: ClassVar[int] = READ_SIZE

    def __init__(self, raw: Source, name: str = ""):
        self._raw = raw
        self._name = name
        self._chunk = memoryview(b"")
        self._pos = 0
        self._spill = memoryview(b"")  # decoded bytes beyond what the last read asked for
        self._received = 0
        self._ended = False
        self._closed = False

    def _step(self, window: memoryview, n: int) -> tuple[bytes, int]:
        raise NotImplementedError

    def _at_clean_end(self) -> bool:
        raise NotImplementedError

    def _release(self) -> None:
        """Drop the decoder state (called by close)."""

    def read(self, n: int) -> bytes:
        if self._closed:
            raise ValueError("read from a closed decompressing reader")
        if n < 1:
            raise ValueError(f"read size must be positive, got {n}")
        if self._spill:
            out = bytes(self._spill[:n])
            self._spill = self._spill[n:]
            return out
        while not self._ended:
            window = self._chunk[self._pos:self._pos + self.feed_limit]
            try:
                out, used = self._step(window, n)
            except self.errors as e:
                raise self._corrupt(f"the data is not a valid {self.method} stream", e) from e
            self._pos += used
            if out:
                if len(out) <= n:
                    return out
                self._spill = memoryview(out)[n:]
                return out[:n]
            if used or window:
                continue
            self._refill()
        return b""

    def _refill(self) -> None:
        chunk = self._raw.read(READ_SIZE)
        if chunk:
            self._received += len(chunk)
            self._chunk = memoryview(chunk)
            self._pos = 0
            return
        if not self._received:
            raise self._corrupt("the object is empty")
        if not self._at_clean_end():
            raise self._corrupt(f"the {self.method} stream stops before its end (truncated object)")
        self._ended = True

    def _corrupt(self, problem: str, cause: BaseException | None = None) -> CorruptObject:
        return corrupt(self.method, self._name, problem, cause)

    def close(self) -> None:
        self._closed = True
        self._chunk = self._spill = memoryview(b"")
        self._release()
