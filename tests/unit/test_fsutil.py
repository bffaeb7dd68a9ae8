"""walrus.fsutil: partial writes finished in order; resources shared with worker threads closed safely."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from walrus.fsutil import pwrite_all, writev_all


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


def test_pwrite_all_finishes_short_pwrites_at_the_right_offsets(tmp_path, monkeypatch):
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, bytes(memoryview(data)[:3]), offset))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"." * 12)
        assert pwrite_all(fd, b"abcdefgh", 2) == 8
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"..abcdefgh.."


def test_pwrite_all_raises_the_error_that_cut_a_write_short(tmp_path):
    """A real short write: the file-size limit lets the kernel write only part of the pages; the
    rest must fail loudly (EFBIG), not be dropped as a single pwrite's short count would be."""
    code = (
        "import errno, os, resource, signal, sys\n"
        "from walrus.fsutil import pwrite_all\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (12288, 12288))\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "assert os.pwrite(fd, b'x' * 8192, 8192) == 4096  # the kernel's short write\n"
        "try:\n"
        "    pwrite_all(fd, b'y' * 8192, 8192)\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "EFBIG"
    assert (tmp_path / "f").read_bytes()[8192:] == b"y" * 4096


def test_a_resource_released_during_a_call_is_closed_by_that_call_as_it_ends():
    import threading

    from walrus.fsutil import Released, WorkerResource

    closed: list[str] = []
    inside, go_on = threading.Event(), threading.Event()

    def slow() -> str:
        inside.set()
        go_on.wait(5)
        assert closed == []  # never closed under a running call
        return "done"

    owner = WorkerResource(lambda: closed.append("closed"))
    worker = threading.Thread(target=lambda: owner.call(slow))
    worker.start()
    inside.wait(5)
    owner.release()  # the loop gives up (a cancelled task): the call is still running
    assert closed == []
    go_on.set()
    worker.join(5)
    assert closed == ["closed"]
    with pytest.raises(Released):
        owner.call(slow)  # nothing touches a released resource
    owner.release()
    assert closed == ["closed"]  # closed once


def test_an_idle_resource_is_closed_at_release():
    from walrus.fsutil import WorkerResource

    closed: list[str] = []
    owner = WorkerResource(lambda: closed.append("closed"))
    assert owner.call(lambda x: x + 1, 1) == 2
    owner.release()
    assert closed == ["closed"]
