"""The prefetcher: downloads the segments after the one recovery asked for, in WAL order, ahead of it."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

from walrus.config import Settings
from walrus.errors import ArchiveNotFound, WalrusError
from walrus.log import log
from walrus.pg.segname import is_segment_name
from walrus.pg.xlog import next_wal_file_name, parse_wal_file_name
from walrus.storage.base import Storage
from walrus.wal.fetch import wal_fetch
from walrus.wal.stored import download
from walrus.wal.prefetch import RUNNING, SOCKET, advance, clean, cursor, present, settings_fingerprint, socket_address

FOLLOW_POLL = 0.02  # seconds between looks at the cursor
FOLLOW_LINGER = 2.0  # a prefetcher whose cursor has not moved for this long, with nothing in flight, exits
ASK_REQUEST_TIMEOUT = 5.0  # a client sends its request right after connecting
OK, NOT_FOUND, ERROR = b"O", b"N", b"E"  # prefetch.ask's answers: fetched, absent from the archive, could not


def parallel_downloads(settings: Settings) -> int:
    """Downloads of a window running at once: one per CPU (decompression is the work; at least 2, so
    one download's wait on storage overlaps another's), never more than the window."""
    return max(1, min(settings.download_concurrency, max(2, len(os.sched_getaffinity(0)))))


class Window:
    """The prefetch window after the segment recovery asked for last, downloaded in order.

    Each fill() queues the next WALG_DOWNLOAD_CONCURRENCY segments that are neither here nor queued;
    they start in WAL order, parallel_downloads() at a time, so the one recovery asks for next is
    whole first (ten at once, as WAL-G starts them, would all finish late). The daemon keeps one
    window for its lifetime and refills it on every fetch; `wal-prefetch` refills one as follow() says.
    """

    def __init__(self, settings: Settings, storage: Storage):
        self.settings = settings
        self.storage = storage
        self._slots = asyncio.Semaphore(parallel_downloads(settings))
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}  # (location, segment) -> its download
        self.downloaded = 0  # segments this window has prefetched

    @property
    def busy(self) -> bool:
        """Some download is queued or running."""
        return bool(self._tasks)

    def fill(self, name: str, location: str) -> list[asyncio.Task]:
        """Queue the segments after `name`; returns the downloads queued now."""
        os.makedirs(os.path.join(location, RUNNING), 0o700, exist_ok=True)
        clean(location, name, self.settings.segment_size)
        started, current = [], name
        for _ in range(self.settings.download_concurrency):
            current = next_wal_file_name(current, self.settings.segment_size)
            key = (location, current)
            if key in self._tasks or present(location, current):
                continue
            task = asyncio.create_task(self._download(location, current))
            self._tasks[key] = task
            task.add_done_callback(lambda _t, k=key: self._tasks.pop(k, None))
            started.append(task)
        return started

    async def settle(self, location: str, name: str) -> None:
        """Wait for a queued or running download of `name`, so a fetch takes it instead of racing it."""
        task = self._tasks.get((location, name))
        if task is not None:
            await asyncio.wait({task})

    def cancel(self) -> list[asyncio.Task]:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        return tasks

    async def _download(self, location: str, segment: str) -> str | None:
        async with self._slots:
            final, partial = os.path.join(location, segment), os.path.join(location, RUNNING, segment)
            if present(location, segment):
                return None  # there already, or another prefetcher has it
            try:
                # not fsynced (a cache): take() refuses any file written before the last boot, the
                # only way its bytes could be torn
                await download(self.settings, self.storage, segment, final, partial=partial)
            except ArchiveNotFound:
                return None  # past the end of the archive (yet)
            except (WalrusError, OSError) as e:  # best effort: wal-fetch downloads it itself
                log.debug(f"prefetch of {segment} skipped: {e}")
                return None
            self.downloaded += 1
            return segment


async def follow(settings: Settings, storage: Storage, name: str, location: str,
                 config_path: str | None = None) -> int:
    """`wal-prefetch`: keep the window filled after the segment recovery asked for last (the cursor each
    wal-fetch records) until it stops moving; returns how many segments were downloaded.

    One prefetcher follows recovery for as long as it keeps asking, instead of a new process (and its
    imports, about 0.1 CPU-s) every few segments competing with replay for the CPU. Meanwhile it
    answers, on a socket in the prefetch folder, the fetches of what it has not prefetched (prefetch.ask)
    with its storage client already open: the files recovery asks for past the end of the archive,
    .history files, a segment whose download is still running.
    """
    return await _Follower(settings, storage, name, location, settings_fingerprint(config_path)).run()


class _Follower:
    def __init__(self, settings: Settings, storage: Storage, name: str, location: str, fingerprint: str):
        self.settings, self.storage, self.location = settings, storage, location
        self.fingerprint = fingerprint  # a call configured otherwise is not this process's to serve
        self.window = Window(settings, storage)
        # a recovery's first call may be for a .history file: then nothing is filled until a segment is asked
        self.last = name if is_segment_name(name) else None
        self.moved = time.monotonic()
        self.answering: set[asyncio.Task] = set()

    async def run(self) -> int:
        if self.last is not None:
            self.window.fill(self.last, self.location)
        else:
            os.makedirs(os.path.join(self.location, RUNNING), 0o700, exist_ok=True)
        server = await self._listen()
        try:
            while True:
                await asyncio.sleep(FOLLOW_POLL)
                now = cursor(self.location)
                if now is not None and (self.last is None or _after(now, self.last, self.settings.segment_size)):
                    self._moved_to(now)
                elif (time.monotonic() - self.moved > FOLLOW_LINGER and not self.window.busy
                      and not self.answering):
                    return self.window.downloaded
        finally:
            if server is not None:
                # closed (and its path gone) before the lock is released at exit: a client that cannot
                # connect any more runs the full command; none is left waiting for an answer
                server.close()
                _unlink(self._socket_path())
                for task in list(self.answering):
                    task.cancel()
                await asyncio.gather(*self.answering, return_exceptions=True)

    def _moved_to(self, name: str) -> None:
        self.last, self.moved = name, time.monotonic()
        self.window.fill(name, self.location)

    def _socket_path(self) -> str:
        return os.path.join(self.location, RUNNING, SOCKET)

    async def _listen(self) -> asyncio.AbstractServer | None:
        """The socket for prefetch.ask(); None where it cannot be made (the calls then run in full).
        Any file at its path is a dead prefetcher's: this one holds the folder's lock."""
        path = self._socket_path()
        _unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            folder = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sock.bind(socket_address(folder))
            finally:
                os.close(folder)
            return await asyncio.start_unix_server(self._connection, sock=sock)
        except OSError as e:
            sock.close()
            log.debug(f"prefetcher: no socket at {path}: {e}")
            return None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One asked fetch. The client leaving first (its SIGTERM, its timeout) cancels the fetch, so
        nothing is written to its DEST after it stopped waiting."""
        task = asyncio.current_task()
        self.answering.add(task)
        try:
            try:
                async with asyncio.timeout(ASK_REQUEST_TIMEOUT):
                    name, destination, fingerprint = [(await reader.readuntil(b"\0"))[:-1].decode()
                                                      for _ in range(3)]
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, UnicodeDecodeError, TimeoutError):
                name = destination = fingerprint = ""
            if not name or "/" in name or not os.path.isabs(destination) or fingerprint != self.fingerprint:
                writer.write(ERROR)
                return
            fetch = asyncio.create_task(self._fetch(name, destination))
            gone = asyncio.create_task(reader.read(1))  # EOF (or anything) from the client: it left
            try:
                await asyncio.wait({fetch, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not fetch.done():
                    fetch.cancel()
                await asyncio.gather(fetch, gone, return_exceptions=True)
            if not fetch.cancelled():
                writer.write(fetch.result())
        finally:
            self.answering.discard(task)
            self.moved = time.monotonic()  # a fetch asked counts as recovery moving
            with contextlib.suppress(OSError):
                writer.close()
                await writer.wait_closed()

    async def _fetch(self, name: str, destination: str) -> bytes:
        try:
            await self.window.settle(self.location, name)
            await wal_fetch(self.settings, self.storage, name, destination)
        except ArchiveNotFound:
            return NOT_FOUND
        except Exception as e:  # the full command fetches it again and reports why
            log.debug(f"prefetcher: wal-fetch {name}: {e}")
            return ERROR
        if is_segment_name(name):
            advance(self.location, name)
            if self.last is None or _after(name, self.last, self.settings.segment_size):
                self._moved_to(name)
        return OK


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _after(a: str, b: str, segment_size: int) -> bool:
    try:
        return parse_wal_file_name(a, segment_size) > parse_wal_file_name(b, segment_size)
    except ValueError:
        return False
