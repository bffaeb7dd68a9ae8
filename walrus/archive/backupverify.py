"""backup-verify: read every object of a backup back through the download chain and check it, its
files, its pages' checksums and the WAL it needs."""
from __future__ import annotations

import asyncio
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from walrus.aio import gather_all
from walrus.backup.list import list_backups, read_files_metadata, read_sentinel
from walrus.backup.retention import segment_range, wal_token
from walrus.config import Settings
from walrus.errors import CorruptObject, WalrusError
from walrus.log import log
from walrus.pg.control import data_checksum_version
from walrus.pg.pages import BLOCK_SIZE, check_pages, checksummed_block0, read_increment_head
from walrus.pg.walmap import BlockMap, MapError, SegmentParser, relation_of
from walrus.pg.xlog import format_lsn, wal_file_name
from walrus.storage import layout
from walrus.storage.base import Storage
from walrus.stream.download import consume_decoded
from walrus.tar.read import iter_members
from walrus.wal.stored import open_archived

CHECK_CHUNK = 128  # pages checked at once (1 MiB)
_WAL_LONG_HEADER = struct.Struct("=HHIQI4xQII")  # xlp_magic, info, tli, pageaddr, rem_len, (pad), sysid, seg_size, blcksz
_XLP_LONG_HEADER = 0x0002


@dataclass
class Fault:
    object: str  # the storage key, or the backup's file it is about
    problem: str

    def as_json(self) -> dict[str, str]:
        return {"object": self.object, "problem": self.problem}


@dataclass
class BackupReport:
    """What the verification of one backup found."""

    name: str
    parts: int = 0
    files: int = 0
    bytes: int = 0  # plaintext bytes of its tar parts
    checksums: bool | None = None  # the cluster's data checksums; None: pg_control unread
    pages_checked: int = 0
    wal_segments: int = 0
    faults: list[Fault] = field(default_factory=list)
    replayed_pages: int = 0  # pages that fail alone but that recovery replaces from the WAL

    @property
    def status(self) -> str:
        return "FAILED" if self.faults else "OK"

    def as_json(self) -> dict[str, Any]:
        return {"backup_name": self.name, "status": self.status, "parts": self.parts, "files": self.files,
                "bytes": self.bytes, "data_checksums": self.checksums, "pages_checked": self.pages_checked,
                "pages_replaced_by_wal": self.replayed_pages, "wal_segments": self.wal_segments,
                "faults": [f.as_json() for f in self.faults]}


@dataclass
class BackupVerifyResult:
    backups: list[BackupReport] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"backups": [b.as_json() for b in self.backups], "seconds": round(self.seconds, 3)}

    def text(self) -> str:
        lines = []
        for b in self.backups:
            sums = {None: "checksums unknown", True: f"{b.pages_checked} pages checksummed",
                    False: "no data checksums"}[b.checksums]
            lines.append(f"{b.name}: {b.status}: {b.parts} parts, {b.files} files, {b.bytes} bytes, {sums}, "
                         f"{b.wal_segments} WAL segments")
            lines += [f"  {f.object}: {f.problem}" for f in b.faults]
        return "\n".join(lines)

    def failure(self) -> WalrusError | None:
        bad = [b for b in self.backups if b.faults]
        if not bad:
            return None
        first = bad[0].faults[0]
        return WalrusError(f"backup-verify: {len(bad)} of {len(self.backups)} backup(s) failed verification",
                           detail=f"{sum(len(b.faults) for b in bad)} fault(s); first: {first.object}: {first.problem}",
                           hint="restore from another backup (backup-list shows them) and take a new one "
                                "(backup-push); the storage may be damaging objects")


async def backup_verify(settings: Settings, storage: Storage, names: list[str] | None) -> BackupVerifyResult:
    """Each backup in turn (all of them where `names` is None): its sentinel and files_metadata.json;
    pg_control.tar (does the cluster checksum pages?); the WAL from its start to its finish (each
    segment decoded whole, checked to be that segment, its blocks noted); every tar part decoded and
    walked, members against files_metadata.json, increments' heads checked, checksummed pages
    verified. Parts and segments are read `WALG_DOWNLOAD_CONCURRENCY` at a time."""
    began = time.monotonic()
    if names is None:
        names = [b.name for b in await list_backups(storage)]
    result = BackupVerifyResult()
    executor = ThreadPoolExecutor(max_workers=max(1, settings.download_concurrency), thread_name_prefix="walrus-verify")
    try:
        for name in names:
            report = BackupReport(name)
            await _Verify(settings, storage, report, executor).run()
            log.info(f"{name}: {report.status} ({len(report.faults)} fault(s))")
            result.backups.append(report)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    result.seconds = time.monotonic() - began
    return result


class _Verify:
    def __init__(self, settings: Settings, storage: Storage, report: BackupReport, executor: ThreadPoolExecutor):
        self.settings, self.storage, self.report, self.executor = settings, storage, report, executor
        self.gate = asyncio.Semaphore(max(1, settings.download_concurrency))
        self.members: dict[str, set[str]] = {}  # part object -> member names
        self.failed_pages: list[tuple[str, int, int]] = []  # (file, block, page LSN)
        self.wal_blocks = BlockMap()
        self.incremented: set[str] = set()  # members that are wi1 increments

    def fault(self, obj: str, problem: str) -> None:
        self.report.faults.append(Fault(obj, problem))

    async def run(self) -> None:
        name, storage = self.report.name, self.storage
        try:
            sentinel = await read_sentinel(storage, name)
        except CorruptObject as e:
            return self.fault(layout.sentinel_key(name), _why(e))
        if sentinel is None:
            return self.fault(layout.sentinel_key(name), "no such backup (no sentinel)")
        try:
            files = await read_files_metadata(storage, name, sentinel)
        except CorruptObject as e:
            return self.fault(layout.backup_key(name, layout.FILES_METADATA), _why(e))
        if files is not None:
            self.incremented = {f for f, d in files.files.items() if d.is_incremented}
        folder = layout.part_key(name, "").rstrip("/")
        stored = {o.name: o async for o in storage.list(folder)}
        expected = set(files.tar_file_sets) if files is not None else set()
        control = next((p for p in stored if p.startswith("pg_control.tar")), None)
        for part in sorted(expected - set(stored)):
            self.fault(layout.part_key(name, part), "missing: files_metadata.json lists files in it")
        if control is None:
            self.fault(layout.part_key(name, "pg_control.tar"), "missing: a backup cannot start without pg_control")
        if not any(p.startswith("backup_label.tar") for p in stored):
            self.fault(layout.part_key(name, "backup_label.tar"), "missing: a backup cannot recover without backup_label")
        if control is not None:
            await self._part(layout.part_key(name, control), control, checksums=False)
        await self._wal(sentinel.start_lsn, sentinel.finish_lsn)
        self.wal_blocks.seal()
        others = sorted(p for p in stored if p != control)
        await gather_all([self._part(layout.part_key(name, p), p, checksums=bool(self.report.checksums))
                          for p in others])
        self.report.parts = len(stored)
        if files is not None:
            self._against_metadata(files)
        self._judge_pages(sentinel.start_lsn)

    # -- WAL -----------------------------------------------------------------------------------

    async def _wal(self, start_lsn: int | None, finish_lsn: int | None) -> None:
        name, size = self.report.name, self.settings.segment_size
        token = wal_token(name, size)
        if token is None or not start_lsn or not finish_lsn:
            return self.fault(layout.sentinel_key(name), "does not say which WAL the backup needs (no LSNs)")
        first, last = segment_range(start_lsn, finish_lsn, size)
        await gather_all([self._segment(token[0], segno) for segno in range(first, last + 1)])

    async def _segment(self, timeline: int, segno: int) -> None:
        size = self.settings.segment_size
        wal_name = wal_file_name(timeline, segno, size)
        async with self.gate:
            found = await open_archived(self.storage, wal_name, self.settings)
            if found is None:
                return self.fault(layout.wal_key(wal_name), "missing: the backup cannot reach consistency without it")
            key, ext, stream = found
            try:
                parser = SegmentParser(timeline, size, segno * size)
            except MapError:
                parser = None
            got = bytearray(_WAL_LONG_HEADER.size)
            total = 0

            def check(reader) -> int:
                nonlocal total
                while chunk := reader.read(1 << 20):
                    if total < len(got):
                        got[total:total + len(chunk)] = chunk[:len(got) - total]
                    total += len(chunk)
                    if parser is not None and not parser.feed(chunk):
                        pass  # the records ended (a switch): the rest is still read and counted
                return total

            try:
                await consume_decoded(stream, ext, key, self.settings.crypter, check, self.executor)
            except CorruptObject as e:
                return self.fault(key, _why(e))
        self.report.wal_segments += 1
        if total != size:
            return self.fault(key, f"decodes to {total} bytes, not a {size}-byte segment")
        magic, info, tli, pageaddr, _, _, seg_size, blcksz = _WAL_LONG_HEADER.unpack(bytes(got))
        if not info & _XLP_LONG_HEADER or pageaddr != segno * size or seg_size != size or tli != timeline:
            return self.fault(key, f"is not segment {wal_name}: its first page says timeline {tli}, "
                                   f"address {format_lsn(pageaddr)}, segment size {seg_size}")
        if parser is not None:
            try:
                self.wal_blocks.add(parser.finish().refs)
            except MapError as e:
                log.debug(f"{wal_name}: its blocks are not known ({e}); failing pages are not excused by it")

    # -- tar parts -----------------------------------------------------------------------------

    async def _part(self, key: str, part: str, checksums: bool) -> None:
        ext = layout.tar_extension(part)
        members: set[str] = set()
        self.members[part] = members
        report = self.report
        failed: list[tuple[str, int, int]] = []
        checked = 0

        def walk(reader) -> int:  # on a worker thread: it touches only this part's own state
            nonlocal checked
            plain = 0
            for member, data in iter_members(reader, name=key):
                members.add(member.name)
                plain += member.size
                if member.kind != "file":
                    continue
                relpath = member.name.lstrip("/")
                if relpath == "global/pg_control":
                    version = data_checksum_version(data.read(member.size))
                    report.checksums = None if version is None else bool(version)
                    continue
                block0 = checksummed_block0(relpath) if checksums else None
                if block0 is None:
                    continue
                if member.name in self.incremented:  # its head, then the pages of its blocks
                    head = read_increment_head(data.read, member.size, member.name)
                    blocks = [block0 + b for b in head.blocks]
                else:
                    blocks = range(block0, block0 + member.size // BLOCK_SIZE)
                checked += len(blocks)
                failed.extend(_check(relpath, data, blocks))
            return plain

        async with self.gate:
            try:
                stream = await self.storage.get(key)
                report.bytes += await consume_decoded(stream, ext, key, self.settings.crypter, walk, self.executor)
            except CorruptObject as e:
                self.fault(key, _why(e))
        report.pages_checked += checked
        self.failed_pages += failed

    def _against_metadata(self, files) -> None:
        """Every file files_metadata.json lists is in the part it names (skipped ones are the base's)."""
        name = self.report.name
        everywhere = set().union(*self.members.values()) if self.members else set()
        for part, listed in files.tar_file_sets.items():
            if part not in self.members:
                continue  # missing or unreadable: already a fault
            for f in listed:
                if f not in self.members[part]:
                    self.fault(f"{name}/{f.lstrip('/')}", f"missing from {part}, where files_metadata.json puts it")
        for f, desc in files.files.items():
            if not desc.is_skipped and f not in everywhere and all(f not in s for s in files.tar_file_sets.values()):
                self.fault(f"{name}/{f.lstrip('/')}", "in files_metadata.json but in no tar part")
        self.report.files = sum(1 for d in files.files.values() if not d.is_skipped)

    def _judge_pages(self, start_lsn: int | None) -> None:
        """A page that fails is corrupt unless recovery replaces it: changed after the backup began
        (its LSN, or the WAL from start to finish touches its block: a page torn by a write while
        it was read). Those are counted, not faults."""
        for relpath, block, lsn in self.failed_pages:
            rel = relation_of(relpath)  # main forks only: the WAL's block references are theirs
            in_wal = rel is not None and self.wal_blocks.touches(rel[0], rel[1], rel[2], block)
            if (start_lsn and lsn >= start_lsn) or in_wal:
                self.report.replayed_pages += 1
                continue
            local = block - (checksummed_block0(relpath) or 0)  # within the file, as pg_checksums counts
            self.fault(f"{self.report.name}/{relpath}", f"block {local} fails its page checksum or header check")


def _check(relpath: str, data, blocks) -> list[tuple[str, int, int]]:
    """(file, block, page LSN) of each page that follows in `data`, one per block number of
    `blocks` in order, that fails its check."""
    failed = []
    for i in range(0, len(blocks), CHECK_CHUNK):
        chunk = blocks[i:i + CHECK_CHUNK]
        pages = data.read(BLOCK_SIZE * len(chunk))
        contiguous = chunk[-1] - chunk[0] == len(chunk) - 1
        bad = set(check_pages(pages, chunk[0])) if contiguous else {
            b for j, b in enumerate(chunk) if check_pages(pages[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE], b)}
        for j, b in enumerate(chunk):
            if b in bad:
                xlogid, xrecoff = struct.unpack_from("=II", pages, j * BLOCK_SIZE)
                failed.append((relpath, b, xlogid << 32 | xrecoff))
    return failed


def _why(e: WalrusError) -> str:
    return e.message + (f" ({e.detail})" if e.detail else "")
