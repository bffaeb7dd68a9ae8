"""walrus.fsutil: writes that the kernel takes only in part are finished in order."""
from __future__ import annotations

import os

from walrus.fsutil import writev_all


def test_writev_all_finishes_a_short_writev_in_order(tmp_path, monkeypatch):
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, chunks: real(fd, [bytes(memoryview(chunks[0])[:3])]))
    chunks = [b"alpha", b"", bytearray(b"beta"), memoryview(b"gamma")]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert writev_all(fd, chunks) == 14
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"alphabetagamma"
