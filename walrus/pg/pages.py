"""PostgreSQL data pages for delta backups: which files are paged, which of their pages changed since an LSN (WAL-G's page scan), and WAL-G's `wi1` increment format."""
from __future__ import annotations

import functools
import posixpath
import re
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Callable

from walrus.errors import CorruptObject
from walrus.log import log

BLOCK_SIZE = 8192  # PostgreSQL's BLCKSZ (WALG_PG_BLOCK_SIZE's default); walrus supports no other
INCREMENT_MAGIC = b"wi1\x55"  # "wal-g increment", format version '1', WAL-G's signature byte
_HEAD = struct.Struct("<4sQI")  # magic, the file's size, the number of pages carried
HEAD_SIZE = _HEAD.size
_PAGED_NAME = re.compile(r"\d+(\.\d+)?")  # a relation's main fork: 16384, 16384.1, ...
_TRANSACTION_DIRS = ("pg_xact", "pg_clog", "pg_multixact")  # SLRU pages carry no LSN
_PAGE_HEAD = struct.Struct("<IIHHHHHH")  # pd_lsn (xlogid, xrecoff), checksum, flags, lower, upper, special, size|version


def is_paged_file(relpath: str, size: int) -> bool:
    """A relation data file, so a delta may carry only its changed pages (WAL-G's isPagedFile, on the
    path inside the data directory: WAL-G's test on the absolute path also matches a data directory
    named, say, /srv/database)."""
    if any(d in relpath for d in _TRANSACTION_DIRS):
        return False
    top = relpath.split("/", 1)[0]
    return (top in ("base", "pg_tblspc") and size > 0 and size % BLOCK_SIZE == 0
            and _PAGED_NAME.fullmatch(posixpath.basename(relpath)) is not None)


def increment_size(pages: int) -> int:
    """Bytes of a `wi1` member that carries `pages` pages."""
    return HEAD_SIZE + 4 * pages + BLOCK_SIZE * pages


def increment_head(file_size: int, blocks: array) -> bytes:
    """A `wi1` member's bytes before its pages: magic, file size, page count, block numbers."""
    numbers = blocks
    if sys.byteorder != "little":
        numbers = array("I", blocks)
        numbers.byteswap()
    return _HEAD.pack(INCREMENT_MAGIC, file_size, len(blocks)) + numbers.tobytes()


@dataclass(frozen=True)
class Increment:
    """A parsed `wi1` head: the file's size and the blocks whose pages follow, in order."""

    file_size: int
    blocks: array

    @property
    def size(self) -> int:
        return increment_size(len(self.blocks))


def read_increment_head(read: Callable[[int], bytes], member_size: int, name: str) -> Increment:
    """Parse a `wi1` member's head through `read(n)` (exactly n bytes, or fewer at the end) and check
    it against the member's size, so a damaged or hostile increment is refused before any write."""
    head = read(HEAD_SIZE)
    if len(head) < HEAD_SIZE:
        raise _bad(name, f"it ends after {len(head)} bytes, inside the 16-byte increment header")
    magic, file_size, count = _HEAD.unpack(head)
    if magic[:2] != b"wi" or magic[3] != INCREMENT_MAGIC[3]:
        raise _bad(name, f"its increment header starts with {magic.hex()}, not {INCREMENT_MAGIC.hex()}")
    if magic[2:3] != b"1":
        raise _bad(name, f"its increment format version is {magic[2:3]!r}; walrus and WAL-G know only '1'")
    if increment_size(count) != member_size:
        raise _bad(name, f"it declares {count} pages ({increment_size(count)} bytes) but holds {member_size} bytes")
    raw = read(4 * count) if count else b""
    if len(raw) < 4 * count:
        raise _bad(name, "it ends inside its block list")
    blocks = array("I")
    blocks.frombytes(raw)
    if sys.byteorder != "little":
        blocks.byteswap()
    pages_in_file = file_size // BLOCK_SIZE
    beyond = next((b for b in blocks if b >= pages_in_file), None)
    if beyond is not None:
        raise _bad(name, f"it carries block {beyond} of a file of {file_size} bytes ({pages_in_file} pages)")
    return Increment(file_size, blocks)


def _bad(name: str, detail: str) -> CorruptObject:
    return CorruptObject(f"invalid increment for {name}", detail=detail,
                         hint="the delta backup is damaged; restore an older backup (backup-list shows them)")


# -- the page scan

@functools.cache
def _compiled(function: str = "walrus_select_pages", what: str = "delta page scan") -> tuple | None:
    """(ffi, the compiled module's `function`), or None (logged once) without it: `what` runs in Python."""
    try:
        from walrus._uring._liburing import ffi, lib
        return ffi, getattr(lib, function)
    except (ImportError, AttributeError) as e:
        log.info(f"{what} in Python (the compiled module is unavailable: {e})")
        return None


def select_pages(pages: memoryview, first_block: int, lsn: int, out: array) -> int | None:
    """Append to `out` the block numbers of the whole pages in `pages` (block `first_block` onwards)
    that a delta from `lsn` carries: new pages (pd_upper 0) and valid pages whose pd_lsn is at least
    `lsn`, WAL-G's rule. Returns the block number of the first page that is neither (the caller
    copies the file whole, as WAL-G does), else None."""
    compiled = _compiled()
    count = len(pages) // BLOCK_SIZE
    if compiled is None:
        return _select_in_python(pages, count, first_block, lsn, out)
    ffi, select = compiled
    found = array("I", bytes(4 * count))
    selected = ffi.new("size_t *")
    invalid = select(ffi.from_buffer("unsigned char[]", pages), count, BLOCK_SIZE, lsn, first_block,
                     ffi.from_buffer("uint32_t[]", found), selected)
    out.extend(found[:selected[0]])
    return None if invalid < 0 else first_block + invalid


def _select_in_python(pages: memoryview, count: int, first_block: int, lsn: int, out: array) -> int | None:
    for i in range(count):
        xlogid, xrecoff, _, flags, lower, upper, special, size_version = _PAGE_HEAD.unpack_from(pages, i * BLOCK_SIZE)
        page_lsn = xlogid << 32 | xrecoff
        valid = (flags & 7 == flags and 24 <= lower <= upper <= special <= BLOCK_SIZE and page_lsn != 0
                 and size_version & 0xFF00 == BLOCK_SIZE and size_version & 0xFF <= 5)
        if valid and page_lsn >= lsn or not valid and upper == 0:
            out.append(first_block + i)
        elif not valid:
            return first_block + i
    return None


# -- data page checksums

RELSEG_BLOCKS = 131072  # blocks in a relation's 1 GiB file segment (RELSEG_SIZE)
_FORK_FILE = re.compile(r"\d+(?:_(?:fsm|vm|init))?(?:\.(\d+))?")  # PostgreSQL's relation file names, every fork


def checksummed_block0(relpath: str) -> int | None:
    """The block number of the first page of a relation file whose pages PostgreSQL checksums (any
    fork, under base/, global/ or a tablespace: pg_checksums' set), counted across the relation's
    1 GiB segments; None for any other file (pg_control, maps, SLRU, temporary files)."""
    top = relpath.split("/", 1)[0]
    match = _FORK_FILE.fullmatch(posixpath.basename(relpath))
    if top not in ("base", "global", "pg_tblspc") or match is None or "pgsql_tmp" in relpath:
        return None
    return int(match.group(1) or 0) * RELSEG_BLOCKS


def _checker() -> tuple | None:
    return _compiled("walrus_check_pages", "page checksums")


def check_pages(pages: memoryview | bytes, first_block: int, lsn: int = 0, checksums: bool = True) -> list[int]:
    """The block numbers of the whole pages in `pages` (block `first_block` onwards) that fail
    PostgreSQL's check of a page read from disk: a new page that is not all zeros, a page header out
    of bounds, or (with `checksums`: a cluster initialised with them) a checksum that is not the
    page's. Pages whose LSN is `lsn` or later are not checked (0: all): recovery replaces them."""
    count = len(pages) // BLOCK_SIZE
    compiled = _checker()
    if compiled is None:
        view = memoryview(pages)
        return [first_block + i for i in range(count)
                if not _page_ok(view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE], first_block + i, lsn, checksums)]
    ffi, check = compiled
    bad = array("I", bytes(4 * count))
    n = check(ffi.from_buffer("unsigned char[]", pages), count, first_block, lsn, int(checksums),
              ffi.from_buffer("uint32_t[]", bad))
    return list(bad[:n])


_SUM_BASE = (0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
             0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
             0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
             0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756)


def page_checksum(page: memoryview | bytes, block: int) -> int:
    """PostgreSQL's checksum of an 8 KiB page at `block` (the compiled module's twin, for tests and
    builds without it)."""
    data = bytearray(page)
    data[8:10] = b"\0\0"  # pd_checksum counts as zero
    words = array("I", data)  # the host's byte order, as PostgreSQL reads the page
    sums = list(_SUM_BASE)
    for i in range(0, len(words), 32):
        for j in range(32):
            t = sums[j] ^ words[i + j]
            sums[j] = (t * 16777619 & 0xFFFFFFFF) ^ (t >> 17)
    for _ in range(2):
        for j in range(32):
            t = sums[j]
            sums[j] = (t * 16777619 & 0xFFFFFFFF) ^ (t >> 17)
    result = 0
    for v in sums:
        result ^= v
    return (result ^ block) % 65535 + 1


def _page_ok(page: memoryview, block: int, lsn: int = 0, checksums: bool = True) -> bool:
    xlogid, xrecoff, checksum, flags, lower, upper, special, _ = _PAGE_HEAD.unpack_from(page)
    if lsn and (xlogid << 32 | xrecoff) >= lsn:
        return True
    if upper == 0:
        return not any(page)
    return (flags & 7 == flags and lower <= upper <= special <= BLOCK_SIZE and special % 8 == 0
            and (not checksums or checksum == page_checksum(page, block)))


class FileChecker:
    """Checks a relation file's pages as pieces of it arrive, in any order (the reads of a backup
    complete out of order): whole pages at once, a page split between two pieces once both are in.
    Memory: the split pages waiting for their other piece, at most one per piece boundary."""

    def __init__(self, relpath: str, block0: int, lsn: int, checksums: bool):
        self.relpath, self.block0, self.lsn, self.checksums = relpath, block0, lsn, checksums
        self.bad: list[int] = []  # block numbers within the file
        self._split: dict[int, list[tuple[int, bytes]]] = {}  # page index -> (offset in page, bytes)

    def feed(self, offset: int, data: memoryview | bytes) -> None:
        end = offset + len(data)
        first = -(-offset // BLOCK_SIZE) * BLOCK_SIZE  # the first whole page's offset
        last = end // BLOCK_SIZE * BLOCK_SIZE  # where the whole pages end
        if first > last:  # inside one page
            self._piece(offset // BLOCK_SIZE, offset % BLOCK_SIZE, data)
            return
        if first < last:
            self._check(data[first - offset:last - offset], first // BLOCK_SIZE)
        if offset % BLOCK_SIZE:  # the end of a page that began in another piece
            self._piece(offset // BLOCK_SIZE, offset % BLOCK_SIZE, data[:first - offset])
        if end % BLOCK_SIZE:  # the start of a page that ends in another piece
            self._piece(last // BLOCK_SIZE, 0, data[last - offset:])

    def _piece(self, page: int, at: int, data) -> None:
        pieces = self._split.setdefault(page, [])
        pieces.append((at, bytes(data)))
        if sum(len(b) for _, b in pieces) == BLOCK_SIZE:
            del self._split[page]
            self._check(b"".join(b for _, b in sorted(pieces)), page)

    def _check(self, pages, first_page: int) -> None:
        self.bad += [b - self.block0 for b in check_pages(pages, self.block0 + first_page, self.lsn, self.checksums)]
