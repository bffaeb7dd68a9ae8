"""PostgreSQL's physical replication protocol over nonblocking libpq: BASE_BACKUP, START_REPLICATION, slots."""
from __future__ import annotations

import re
import select
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Union

from psycopg import OperationalError, pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from walrus.config import Settings
from walrus.errors import WalrusError
from walrus.log import log
from walrus.pg import copyfill
from walrus.pg.client import conninfo_kwargs
from walrus.pg.copyfill import CopyReader
from walrus.pg.xlog import format_lsn, parse_lsn

# Every libpq call here is nonblocking: a blocking one holds the GIL for its whole duration. Waits
# are select() slices this long, so interrupt() (another thread) and SIGINT (this one) stop any of
# them within a slice, and each wait is bounded by the connection's timeout.
_SLICE = 0.2
_PG_EPOCH = 946_684_800  # 2000-01-01 00:00:00 UTC in Unix time: the protocol's clock origin
_SLOT_NAME_RE = re.compile(r"[a-z0-9_]{1,63}")  # PostgreSQL's own rule; names are sent unquoted
_SETTING_NAME_RE = re.compile(r"[a-z_][a-z0-9_.]{0,62}")  # sent unquoted too
_XLOG_DATA = struct.Struct(">QQq")  # after 'w': WAL start, server WAL end, send time
_KEEPALIVE = struct.Struct(">QqB")  # after 'k': server WAL end, send time, reply requested
_STATUS = struct.Struct(">cQQQqB")  # 'r', written, flushed, applied, client time, reply requested

# (pattern in the server's or libpq's message, lost connection?, message, hint): first match wins
_KNOWN: list[tuple[re.Pattern[str], bool, str, str]] = [(re.compile(p), lost, m, h) for p, lost, m, h in [
    (r"must be superuser or replication role|permission denied to start WAL sender", False,
     "the role may not open a replication connection",
     "grant it: ALTER ROLE <user> REPLICATION (or connect as a superuser)"),
    (r"exceeds max_wal_senders", False, "the server has no free WAL sender",
     "raise max_wal_senders (a restart), or end other replication connections (pg_stat_replication)"),
    (r"no pg_hba\.conf entry for replication connection|pg_hba\.conf rejects replication connection", False,
     "pg_hba.conf does not allow this replication connection",
     "add a line for it whose database column is 'replication' (the keyword 'all' does not match it), "
     "then reload the server"),
    (r"replication slot \".*\" is active for PID", False, "the replication slot is in use by another connection",
     "stop the other receiver (pg_stat_replication shows it), or use another slot"),
    (r"replication slot \".*\" does not exist", False, "the replication slot does not exist",
     "create it first (CREATE_REPLICATION_SLOT, or pg_create_physical_replication_slot())"),
    (r"requested WAL segment .* has already been removed", False, "the server no longer has the WAL asked for",
     "stream from a replication slot, which keeps WAL until it is confirmed"),
    (r"server closed the connection|terminating connection|connection is lost|could not receive data"
     r"|connection to server was lost|no connection to the server|EOF detected", True,
     "the server closed the replication connection",
     "the server was stopped or restarted, or the backend terminated (see the server's log); "
     "run the command again once the server is up"),
]]


class ReplicationError(WalrusError):
    """The server refused a replication command or connection, or the stream broke."""

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None,
                 sqlstate: str | None = None):
        super().__init__(message, detail=detail, hint=hint)
        self.sqlstate = sqlstate


class ConnectionLost(ReplicationError):
    """The connection ended under a command or a stream (server stopped, backend terminated, network)."""


class ReplicationTimeout(ReplicationError):
    """The server sent nothing for the connection's timeout."""


class ReplicationInterrupted(ReplicationError):
    """interrupt() was called: the work in progress was abandoned; close the connection."""


def _error(what: str, text: str, sqlstate: str | None = None) -> ReplicationError:
    """A clear error for a server's or libpq's message: known causes get a message and a hint."""
    text = text.strip()
    for pattern, lost, message, hint in _KNOWN:
        if pattern.search(text):
            cls = ConnectionLost if lost else ReplicationError
            return cls(f"{what}: {message}", detail=text, hint=hint, sqlstate=sqlstate)
    # the server's own line ("ERROR:  ...", after libpq's "connection to server ... failed: ") is the message
    primary = re.split(r"(?:ERROR|FATAL|PANIC):  |failed: ", text.splitlines()[0] if text else "")[-1]
    return ReplicationError(f"{what}: {primary or 'failed'}", detail=text or None, sqlstate=sqlstate)


def replication_conninfo(settings: Settings, application_name: str = "walrus") -> str:
    """The libpq connection string of a physical replication connection, from the same settings as the
    SQL session (libpq reads the rest, PGSSLMODE..., from the environment)."""
    return make_conninfo("", **conninfo_kwargs(settings), replication="true", application_name=application_name)


# --- what the server sends ------------------------------------------------------------------------

@dataclass(frozen=True)
class SystemIdentity:
    system_id: int
    timeline: int
    xlogpos: int
    dbname: str | None


@dataclass(frozen=True)
class SlotInfo:
    slot_type: str  # "physical" or "logical"
    restart_lsn: int | None  # None: the slot reserves no WAL yet
    restart_timeline: int | None


@dataclass(frozen=True)
class Tablespace:
    oid: int | None  # None: the data directory itself
    location: str | None  # None for the data directory
    size_kb: int | None  # an estimate, only with progress=True


@dataclass(frozen=True)
class BackupStarted:
    lsn: int
    timeline: int


@dataclass(frozen=True)
class Tablespaces:
    tablespaces: list[Tablespace]


@dataclass(frozen=True)
class ArchiveStarted:
    name: str  # "base.tar", or "<oid>.tar" for a tablespace
    location: str  # the tablespace's directory on the server; "" for base.tar


@dataclass(frozen=True)
class ArchiveData:
    data: memoryview  # the next bytes of the archive last started (a tar stream)


@dataclass(frozen=True)
class BackupProgress:
    done: int  # bytes of the whole backup sent so far


@dataclass(frozen=True)
class ManifestData:
    data: memoryview  # the next bytes of the backup manifest (JSON)


@dataclass(frozen=True)
class BackupEnded:
    lsn: int
    timeline: int


BackupEvent = Union[BackupStarted, Tablespaces, ArchiveStarted, ArchiveData, BackupProgress, ManifestData,
                    BackupEnded]


@dataclass(frozen=True)
class XLogData:
    start: int  # LSN of data[0]
    server_end: int  # the server's WAL end when it sent this
    send_time: int  # microseconds since 2000-01-01 UTC
    data: memoryview


@dataclass(frozen=True)
class Keepalive:
    server_end: int
    send_time: int
    reply_requested: bool  # answer with send_status() soon, or the server ends the stream


@dataclass(frozen=True)
class EndOfTimeline:
    next_timeline: int
    next_start: int  # where the next timeline forks off: stream it from here


StreamEvent = Union[XLogData, Keepalive, EndOfTimeline]


MAX_RATE_KB = (32, 1048576)  # BASE_BACKUP's MAX_RATE: kB/s the server accepts


def base_backup_command(label: str, *, fast_checkpoint: bool = True, tablespace_map: bool = True,
                        progress: bool = False, manifest: bool = False, verify_checksums: bool = False,
                        max_rate_kb: int | None = None, wait: bool = True) -> str:
    """PostgreSQL 15's BASE_BACKUP; with the defaults, WAL-G's very command. Options left at the server's
    default are not sent (CHECKPOINT 'spread', no PROGRESS, MANIFEST 'no', no MAX_RATE, WAIT true);
    VERIFY_CHECKSUMS (true by default) always is. `max_rate_kb`: the server reads and sends at most
    this many kB a second (within MAX_RATE_KB). `wait` false: the server's end does not wait for its
    archiver to archive the backup's WAL, so the client must see to that WAL itself."""
    options = [f"LABEL {_quote(label)}"] + ["CHECKPOINT 'fast'"] * fast_checkpoint + ["TABLESPACE_MAP"] * tablespace_map
    options += [f"VERIFY_CHECKSUMS {'true' if verify_checksums else 'false'}"]
    options += ["PROGRESS"] * progress + ["MANIFEST 'yes'"] * manifest + ["WAIT false"] * (not wait)
    if max_rate_kb is not None:
        low, high = MAX_RATE_KB
        if not low <= max_rate_kb <= high:
            raise ValueError(f"MAX_RATE {max_rate_kb} kB/s is outside {low}..{high}")
        options.append(f"MAX_RATE {max_rate_kb}")
    return "BASE_BACKUP ( " + ", ".join(options) + " )"


def _rows(res: pq.PGresult) -> list[tuple[str | None, ...]]:
    return [tuple(None if (v := res.get_value(i, j)) is None else v.decode() for j in range(res.nfields))
            for i in range(res.ntuples)]


def _quote(text: str) -> str:
    if "\0" in text:
        raise ValueError("a replication command's string cannot hold a NUL character")
    return "'" + text.replace("'", "''") + "'"


def _slot_name(name: str) -> str:
    if not _SLOT_NAME_RE.fullmatch(name):
        raise ReplicationError(f"invalid replication slot name {name!r}",
                               hint="use 1 to 63 lowercase letters, digits and underscores")
    return name


class ReplicationConnection:
    """One replication connection (replication=true: replication commands only, no SQL). Driven by one
    thread; only interrupt() may be called from another."""

    def __init__(self, pgconn: pq.PGconn, timeout: float, stop: threading.Event):
        self._pg = pgconn
        self.timeout = timeout  # the longest the server may stay silent during any wait
        self._stop = stop
        self._behind = False  # the last read left bytes waiting on the socket (see _copy_message's linger)
        self._busy: str | None = None  # the command whose COPY is open; nothing else may be sent meanwhile
        self._archive: _ArchiveReader | None = None  # BASE_BACKUP's COPY, while it is open

    @classmethod
    def open(cls, conninfo: dict | str, timeout: float, *, stop: threading.Event | None = None
             ) -> ReplicationConnection:
        """Connect within `timeout` seconds, which then bounds every silence of the server. `replication=true`
        is forced: physical replication, whatever the conninfo says. `stop`, when set (by anyone, e.g. an
        engine whose task was cancelled by SIGTERM), interrupts the connection as interrupt() does."""
        params = conninfo_to_dict(conninfo) if isinstance(conninfo, str) else dict(conninfo)
        params = {k: v for k, v in params.items() if v is not None}
        params["replication"] = "true"
        params.setdefault("application_name", "walrus")
        stop = stop or threading.Event()
        pgconn = pq.PGconn.connect_start(make_conninfo("", **params).encode())
        what = "could not open a replication connection"
        try:
            if pgconn.status == pq.ConnStatus.BAD:
                raise _error(what, pgconn.get_error_message())
            deadline = time.monotonic() + timeout
            while (state := pgconn.connect_poll()) != pq.PollingStatus.OK:
                if state == pq.PollingStatus.FAILED:
                    raise _error(what, pgconn.get_error_message())
                # the socket may change between polls (libpq tries each host and address in turn)
                with _libpq(what):
                    ready = _wait(pgconn.socket, state == pq.PollingStatus.WRITING, deadline, stop)
                if not ready:
                    raise ReplicationTimeout(f"{what}: no answer within {timeout:g} s",
                                             hint="check that the server is up and reachable (PGHOST, PGPORT)")
            pgconn.nonblocking = 1
            pgconn.notice_handler = _log_notice
        except BaseException:
            pgconn.finish()
            raise
        return cls(pgconn, timeout, stop)

    @property
    def server_version(self) -> int:
        return self._pg.server_version

    @property
    def backend_pid(self) -> int:
        """The WAL sender's process id on the server (pg_stat_replication.pid)."""
        return self._pg.backend_pid

    def interrupt(self) -> None:
        """Thread-safe: the wait in progress, or the next one, raises ReplicationInterrupted."""
        self._stop.set()

    def close(self) -> None:
        """Idempotent. A base backup or stream still open is abandoned: the server aborts it."""
        self._pg.finish()

    def check_peer(self, what: str) -> None:
        """Raises ConnectionLost when the server has closed the connection, even while bytes it sent
        before are still unread (POLLRDHUP: its end has arrived). For a reader that stopped reading on
        purpose (backpressure), which would otherwise learn of it only once it reads again."""
        try:
            fd = self._pg.socket
        except OperationalError as e:
            raise _error(what, str(e)) from None
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)  # POLLHUP and POLLERR are always reported
        events = poller.poll(0)
        if events and events[0][1] & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            raise _error(what, "server closed the connection while walrus waited for the storage to catch up")

    def __enter__(self) -> ReplicationConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- commands that answer with result sets --------------------------------------------------

    def identify_system(self) -> SystemIdentity:
        (system_id, timeline, xlogpos, dbname), = self._rows("IDENTIFY_SYSTEM")
        return SystemIdentity(int(system_id), int(timeline), parse_lsn(xlogpos), dbname)

    def show(self, name: str) -> str:
        """A server setting as SHOW prints it ('16MB' for wal_segment_size): a replication connection takes SHOW."""
        if not _SETTING_NAME_RE.fullmatch(name):
            raise ValueError(f"not a setting name: {name!r}")
        (value,), = self._rows(f"SHOW {name}")
        return value or ""

    def timeline_history(self, timeline: int) -> tuple[str, bytes]:
        """(file name, content) of the timeline's history file (timelines after 1 have one)."""
        self._send(f"TIMELINE_HISTORY {int(timeline)}")
        res, = self._results("TIMELINE_HISTORY")
        return res.get_value(0, 0).decode(), bytes(res.get_value(0, 1))  # the file's bytes as they are

    def create_physical_slot(self, name: str, reserve_wal: bool = True) -> None:
        """With reserve_wal the slot keeps WAL from now on, before any receiver connects."""
        # the pre-15 syntax, which 15 still takes; a physical slot's consistent_point is 0/0, so nothing is returned
        self._rows(f"CREATE_REPLICATION_SLOT {_slot_name(name)} PHYSICAL" + (" RESERVE_WAL" if reserve_wal else ""))

    def read_replication_slot(self, name: str) -> SlotInfo | None:
        """None if there is no such slot. PostgreSQL 15 and later."""
        if self.server_version < 150000:
            raise ReplicationError("READ_REPLICATION_SLOT needs PostgreSQL 15 or later",
                                   hint="read pg_replication_slots on an SQL connection instead")
        (slot_type, lsn, tli), = self._rows(f"READ_REPLICATION_SLOT {_slot_name(name)}")
        if slot_type is None:
            return None
        return SlotInfo(slot_type, None if lsn is None else parse_lsn(lsn), None if tli is None else int(tli))

    def drop_slot(self, name: str) -> None:
        """The slot must exist and be inactive (WAIT is not sent: an active slot is an error, not a wait)."""
        self._rows(f"DROP_REPLICATION_SLOT {_slot_name(name)}")

    # --- BASE_BACKUP ------------------------------------------------------------------------------

    def base_backup(self, label: str, *, fast_checkpoint: bool = True, tablespace_map: bool = True,
                    progress: bool = False, manifest: bool = False, verify_checksums: bool = False,
                    max_rate_kb: int | None = None, wait: bool = True,
                    timeout: float | None = None) -> Iterator[BackupEvent]:
        """The events of one BASE_BACKUP, in the server's order: BackupStarted, Tablespaces, per archive
        ArchiveStarted then its ArchiveData, BackupProgress between them (PostgreSQL 15 sends it even
        without progress=True, which adds the tablespaces' sizes), ManifestData (manifest=True), BackupEnded.
        `timeout` (default the connection's) bounds each silence, the checkpoint before the first event
        included: give a spread checkpoint more. WAL is not included
        (as WAL-G: it is archived), and the end waits, as WAIT's default, for the archiver when archiving
        is on (`wait` false: it does not). Leaving the iteration before BackupEnded closes the connection, and the server aborts the
        backup. PostgreSQL 15 and later (the one-stream protocol)."""
        if self.server_version < 150000:
            raise ReplicationError("a base backup over a replication connection needs PostgreSQL 15 or later",
                                   hint="give the data directory, so the backup is read from the files")
        command = base_backup_command(label, fast_checkpoint=fast_checkpoint, tablespace_map=tablespace_map,
                                      progress=progress, manifest=manifest, verify_checksums=verify_checksums,
                                      max_rate_kb=max_rate_kb, wait=wait)
        return self._base_backup(command, timeout or self.timeout)

    def _base_backup(self, command: str, timeout: float) -> Iterator[BackupEvent]:
        what = "BASE_BACKUP"
        done = False
        try:
            self._send(command)
            start = self._result(what, pq.ExecStatus.TUPLES_OK, timeout)
            (lsn, tli), = _rows(start)
            yield BackupStarted(parse_lsn(lsn), int(tli))
            spaces = self._result(what, pq.ExecStatus.TUPLES_OK, timeout)
            yield Tablespaces([Tablespace(None if oid is None else int(oid), loc, None if kb is None else int(kb))
                               for oid, loc, kb in _rows(spaces)])
            self._result(what, pq.ExecStatus.COPY_OUT, timeout)
            self._archive = _ArchiveReader(self, CopyReader(self._pg), what, timeout)
            in_manifest = False
            # one COPY for everything: each message's first byte says what the rest is
            while (msg := self._archive.next_message()) is not None:
                kind = msg[:1].tobytes()
                if kind == b"d":
                    yield ManifestData(msg[1:]) if in_manifest else ArchiveData(msg[1:])
                elif kind == b"n":
                    name, location, _ = msg[1:].tobytes().split(b"\0", 2)
                    self._archive.open = True
                    yield ArchiveStarted(name.decode(), location.decode())
                elif kind == b"p":
                    yield BackupProgress(struct.unpack_from(">q", msg, 1)[0])
                elif kind == b"m":
                    in_manifest = True  # the manifest's bytes follow as 'd' messages
                    self._archive.open = False
                else:
                    raise ReplicationError(f"{what}: unknown message type {kind!r} in the backup stream",
                                           hint="a PostgreSQL newer than walrus knows? report it")
            end = self._result(what, pq.ExecStatus.TUPLES_OK, timeout)
            (lsn, tli), = _rows(end)
            self._result(what, pq.ExecStatus.COMMAND_OK, timeout)
            self._finish(what, timeout)
            done = True
            yield BackupEnded(parse_lsn(lsn), int(tli))
        finally:
            self._busy = None
            if self._archive is not None:
                self._archive.close()
                self._archive = None
            if not done:  # abandoned or failed half-way: the connection is in no state to reuse
                self.close()

    def read_archive(self, view: memoryview) -> int:
        """The next bytes of the archive base_backup() last started (its ArchiveStarted event was the
        last taken), read straight into `view`: len(view) of them, fewer only where the archive ends
        (0: it has ended, and the events go on). The same bytes the ArchiveData events would carry,
        without a copy or a Python step per server message."""
        if self._archive is None or not self._archive.open:
            return 0
        return self._archive.readinto(view)

    # --- START_REPLICATION ------------------------------------------------------------------------

    def start_replication(self, slot: str | None, start_lsn: int, timeline: int | None = None) -> WalStream:
        """Stream WAL from `start_lsn` (of `timeline`; default the server's). With a slot the server keeps
        WAL until send_status() reports it flushed."""
        command = "START_REPLICATION" + (f" SLOT {_slot_name(slot)}" if slot else "")
        command += f" PHYSICAL {format_lsn(start_lsn)}" + (f" TIMELINE {int(timeline)}" if timeline else "")
        self._send(command)
        try:
            self._result("START_REPLICATION", pq.ExecStatus.COPY_BOTH, self.timeout)
        except BaseException:
            self._busy = None
            raise
        self._busy = "START_REPLICATION"
        return WalStream(self)

    # --- the machinery ------------------------------------------------------------------------------

    def _rows(self, command: str) -> list[tuple[str | None, ...]]:
        self._send(command)
        results = self._results(command.split()[0])
        return _rows(results[0]) if results else []

    def _send(self, command: str) -> None:
        if self._busy:
            raise ReplicationError(f"cannot send {command.split()[0]} while {self._busy} is in progress")
        what = command.split()[0]
        self._busy = what
        with _libpq(what):
            self._pg.send_query(command.encode())
        self._flush(what, time.monotonic() + self.timeout)

    def _flush(self, what: str, deadline: float) -> None:
        with _libpq(what):
            while self._pg.flush():
                # libpq's buffer is full: the server may be waiting for us to read first
                if not _wait(self._pg.socket, True, deadline, self._stop):
                    raise self._timed_out(what)
                self._pg.consume_input()

    def _next_result(self, what: str, timeout: float) -> pq.PGresult | None:
        with _libpq(what):
            while self._pg.is_busy():
                if not _wait(self._pg.socket, False, time.monotonic() + timeout, self._stop):
                    raise self._timed_out(what, timeout)
                self._pg.consume_input()
            return self._pg.get_result()

    def _result(self, what: str, status: pq.ExecStatus, timeout: float) -> pq.PGresult:
        res = self._next_result(what, timeout)
        if res is None:
            raise ReplicationError(f"{what}: the server ended the command early", detail=f"expected {status.name}")
        self._check(what, res)
        if res.status != status:
            raise ReplicationError(f"{what}: unexpected answer from the server",
                                   detail=f"expected {status.name}, got {pq.ExecStatus(res.status).name}")
        return res

    def _results(self, what: str) -> list[pq.PGresult]:
        out = []
        while (res := self._next_result(what, self.timeout)) is not None:
            self._check(what, res)
            out.append(res)
        self._busy = None
        return [r for r in out if r.status == pq.ExecStatus.TUPLES_OK]

    def _finish(self, what: str, timeout: float) -> None:
        """Read the command's results to their end (get_result's None): the connection is idle after."""
        while (res := self._next_result(what, timeout)) is not None:
            self._check(what, res)
        self._busy = None

    def _check(self, what: str, res: pq.PGresult) -> None:
        if res.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE):
            self._busy = None
            text = res.error_message.decode(errors="replace") or self._pg.get_error_message()
            sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE)
            # a closed connection also arrives as an error result
            error = _error(what, text or "no message", sqlstate.decode() if sqlstate else None)
            self._drain(what)
            raise error

    def _drain(self, what: str) -> None:
        """After an error result: read to the command's end, so the connection takes the next command."""
        try:
            while self._next_result(what, self.timeout) is not None:
                pass
        except ReplicationError:
            pass  # the connection is gone (or interrupted): the error being raised says what failed
        self._busy = None

    def _copy_message(self, what: str, timeout: float, *, since: float | None = None,
                      idle_until: float | None = None, linger: float = 0.0) -> memoryview | None:
        """The next CopyData message; None when the copy has ended (the command's results follow).
        Raises ReplicationTimeout once the server has been silent for `timeout` seconds from `since`
        (default now); returns an empty view at `idle_until` when that is sooner. `linger`: once the
        socket turns readable after a read that left nothing waiting, wait this long before reading,
        so messages that trickle in (a WAL sender's, a commit each) are read many at a time; a
        stream that is behind (more waiting after a read) is read on at once."""
        deadline = None
        with _libpq(what):
            while True:
                n, data = self._pg.get_copy_data(1)
                if n > 0:
                    return data
                if n == -1:
                    return None
                if deadline is None:  # the clock is read only when there is a wait (a stream's messages
                    # mostly come without one)
                    deadline = (time.monotonic() if since is None else since) + timeout
                until = deadline if idle_until is None else min(deadline, idle_until)
                if not _wait(self._pg.socket, False, until, self._stop):
                    if idle_until is not None and idle_until < deadline:
                        return memoryview(b"")
                    raise self._timed_out(what, timeout)
                if linger and not self._behind:
                    time.sleep(linger)
                self._pg.consume_input()
                if linger:
                    self._behind = _readable(self._pg.socket)

    def _timed_out(self, what: str, timeout: float | None = None) -> ReplicationTimeout:
        return ReplicationTimeout(f"{what}: the server sent nothing for {timeout or self.timeout:g} s",
                                  hint="check the server and the network; raise the timeout if the server is "
                                       "just slow (a spread checkpoint before a base backup)")


class _ArchiveReader:
    """BASE_BACKUP's COPY read through a CopyReader: the archives' bytes into the caller's buffers
    (readinto), or message by message for the events. Every wait is a slice, so the stop flag and
    SIGINT are seen promptly, and a silence of `timeout` seconds raises ReplicationTimeout."""

    _DATA = 64 << 10  # bytes of data an ArchiveData or ManifestData event carries at most

    def __init__(self, conn: ReplicationConnection, reader: CopyReader, what: str, timeout: float):
        self._conn = conn
        self._reader = reader
        self._what = what
        self._timeout = timeout
        self.open = False  # an archive's data is being read: readinto() may be called

    def readinto(self, view: memoryview) -> int:
        got = 0
        want = len(view)
        while got < want:
            n, status = self._fill(view[got:])
            got += n
            if status == copyfill.EVENT and self._reader.kind() == b"p":
                self._reader.take()  # progress between data messages: nobody reading bytes wants it
                continue
            if status != copyfill.FULL:
                break  # the archive's data ended (another event, or the copy's end): the events go on
        return got

    def next_message(self) -> memoryview | None:
        """The next message whole ('d' ones at most _DATA bytes of their data at a time); None at the copy's end."""
        data = bytearray(self._DATA)
        n, status = self._fill(memoryview(data)[1:])
        if n:
            data[0] = ord("d")
            return memoryview(data)[:1 + n]
        if status == copyfill.EVENT:
            return memoryview(self._reader.take())
        return None  # END

    def close(self) -> None:
        self._reader.close()

    def _fill(self, view: memoryview) -> tuple[int, int]:
        """Fills view until it is full or something else comes (an event, the end); waits in slices."""
        conn = self._conn
        since = time.monotonic()
        got = 0
        while True:
            if conn._stop.is_set():
                raise ReplicationInterrupted("replication interrupted", detail="the connection was abandoned")
            n, status = self._reader.fill(view[got:], _SLICE)
            got += n
            if status == copyfill.ERROR:
                raise _error(self._what, self._conn._pg.get_error_message())
            if status != copyfill.WAIT:
                return got, status
            if n:
                since = time.monotonic()
            elif time.monotonic() - since >= self._timeout:
                raise conn._timed_out(self._what, self._timeout)


LINGER = 0.002  # seconds a WAL stream that is caught up lets messages gather once one arrives


class WalStream:
    """A START_REPLICATION in progress (COPY both ways): read() the WAL, send_status() the progress."""

    def __init__(self, conn: ReplicationConnection):
        self._conn = conn
        # read_wal()'s compiled reads; a message it stopped at (or data it left part of) is held there
        self._reader = CopyReader(conn._pg, kind=b"w", skip=1 + _XLOG_DATA.size, check_lsn=True)
        self._last_heard = time.monotonic()  # a server silent for conn.timeout is taken for dead
        self._pinged = False  # a reply was asked for during the present silence
        self._reported = (0, 0, 0)  # the last positions sent; a ping repeats them
        self.ended: EndOfTimeline | None = None  # set when the server ended the timeline
        self._open = True  # the copy is open: read() and send_status() may be called

    def read(self, timeout: float | None = None) -> StreamEvent | None:
        """The next message; None if none came within `timeout` seconds (default: the connection's), so a
        receiver can send its status on time. Raises ReplicationTimeout once the server has been silent
        for the connection's timeout across reads. A quiet primary sends nothing (its keepalives stop while
        the receiver reports in time), so after half that silence read() asks for a reply (a status
        update repeating the last positions): only a server that cannot answer times out. EndOfTimeline
        is the last event, and the connection is free again."""
        conn = self._conn
        if not self._open:
            raise ReplicationError("START_REPLICATION: the stream has ended", detail="read after its end")
        until = time.monotonic() + (conn.timeout if timeout is None else timeout)
        while True:
            ping_at = self._last_heard + conn.timeout / 2
            if not self._pinged and time.monotonic() >= ping_at:
                self.send_status(*self._reported, reply=True)
                self._pinged = True
            if self._reader.holding():
                msg = memoryview(self._reader.take())
            elif self._reader.ended:  # read_wal() met the copy's end (libpq says it only once)
                msg = None
            else:
                msg = conn._copy_message("START_REPLICATION", conn.timeout, since=self._last_heard,
                                         idle_until=until if self._pinged else min(until, ping_at), linger=LINGER)
            if msg is None:
                return self._end_of_copy()
            if msg:
                break
            if time.monotonic() >= until:
                return None
        self._last_heard = time.monotonic()
        self._pinged = False
        kind = msg[:1].tobytes()
        if kind == b"w":
            start, end, sent = _XLOG_DATA.unpack_from(msg, 1)
            return XLogData(start, end, sent, msg[1 + _XLOG_DATA.size:])
        if kind == b"k":
            end, sent, reply = _KEEPALIVE.unpack_from(msg, 1)
            return Keepalive(end, sent, bool(reply))
        raise ReplicationError(f"START_REPLICATION: unknown message type {kind!r} in the WAL stream")

    def read_wal(self, view: memoryview, position: int) -> int:
        """The WAL from `position` that has already arrived, as many bytes of it as fit, copied into
        `view` from consecutive XLogData messages without a Python step per message (a WAL sender
        that keeps up sends one per commit); never waits. 0 when nothing more is here now, or the
        next message is something else (a keepalive, WAL from elsewhere, the end): read() takes it."""
        if not self._open:
            raise ReplicationError("START_REPLICATION: the stream has ended", detail="read after its end")
        reader = self._reader
        reader.lsn = position
        n, status = reader.fill(view, 0)
        if status == copyfill.ERROR:
            raise _error("START_REPLICATION", self._conn._pg.get_error_message())
        if n:
            self._last_heard = time.monotonic()
            self._pinged = False
        return n

    def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        """Standby status update: WAL written, flushed (a slot's restart_lsn follows it), applied."""
        if not self._open:
            raise ReplicationError("START_REPLICATION: the stream has ended", detail="status after its end")
        now = int((time.time() - _PG_EPOCH) * 1_000_000)
        self._put(_STATUS.pack(b"r", write, flush, apply, now, int(reply)))
        self._reported = (write, flush, apply)

    def end(self) -> None:
        """End the stream from our side (CopyDone); the server's remaining messages are discarded, and
        the connection is free again."""
        conn = self._conn
        what = "START_REPLICATION"
        if not self._open:
            return
        self._open = False
        self._reader.close()
        with _libpq(what):
            while not conn._pg.put_copy_end():  # 0: libpq's buffer is full, flush and retry
                conn._flush(what, time.monotonic() + conn.timeout)
        conn._flush(what, time.monotonic() + conn.timeout)
        while not self._reader.ended and conn._copy_message(what, conn.timeout) is not None:
            pass  # WAL or keepalives already on their way
        conn._finish(what, conn.timeout)

    def _put(self, payload: bytes) -> None:
        conn = self._conn
        what = "START_REPLICATION"
        deadline = time.monotonic() + conn.timeout
        with _libpq(what):
            while not conn._pg.put_copy_data(payload):
                conn._flush(what, deadline)
        conn._flush(what, deadline)

    def _end_of_copy(self) -> StreamEvent:
        """The server ended the copy: after the last WAL of a timeline that is not the server's latest,
        with a result (next timeline, where it starts); an error, as an error result."""
        conn = self._conn
        what = "START_REPLICATION"
        self._open = False
        res = conn._next_result(what, conn.timeout)
        if res is not None:
            conn._check(what, res)
        if res is None or res.status != pq.ExecStatus.COPY_IN:
            raise ReplicationError(f"{what}: the server ended the stream unexpectedly",
                                   detail=None if res is None else pq.ExecStatus(res.status).name)
        with _libpq(what):  # our half of the copy ends too; then the results come
            while not conn._pg.put_copy_end():
                conn._flush(what, time.monotonic() + conn.timeout)
        conn._flush(what, time.monotonic() + conn.timeout)
        (tli, lsn), = _rows(conn._result(what, pq.ExecStatus.TUPLES_OK, conn.timeout))
        conn._result(what, pq.ExecStatus.COMMAND_OK, conn.timeout)
        conn._finish(what, conn.timeout)
        self.ended = EndOfTimeline(int(tli), parse_lsn(lsn))
        return self.ended


def _readable(fd: int) -> bool:
    """Bytes are waiting on `fd` now."""
    return bool(select.select([fd], [], [], 0)[0])


def _wait(fd: int, write: bool, deadline: float, stop: threading.Event) -> bool:
    """Wait until `fd` is readable (or writable too, with `write`); False at `deadline`. In slices, so a
    stop request or SIGINT ends it promptly."""
    while True:
        if stop.is_set():
            raise ReplicationInterrupted("replication interrupted", detail="the connection was abandoned")
        left = deadline - time.monotonic()
        # one look even past the deadline: bytes already here are not a silence
        r, w, _ = select.select([fd], [fd] if write else [], [], max(0.0, min(left, _SLICE)))
        if r or w:
            return True
        if left <= 0:
            return False


class _libpq:
    """libpq's failures (psycopg raises them as OperationalError) as ReplicationErrors with a hint."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind, exc, tb) -> None:
        if isinstance(exc, OperationalError):
            raise _error(self.what, str(exc)) from None


def _log_notice(res: pq.PGresult) -> None:
    # libpq would print notices to stderr ("WAL archiving is not enabled..."): they go to the log instead
    log.debug(f"PostgreSQL: {res.error_message.decode(errors='replace').strip()}")
