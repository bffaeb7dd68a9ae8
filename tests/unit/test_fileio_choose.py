"""walrus.fileio's one choice between io_uring and plain I/O, for reads and for restore writes."""
from __future__ import annotations

import pytest

from walrus._uring import probe
from walrus._uring import support as probe_module
from walrus._uring import writer as writer_module
from walrus._uring.writer import WriteRing
from walrus.errors import ConfigError
from walrus.fileio import PreadReader, choose, open_reader, open_sink
from walrus.fileio.pwrite import PwriteQueue

UNAVAILABLE = probe()
needs_uring = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"io_uring unavailable: {UNAVAILABLE}")
BUF = 64 << 10


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    monkeypatch.setattr(choose, "_told", set())  # as if no fallback had been logged yet


# --- reads (backup-push, wal-push)


def test_reader_preadv_mode_never_touches_io_uring(monkeypatch):
    monkeypatch.setattr(probe_module, "probe", lambda: pytest.fail("probed"))
    r = open_reader("preadv")
    assert isinstance(r, PreadReader)
    r.close()


@needs_uring
def test_reader_auto_and_forced_modes_pick_io_uring_when_it_works(log_lines):
    for mode in ("auto", "io_uring"):
        r = open_reader(mode)
        assert r.name == "io_uring"
        r.close()
    assert log_lines == []


def test_reader_auto_falls_back_to_preadv_with_one_line_per_process(monkeypatch, log_lines):
    monkeypatch.setattr(probe_module, "probe", lambda: "EPERM: kernel.io_uring_disabled=2")
    r = open_reader("auto")
    assert isinstance(r, PreadReader)
    r.close()
    assert log_lines == ["io_uring unavailable (EPERM: kernel.io_uring_disabled=2); using preadv"]


def test_reader_forced_io_uring_unavailable_is_a_config_error(monkeypatch):
    monkeypatch.setattr(probe_module, "probe", lambda: "ENOSYS: the kernel is built without io_uring")
    with pytest.raises(ConfigError) as caught:
        open_reader("io_uring")
    assert caught.value.detail == "ENOSYS: the kernel is built without io_uring"


def test_reader_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError):
        open_reader("mmap")


# --- writes (backup-fetch)


def test_sink_preadv_mode_never_touches_io_uring(monkeypatch):
    monkeypatch.setattr(writer_module, "probe", lambda: pytest.fail("probed"))
    s = open_sink("preadv", direct_threshold=1 << 20)
    assert s.name == "pwrite" and isinstance(s._queue, PwriteQueue) and s.direct_threshold == 1 << 20
    s.close()


@needs_uring
def test_sink_auto_and_forced_modes_pick_io_uring_when_it_works(log_lines):
    for mode in ("auto", "io_uring"):
        s = open_sink(mode, direct_threshold=1 << 20, buffer_size=BUF, buffers=2)
        assert s.name == "io_uring" and isinstance(s._queue, WriteRing) and s.direct_threshold == 1 << 20
        s.close()
    assert log_lines == []


def test_sink_auto_falls_back_to_pwrite_with_one_line_per_process(monkeypatch, log_lines):
    monkeypatch.setattr(writer_module, "probe", lambda: "EPERM: kernel.io_uring_disabled=2")
    for _ in range(3):
        s = open_sink("auto", direct_threshold=1 << 20)
        # the fallback keeps direct I/O and preallocation: only the queue under the sink changes
        assert s.name == "pwrite" and s.direct_threshold == 1 << 20
        s.close()
    assert log_lines == ["io_uring unavailable (EPERM: kernel.io_uring_disabled=2); using pwrite"]


def test_sink_forced_io_uring_unavailable_is_a_config_error(monkeypatch):
    monkeypatch.setattr(writer_module, "probe", lambda: "ENOSYS: the kernel is built without io_uring")
    with pytest.raises(ConfigError) as caught:
        open_sink("io_uring", direct_threshold=1 << 20)
    assert caught.value.detail == "ENOSYS: the kernel is built without io_uring"


def test_sink_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError):
        open_sink("mmap", direct_threshold=0)
