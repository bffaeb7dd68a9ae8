"""The WAL feed of `restore --start`: the segments recovery will ask for, downloaded ahead of it into
pg_wal/.walrus-feed/ and fsynced there, so that restore_command takes each with one rename.

PostgreSQL calls restore_command once per segment and replays nothing while it runs: a process start
per segment (an interpreter and its imports) stalls replay each time. The restore process already
runs while recovery does, so it downloads the segments in WAL order, at most FEED_SEGMENTS ahead, and
restore_command's shell prefix (feed_prefix) moves a fed segment into place without starting walrus.
Anything not fed (a history file, another timeline, the end of the archive) falls through to
wal-fetch, which alone answers "not archived".

Invariant: a file under its segment's name in the feed is whole and durable. Each is decompressed
under .partial/, fsynced, then renamed into place: after a crash or power loss the feed holds whole
segments or none, never torn ones a rename would hand to recovery as the archive's.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil

from walrus.config import Settings
from walrus.errors import ArchiveNotFound, WalrusError
from walrus.log import log
from walrus.pg.xlog import wal_file_name
from walrus.storage.base import Storage
from walrus.wal.prefetcher import parallel_downloads
from walrus.wal.stored import download

FEED = ".walrus-feed"  # under pg_wal
PARTIAL = ".partial"
FEED_SEGMENTS = 16  # segments fed and not yet taken, at most (disk: 16 × the segment size)
POLL = 0.02  # seconds between looks at what recovery has taken, while the feed is full


def feed_prefix() -> str:
    """The shell that restore_command runs first (PostgreSQL runs it in the data directory): a fed
    segment is renamed into place; anything else, or a failed rename, goes on to what follows `||`."""
    return f'f=pg_wal/{FEED}/%f; [ -f "$f" ] && mv -f "$f" "%p" || '


def location(directory: str) -> str:
    return os.path.join(directory, "pg_wal", FEED)


class Feed:
    """Segments first..last (numbers on `timeline`, all archived) fed in order, at most FEED_SEGMENTS
    not yet taken at once. Best effort: a failure ends the feed with one log line, and restore_command
    downloads the rest itself."""

    def __init__(self, settings: Settings, storage: Storage, directory: str, timeline: int, first: int, last: int):
        self.settings, self.storage = settings, storage
        self.place = location(directory)
        self.timeline, self.first, self.last = timeline, first, last
        self.fed = 0  # segments fed so far

    async def run(self) -> None:
        """Until every segment is fed, or cancelled."""
        partial = os.path.join(self.place, PARTIAL)
        os.makedirs(partial, 0o700, exist_ok=True)
        slots = asyncio.Semaphore(parallel_downloads(self.settings))
        inflight: list[asyncio.Task] = []

        async def one(segno: int) -> None:
            name = wal_file_name(self.timeline, segno, self.settings.segment_size)
            async with slots:
                staged = os.path.join(partial, name)
                await download(self.settings, self.storage, name, staged, partial=staged + ".part")
                await asyncio.to_thread(_fsync, staged)
                os.rename(staged, os.path.join(self.place, name))

        try:
            segno = self.first
            while segno <= self.last or inflight:
                # in WAL order: a segment's download starts only when the feed has room for it
                while segno <= self.last and len(inflight) + waiting(self.place) < FEED_SEGMENTS:
                    inflight.append(asyncio.create_task(one(segno)))
                    segno += 1
                if not inflight:  # the feed is full: wait for recovery to take a segment
                    await asyncio.sleep(POLL)
                    continue
                done, _ = await asyncio.wait({inflight[0]}, timeout=POLL)
                if done:
                    await inflight.pop(0)  # raises what it raised
                    self.fed += 1
        except ArchiveNotFound as e:
            log.debug(f"the WAL feed stops: {e}")
        except (WalrusError, OSError) as e:
            log.info(f"the WAL feed stops after {self.fed} segment(s), restore_command downloads the rest: {e}")
        finally:
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)


def remove(directory: str) -> None:
    """The feed's directory and what recovery left in it (segments past a target, partial downloads)."""
    with contextlib.suppress(OSError):
        shutil.rmtree(location(directory))


def waiting(place: str) -> int:
    """Segments in the feed at `place` (location()) not yet taken."""
    try:
        return sum(1 for e in os.scandir(place) if e.name != PARTIAL)
    except OSError:
        return 0


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
