"""wal-receive: stream WAL over a physical replication slot into wal_005/, each segment as wal-push stores it."""
from __future__ import annotations

import asyncio
import fcntl
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from walrus.config import Settings, parse_size
from walrus.errors import ConfigError, StorageError, WalrusError
from walrus.fsutil import pwrite_all
from walrus.log import log
from walrus.pg.replication import (EndOfTimeline, Keepalive, ReplicationConnection, ReplicationError,
                                   ReplicationInterrupted, WalStream, XLogData, replication_conninfo)
from walrus.pg.xlog import format_lsn, wal_file_name
from walrus.storage.base import Storage
from walrus.wal.push import WalPusher

# How it stays correct: the server is told WAL is flushed only up to the end of the last segment
# durable in storage, so the slot keeps everything not yet stored, and every start (a new process, or
# a reconnection) streams from the slot's restart_lsn rounded down to its segment's start. The spool
# directory only stages segments for wal-push's upload (never fsynced, never trusted): a new process
# empties it and streams again what it held. One exception to the flush rule, for a server shutting
# down: see _stream (an invalid flush position, which the slot ignores).

TIMEOUT = 30.0  # the longest the server may stay silent (WalStream pings it after half of that)
STATUS_INTERVAL = 10.0  # a status update at least this often (pg_receivewal's and WAL-G's 10 s)
READ_SLICE = 0.1  # read()'s wait: how soon a segment stored is confirmed, a stop is seen
READ_AHEAD = 1 << 20  # bytes of WAL read_wal() copies at once (at most to the segment's end)
# received WAL is reported (the write position) at most this long after it arrives, or once this much
# more has arrived: a burst after a checkpoint (full-page images) brings tens of MiB a second
WRITE_REPORT = 0.25
WRITE_REPORT_BYTES = 1 << 20
MAX_SPOOLED = 8  # completed segments waiting for storage; then the stream waits (the slot keeps the WAL)
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # seconds between reconnections (or storage retries), then 30 s
# A slot held by another connection is retried this long: after a kill or a network cut our old WAL
# sender may hold it until the server notices (wal_sender_timeout, 60 s by default). At start-up it is
# more likely a second receiver: a shorter wait, then the error.
BUSY_GRACE_START = 10.0
BUSY_GRACE_RECONNECT = 120.0
STOP_GRACE = 5.0  # how long a stop waits for the replication thread (it stops within READ_SLICE)

# ReplicationErrors no retry can cure: exit with the error (systemd's Restart= may try again later)
_FATAL = re.compile(r"may not open a replication connection|pg_hba\.conf|password authentication failed"
                    r"|authentication failed|role \".*\" does not exist|no longer has the WAL"
                    r"|replication slot .* does not exist|invalidated|logical replication slot"
                    r"|invalid replication slot name|cannot use a .* slot", re.S)
_BUSY = re.compile(r"in use by another connection")


def default_spool_dir() -> str:
    """~/.walrus/receive: local, the receiving user's own."""
    return os.path.join(os.path.expanduser("~"), ".walrus", "receive")


@dataclass(frozen=True)
class _Item:
    """A file the replication thread spooled, to be stored as wal-push would store it."""
    path: str
    end: int | None  # a complete segment: its end LSN, confirmed to the server once it is stored
    spooled: bool  # holds one of the MAX_SPOOLED places


class _Shared:
    """What the replication thread and the storing task share (plain values: the GIL keeps them whole)."""

    def __init__(self) -> None:
        self.stored = 0  # end of the last segment durable in storage: the flush position reported (0: none yet)
        self.places = threading.Semaphore(MAX_SPOOLED)


# --- the spool ---------------------------------------------------------------------------------------

class Spool:
    """A local directory per slot where segments are received before they are stored; locked, so two
    receivers never share one."""

    def __init__(self, path: str, lock_fd: int):
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, root: str, slot: str) -> Spool:
        path = os.path.join(os.path.abspath(root), slot)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise WalrusError(f"cannot use the spool directory {path}", detail=e.strerror,
                              hint="give wal-receive a local directory it may write (--spool-dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WalrusError(f"another wal-receive is using the spool directory {path}",
                              detail=f"slot {slot}: one receiver per slot",
                              hint="stop the other receiver, or give this one another slot (WALG_SLOTNAME) and "
                                   "--spool-dir") from None
        spool = cls(path, fd)
        spool.empty()
        return spool

    def empty(self) -> None:
        """Leftovers of an earlier run are not trusted (they were never fsynced): the slot still holds
        their WAL, which is streamed again."""
        left = [n for n in os.listdir(self.path) if n != ".lock"]
        for name in left:
            os.unlink(os.path.join(self.path, name))
        if left:
            log.info(f"removed {len(left)} file(s) an earlier wal-receive left in {self.path}; their WAL is "
                     "streamed again from the slot")

    def close(self) -> None:
        os.close(self._lock_fd)  # the lock goes with it


# --- the replication thread ----------------------------------------------------------------------------

def _classify(e: ReplicationError) -> str:
    text = f"{e.message}\n{e.detail or ''}"
    if _BUSY.search(text):
        return "busy"
    if _FATAL.search(text):
        return "fatal"
    return "retry"


def _parse_size(text: str) -> int:
    try:
        return parse_size(text)  # PostgreSQL's "16MB": its units are powers of 1024, as the settings'
    except ValueError:
        raise ReplicationError(f"cannot read the server's wal_segment_size {text!r}") from None


class _Receiver:
    """The replication connection, driven by one thread: connect, find where to start, stream,
    reconnect. Completed segments (and .partial and .history files) are handed to the storing task."""

    def __init__(self, settings: Settings, slot: str, spool: Spool, shared: _Shared, stop: threading.Event,
                 hand_over):
        self.settings = settings
        self.slot = slot
        self.spool = spool
        self.shared = shared
        self.stop = stop
        self.hand_over = hand_over  # (_Item) -> None, thread-safe
        self.size = settings.segment_size
        self.conninfo = replication_conninfo(settings, application_name=f"walrus wal-receive {slot}")
        self.streamed = False  # a stream has started in this process: the slot is ours to resume
        self.streaming_began = False  # ... on the present connection
        self.handed: tuple[int, int] | None = None  # (end, timeline) of the last complete segment handed over
        self.histories: set[int] = set()  # timelines whose history file this process has handed over

    def run(self) -> None:
        """Phases: connect; the start position; stream, timeline after timeline. A broken connection is
        retried with a bounded backoff, one log line per attempt, for as long as it takes."""
        failures = 0
        busy_since: float | None = None
        while not self.stop.is_set():
            try:
                with ReplicationConnection.open(self.conninfo, TIMEOUT, stop=self.stop) as conn:
                    self._session(conn)
            except ReplicationInterrupted:
                return
            except ReplicationError as e:
                kind = _classify(e)
                if kind == "fatal":
                    raise
                if kind == "busy":
                    busy_since = busy_since or time.monotonic()
                    grace = BUSY_GRACE_RECONNECT if self.streamed else BUSY_GRACE_START
                    if time.monotonic() - busy_since >= grace:
                        raise ReplicationError(f"replication slot {self.slot} is held by another connection",
                                               detail=f"{e.detail or e.message} (for {grace:g} s)",
                                               hint="another wal-receive (or a standby) streams from this slot: stop "
                                                    "it, or give this receiver its own WALG_SLOTNAME") from None
                else:
                    busy_since = None
                if self.streaming_began:
                    failures = 0  # the last connection worked: start the backoff again
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                failures += 1
                log.warning(f"wal-receive: {e.message}" + (f" ({e.detail.splitlines()[0]})" if e.detail else "")
                            + f"; connecting again in {delay:g} s (attempt {failures})")
                self.stop.wait(delay)
        raise ReplicationInterrupted("replication interrupted")

    def _session(self, conn: ReplicationConnection) -> None:
        self.streaming_began = False
        identity = conn.identify_system()
        server_size = _parse_size(conn.show("wal_segment_size"))
        if server_size != self.size:
            raise ConfigError("WAL segment size mismatch",
                              detail=f"the server uses {server_size >> 20} MiB segments, WALG_PG_WAL_SIZE is "
                                     f"{self.settings.pg_wal_size}",
                              hint=f"set WALG_PG_WAL_SIZE={server_size >> 20}")
        start, timeline = self._start_position(conn, identity.xlogpos, identity.timeline)
        if identity.timeline > 1 and identity.timeline not in self.histories:
            self._spool_history(conn, identity.timeline)  # as WAL-G: the server's timeline's history, at start
        while True:
            stream = conn.start_replication(self.slot, start, timeline)
            self.streamed = self.streaming_began = True
            log.info(f"wal-receive: streaming from {format_lsn(start)} on timeline {timeline} (slot {self.slot})")
            ended = self._stream(stream, start, timeline)
            if ended.next_timeline not in self.histories:
                self._spool_history(conn, ended.next_timeline)
            start = ended.next_start - ended.next_start % self.size
            timeline = ended.next_timeline

    def _start_position(self, conn: ReplicationConnection, xlogpos: int, server_timeline: int) -> tuple[int, int]:
        """The slot's restart_lsn rounded down to its segment's start (the slot is created, reserving WAL,
        if missing); or, in this process, past segments already handed over (they are being stored)."""
        info = conn.read_replication_slot(self.slot)
        if info is None:
            if self.streamed:  # ours, and gone: WAL it held may be lost, which no restart cures
                raise ReplicationError(f"replication slot {self.slot} was dropped while wal-receive used it",
                                       hint="WAL may be missing from the archive from here: take a new base "
                                            "backup once wal-receive runs again (it creates the slot)")
            log.info(f"wal-receive: creating the physical replication slot {self.slot} (reserving WAL)")
            conn.create_physical_slot(self.slot, reserve_wal=True)
            info = conn.read_replication_slot(self.slot)
        if info is None or info.slot_type != "physical":
            raise ReplicationError(f"replication slot {self.slot} is not a physical slot",
                                   detail=f"its type is {info.slot_type if info else 'unknown'}",
                                   hint="give wal-receive a physical slot (WALG_SLOTNAME)")
        if info.restart_lsn is None:
            # created elsewhere without RESERVE_WAL and never used, or invalidated (max_slot_wal_keep_size)
            log.warning(f"wal-receive: slot {self.slot} holds no WAL; streaming from the server's position "
                        f"{format_lsn(xlogpos)}: the archive may miss WAL before it")
            lsn, timeline = xlogpos, server_timeline
        else:
            lsn, timeline = info.restart_lsn, info.restart_timeline or server_timeline
        start = lsn - lsn % self.size
        if self.handed is not None and self.handed[0] > start:
            start, timeline = self.handed
        return start, timeline

    def _stream(self, stream: WalStream, start: int, timeline: int) -> EndOfTimeline:
        """Receive into the spool, segment after segment, until the timeline ends (or an error). Status
        updates: written = received, flushed = applied = stored."""
        shared = self.shared
        segno = start // self.size
        writer = self._open_segment(timeline, segno)
        position = start
        reported = -1  # the flush position last sent
        sent_position = -1  # the write position last sent
        last_status = 0.0
        scratch = memoryview(bytearray(READ_AHEAD))

        def write(data: memoryview) -> None:
            nonlocal position, segno, writer
            while data:
                seg_end = (segno + 1) * self.size
                chunk = data[:seg_end - position]
                pwrite_all(writer, chunk, position - segno * self.size)
                position += len(chunk)
                data = data[len(chunk):]
                if position == seg_end:
                    os.close(writer)
                    writer = -1
                    self._wait_for_place(stream, position)
                    name = wal_file_name(timeline, segno, self.size)
                    os.rename(self._receiving(name), os.path.join(self.spool.path, name))
                    self.hand_over(_Item(os.path.join(self.spool.path, name), seg_end, True))
                    self.handed = (seg_end, timeline)
                    segno += 1
                    writer = self._open_segment(timeline, segno)

        try:
            while True:
                # what has arrived, many messages at a time; read() waits for (and pings) the rest
                n = stream.read_wal(scratch[:min(READ_AHEAD, (segno + 1) * self.size - position)], position)
                event = None if n else stream.read(READ_SLICE)
                reply = caught_up = False
                if n:
                    if self.stop.is_set():  # a stream that never waits still stops promptly
                        raise ReplicationInterrupted("replication interrupted")
                    write(scratch[:n])
                elif isinstance(event, XLogData):
                    if event.start != position:
                        raise ReplicationError("the server sent WAL out of order",
                                               detail=f"expected {format_lsn(position)}, got {format_lsn(event.start)}")
                    write(event.data)
                elif isinstance(event, Keepalive) and event.reply_requested:
                    reply = True
                    # Caught up with the server: it may be shutting down, and a WAL sender exits only once
                    # the receiver has everything it sent, which it reads from the flush position, or from
                    # the write position when flush is invalid (0). The answer then says 0: the slot ignores
                    # an invalid flush (it keeps the WAL not stored), and the server can stop.
                    caught_up = event.server_end <= position
                elif isinstance(event, EndOfTimeline):
                    os.close(writer)
                    writer = -1
                    self._spool_partial(timeline, segno, position)
                    return event
                now = time.monotonic()
                if reply and caught_up:
                    stream.send_status(position, 0, 0)
                    last_status = now
                elif (reply or shared.stored != reported or now - last_status >= STATUS_INTERVAL
                      or (position != sent_position and now - last_status >= WRITE_REPORT)
                      or position - sent_position >= WRITE_REPORT_BYTES):
                    # the write position too, so the server's view of what the archive has received
                    # (pg_stat_replication's write_lsn) trails it by at most WRITE_REPORT
                    reported, sent_position = shared.stored, position
                    stream.send_status(position, reported, reported)
                    last_status = now
        finally:
            if writer >= 0:
                os.close(writer)

    def _wait_for_place(self, stream: WalStream, position: int) -> None:
        """Backpressure: MAX_SPOOLED segments already wait for storage. Status updates go on meanwhile,
        so the server does not time the stream out (it waits, and the slot keeps the WAL)."""
        last = time.monotonic()
        while not self.shared.places.acquire(timeout=READ_SLICE):
            if self.stop.is_set():
                raise ReplicationInterrupted("replication interrupted")
            if time.monotonic() - last >= STATUS_INTERVAL:
                stream.send_status(position, self.shared.stored, self.shared.stored)
                last = time.monotonic()

    def _receiving(self, name: str) -> str:
        return os.path.join(self.spool.path, name + ".receiving")

    def _open_segment(self, timeline: int, segno: int) -> int:
        path = self._receiving(wal_file_name(timeline, segno, self.size))
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def _spool_partial(self, timeline: int, segno: int, position: int) -> None:
        """The end of a timeline: its last segment, up to the switch, zero-filled to a whole segment as
        PostgreSQL's own .partial files are, stored as <segment>.partial."""
        name = wal_file_name(timeline, segno, self.size)
        receiving = self._receiving(name)
        if position == segno * self.size:  # the timeline ended at a segment boundary: nothing partial
            os.unlink(receiving)
            return
        os.truncate(receiving, self.size)
        partial = os.path.join(self.spool.path, name + ".partial")
        os.rename(receiving, partial)
        log.info(f"wal-receive: timeline {timeline} ended at {format_lsn(position)}: storing {name}.partial")
        self.hand_over(_Item(partial, None, False))

    def _spool_history(self, conn: ReplicationConnection, timeline: int) -> None:
        """The timeline's history file (TIMELINE_HISTORY), stored as wal-push stores a .history file."""
        name, content = conn.timeline_history(timeline)
        path = os.path.join(self.spool.path, os.path.basename(name))
        with open(path, "wb") as f:
            f.write(content)
        self.histories.add(timeline)
        self.hand_over(_Item(path, None, False))


# --- storing -------------------------------------------------------------------------------------------

async def _store(settings: Settings, storage: Storage, queue: asyncio.Queue, shared: _Shared) -> None:
    """Store each spooled file in order, as wal-push does (compression, encryption, never overwriting
    different bytes); a segment's end becomes the flush position the thread reports. Storage failures
    are retried with the backoff, one log line each; anything else ends wal-receive."""
    pusher = WalPusher(settings, slots=1, register=False)
    try:
        while True:
            item: _Item = await queue.get()
            failures = 0
            while True:
                try:
                    await pusher.push(storage, item.path)
                    break
                except StorageError as e:
                    delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                    failures += 1
                    log.warning(f"wal-receive: storing {os.path.basename(item.path)} failed: {e.message}"
                                + (f" ({e.detail})" if e.detail else "")
                                + f"; trying again in {delay:g} s (attempt {failures})")
                    await asyncio.sleep(delay)
            if item.end is not None:
                shared.stored = max(shared.stored, item.end)
            os.unlink(item.path)
            if item.spooled:
                shared.places.release()
    finally:
        pusher.close()


# --- the engine ------------------------------------------------------------------------------------------

async def wal_receive(settings: Settings, storage: Storage, spool_dir: str) -> None:
    """Stream WAL from slot WALG_SLOTNAME into the archive until stopped (SIGTERM cancels this task: the
    replication thread is interrupted, an upload in progress publishes nothing) or a fatal error."""
    slot = settings.slot_name
    spool = Spool.open(spool_dir, slot)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    shared = _Shared()
    stop = threading.Event()

    def hand_over(item: _Item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closing: stopping anyway
            raise ReplicationInterrupted("replication interrupted") from None

    receiver = _Receiver(settings, slot, spool, shared, stop, hand_over)
    thread = ThreadPoolExecutor(1, thread_name_prefix="walrus-receive")
    receiving = loop.run_in_executor(thread, receiver.run)
    storing = asyncio.create_task(_store(settings, storage, queue, shared))
    try:
        done, _ = await asyncio.wait({receiving, storing}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # either ends only by an error
        raise WalrusError("wal-receive ended unexpectedly")
    finally:
        stop.set()  # the replication thread stops within READ_SLICE, its connection closed
        storing.cancel()
        await asyncio.gather(storing, return_exceptions=True)
        await asyncio.wait({receiving}, timeout=STOP_GRACE)
        if receiving.done() and not receiving.cancelled():
            receiving.exception()  # retrieved: its ReplicationInterrupted is not the error to report
        thread.shutdown(wait=False)
        spool.close()
