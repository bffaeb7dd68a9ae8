"""`walrus daemon SOCKET`: WAL-G's socket protocol, with look-ahead uploads of the next .ready segments."""
from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import stat
import time
from dataclasses import dataclass, field

from walrus import codec
from walrus.config import Settings
from walrus.daemon import protocol
from walrus.errors import ArchiveNotFound, ConfigError, WalrusError
from walrus.log import log
from walrus.pg.xlog import classify_wal_name, next_wal_file_name
from walrus.runtime import raise_nofile_limit
from walrus.storage.base import Storage
from walrus.wal import prefetch, prefetcher, ready
from walrus.wal.fetch import wal_fetch
from walrus.wal.push import WalPusher


SHUTDOWN_GRACE = 30.0  # seconds requests in progress get to finish after SIGTERM
# A new connection must bring its whole request within this: WAL-G's client and the walg_archive module
# write it right after connect(), so 5 s allows for a stalled machine, and a connection silent that
# long is idle and holds a descriptor for nothing.
FIRST_REQUEST_TIMEOUT = 5.0
# After a check (C) the connection stays open for the next request. The walg_archive module sends its
# wal-push at once, but a client that checks now and then may pause: a minute, then it reconnects.
NEXT_REQUEST_TIMEOUT = 60.0
# The most connections held at once, or a quarter of RLIMIT_NOFILE if less (WAL files, storage
# connections and the prefetch need descriptors too). PostgreSQL sends one request at a time from
# its archiver and one from recovery, so a legitimate load is a handful; at the bound the connection
# waiting longest for its request is closed, so a flood of idle ones cannot lock clients out.
MAX_CONNECTIONS = 256
LIMIT_LOG_INTERVAL = 60.0  # seconds between reports of connections closed or refused at the bound
# .ready segments queued ahead of the archiver, per upload slot: uploads run WALG_UPLOAD_CONCURRENCY at a
# time, and a queue twice that deep keeps every slot busy while the archiver collects finished ones
LOOK_AHEAD_PER_UPLOAD = 2
# How far past the asked segment the look-ahead walks, in windows: segments already .done (marked by
# PG_READY_RENAME) are passed over without counting, so the walk is bounded separately.
LOOK_AHEAD_REACH = 4


def sd_notify(message: str) -> None:
    """systemd's notification protocol (Type=notify): one datagram to $NOTIFY_SOCKET, if set."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), address)


def inherited_listener() -> socket.socket | None:
    """The listening socket systemd passed in (socket activation: walrus-daemon.socket), else None.

    systemd's protocol: LISTEN_PID is this process's pid and LISTEN_FDS counts the sockets passed
    from fd 3 on; the daemon serves the first. The variables are removed either way, so a process
    this one starts never takes them for its own.
    """
    pid, count = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count or not count.isdigit() or int(count) < 1:
        return None
    try:
        sock = socket.socket(fileno=3)
    except OSError as e:
        raise ConfigError("LISTEN_FDS says a socket was passed as descriptor 3, but it is not one",
                          detail=str(e), hint="start the daemon from walrus-daemon.socket, or unset LISTEN_FDS") from e
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError("the socket passed as descriptor 3 is not a Unix stream socket",
                          hint="walrus-daemon.socket must use ListenStream= with a path")
    sock.set_inheritable(False)
    return sock


@dataclass
class _Pushes:
    """Uploads under way or finished, by WAL file name; a finished one stays until PostgreSQL asks
    (or, with PG_READY_RENAME, until the daemon marks it .done itself)."""

    tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    asked: dict[str, int] = field(default_factory=dict)  # names with a wal-push request being answered
    stored_ahead: set[str] = field(default_factory=set)  # look-ahead segments stored, not yet marked .done
    last_asked: str | None = None  # the segment PostgreSQL asked for last: the look-ahead starts after it


class Daemon:
    def __init__(self, settings: Settings, storage: Storage, socket_path: str, pgdata: str):
        self.settings = settings
        self.storage = storage
        self.socket_path = socket_path
        self.pgdata = os.path.realpath(pgdata)
        self.status_dir = ready.status_dir(os.path.join(self.pgdata, "pg_wal"))
        self._pusher: WalPusher | None = None  # made in run(): it needs the loop
        self._pushes = _Pushes()
        self._stopping = asyncio.Event()
        self._connections: set[asyncio.Task] = set()  # counted against the bound
        # connections waiting for a request, longest first; True once one was answered (kept open after C)
        self._waiting: dict[asyncio.Task, bool] = {}
        self._max_connections = MAX_CONNECTIONS  # set in run(), from RLIMIT_NOFILE
        self._over_limit = [0, 0]  # connections closed idle, refused busy, since the last report
        self._limit_logged: float | None = None
        self._window = prefetcher.Window(settings, storage)
        self._listener: socket.socket | None = None  # passed in by systemd (socket activation)

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        self._listener = inherited_listener()
        if self._listener is None:
            self._claim_socket()
        self._max_connections = _connection_bound()
        codec.preload(self.settings.compression_method)  # the first segment should not wait on imports
        self._pusher = WalPusher(self.settings, slots=WalPusher.slots_for(self.settings, self.storage))
        try:
            await self._serve()
        finally:
            self._pusher.close()

    async def _serve(self) -> None:
        # a graceful stop from the moment the socket accepts a connection (before, a signal cancels
        # the start-up like any command's work)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        if self._listener is not None:  # systemd made, owns and removes the socket file
            server = await asyncio.start_unix_server(self._connection, sock=self._listener)
            name = self._listener.getsockname()
            where = f"{name or self.socket_path} (passed in by systemd)"
            if name and name != self.socket_path:
                log.warning(f"the daemon was given {self.socket_path} but serves the socket systemd passed in, {name}")
        else:
            old_umask = os.umask(0o117)  # the socket is rw for the owner and its group only
            try:
                server = await asyncio.start_unix_server(self._connection, path=self.socket_path)
            finally:
                os.umask(old_umask)
            where = self.socket_path
        watchdog = asyncio.create_task(self._watchdog())
        log.info(f"walrus daemon listening on {where} for {self.pgdata} ({self.storage.describe()})")
        sd_notify("READY=1")
        try:
            await self._stopping.wait()
        finally:
            sd_notify("STOPPING=1")
            server.close()
            watchdog.cancel()
            for task, answered in list(self._waiting.items()):
                if answered:  # kept open after a check: nothing asked; a new one still gets its request read
                    task.cancel()
            # finish what was asked (bounded), so no client waits on a reply that never comes
            if self._connections:
                await asyncio.wait(set(self._connections), timeout=SHUTDOWN_GRACE)
            leftovers = [*self._connections, *self._pushes.tasks.values()]
            for task in leftovers:
                task.cancel()
            leftovers += self._window.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            await server.wait_closed()
            if any(self._over_limit):
                self._report_limit()
            if self._listener is None:  # an inherited socket stays: systemd listens on it for the next start
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket_path)
            log.info("walrus daemon stopped")

    def stop(self) -> None:
        self._stopping.set()

    def _claim_socket(self) -> None:
        """Remove a stale socket left by a crash; refuse to replace a live daemon or a non-socket file."""
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{self.socket_path} exists and is not a socket", hint="choose another socket path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket_path)
            except OSError:
                os.unlink(self.socket_path)  # nobody listens: left over from a previous run
                return
        raise ConfigError(f"another daemon is already listening on {self.socket_path}",
                          hint="stop it first, or choose another socket path")

    async def _watchdog(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec:
            return
        interval = max(1.0, int(usec) / 2e6)
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # -- requests --------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client: its requests until a wal-push, a wal-fetch, an error or silence. Every failure
        ends here, logged: none is left to asyncio's handler."""
        task = asyncio.current_task()
        try:
            if not self._admit(task):
                with contextlib.suppress(ConnectionError):
                    await _send(writer, protocol.ERROR)
                return
            answered = False
            while not (answered and self._stopping.is_set()):
                try:
                    request = await self._next_request(reader, answered)
                except protocol.ProtocolError as e:
                    log.warning(f"daemon: malformed request ({e}); answered E")
                    with contextlib.suppress(ConnectionError):
                        await _send(writer, protocol.ERROR)
                    return
                if request is None:
                    return  # the client is done, or silent too long
                kind, args = request
                await _send(writer, await self._answer(kind, args))
                if kind != protocol.CHECK:
                    return  # WAL-G closes after a push or a fetch
                answered = True
        except ConnectionError as e:
            log.warning(f"daemon: client left before its reply ({e.strerror or e})")
        except Exception as e:
            log.error(f"daemon: connection failed: {type(e).__name__}: {e}")
        finally:
            self._connections.discard(task)
            with contextlib.suppress(OSError):
                writer.close()
                await writer.wait_closed()

    async def _next_request(self, reader: asyncio.StreamReader, answered: bool) -> tuple[int, list[str]] | None:
        """The next request, or None at EOF or after the idle bound; meanwhile the connection is
        listed as waiting, so the connection bound may close it."""
        task = asyncio.current_task()
        self._waiting[task] = answered
        try:
            async with asyncio.timeout(NEXT_REQUEST_TIMEOUT if answered else FIRST_REQUEST_TIMEOUT):
                return await _read_request(reader)
        except TimeoutError:
            log.debug("daemon: closed a connection that sent no request in time")
            return None
        finally:
            self._waiting.pop(task, None)

    def _admit(self, task: asyncio.Task) -> bool:
        """Count a new connection against the bound. At the bound the connection waiting longest for its
        request is closed to make room; if every one is busy with a request, the new one is refused."""
        if len(self._connections) >= self._max_connections:
            refused = not self._waiting
            if not refused:
                oldest = next(iter(self._waiting))
                del self._waiting[oldest]
                self._connections.discard(oldest)
                oldest.cancel()
            self._over_limit[refused] += 1
            now = time.monotonic()
            if self._limit_logged is None or now - self._limit_logged >= LIMIT_LOG_INTERVAL:
                self._report_limit()
            if refused:
                return False
        self._connections.add(task)
        return True

    def _report_limit(self) -> None:
        """One line for the connections closed or refused at the bound since the last one (a flood is
        thousands of connections, so they are counted, not logged one by one)."""
        now = time.monotonic()
        since = "" if self._limit_logged is None else f", in the last {now - self._limit_logged:.0f} s"
        (closed, refused), self._over_limit, self._limit_logged = self._over_limit, [0, 0], now
        log.warning(f"daemon: connection limit reached ({self._max_connections} open): {closed} closed while waiting "
                    f"for a request, {refused} refused with every one busy{since}")

    async def _answer(self, kind: int, args: list[str]) -> bytes:
        """The reply to a well-formed request; a failure nothing below caught is logged here, once."""
        try:
            if kind == protocol.CHECK:
                return protocol.OK
            if kind == protocol.WAL_PUSH:
                return await self._push(*args)
            return await self._fetch(*args)
        except Exception as e:
            what = "wal-push" if kind == protocol.WAL_PUSH else "wal-fetch"
            log.error(f"daemon: {what} {' '.join(args)}: {type(e).__name__}: {e}")
            return protocol.ERROR

    def _in_pgdata(self, path: str) -> str:
        """WAL-G's rule: a path that already names PGDATA is used as is, else it is under PGDATA."""
        return path if self.pgdata in path else os.path.join(self.pgdata, path)

    async def _push(self, name: str) -> bytes:
        wal_name = os.path.basename(name)
        pushes = self._pushes
        pushes.asked[wal_name] = pushes.asked.get(wal_name, 0) + 1
        try:
            return await self._answer_push(wal_name, name)
        finally:  # before the reply is written: no .ready is renamed once the archiver may move on
            pushes.asked[wal_name] -= 1
            if not pushes.asked[wal_name]:
                del pushes.asked[wal_name]

    async def _answer_push(self, wal_name: str, name: str) -> bytes:
        path = self._in_pgdata(name if "/" in name else os.path.join("pg_wal", name))
        self._pushes.stored_ahead.discard(wal_name)  # PostgreSQL asked: it marks this one itself
        if classify_wal_name(wal_name) == "segment":
            self._pushes.last_asked = wal_name
        self._mark_stored_ahead()
        task = self._pushes.tasks.get(wal_name)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._start_push(wal_name, path)
        self._look_ahead(wal_name)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.settings.daemon_wal_upload_timeout)
        except asyncio.TimeoutError:
            log.error(f"daemon: wal-push {wal_name} did not finish in {self.settings.daemon_wal_upload_timeout:.0f} s")
            return protocol.ERROR
        except WalrusError as e:
            log.error(f"daemon: wal-push {wal_name}: {e.message}" + (f" ({e.detail})" if e.detail else ""))
            self._pushes.tasks.pop(wal_name, None)
            return protocol.ERROR
        except Exception as e:  # storage and OS errors: PostgreSQL retries; the daemon lives on
            log.error(f"daemon: wal-push {wal_name}: {type(e).__name__}: {e}")
            self._pushes.tasks.pop(wal_name, None)
            return protocol.ERROR
        self._pushes.tasks.pop(wal_name, None)  # answered: PostgreSQL marks it .done
        return protocol.OK

    def _start_push(self, wal_name: str, path: str, ahead: bool = False) -> asyncio.Task:
        async def upload() -> None:
            await self._pusher.push(self.storage, path)  # WALG_UPLOAD_CONCURRENCY at once
            if ahead and self.settings.pg_ready_rename and wal_name not in self._pushes.asked:
                self._pushes.stored_ahead.add(wal_name)
                if self._mark_stored_ahead() and self._pushes.last_asked is not None:
                    self._look_ahead(self._pushes.last_asked)  # the marked ones left the window: refill it

        task = asyncio.create_task(upload())
        task.add_done_callback(_consume_exception)
        self._pushes.tasks[wal_name] = task
        return task

    def _look_ahead(self, wal_name: str) -> None:
        """Start uploading the segments after wal_name that PostgreSQL has marked .ready, so they are
        durable (and answered at once) by the time the archiver asks for them. WALG_UPLOAD_CONCURRENCY
        uploads run at once, from a queue LOOK_AHEAD_PER_UPLOAD times as deep; each is reported only when
        PostgreSQL asks (or marked .done, see _mark_stored_ahead), and a queued one holds no memory until
        its turn. Segments already .done are passed over; the first with neither status ends the walk."""
        if classify_wal_name(wal_name) != "segment":
            return
        window = self.settings.upload_concurrency * LOOK_AHEAD_PER_UPLOAD
        name, queued = wal_name, 0
        for _ in range(LOOK_AHEAD_REACH * window):
            if queued >= window:
                break
            try:
                name = next_wal_file_name(name, self.settings.segment_size)
            except ValueError:  # no segment follows (the timeline's last), or not one of this size
                break
            if name in self._pushes.tasks:
                queued += 1
                continue
            status = os.path.join(self.status_dir, name)
            if os.path.exists(status + ready.READY):
                self._start_push(name, os.path.join(self.pgdata, "pg_wal", name), ahead=True)
                queued += 1
            elif not os.path.exists(status + ready.DONE):
                break

    def _mark_stored_ahead(self) -> int:
        """PG_READY_RENAME: mark look-ahead segments that are durably stored as archived, renaming their
        archive_status .ready to .done as PostgreSQL would, so the archiver skips them instead of
        starting archive_command for each (it checks that a .ready file is still there first).

        Invariant: this runs only while a wal-push request is being answered. The archiver then waits
        in archive_command, so it cannot have picked the segment being renamed; between requests it
        may have, and a rename then would make PostgreSQL warn that its own rename failed. The
        segment asked for is left to PostgreSQL. Nothing is marked that is not stored.
        Returns how many segments left the look-ahead window."""
        pushes = self._pushes
        if not pushes.asked or not pushes.stored_ahead:
            return 0
        marked = 0
        for name in sorted(pushes.stored_ahead - pushes.asked.keys()):
            pushes.stored_ahead.discard(name)
            if not ready.mark_done(self.status_dir, name, "daemon"):
                continue  # it stays .ready, and its finished task answers the archiver at once
            pushes.tasks.pop(name, None)  # PostgreSQL will not ask for it now (or archived it meanwhile)
            marked += 1
        return marked

    async def _fetch(self, name: str, destination: str) -> bytes:
        destination = self._in_pgdata(destination)
        try:
            await self._window.settle(prefetch.location(self.settings, destination), name)
            await wal_fetch(self.settings, self.storage, name, destination)
        except ArchiveNotFound:
            return protocol.NOT_FOUND
        except WalrusError as e:
            log.error(f"daemon: wal-fetch {name}: {e.message}" + (f" ({e.detail})" if e.detail else ""))
            return protocol.ERROR
        except Exception as e:
            log.error(f"daemon: wal-fetch {name}: {type(e).__name__}: {e}")
            return protocol.ERROR
        if prefetch.wanted(name, self.settings):
            self._prefetch(name, destination)
        return protocol.OK

    def _prefetch(self, name: str, destination: str) -> None:
        """Keep the prefetch window after `name` full: recovery asks for the next segment in milliseconds."""
        try:
            self._window.fill(name, prefetch.location(self.settings, destination))
        except OSError as e:  # no room for the prefetch directory: fetches still work, only slower
            log.warning(f"daemon: cannot prefetch after {name}: {e.strerror or e}")


async def _read_request(reader: asyncio.StreamReader) -> tuple[int, list[str]] | None:
    """The next request as (kind, arguments), or None if the client closed before sending one."""
    try:
        header = await reader.readexactly(protocol.HEADER)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise protocol.ProtocolError("message ends inside its header") from None
    except ConnectionError:
        return None  # reset by the client: nobody to answer
    kind, length = protocol.parse_header(header)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise protocol.ProtocolError(f"message ends after {len(e.partial)} of its {length} body bytes") from None
    except ConnectionError:
        return None
    return kind, protocol.request_args(kind, body)


async def _send(writer: asyncio.StreamWriter, reply: bytes) -> None:
    writer.write(reply)
    await writer.drain()


def _connection_bound() -> int:
    """MAX_CONNECTIONS, or a quarter of RLIMIT_NOFILE if that is less, once the soft limit is raised to
    the hard one (the soft default, often 1024, is set for programs that serve no connections)."""
    raise_nofile_limit()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft // 4))


def _consume_exception(task: asyncio.Task) -> None:
    """A look-ahead upload that fails is retried when PostgreSQL asks; don't warn about it twice."""
    if not task.cancelled():
        task.exception()


async def run_daemon(settings: Settings, storage: Storage, socket_path: str) -> None:
    pgdata = settings.pgdata
    if not pgdata or not os.path.isdir(os.path.join(pgdata, "pg_wal")):
        raise ConfigError("the daemon needs PGDATA, the data directory whose WAL it archives",
                          detail=f"PGDATA is {pgdata!r}" if pgdata else "PGDATA is not set",
                          hint="set PGDATA in the environment or the config file")
    await Daemon(settings, storage, socket_path, pgdata).run()
