"""A delta's WAL block map: the union of the maps of every WAL segment from its base's start to its
own start, read from blockmap_005/ (parsed from pg_wal where a map is missing), or why the delta
scans pages instead."""
from __future__ import annotations

import asyncio
import dataclasses
import os
from array import array
from dataclasses import dataclass

from walrus.backup.delta import DeltaBase
from walrus.config import Settings
from walrus.errors import CorruptObject, ObjectNotFound, WalrusError
from walrus.log import log
from walrus.pg.walmap import BlockMap, MapError, SegmentMap, SegmentParser, join_record
from walrus.pg.xlog import format_lsn, segment_of, timeline_from_backup_name, wal_file_name
from walrus.storage import layout
from walrus.storage.base import Storage

READ_CHUNK = 1 << 20  # bytes of a pg_wal file parsed at a time
PREFETCH_WINDOW = 32  # stored maps fetched at once ahead of the start LSN


@dataclass
class MapChoice:
    """The map a delta reads its blocks from, or None and why it scans pages."""

    map: BlockMap | None
    reason: str
    segments: int = 0  # segments whose maps were joined
    from_pg_wal: int = 0  # of which parsed from pg_wal (no map in storage)


Stored = dict[int, "SegmentMap | None | WalrusError"]  # segment number -> its stored map, none, or why it is unusable


async def prefetch_stored_maps(settings: Settings, storage: Storage, base: DeltaBase) -> Stored:
    """The stored maps of the segments from `base`'s start on, fetched before the new backup's start
    LSN is known (while the server connection is made): a window at a time, up to the first window
    with a segment that has none (archiving has not reached it, or it has no map)."""
    size, timeline = settings.segment_size, timeline_from_backup_name(base.name)
    found: Stored = {}
    if not settings.block_map or timeline is None:
        return found

    async def one(segno: int) -> None:
        try:
            found[segno] = await _stored(storage, wal_file_name(timeline, segno, size), timeline, size, segno * size)
        except (MapError, CorruptObject) as e:
            found[segno] = e if isinstance(e, WalrusError) else CorruptObject(str(e))

    window = max(PREFETCH_WINDOW, settings.download_concurrency)  # maps are small: a storage's own limit caps it
    segno = segment_of(base.lsn, size)
    while True:
        batch = range(segno, segno + window)
        await asyncio.gather(*(one(n) for n in batch))
        if any(found[n] is None for n in batch):
            return found
        segno += window


async def load_block_map(settings: Settings, storage: Storage, pgdata: str, base: DeltaBase, start_lsn: int,
                         timeline: int, stored: Stored | None = None) -> MapChoice:
    """The blocks WAL records touched from `base`'s start LSN up to `start_lsn`: the records before
    the base's start were on disk when the base read its files, and those from `start_lsn` on are
    replayed by any restore of this backup. Needs a map for every segment in between, in storage or
    parsed from pg_wal (the segment `start_lsn` is in is always parsed there, up to it). `stored`:
    maps prefetch_stored_maps fetched already (the others are fetched here)."""
    stored = stored or {}
    if not settings.block_map:
        return MapChoice(None, "WALRUS_BLOCK_MAP is off")
    size = settings.segment_size
    if timeline_from_backup_name(base.name) != timeline:
        return MapChoice(None, f"{base.name} is on another timeline than this backup ({timeline})")
    first, last = segment_of(base.lsn, size), segment_of(start_lsn, size)
    union = BlockMap()
    edges: dict[int, SegmentMap] = {}  # each segment's map without its references: the records across its edges
    from_pg_wal = 0

    async def one(segno: int) -> str | None:
        """Adds segment segno's map; else says why it has none."""
        nonlocal from_pg_wal
        name = wal_file_name(timeline, segno, size)
        stop = start_lsn if segno == last else 0
        try:
            if stop:
                segment = None
            elif segno in stored:
                segment = stored[segno]
                if isinstance(segment, WalrusError):
                    raise segment
            else:
                segment = await _stored(storage, name, timeline, size, segno * size)
            if segment is None:
                segment = await asyncio.to_thread(_parse_pg_wal, pgdata, name, timeline, size, segno * size, stop)
                if segment is None:
                    return f"{name} has no block map (archived while maps were off, or its map failed) " \
                           "and is no longer in pg_wal"
                from_pg_wal += not stop
        except (MapError, CorruptObject) as e:
            return f"{name}: {e.message if isinstance(e, WalrusError) else e}"
        union.add(segment.refs)
        edges[segno] = dataclasses.replace(segment, refs=array("I"))
        return None

    window = max(8, settings.download_concurrency)
    segnos = list(range(first, last + 1))
    for i in range(0, len(segnos), window):
        for why in await asyncio.gather(*(one(segno) for segno in segnos[i:i + window])):
            if why is not None:
                return MapChoice(None, why)
    try:
        for segno in range(first, last):
            if edges[segno].tail_len:
                union.add(join_record(edges[segno], edges[segno + 1]))
        union.seal()
    except MapError as e:
        return MapChoice(None, str(e))
    return MapChoice(union, f"the WAL block map from {format_lsn(base.lsn)} to {format_lsn(start_lsn)} "
                            f"({len(segnos)} segments, {len(union)} blocks)", len(segnos), from_pg_wal)


async def _stored(storage: Storage, name: str, timeline: int, size: int, start: int) -> SegmentMap | None:
    key = layout.blockmap_key(name)
    try:
        data = await storage.get_bytes(key)
    except ObjectNotFound:
        return None
    return SegmentMap.decode(data, f"{key} in {storage.describe()}", timeline, size, start)


def _parse_pg_wal(pgdata: str, name: str, timeline: int, size: int, start: int, stop: int) -> SegmentMap | None:
    """The map of pg_wal/name, up to the record at `stop` (0: the whole segment); None without the file.
    A file PostgreSQL recycled under this name holds older WAL: its first page says so (MapError)."""
    try:
        fd = os.open(os.path.join(pgdata, "pg_wal", name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        parser = SegmentParser(timeline, size, start, stop)
        end = size if not stop else min(size, stop - start + 2 * READ_CHUNK)
        offset = 0
        while offset < end:
            data = os.pread(fd, min(READ_CHUNK, end - offset), offset)
            if not data or not parser.feed(data):
                break
            offset += len(data)
        return parser.finish()
    finally:
        os.close(fd)


def log_choice(choice: MapChoice) -> None:
    if choice.map is None:
        log.info(f"delta: scanning pages: no block map covers the range: {choice.reason}")
    else:
        log.info(f"delta: reading only the blocks of {choice.reason}"
                 + (f"; {choice.from_pg_wal} segment(s) parsed from pg_wal" if choice.from_pg_wal else ""))
