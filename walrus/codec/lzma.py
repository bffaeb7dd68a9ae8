"""lzma: classic LZMA-alone (.lzma) streams, as WAL-G's ulikunitz/xz/lzma writer produces; not .xz."""
from __future__ import annotations

import lzma as _lzma
from typing import ClassVar

from walrus.codec.base import BytesLike, ChunkedReader
from walrus.pull import Source


# The header names the dictionary size and liblzma allocates it up front; cap it where zstd's window
# is capped (128 MiB). WAL-G writes 8 MiB dictionaries, `lzma -9` uses 64 MiB.
_MEMLIMIT = (128 << 20) + (1 << 20)  # the dictionary plus liblzma's own state


class LzmaCompressor:
    """Header 5D 00 00 80 00 FF*8: lc=3 lp=0 pb=2, 8 MiB dictionary, unknown size, end marker.

    Preset 6 is what gives liblzma's alone encoder ulikunitz's defaults byte for byte in the header.
    """

    independent_blocks = False

    def __init__(self) -> None:
        self._stream = _lzma.LZMACompressor(format=_lzma.FORMAT_ALONE, preset=6)

    def compress(self, data: BytesLike) -> bytes:
        return self._stream.compress(data)

    def finish(self) -> bytes:
        return self._stream.flush()


class LzmaReader(ChunkedReader):
    """Reads one LZMA-alone stream: unknown size with end marker, or known size with or without one.

    The lzma module keeps a step's unconsumed input itself (copied once), so input is only handed
    over when the decoder asks for more.
    """

    method: ClassVar[str] = "lzma"
    errors: ClassVar[tuple[type[BaseException], ...]] = (_lzma.LZMAError,)

    def __init__(self, raw: Source, name: str = ""):
        super().__init__(raw, name)
        self._decoder = _lzma.LZMADecompressor(format=_lzma.FORMAT_ALONE, memlimit=_MEMLIMIT)

    def _step(self, window: memoryview, n: int) -> tuple[bytes, int]:
        decoder = self._decoder
        if decoder.eof:
            if window or decoder.unused_data:  # the decoder may hold the extra bytes already
                raise self._corrupt("unexpected bytes after the end of the lzma stream")
            return b"", 0
        if not decoder.needs_input:
            return decoder.decompress(b"", n), 0
        out = decoder.decompress(window, n)
        return out, len(window) - len(decoder.unused_data)

    def _at_clean_end(self) -> bool:
        return self._decoder.eof

    def _release(self) -> None:
        self._decoder = None
