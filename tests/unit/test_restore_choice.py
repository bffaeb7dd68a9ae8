"""restore's choice of backup and its refusals, before anything is written: over archives laid out
here as WAL-G writes them (metadata.json's times and LSNs, segments in wal_005/)."""
from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_wal_verify import SEG, Archive
from walrus.archive.restore import RestoreError, _choose, parse_target
from walrus.storage.fs import FsStorage


def choose(archive: Archive, kind, value, backup=None):
    return asyncio.run(_choose(archive.settings(), FsStorage(str(archive.root)), parse_target(kind, value, "promote"),
                               backup))[0].name


@pytest.fixture
def archive(tmp_path):
    a = Archive(tmp_path / "store")
    a.backup(1, 2)  # metadata(): finishes at 2026-01-01T00:01:00Z, LSN segno * SEG + 0x28 + SEG
    a.backup(1, 6)
    a.segments(1, *range(1, 12))
    return a


def test_the_newest_backup_that_finished_before_the_target(archive):
    assert choose(archive, None, None) == "base_000000010000000000000006"
    assert choose(archive, "lsn", f"0/{5 * SEG:X}") == "base_000000010000000000000002"  # before the second's end
    assert choose(archive, "lsn", f"0/{9 * SEG:X}") == "base_000000010000000000000006"
    assert choose(archive, "xid", "1234") == "base_000000010000000000000006"  # the metadata cannot tell: the newest
    assert choose(archive, "time", "2026-01-01T00:02:00+00:00", "base_000000010000000000000002") == \
        "base_000000010000000000000002"


def test_unreachable_targets_are_refused(archive):
    with pytest.raises(RestoreError, match="no backup can reach"):
        choose(archive, "time", "2025-12-31T23:59:59+00:00")
    with pytest.raises(RestoreError, match="no backup can reach LSN"):
        choose(archive, "lsn", "0/100")
    with pytest.raises(RestoreError, match="not all archived"):  # the archive ends at segment 11
        choose(archive, "lsn", f"0/{14 * SEG:X}")
    (archive.root / "wal_005" / "000000010000000000000007.lz4").unlink()
    with pytest.raises(RestoreError, match="its WAL is not all archived"):  # the newest backup needs it
        choose(archive, None, None)
    with pytest.raises(RestoreError, match="not a time"):
        parse_target("time", "yesterday", "promote")
    with pytest.raises(RestoreError, match="not a time"):
        parse_target("time", "2026-01-01T00:00:00", "promote")  # no zone: which one is meant?
    with pytest.raises(RestoreError, match="transaction id"):
        parse_target("xid", "abc", "promote")
