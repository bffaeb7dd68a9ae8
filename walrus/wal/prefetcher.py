"""The prefetcher: downloads the segments after the one recovery asked for, in WAL order, ahead of it."""
from __future__ import annotations

import asyncio
import os
import time

from walrus.config import Settings
from walrus.errors import ArchiveNotFound, WalrusError
from walrus.log import log
from walrus.pg.xlog import next_wal_file_name, parse_wal_file_name
from walrus.storage.base import Storage
from walrus.wal.stored import download
from walrus.wal.prefetch import RUNNING, clean, cursor, present

FOLLOW_POLL = 0.02  # seconds between looks at the cursor
FOLLOW_LINGER = 2.0  # a prefetcher whose cursor has not moved for this long, with nothing in flight, exits


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


async def follow(settings: Settings, storage: Storage, name: str, location: str) -> int:
    """`wal-prefetch`: keep the window filled after the segment recovery asked for last (the cursor each
    wal-fetch records) until it stops moving; returns how many segments were downloaded.

    One prefetcher follows recovery for as long as it keeps asking, instead of a new process (and its
    imports, about 0.1 CPU-s) every few segments competing with replay for the CPU.
    """
    window = Window(settings, storage)
    window.fill(name, location)
    last, moved = name, time.monotonic()
    while True:
        await asyncio.sleep(FOLLOW_POLL)
        now = cursor(location)
        if now is not None and _after(now, last, settings.segment_size):
            last, moved = now, time.monotonic()
            window.fill(last, location)
        elif time.monotonic() - moved > FOLLOW_LINGER and not window.busy:
            return window.downloaded


def _after(a: str, b: str, segment_size: int) -> bool:
    try:
        return parse_wal_file_name(a, segment_size) > parse_wal_file_name(b, segment_size)
    except ValueError:
        return False
