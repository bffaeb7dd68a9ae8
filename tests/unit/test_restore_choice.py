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


def test_configure_leaves_recovery_not_standby_mode(tmp_path):
    """A backup of a standby (WAL-G's remote mode keeps its standby.signal) is configured for recovery to
    the target: recovery.signal, and no standby.signal, which would override it and wait for WAL forever."""
    from walrus.archive.restore import _configure

    (tmp_path / "standby.signal").write_text("")
    (tmp_path / "postgresql.auto.conf").write_text("port = 5432\n")
    _configure(str(tmp_path), parse_target(None, None, "promote"), "walrus wal-fetch %f %p", {"port": "5433"})
    assert (tmp_path / "recovery.signal").exists() and not (tmp_path / "standby.signal").exists()
    conf = (tmp_path / "postgresql.auto.conf").read_text()
    assert "restore_command = 'walrus wal-fetch %f %p'" in conf and conf.rstrip().endswith("port = '5433'")
