"""lzo (read only): lzop files, as WAL-E stored WAL and base backups (`.lzo`); WAL-G reads them when built with lzo.

An lzop file is a header and a sequence of blocks, each at most 256 KiB of output as lzop writes them,
LZO1X-compressed (or stored) with optional Adler-32/CRC-32 checksums, ended by a zero length. The
container is parsed here; each block is decoded by lzallright (LZO1X in Rust, GIL released), so a
read holds one block in and one out.
"""
from __future__ import annotations

import struct
import zlib

from walrus.codec.base import corrupt
from walrus.errors import WalrusError
from walrus.pull import READ_SIZE, Source


MAGIC = b"\x89LZO\x00\r\n\x1a\n"
F_ADLER32_D, F_ADLER32_C = 0x0001, 0x0002
F_H_EXTRA_FIELD = 0x0040
F_CRC32_D, F_CRC32_C = 0x0100, 0x0200
F_H_FILTER = 0x0800
F_H_CRC32 = 0x1000
LZO1X_METHODS = (1, 2, 3)  # LZO1X-1, LZO1X-1(15), LZO1X-999: one decoder
MAX_BLOCK = 64 << 20  # lzop's own limit on a block's size
NEWEST_FORMAT = 0x1040  # the newest "version needed to extract" lzop 1.04 knows


class LzoReader:
    """Decompressed bytes of one lzop file: read(n) returns 1..n bytes, b"" after the end-of-stream marker."""

    method = "lzo"

    def __init__(self, raw: Source, name: str = ""):
        try:
            import lzallright
        except ImportError as e:
            raise WalrusError(f"cannot read {name!r}: reading lzo objects needs the lzallright package",
                              detail=str(e), hint="pip install lzallright") from None
        self._lzo = lzallright
        self._raw = raw
        self._name = name
        self._in = bytearray()
        self._received = 0
        self._eof = False
        self._flags: int | None = None  # None until the header is read
        self._ended = False
        self._spill = memoryview(b"")

    def _take(self, n: int) -> bytes:
        while len(self._in) < n and not self._eof:
            block = self._raw.read(READ_SIZE)
            self._in += block
            self._received += len(block)
            self._eof = not block
        if len(self._in) < n:
            if not self._received:
                raise self._corrupt("the object is empty")
            raise self._corrupt("the lzop stream stops before its end (truncated object)")
        out = bytes(self._in[:n])
        del self._in[:n]
        return out

    def _u32(self) -> int:
        return struct.unpack(">I", self._take(4))[0]

    def _corrupt(self, problem: str, cause: BaseException | None = None):
        return corrupt(self.method, self._name, problem, cause)

    def _read_header(self) -> int:
        if self._take(len(MAGIC)) != MAGIC:
            raise self._corrupt("the data is not an lzop file (bad magic)")
        fields = bytearray()

        def take(n: int) -> bytes:
            data = self._take(n)
            fields.extend(data)
            return data

        version = struct.unpack(">H", take(2))[0]
        take(2)  # library version
        if version >= 0x0940 and struct.unpack(">H", take(2))[0] > NEWEST_FORMAT:
            raise self._corrupt("the lzop file needs a newer lzop to extract")
        method = take(1)[0]
        if version >= 0x0940:
            take(1)  # level
        flags = struct.unpack(">I", take(4))[0]
        if flags & F_H_FILTER:
            raise self._corrupt("lzop filters are not supported")
        if method not in LZO1X_METHODS:
            raise self._corrupt(f"lzop method {method} is not supported (only LZO1X)")
        take(4)  # mode
        take(8 if version >= 0x0940 else 4)  # mtime (low, then high from 0.94 on)
        take(take(1)[0])  # file name
        expected = self._u32()
        actual = zlib.crc32(fields) if flags & F_H_CRC32 else zlib.adler32(fields)
        if expected != actual:
            raise self._corrupt("the lzop header checksum does not match")
        if flags & F_H_EXTRA_FIELD:
            self._take(self._u32() + 4)  # extra field and its checksum
        return flags

    def _next_block(self, flags: int) -> bytes:
        out_len = self._u32()
        if out_len == 0:
            self._ended = True
            return b""
        in_len = self._u32()
        if out_len > MAX_BLOCK or in_len > out_len:
            raise self._corrupt(f"an lzop block claims {in_len} -> {out_len} bytes")
        out_sums = [(self._u32(), check) for bit, check in ((F_ADLER32_D, zlib.adler32), (F_CRC32_D, zlib.crc32))
                    if flags & bit]
        in_sums = [(self._u32(), check) for bit, check in ((F_ADLER32_C, zlib.adler32), (F_CRC32_C, zlib.crc32))
                   if in_len < out_len and flags & bit]
        data = self._take(in_len)
        for expected, check in in_sums:
            if check(data) != expected:
                raise self._corrupt("an lzop block's compressed checksum does not match")
        if in_len < out_len:
            try:
                data = self._lzo.LZOCompressor.decompress(data, output_size_hint=out_len)
            except self._lzo.LZOError as e:
                raise self._corrupt("an lzop block is not valid LZO1X data", e) from None
            if len(data) != out_len:
                raise self._corrupt(f"an lzop block decodes to {len(data)} bytes, not {out_len}")
        for expected, check in out_sums:
            if check(data) != expected:
                raise self._corrupt("an lzop block's checksum does not match")
        return data

    def read(self, n: int) -> bytes:
        if n < 1:
            raise ValueError(f"read size must be positive, got {n}")
        while not self._spill:
            if self._ended:
                return b""
            if self._flags is None:
                self._flags = self._read_header()
            self._spill = memoryview(self._next_block(self._flags))
        out = bytes(self._spill[:n])
        self._spill = self._spill[n:]
        return out

    def close(self) -> None:
        self._in = bytearray()
        self._spill = memoryview(b"")
        self._ended = True
