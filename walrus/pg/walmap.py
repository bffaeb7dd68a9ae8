"""The WAL block map: which relation blocks a WAL segment's records touch (parsed by the compiled
module), the sidecar that stores one segment's map, and the union over a range that a delta reads
instead of scanning pages."""
from __future__ import annotations

import functools
import struct
import sys
from array import array
from dataclasses import dataclass

from walrus.errors import CorruptObject
from walrus.pg.pages import BLOCK_SIZE

WHOLE = 0xFFFFFFFF  # block number meaning "the whole relation" (relation 0: the whole database)
DEFAULT_TABLESPACE = 1663  # base/
RELSEG_BLOCKS = (1 << 30) // BLOCK_SIZE  # blocks per 1 GiB relation file segment (RELSEG_SIZE)
_STATUS = {-1: "a page without a known WAL page magic (PostgreSQL 13 to 17)",
           -2: "the first page belongs to another segment", -3: "a segment or page size this map does not know",
           -4: "a record with an impossible length", -5: "a record header that does not decode",
           -6: "out of memory", -7: "the segment ends inside a record's pages"}

# The sidecar: a zstd frame (with its checksum) of this header, the references (four little-endian
# uint32 each: tablespace, database, relation, block; sorted, unique), then the tail and cont bytes.
SIDECAR_MAGIC = b"WRBM"
SIDECAR_VERSION = 1
_SIDECAR = struct.Struct("<4sHHIIQQHHIIIII")
_SWITCHED = 1


class MapError(Exception):
    """A segment whose records could not all be read: it has no block map."""


@dataclass(frozen=True)
class SegmentMap:
    """One segment's block references, and the pieces of the record that crosses into the next."""

    timeline: int
    segment_size: int
    start: int  # LSN of the segment's first byte
    refs: array  # uint32 quadruples, sorted and unique
    records: int
    switched: bool
    page_magic: int
    tail_len: int = 0  # xl_tot_len of a record this segment ends inside of, header undecoded (else 0)
    tail: bytes = b""  # its first bytes (at most the parser's header limit)
    cont_len: int = 0  # bytes of an earlier segment's record this one starts with (xlp_rem_len)
    cont: bytes = b""  # their first bytes

    def encode(self) -> bytes:
        refs = self.refs if sys.byteorder == "little" else _swapped(self.refs)
        head = _SIDECAR.pack(SIDECAR_MAGIC, SIDECAR_VERSION, _SWITCHED if self.switched else 0, self.timeline,
                             self.segment_size, self.start, self.records, self.page_magic, 0, len(self.refs) // 4,
                             self.tail_len, len(self.tail), self.cont_len, len(self.cont))
        import zstandard  # here: every backup-push imports this module; only sidecars need zstd

        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(
            head + refs.tobytes() + self.tail + self.cont)

    @classmethod
    def decode(cls, data: bytes, source: str, timeline: int, segment_size: int, start: int) -> SegmentMap:
        """The map in a sidecar, checked to be the one of segment `start` on `timeline`."""
        def bad(detail: str) -> CorruptObject:
            return CorruptObject(f"{source} is not a readable block map", detail=detail,
                                 hint="delete it: the delta then scans pages, and the next wal-push of the "
                                      "segment does not write it again (the map is optional)")
        import zstandard

        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=segment_size + _SIDECAR.size + 8192)
        except zstandard.ZstdError as e:
            raise bad(f"zstd: {e}") from None
        if len(raw) < _SIDECAR.size:
            raise bad(f"{len(raw)} bytes, shorter than its header")
        (magic, version, flags, tli, size, first, records, page_magic, _, count, tail_len, tail_bytes, cont_len,
         cont_bytes) = _SIDECAR.unpack_from(raw)
        if magic != SIDECAR_MAGIC or version != SIDECAR_VERSION:
            raise bad(f"magic {magic!r} version {version}, expected {SIDECAR_MAGIC!r} {SIDECAR_VERSION}")
        if (tli, size, first) != (timeline, segment_size, start):
            raise bad(f"it maps timeline {tli} segment at {first:X} of {size} bytes, "
                      f"not timeline {timeline} at {start:X} of {segment_size}")
        body = _SIDECAR.size + 16 * count
        if len(raw) != body + tail_bytes + cont_bytes or tail_bytes > tail_len or cont_bytes > cont_len:
            raise bad(f"{len(raw)} bytes do not hold {count} references, {tail_bytes} + {cont_bytes} record bytes")
        refs = array("I", raw[_SIDECAR.size:body])
        if sys.byteorder != "little":
            refs.byteswap()
        if not _is_sorted(refs):
            raise bad("its references are not sorted and unique")
        return cls(tli, size, first, refs, records, bool(flags & _SWITCHED), page_magic, tail_len,
                   raw[body:body + tail_bytes], cont_len, raw[body + tail_bytes:])


class SegmentParser:
    """A segment's bytes, fed in order as they are read; finish() gives its SegmentMap. stop_lsn (of
    a segment PostgreSQL is still writing) ends the parse at the first record that starts there."""

    def __init__(self, timeline: int, segment_size: int, start: int, stop_lsn: int = 0):
        ffi, self._lib = _compiled()
        self.timeline, self.segment_size, self.start = timeline, segment_size, start
        self._state = ffi.gc(ffi.new("struct walrus_walmap *"), self._lib.walrus_walmap_release)
        self._lib.walrus_walmap_init(self._state, start, segment_size, stop_lsn)
        self._ffi = ffi

    def feed(self, data) -> bool:
        """Parse the next bytes; False once the parse is over (the segment switched, ended, or failed)."""
        return self._lib.walrus_walmap_feed(self._state, self._ffi.from_buffer("unsigned char[]", data), len(data)) == 0

    def finish(self) -> SegmentMap:
        st = self._state
        status = self._lib.walrus_walmap_finish(st)
        if status < 0:
            raise MapError(f"{_STATUS.get(status, f'error {status}')} at {st.error_lsn >> 32:X}/{st.error_lsn & 0xFFFFFFFF:X}")
        if status == 0 and st.pos < self.segment_size and st.need == 0:
            raise MapError(f"only {st.pos} of {self.segment_size} bytes were read")
        refs = _refs_of(self._ffi, st)
        tail_len = st.rec_len if st.need and not st.foreign and not st.decoded else 0
        tail = bytes(self._ffi.buffer(st.head, min(st.got, len(st.head)))) if tail_len else b""
        cont = bytes(self._ffi.buffer(st.cont, st.cont_got))
        self._lib.walrus_walmap_release(st)
        return SegmentMap(self.timeline, self.segment_size, self.start, refs, st.records, bool(st.switched),
                          st.magic, tail_len, tail, st.cont_len, cont)


def join_record(tail: SegmentMap, cont: SegmentMap) -> array:
    """The block references of the record that `tail` ends inside of and `cont` continues."""
    ffi, lib = _compiled()
    data = (tail.tail + cont.cont)[:tail.tail_len]
    st = ffi.gc(ffi.new("struct walrus_walmap *"), lib.walrus_walmap_release)
    status = lib.walrus_walmap_record(st, data, len(data), tail.tail_len, tail.page_magic)
    if status < 0:
        raise MapError(f"the record crossing into the segment at {cont.start:X}: {_STATUS.get(status, status)}")
    lib.walrus_walmap_finish(st)
    return _refs_of(ffi, st)


def _refs_of(ffi, st) -> array:
    """A copy of a finished parse's references (the C state's own array is freed with it)."""
    return array("I", bytes(ffi.buffer(st.refs, 16 * st.nrefs)) if st.nrefs else b"")


def _merge(a: array, b: array) -> array:
    """The union of two sorted, unique reference runs."""
    ffi, lib = _compiled()
    out = array("I", bytes(4 * (len(a) + len(b))))
    n = lib.walrus_walmap_merge(ffi.from_buffer("uint32_t[]", a), len(a) // 4, ffi.from_buffer("uint32_t[]", b),
                                len(b) // 4, ffi.from_buffer("uint32_t[]", out))
    del out[4 * n:]
    return out


class BlockMap:
    """The union of segments' references: which blocks of which relation file changed.

    Held as a bitmap per relation file (a bit per block, up to the highest block named: 16 KiB for
    a whole 1 GiB file) and a set of relations and databases changed whole, so its memory is
    bounded by the size of the files the WAL touched, never by how often or how many of their
    blocks changed (a sorted list of references took 16 bytes a block: 200 MB for 100 GB
    changed). References come in sorted runs (a segment's map, a crossing record's), gathered in
    batches that are merged (the compiled module's linear merge, pairwise: n log k steps for k runs)
    and folded into the bitmaps one file's group at a time.
    """

    BATCH = 1 << 18  # references gathered before they are folded in (4 MiB of runs)

    def __init__(self) -> None:
        self._files: dict[tuple[int, int, int, int], bytearray] = {}  # (spc, db, rel, file segment) -> bits
        self._whole: set[tuple[int, int, int]] = set()  # (spc, db, rel) changed whole; rel 0: the database
        self._runs: list[array] = []
        self._pending = 0  # references in _runs

    def __len__(self) -> int:
        """Blocks changed, and relations and databases changed whole."""
        assert not self._runs, "seal() the map before reading it"
        ffi, lib = _compiled()
        return len(self._whole) + sum(lib.walrus_walmap_count_bits(ffi.from_buffer("uint8_t[]", bits), len(bits))
                                      for bits in self._files.values())

    def add(self, refs: array) -> None:
        """Adds references, each run sorted and unique as a parse or a decoded map gives them
        (another run is sorted here first)."""
        if not refs:
            return
        if not _is_sorted(refs):
            ffi, lib = _compiled()
            refs = array("I", refs)
            del refs[4 * lib.walrus_walmap_unique(ffi.from_buffer("uint32_t[]", refs), len(refs) // 4):]
        self._runs.append(refs)
        self._pending += len(refs) // 4
        if self._pending >= self.BATCH:
            self.seal()

    def seal(self) -> None:
        """Fold what was added into the union (before it is read)."""
        if not self._runs:
            return
        runs, self._runs, self._pending = self._runs, [], 0
        while len(runs) > 1:
            merged = [_merge(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
            runs = merged + runs[len(merged) * 2:]
        self._fold(runs[0])

    def _fold(self, refs: array) -> None:
        """Sorted, unique references into the bitmaps: one Python step per relation file named."""
        ffi, lib = _compiled()
        view, n, i = ffi.from_buffer("uint32_t[]", refs), len(refs) // 4, 0
        while i < n:
            j = lib.walrus_walmap_group_end(view, n, i, RELSEG_BLOCKS)
            spc, db, rel, block = refs[4 * i:4 * i + 4]
            if block == WHOLE:
                self._whole.add((spc, db, rel))
            else:
                segno = block // RELSEG_BLOCKS
                first = segno * RELSEG_BLOCKS
                size = (refs[4 * j - 1] - first) // 8 + 1  # bytes to the group's last block
                bits = self._files.setdefault((spc, db, rel, segno), bytearray(size))
                if len(bits) < size:
                    bits.extend(bytes(size - len(bits)))
                lib.walrus_walmap_set_bits(ffi.from_buffer("uint8_t[]", bits), view, i, j, first)
            i = j

    @property
    def refs(self) -> array:
        """The union as sorted, unique quadruples (tests and tools; a delta asks per file)."""
        assert not self._runs, "seal() the map before reading it"
        quads = [(spc, db, rel, WHOLE) for spc, db, rel in self._whole]
        for (spc, db, rel, segno), bits in self._files.items():
            quads += [(spc, db, rel, segno * RELSEG_BLOCKS + b) for b in self._listed(bits, len(bits) * 8)]
        return array("I", [v for q in sorted(quads) for v in q])

    def blocks(self, relpath: str, size: int) -> array | None:
        """The blocks of relation file `relpath` (inside the data directory) that changed, numbered
        within the file and below its size; None where the whole file must be copied (its relation
        or database was created anew in the range, or the path is not a relation file's)."""
        assert not self._runs, "seal() the map before reading it"
        key = relation_of(relpath)
        if key is None:
            return None
        spc, db, rel, segno = key
        if self._rewritten(spc, db, rel):
            return None
        bits = self._files.get(key)
        if bits is None:
            return array("I")
        return self._listed(bits, min(size // BLOCK_SIZE, len(bits) * 8))

    def touches(self, spc: int, db: int, rel: int, block: int) -> bool:
        """Whether the WAL changed block `block` (numbered across the relation's segments) of the
        relation's main fork, or the relation or its database whole."""
        assert not self._runs, "seal() the map before reading it"
        if self._rewritten(spc, db, rel):
            return True
        bits = self._files.get((spc, db, rel, block // RELSEG_BLOCKS))
        b = block % RELSEG_BLOCKS
        return bits is not None and b < len(bits) * 8 and bool(bits[b >> 3] >> (b & 7) & 1)

    def _rewritten(self, spc: int, db: int, rel: int) -> bool:
        """Whether the relation, or its database, changed whole."""
        return (spc, db, rel) in self._whole or (spc, db, 0) in self._whole

    @staticmethod
    def _listed(bits: bytearray, nbits: int) -> array:
        """The set bits of bits below nbits, in order."""
        ffi, lib = _compiled()
        out = array("I", bytes(4 * nbits))
        found = lib.walrus_walmap_list_bits(ffi.from_buffer("uint8_t[]", bits), nbits,
                                            ffi.from_buffer("uint32_t[]", out))
        del out[found:]
        return out


def relation_of(relpath: str) -> tuple[int, int, int, int] | None:
    """(tablespace, database, relation, file segment) of base/DB/REL[.N] or
    pg_tblspc/SPC/VERSION_DIR/DB/REL[.N]; None for any other path."""
    parts = relpath.strip("/").split("/")
    if len(parts) == 3 and parts[0] == "base":
        spc, db, name = str(DEFAULT_TABLESPACE), parts[1], parts[2]
    elif len(parts) == 5 and parts[0] == "pg_tblspc":
        spc, db, name = parts[1], parts[3], parts[4]
    else:
        return None
    rel, _, segno = name.partition(".")
    if not (spc.isdigit() and db.isdigit() and rel.isdigit() and (segno.isdigit() or not segno)):
        return None
    return int(spc), int(db), int(rel), int(segno or 0)


def _is_sorted(refs: array) -> bool:
    ffi, lib = _compiled()
    return len(refs) % 4 == 0 and bool(lib.walrus_walmap_sorted(ffi.from_buffer("uint32_t[]", refs), len(refs) // 4))


def _swapped(refs: array) -> array:
    copy = array("I", refs)
    copy.byteswap()
    return copy


@functools.cache
def _compiled():
    """(ffi, lib) of the compiled module; the map needs it (MapError without it)."""
    try:
        from walrus._uring._liburing import ffi, lib
        lib.walrus_walmap_init  # noqa: B018 -- a module built before the block map lacks it
    except (ImportError, AttributeError) as e:
        raise MapError(f"the compiled module is unavailable ({e})") from None
    return ffi, lib
