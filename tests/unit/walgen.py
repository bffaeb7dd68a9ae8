"""Synthetic WAL for the block map's tests: records with chosen block references, laid into pages
and segments the way PostgreSQL lays them (page headers, continuation flags, MAXALIGN)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

PAGE = 8192
MAGIC_15 = 0xD110
XLP_FIRST_IS_CONTRECORD = 0x1
XLP_LONG_HEADER = 0x2
SYSID = 7000000000000000001


@dataclass
class Ref:
    spc: int
    db: int
    rel: int
    blk: int
    fork: int = 0
    image: int = 0  # bytes of a full-page image (0: none)
    data: int = 0  # bytes of block data
    same_rel: bool = False
    hole_compressed: bool = False  # an image with a hole, compressed: the header carries hole_length


@dataclass
class Record:
    rmid: int = 10  # RM_HEAP_ID
    info: int = 0
    refs: list[Ref] = field(default_factory=list)
    main: bytes = b""
    origin: bool = False
    toplevel_xid: bool = False

    def encode(self) -> bytes:
        headers, payload = bytearray(), bytearray()
        for i, r in enumerate(self.refs):
            flags = r.fork | (0x10 if r.image else 0) | (0x20 if r.data else 0) | (0x80 if r.same_rel else 0)
            headers += struct.pack("<BBH", i, flags, r.data)
            if r.image:
                info = 0x01 | 0x08 if r.hole_compressed else 0
                headers += struct.pack("<HHB", r.image, 100, info)
                if r.hole_compressed:
                    headers += struct.pack("<H", 64)
            if not r.same_rel:
                headers += struct.pack("<III", r.spc, r.db, r.rel)
            headers += struct.pack("<I", r.blk)
            payload += bytes([0xAB]) * (r.image + r.data)
        if self.origin:
            headers += struct.pack("<BH", 253, 1)
        if self.toplevel_xid:
            headers += struct.pack("<BI", 252, 1234)
        if self.main:
            headers += struct.pack("<BB", 255, len(self.main)) if len(self.main) < 256 \
                else struct.pack("<BI", 254, len(self.main))
        body = bytes(headers) + bytes(payload) + self.main
        total = 24 + len(body)
        return struct.pack("<IIQBBHI", total, 1, 0, self.info, self.rmid, 0, 0) + body


def smgr_create(spc: int, db: int, rel: int, fork: int = 0) -> Record:
    return Record(rmid=2, info=0x10, main=struct.pack("<IIIi", spc, db, rel, fork))


def dbase_copy(db: int, spc: int) -> Record:
    return Record(rmid=4, info=0x00, main=struct.pack("<IIII", db, spc, 1, spc))


def switch() -> Record:
    return Record(rmid=0, info=0x40)


def filler(size: int) -> Record:
    """A record of `size` bytes (at least 26) without block references."""
    return Record(rmid=1, main=bytes(size - 26)) if size - 26 < 256 else Record(rmid=1, main=bytes(size - 29))


def wal_stream(records: list[Record], start: int, segments: int, segment_size: int, timeline: int = 1,
               magic: int = MAGIC_15) -> tuple[bytes, list[int]]:
    """`segments` consecutive segments from LSN `start` (a segment's first byte) holding `records`;
    also returns each record's LSN. A switch record ends its segment as PostgreSQL's does (the next
    record starts on the next segment)."""
    out = bytearray(segments * segment_size)
    pos = 0
    lsns = []

    def header(rem: int) -> None:
        nonlocal pos
        long = pos % segment_size == 0
        info = (XLP_LONG_HEADER if long else 0) | (XLP_FIRST_IS_CONTRECORD if rem else 0)
        head = struct.pack("<HHIQI", magic, info, timeline, start + pos, rem) + bytes(4)
        if long:
            head += struct.pack("<QII", SYSID, segment_size, PAGE)
        out[pos:pos + len(head)] = head
        pos += len(head)

    def align() -> None:
        nonlocal pos
        pos = (pos + 7) & ~7
        if pos % PAGE == 0:
            header(0)

    header(0)
    for record in records:
        align()
        lsns.append(start + pos)
        data = record.encode()
        while data:
            n = min(PAGE - pos % PAGE, len(data))
            out[pos:pos + n] = data[:n]
            pos += n
            data = data[n:]
            if pos % PAGE == 0 and pos < len(out):
                header(len(data))
        if record.rmid == 0 and record.info == 0x40:
            pos = (pos // segment_size + 1) * segment_size
            if pos < len(out):
                header(0)
        assert pos <= len(out), "the records do not fit the segments"
    return bytes(out), lsns
