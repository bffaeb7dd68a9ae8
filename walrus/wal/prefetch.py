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
STAGGER = 0.01  # seconds between starting each prefetch download, as WAL-G


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
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
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


async def prefetch(settings: Settings, storage: Storage, name: str, location: str) -> list[str]:
    """Download the WALG_DOWNLOAD_CONCURRENCY segments after `name` on its timeline; clean older ones."""
    from walrus.wal.fetch import download

    running = os.path.join(location, RUNNING)
    os.makedirs(running, 0o700, exist_ok=True)
    _clean(location, name, settings.segment_size)
    names, current = [], name
    for _ in range(settings.download_concurrency):
        current = next_wal_file_name(current, settings.segment_size)
        names.append(current)

    async def one(i: int, segment: str) -> str | None:
        await asyncio.sleep(i * STAGGER)
        final, partial = os.path.join(location, segment), os.path.join(running, segment)
        if os.path.exists(final) or os.path.exists(partial):
            return None  # there already, or another prefetch has it
        try:
            await download(settings, storage, segment, final, partial=partial)
        except ArchiveNotFound:
            return None  # past the end of the archive (yet)
        except (WalrusError, FileExistsError) as e:
            log.debug(f"prefetch of {segment} skipped: {e}")
            return None
        return segment

    done = await asyncio.gather(*(one(i, s) for i, s in enumerate(names)))
    return [s for s in done if s]


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
