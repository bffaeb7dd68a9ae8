"""io_uring's routine facts (fixed buffers refused under RLIMIT_MEMLOCK) are DEVEL lines, never NORMAL ones."""
from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from walrus._uring import probe
from walrus._uring import writer as writer_module
from walrus._uring.reader import UringReader
from walrus._uring.ring import Ring
from walrus._uring.writer import WriteRing
from walrus.fileio.slabsink import SlabSink
from walrus.fileio import BufferPool
from walrus.log import setup_logging

UNAVAILABLE = probe()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"io_uring unavailable: {UNAVAILABLE}")


@pytest.fixture
def memlock_refused(monkeypatch):
    """What an unprivileged user under a small RLIMIT_MEMLOCK gets from the kernel (root is exempt)."""
    def refuse(*_):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(Ring, "register_buffers", refuse)
    monkeypatch.setattr(writer_module, "_logged", set())
    yield
    setup_logging("normal")


def _refused_registrations() -> None:
    async def read_side():
        reader = UringReader(8, 1 << 20)
        try:
            assert not reader.register(BufferPool(4, 64 << 10))
        finally:
            reader.close()

    asyncio.run(read_side())
    sink = SlabSink(WriteRing(8), direct_threshold=8192, buffer_size=64 << 10, buffers=4)
    try:
        assert not sink.registered
    finally:
        sink.close()


@pytest.mark.parametrize("level, shown", [("normal", False), ("devel", True)])
def test_refused_fixed_buffers_are_told_only_at_devel(memlock_refused, capsys, level, shown):
    setup_logging(level)
    _refused_registrations()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "io_uring:" in line]
    if shown:
        assert len(lines) == 2 and all(line.startswith("DEBUG: ") for line in lines), err
        assert any("RLIMIT_MEMLOCK" in line for line in lines)
    else:
        assert lines == [], err
        assert logging.getLogger("walrus").getEffectiveLevel() == logging.INFO
