"""The pull protocol that every decoding stage reads through, and the size each stage asks for.

A download is a chain of pull readers: storage bytes, decrypted, decompressed, then a tar reader
or a file. Each stage calls read(n) on the one before; holding at most about n bytes per step is
what keeps a restore's memory flat whatever the object's size.
"""
from __future__ import annotations

from typing import Protocol

# Bytes one stage asks of the one before per step: big enough that per-call overhead is noise on
# multi-GiB restores, small enough to be a negligible share of the memory budget.
READ_SIZE = 1 << 20


class Source(Protocol):
    """read(n) returns 1..n bytes, b"" only at the end of the input."""

    def read(self, n: int, /) -> bytes: ...


class Payload(Protocol):
    """Bytes pulled into the caller's buffer: readinto fills up to len(view), 0 only at the end."""

    def readinto(self, view: memoryview, /) -> int: ...
