"""WAL prefetch in WAL-G's layout: the next segments land in pg_wal/.wal-g/prefetch/ before recovery asks."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import subprocess
import sys

from walrus.config import Settings
from walrus.errors import ArchiveNotFound, WalrusError
from walrus.log import log
from walrus.pg.xlog import classify_wal_name, next_wal_file_name, parse_wal_file_name
from walrus.storage.base import Storage

PREFETCH = os.path.join(".wal-g", "prefetch")
RUNNING = "running"
LOCK = ".prefetcher.lock"
WAL_MAGIC_MIN = 0xD061  # the oldest WAL page magic PostgreSQL 9.x wrote; anything lower is not WAL
WAIT_POLL = 0.002
WAIT_GIVE_UP = 100  # polls without growth of a running download (WAL-G waits the same ~200 ms)


def location(settings: Settings, destination: str) -> str:
    """P = <dir of DEST or WALG_PREFETCH_DIR>/.wal-g/prefetch; downloads in progress go to P/running."""
    base = settings.prefetch_dir or os.path.dirname(os.path.realpath(destination))
    return os.path.join(base, PREFETCH)


def wanted(name: str, settings: Settings) -> bool:
    return classify_wal_name(name) == "segment" and settings.download_concurrency > 1


async def take(location: str, name: str, destination: str, segment_size: int) -> int | None:
    """Move a prefetched `name` to DEST if it is whole and looks like WAL; None to download it instead."""
    ready = os.path.join(location, name)
    running = os.path.join(location, RUNNING, name)
    if not os.path.exists(ready):
        last, idle = -1, 0
        while idle < WAIT_GIVE_UP:  # a prefetch is writing it: wait while it keeps growing
            try:
                size = os.stat(running).st_size
            except FileNotFoundError:
                break
            idle = idle + 1 if size == last else 0
            last = size
            await asyncio.sleep(WAIT_POLL)
        if not os.path.exists(ready):
            return None
    try:
        with open(ready, "rb") as f:
            head = f.read(4)
            st = os.fstat(f.fileno())
    except FileNotFoundError:
        return None
    if st.st_mtime < _boot_time():
        # written without fsync before a crash or reboot: its bytes may be torn, so never trust it
        log.info(f"prefetched {name} dates from before the last boot; downloading it again")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready)
        return None
    size = st.st_size
    if size != segment_size or len(head) < 4 or struct.unpack("<I", head)[0] < WAL_MAGIC_MIN:
        log.warning(f"prefetched {name} is not a whole WAL segment; downloading it again")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready)
        return None
    try:
        os.rename(ready, destination)
    except FileNotFoundError:
        return None
    return size


def parallel_downloads(settings: Settings) -> int:
    """Downloads of a window running at once: one per CPU (decompression is the work; at least 2, so
    one download's wait on storage overlaps another's), never more than the window."""
    return max(1, min(settings.download_concurrency, max(2, len(os.sched_getaffinity(0)))))


class Window:
    """The prefetch window after the segment recovery asked for last, downloaded in order.

    Each fill() queues the next WALG_DOWNLOAD_CONCURRENCY segments that are neither here nor queued;
    they start in WAL order, parallel_downloads() at a time, so the one recovery asks for next is
    whole first (ten at once, as WAL-G starts them, would all finish late). The daemon keeps one
    window for its lifetime and refills it on every fetch; `wal-prefetch` fills one and waits.
    """

    def __init__(self, settings: Settings, storage: Storage):
        self.settings = settings
        self.storage = storage
        self._slots = asyncio.Semaphore(parallel_downloads(settings))
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}  # (location, segment) -> its download

    def fill(self, name: str, location: str) -> list[asyncio.Task]:
        """Queue the segments after `name`; returns the downloads queued now."""
        os.makedirs(os.path.join(location, RUNNING), 0o700, exist_ok=True)
        _clean(location, name, self.settings.segment_size)
        started, current = [], name
        for _ in range(self.settings.download_concurrency):
            current = next_wal_file_name(current, self.settings.segment_size)
            key = (location, current)
            if key in self._tasks or _present(location, current):
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
        from walrus.wal.fetch import download

        async with self._slots:
            final, partial = os.path.join(location, segment), os.path.join(location, RUNNING, segment)
            if _present(location, segment):
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
            return segment


async def prefetch(settings: Settings, storage: Storage, name: str, location: str) -> list[str]:
    """Download the WALG_DOWNLOAD_CONCURRENCY segments after `name` on its timeline; clean older ones."""
    done = await asyncio.gather(*Window(settings, storage).fill(name, location))
    return [s for s in done if s]


def _present(location: str, segment: str) -> bool:
    return os.path.exists(os.path.join(location, segment)) or os.path.exists(os.path.join(location, RUNNING, segment))


def _boot_time() -> float:
    """When this system booted (seconds since the epoch), from /proc/stat's btime; 0 if unknown."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _clean(location: str, name: str, segment_size: int) -> None:
    """Remove prefetched files older than `name`: recovery has moved past them."""
    timeline, segno = parse_wal_file_name(name, segment_size)
    for folder in (location, os.path.join(location, RUNNING)):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(folder):
                try:
                    if parse_wal_file_name(entry, segment_size) < (timeline, segno):
                        os.unlink(os.path.join(folder, entry))
                except (ValueError, FileNotFoundError, IsADirectoryError):
                    continue


def spawn(name: str, destination: str, location: str, config_path: str | None) -> None:
    """Start `walrus wal-prefetch` detached, so restore_command returns while the next segments come.

    At most one prefetcher runs per location: this process takes an exclusive flock and hands the
    locked file to the child, which holds it until it exits. Recovery calls restore_command once per
    segment; without the lock each call would start another interpreter competing for the CPU
    that replay needs.
    """
    try:
        os.makedirs(os.path.join(location, RUNNING), 0o700, exist_ok=True)
        lock = os.open(os.path.join(location, RUNNING, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)  # a prefetcher is already at work
        return
    cmd = [sys.executable, "-m", "walrus"] + (["--config", config_path] if config_path else [])
    cmd += ["wal-prefetch", name, os.path.dirname(os.path.abspath(destination))]
    with contextlib.suppress(OSError):
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, pass_fds=(lock,))
    os.close(lock)  # the child's copy keeps the lock (flock belongs to the shared open file)
