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


class MapJoin:
    """The union of the maps of a range of segments, built as the maps arrive, in any order.

    A segment's references go into the union at once; of its map only the edges are held (the first
    bytes of a record it ends inside of, and of one it starts inside of) until the neighbour that
    completes that record is in, when the record's references join the union. So memory is the
    union, one merge batch and the edges of segments whose neighbour is not in yet, whatever the
    number of segments: a day of WAL is thousands of maps, most of them naming the same hot blocks.
    Segments outside the range a delta needs (its start segment's stored map, say) only make the
    union a superset, which is safe: a page copied that did not change is just a page.
    """

    def __init__(self) -> None:
        self.union = BlockMap()
        self._added: set[int] = set()
        self._edges: dict[int, SegmentMap] = {}  # added segments with an edge not joined yet, refs dropped
        self._joined: set[int] = set()  # n: the record across the edge between n and n + 1 is in the union
        self._unusable: dict[int, WalrusError | None] = {}  # segments looked up without a usable map: why
        self.error: str | None = None  # why a record across an edge could not join the union

    def __contains__(self, segno: int) -> bool:
        return segno in self._added

    @property
    def held_edges(self) -> int:
        """Segments whose edges are held, waiting for a neighbour."""
        return len(self._edges)

    def add(self, segno: int, segment: SegmentMap) -> None:
        """Adds segment segno's map; a record across one of its edges that does not parse is kept in
        `error` (the map is then unusable: the delta scans pages)."""
        if segno in self._added:
            return
        self.union.add(segment.refs)
        self._added.add(segno)
        self._unusable.pop(segno, None)
        self._edges[segno] = dataclasses.replace(segment, refs=array("I"))
        for left in (segno - 1, segno):
            self._join(left)

    def mark_unusable(self, segno: int, why: WalrusError | None) -> None:
        """Segment segno has no map in storage (None) or an unusable one (why)."""
        if segno not in self._added:
            self._unusable[segno] = why

    def unusable(self, segno: int) -> tuple[bool, WalrusError | None]:
        """(looked up without a usable map, the error if it was damaged rather than missing)."""
        return segno in self._unusable, self._unusable.get(segno)

    def _join(self, left: int) -> None:
        tail, cont = self._edges.get(left), self._edges.get(left + 1)
        if tail is None or cont is None or left in self._joined:
            return
        if tail.tail_len:
            try:
                self.union.add(join_record(tail, cont))
            except MapError as e:
                self.error = self.error or str(e)
        self._joined.add(left)
        for segno in (left, left + 1):  # an edge map is done once both its edges are
            if segno in self._joined and segno - 1 in self._joined:
                self._edges.pop(segno, None)

    def complete(self, first: int, last: int) -> bool:
        """Every segment from first to last is in, and every record across their edges."""
        return all(n in self._added for n in range(first, last + 1)) and all(
            n in self._joined for n in range(first, last))


async def prefetch_stored_maps(settings: Settings, storage: Storage, base: DeltaBase) -> MapJoin:
    """The stored maps of the segments from `base`'s start on, fetched before the new backup's start
    LSN is known (while the server connection is made) and joined as they come: a window at a time,
    up to the first window with a segment that has none (archiving has not reached it, or it has no
    map)."""
    size, timeline = settings.segment_size, timeline_from_backup_name(base.name)
    join = MapJoin()
    if not settings.block_map or timeline is None:
        return join

    async def one(segno: int) -> bool:
        """Whether segment segno has a map in storage."""
        try:
            segment = await _stored(storage, wal_file_name(timeline, segno, size), timeline, size, segno * size)
        except (MapError, CorruptObject) as e:
            join.mark_unusable(segno, e if isinstance(e, WalrusError) else CorruptObject(str(e)))
            return True  # damaged: reported if the range needs it
        if segment is None:
            join.mark_unusable(segno, None)
            return False
        join.add(segno, segment)
        return True

    window = max(PREFETCH_WINDOW, settings.download_concurrency)  # maps are small: a storage's own limit caps it
    segno = segment_of(base.lsn, size)
    while True:
        if not all(await asyncio.gather(*(one(n) for n in range(segno, segno + window)))):
            return join
        segno += window


async def load_block_map(settings: Settings, storage: Storage, pgdata: str, base: DeltaBase, start_lsn: int,
                         timeline: int, stored: MapJoin | None = None) -> MapChoice:
    """The blocks WAL records touched from `base`'s start LSN up to `start_lsn`: the records before
    the base's start were on disk when the base read its files, and those from `start_lsn` on are
    replayed by any restore of this backup. Needs a map for every segment in between, in storage or
    parsed from pg_wal (the segment `start_lsn` is in is parsed there, up to it, unless the prefetch
    found its map stored). `stored`: what prefetch_stored_maps joined already (the rest is fetched
    here)."""
    if not settings.block_map:
        return MapChoice(None, "WALRUS_BLOCK_MAP is off")
    size = settings.segment_size
    if timeline_from_backup_name(base.name) != timeline:
        return MapChoice(None, f"{base.name} is on another timeline than this backup ({timeline})")
    join = stored if stored is not None else MapJoin()
    first, last = segment_of(base.lsn, size), segment_of(start_lsn, size)
    from_pg_wal = 0

    async def one(segno: int) -> str | None:
        """Adds segment segno's map; else says why it has none."""
        nonlocal from_pg_wal
        name = wal_file_name(timeline, segno, size)
        stop = start_lsn if segno == last else 0
        try:
            looked, why = join.unusable(segno)
            if why is not None and not stop:
                raise why
            segment = None if stop or looked else await _stored(storage, name, timeline, size, segno * size)
            if segment is None:
                segment = await asyncio.to_thread(_parse_pg_wal, pgdata, name, timeline, size, segno * size, stop)
                if segment is None:
                    return f"{name} has no block map (archived while maps were off, or its map failed) " \
                           "and is no longer in pg_wal"
                from_pg_wal += not stop
            join.add(segno, segment)
        except (MapError, CorruptObject) as e:
            return f"{name}: {e.message if isinstance(e, WalrusError) else e}"
        return None

    window = max(8, settings.download_concurrency)
    missing = [segno for segno in range(first, last + 1) if segno not in join]
    for i in range(0, len(missing), window):
        for why in await asyncio.gather(*(one(segno) for segno in missing[i:i + window])):
            if why is not None:
                return MapChoice(None, why)
    if join.error is not None:
        return MapChoice(None, join.error)
    if not join.complete(first, last):  # cannot happen: each segment is in, or the delta scans
        return MapChoice(None, "the maps of the range do not join up")
    join.union.seal()
    segments = last - first + 1
    return MapChoice(join.union, f"the WAL block map from {format_lsn(base.lsn)} to {format_lsn(start_lsn)} "
                                 f"({segments} segments, {len(join.union)} blocks)", segments, from_pg_wal)


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
