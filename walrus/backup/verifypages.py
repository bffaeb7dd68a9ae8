"""backup-push --verify: each relation file's pages checked as their reads land, failures re-read once, and the corrupt blocks for files_metadata.json."""
from __future__ import annotations

import os

from walrus.log import log
from walrus.pg.control import data_checksum_version
from walrus.pg.pages import BLOCK_SIZE, FileChecker, check_pages, checksummed_block0
from walrus.tar.write import Entry

RECORDED = 10  # corrupt blocks files_metadata.json lists per file, as WAL-G (all with WALG_STORE_ALL_CORRUPT_BLOCKS)


class PageVerification:
    """The checks of one backup. Pages whose LSN is the backup's start LSN or later are not checked:
    recovery replaces them, and PostgreSQL may be writing them as they are read."""

    def __init__(self, pgdata: str, start_lsn: int, store_all: bool):
        with open(os.path.join(pgdata, "global", "pg_control"), "rb") as f:
            version = data_checksum_version(f.read())
        self.checksums = bool(version)
        self.start_lsn, self.store_all = start_lsn, store_all
        self._checkers: list[tuple[Entry, FileChecker]] = []
        log.info("verifying data pages: headers and checksums" if self.checksums else
                 "verifying data pages: headers only (the cluster has no data checksums)")

    def checker(self, entry: Entry) -> FileChecker | None:
        """A checker for a relation file's pages (TarPartStream's hook); None for other files."""
        block0 = checksummed_block0(entry.name.lstrip("/"))
        if block0 is None or entry.path is None:
            return None
        checker = FileChecker(entry.name.lstrip("/"), block0, self.start_lsn, self.checksums)
        self._checkers.append((entry, checker))
        return checker

    def corrupt_blocks(self) -> dict[str, list[int]]:
        """{member name: block numbers within the file} of the pages that failed, read once more
        from disk to tell a page torn by a concurrent write (it passes, or its LSN moved past the
        start) from a corrupt one (it fails again). Each file with any is logged."""
        found: dict[str, list[int]] = {}
        for entry, checker in self._checkers:
            if not checker.bad:
                continue
            again = [b for b in sorted(set(checker.bad)) if self._fails_again(entry.path, checker, b)]
            if again:
                found[entry.name] = again
                log.warning(f"{entry.path}: {len(again)} corrupt block(s): "
                            f"{', '.join(map(str, again[:RECORDED]))}{' ...' if len(again) > RECORDED else ''}")
        self._checkers = []
        return found

    def _fails_again(self, path: str, checker: FileChecker, block: int) -> bool:
        try:
            with open(path, "rb") as f:
                page = os.pread(f.fileno(), BLOCK_SIZE, block * BLOCK_SIZE)
        except OSError:
            return True  # gone or unreadable: what was read is what the backup holds
        if len(page) < BLOCK_SIZE:
            return False  # truncated since: WAL replay restores the file's length
        return bool(check_pages(page, checker.block0 + block, self.start_lsn, self.checksums))

    def record(self, blocks: list[int]) -> dict[str, object]:
        """files_metadata.json's CorruptBlocks for a file (WAL-G's shape)."""
        return {"CorruptBlocksCount": len(blocks), "SomeCorruptBlocks": blocks if self.store_all else blocks[:RECORDED]}
