"""walrus.wal.receive without a server: segments cut at their boundaries, a timeline's end stored as a
zero-filled .partial, what each status update reports, where streaming starts, which errors are fatal."""
from __future__ import annotations

import os
import threading

import pytest

from walrus.config import load_settings
from walrus.errors import WalrusError
from walrus.pg.replication import EndOfTimeline, Keepalive, ReplicationError, SlotInfo, XLogData
from walrus.wal.receive import Spool, _classify, _Receiver, _Shared

MIB = 1 << 20


class FakeStream:
    def __init__(self, events):
        self.events = list(events)
        self.statuses: list[tuple[int, int, int]] = []

    def read(self, timeout=None):
        return self.events.pop(0) if self.events else None

    def read_wal(self, view, position):
        """As WalStream's: the XLogData already here that continues `position`, as much as fits."""
        got = 0
        while got < len(view) and self.events and isinstance(ev := self.events[0], XLogData) \
                and ev.start == position + got:
            k = min(len(view) - got, len(ev.data))
            view[got:got + k] = ev.data[:k]
            got += k
            if k == len(ev.data):
                self.events.pop(0)
            else:
                self.events[0] = XLogData(ev.start + k, ev.server_end, ev.send_time, ev.data[k:])
        return got

    def send_status(self, write, flush, apply, reply=False):
        self.statuses.append((write, flush, apply))


class FakeConn:
    def __init__(self, slot: SlotInfo | None):
        self.slot = slot
        self.created = []

    def read_replication_slot(self, name):
        return self.slot

    def create_physical_slot(self, name, reserve_wal=True):
        self.created.append((name, reserve_wal))
        self.slot = SlotInfo("physical", 0x2345678, 1)


@pytest.fixture
def receiver(tmp_path):
    settings = load_settings(env={"WALG_FILE_PREFIX": str(tmp_path / "storage"), "WALG_PG_WAL_SIZE": "1"})
    spool = Spool.open(str(tmp_path / "spool"), "walg")
    items = []
    r = _Receiver(settings, "walg", spool, _Shared(), threading.Event(), items.append)
    r.items = items
    yield r
    spool.close()


def _xlog(start: int, data: bytes, end: int = 0) -> XLogData:
    return XLogData(start, end or start + len(data), 0, memoryview(data))


def test_segments_and_the_partial_at_a_timeline_end(receiver):
    start = 16 * MIB
    wal = os.urandom(MIB + MIB // 2)
    chunks = [wal[i:i + 300_000] for i in range(0, len(wal), 300_000)]  # chunks straddle the boundary
    events, at = [], start
    for chunk in chunks:
        events.append(_xlog(at, chunk))
        at += len(chunk)
    events.append(EndOfTimeline(2, at))
    stream = FakeStream(events)
    ended = receiver._stream(stream, start, 1)
    assert ended == EndOfTimeline(2, start + len(wal))
    segment, partial = receiver.items
    assert os.path.basename(segment.path) == "000000010000000000000010" and segment.end == start + MIB
    with open(segment.path, "rb") as f:
        assert f.read() == wal[:MIB]
    assert os.path.basename(partial.path) == "000000010000000000000011.partial" and partial.end is None
    with open(partial.path, "rb") as f:
        assert f.read() == wal[MIB:] + bytes(MIB // 2)  # zero-filled to a whole segment, as PostgreSQL's
    assert receiver.handed == (start + MIB, 1)
    assert sorted(os.listdir(receiver.spool.path)) == [".lock", "000000010000000000000010",
                                                      "000000010000000000000011.partial"]


def test_a_timeline_ending_on_a_boundary_leaves_no_partial(receiver):
    start = 16 * MIB
    stream = FakeStream([_xlog(start, bytes(MIB)), EndOfTimeline(2, start + MIB)])
    receiver._stream(stream, start, 1)
    assert [os.path.basename(i.path) for i in receiver.items] == ["000000010000000000000010"]
    assert sorted(os.listdir(receiver.spool.path)) == [".lock", "000000010000000000000010"]


def test_status_reports_flush_only_for_what_is_stored(receiver):
    start = 16 * MIB
    receiver.shared.stored = start
    stream = FakeStream([_xlog(start, bytes(1000), end=start + 5000), Keepalive(start + 5000, 0, True),
                         _xlog(start + 1000, bytes(4000)), Keepalive(start + 5000, 0, True),
                         EndOfTimeline(2, start + 5000)])
    receiver._stream(stream, start, 1)
    # the first status (nothing reported yet): written = received, flushed = applied = stored
    assert stream.statuses[0] == (start + 1000, start, start)
    # a reply asked for while behind the server: the stored position
    assert stream.statuses[1] == (start + 1000, start, start)
    # caught up: flush 0 (invalid), so a server shutting down sees everything written; the slot ignores it
    assert stream.statuses[-1] == (start + 5000, 0, 0)


def test_status_reports_the_write_position_as_wal_arrives(receiver, monkeypatch):
    """Each MiB received is reported at once (a burst), less than that once WRITE_REPORT has passed,
    so pg_stat_replication's write_lsn trails what arrived; flush stays the stored position."""
    from walrus.wal import receive

    clock = [1000.0]
    monkeypatch.setattr(receive.time, "monotonic", lambda: clock[0])
    start = 16 * MIB
    receiver.shared.stored = start
    piece = 256 * 1024
    at, events = start, []
    for size, pause in [(piece, 0.01)] * 5 + [(1000, 0.01), (1000, receive.WRITE_REPORT)]:
        events.append((pause, _xlog(at, bytes(size))))
        at += size
    events.append((0.01, EndOfTimeline(2, at)))
    stream = FakeStream([])

    def read(timeout=None):
        pause, event = events.pop(0)
        clock[0] += pause
        return event

    stream.read = read
    receiver._stream(stream, start, 1)
    assert stream.statuses == [
        (start + piece, start, start),  # the first message: nothing reported yet
        (start + 5 * piece, start, start),  # 1 MiB more within 40 ms: reported at once
        (start + 5 * piece + 2000, start, start),  # 1000 bytes, then WRITE_REPORT later: reported
    ]


def test_out_of_order_wal_is_an_error(receiver):
    with pytest.raises(ReplicationError, match="out of order"):
        receiver._stream(FakeStream([_xlog(16 * MIB + 8, b"x")]), 16 * MIB, 1)


def test_start_position(receiver):
    conn = FakeConn(None)
    # no slot: created reserving WAL, and streamed from its restart_lsn's segment start
    assert receiver._start_position(conn, 0x9000000, 3) == (0x2300000, 1)
    assert conn.created == [("walg", True)]
    # a slot without WAL reserved: the server's position (with a warning)
    assert receiver._start_position(FakeConn(SlotInfo("physical", None, None)), 0x9000010, 3) == (0x9000000, 3)
    # segments already handed over in this process are not streamed again
    receiver.handed = (0x2400000, 1)
    assert receiver._start_position(FakeConn(SlotInfo("physical", 0x2345678, 1)), 0, 1) == (0x2400000, 1)
    with pytest.raises(ReplicationError, match="not a physical slot"):
        receiver._start_position(FakeConn(SlotInfo("logical", 1, 1)), 0, 1)
    # the slot vanished after streaming began: WAL may be lost, no restart cures it
    receiver.streamed = True
    with pytest.raises(ReplicationError, match="was dropped"):
        receiver._start_position(FakeConn(None), 0, 1)


@pytest.mark.parametrize("message, detail, kind", [
    ("could not open a replication connection: the role may not open a replication connection", None, "fatal"),
    ("could not open a replication connection: pg_hba.conf does not allow this replication connection", None, "fatal"),
    ("could not open a replication connection: failed", "FATAL:  password authentication failed for user", "fatal"),
    ("START_REPLICATION: the replication slot is in use by another connection", "active for PID 7", "busy"),
    ("START_REPLICATION: the server closed the replication connection", None, "retry"),
    ("could not open a replication connection: No such file or directory", None, "retry"),
    ("START_REPLICATION: the server ended the stream unexpectedly", "COMMAND_OK", "retry"),
])
def test_which_errors_are_fatal(message, detail, kind):
    assert _classify(ReplicationError(message, detail=detail)) == kind


def test_spool_is_locked_and_emptied(tmp_path):
    first = Spool.open(str(tmp_path), "walg")
    try:
        with open(os.path.join(first.path, "000000010000000000000001.receiving"), "wb") as f:
            f.write(b"left over")
        with pytest.raises(WalrusError, match="another wal-receive is using the spool directory"):
            Spool.open(str(tmp_path), "walg")
    finally:
        first.close()
    again = Spool.open(str(tmp_path), "walg")  # the lock went with the first; leftovers are not trusted
    try:
        assert os.listdir(again.path) == [".lock"]
    finally:
        again.close()


def test_segment_size_as_show_prints_it():
    from walrus.wal.receive import _parse_size

    assert [_parse_size(t) for t in ("1MB", "16MB", "1GB")] == [MIB, 16 * MIB, 1024 * MIB]
    with pytest.raises(ReplicationError):
        _parse_size("sixteen")
