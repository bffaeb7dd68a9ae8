"""walrus.fsutil: partial writes finished in order; resources shared with worker threads closed safely."""
from __future__ import annotations

import os

import pytest

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
