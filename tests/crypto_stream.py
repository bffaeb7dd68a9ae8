"""Shared by the crypter tests: sealing bytes as walrus stores them, and decrypting endless ciphertext."""
from __future__ import annotations

import os
import tracemalloc

from walrus import codec


def decrypt_endless(crypter, total_mib: int) -> tuple[int, int]:
    """Decrypt `total_mib` MiB that are encrypted only as the reader asks, so the whole ciphertext
    never exists at once; returns (plaintext bytes read, peak bytes traced while reading)."""
    block = os.urandom(1 << 20)

    class Endless:
        def __init__(self):
            self.writer, self.left, self.buf = crypter.new_encryptor(), total_mib, b""

        def read(self, n):
            while not self.buf and self.left >= 0:
                self.buf = self.writer.encrypt(block) if self.left else self.writer.finish()
                self.left -= 1
            out, self.buf = self.buf[:n], self.buf[n:]
            return out

    tracemalloc.start()
    try:
        reader = crypter.open_reader(Endless(), "x")
        seen = 0
        while chunk := reader.read(1 << 20):
            seen += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return seen, peak


def seal(method: str, crypter, *chunks: bytes) -> bytes:
    """`chunks` compressed by `method` and then encrypted by `crypter`, as the upload chain stores them."""
    compressor, encryptor = codec.new_compressor(method), crypter.new_encryptor()
    out = [encryptor.encrypt(c) for c in [*map(compressor.compress, chunks), compressor.finish()] if c]
    return b"".join(out) + encryptor.finish()
