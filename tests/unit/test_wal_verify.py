"""wal-show and wal-verify over archives written here as WAL-G lays them out (not through walrus):
WAL-G's own test cases for the integrity walk, and its output shapes."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from tests.unit.test_delete import metadata, sentinel
from walrus.archive.walshow import wal_show
from walrus.archive.walverify import Position, wal_verify
from walrus.config import load_settings
from walrus.storage.fs import FsStorage

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
SEG = 16 << 20


def wal(timeline: int, segno: int) -> str:
    return f"{timeline:08X}{segno // 256:08X}{segno % 256:08X}"


class Archive:
    def __init__(self, root):
        self.root = root
        (root / "wal_005").mkdir(parents=True)
        (root / "basebackups_005").mkdir()

    def segments(self, timeline: int, *segnos: int) -> None:
        for s in segnos:
            (self.root / "wal_005" / f"{wal(timeline, s)}.lz4").write_bytes(b"x")

    def history(self, timeline: int, text: str) -> None:  # uncompressed: read back as is
        (self.root / "wal_005" / f"{timeline:08X}.history").write_text(text)

    def backup(self, timeline: int, segno: int, permanent: bool = False) -> str:
        name = "base_" + wal(timeline, segno)
        folder = self.root / "basebackups_005" / name
        folder.mkdir()
        (folder / "metadata.json").write_bytes(metadata(segno, permanent=permanent))
        (self.root / "basebackups_005" / f"{name}_backup_stop_sentinel.json").write_bytes(
            sentinel(segno, permanent=permanent))
        return name

    def settings(self, **extra: str):
        return load_settings({"WALG_FILE_PREFIX": str(self.root), **extra})

    def verify(self, checks, timeline: int, current_segno: int, backup_name=None, **extra: str):
        settings = self.settings(**extra)
        return asyncio.run(wal_verify(settings, FsStorage(str(self.root)), checks,
                                      position=Position(timeline, current_segno * SEG + 0x100),
                                      backup_name=backup_name))


@pytest.fixture
def archive(tmp_path):
    return Archive(tmp_path / "store")


WALG_TEST_SETTINGS = {"WALG_UPLOAD_CONCURRENCY": "4", "WALG_INTEGRITY_MAX_DELAYED_WALS": "3"}


def runs(result):
    return [(r.timeline, int(r.start_segment[16:], 16), int(r.end_segment[16:], 16), r.segments_count, r.status)
            for r in result.results["integrity"].runs]


def test_integrity_of_an_empty_archive_without_backups_is_a_warning(archive):
    r = archive.verify(["integrity"], 3, 0xA, **WALG_TEST_SETTINGS)
    assert runs(r) == [(3, 1, 2, 2, "MISSING_LOST"), (3, 3, 6, 4, "MISSING_UPLOADING"), (3, 7, 9, 3, "MISSING_DELAYED")]
    assert r.results["integrity"].status == "WARNING" and r.failure() is None


@pytest.mark.parametrize("present, current, expected, status", [
    ([1, 2, 3, 4], 5, [(5, 1, 4, 4, "FOUND")], "OK"),
    ([1, 2, 3, 4], 8, [(5, 1, 4, 4, "FOUND"), (5, 5, 7, 3, "MISSING_DELAYED")], "WARNING"),
    ([1, 2, 3, 5, 7], 8, [(5, 1, 3, 3, "FOUND"), (5, 4, 4, 1, "MISSING_UPLOADING"), (5, 5, 5, 1, "FOUND"),
                          (5, 6, 6, 1, "MISSING_UPLOADING"), (5, 7, 7, 1, "FOUND")], "WARNING"),
])
def test_integrity_on_one_timeline(archive, present, current, expected, status):
    archive.segments(5, *present)
    r = archive.verify(["integrity"], 5, current, **WALG_TEST_SETTINGS)
    assert runs(r) == expected and r.results["integrity"].status == status


def test_integrity_follows_the_history_to_the_parent_and_a_lost_segment_fails(archive):
    archive.segments(5, 1, 2, 4, 5, 6)
    archive.segments(6, 7, 8)
    archive.history(6, f"5\t0/{5 * SEG + 0x100:X}\tno recovery target specified\n")
    r = archive.verify(["integrity", "timeline"], 6, 9, **WALG_TEST_SETTINGS)
    assert runs(r) == [(5, 1, 2, 2, "FOUND"), (5, 3, 3, 1, "MISSING_LOST"), (5, 4, 4, 1, "FOUND"),
                       (6, 5, 6, 2, "MISSING_UPLOADING"), (6, 7, 8, 2, "FOUND")]
    assert r.results["integrity"].status == "FAILURE" and r.results["timeline"].status == "OK"
    failure = r.failure()
    assert failure is not None and wal(5, 3) in failure.detail  # the error names the lost segment


def test_integrity_starts_at_the_oldest_backup_on_the_servers_history(archive):
    archive.segments(5, 1, 2, 4, 5, 6)
    archive.segments(6, 6, 7, 8)
    archive.history(6, f"5\t0/{5 * SEG + 0x100:X}\tno recovery target specified\n")
    archive.backup(5, 5)  # after timeline 5 ended: not on the server's history
    archive.backup(6, 2)  # before timeline 6 began
    archive.backup(5, 3, permanent=True)  # permanent backups are not where the range starts
    archive.backup(6, 7)
    archive.backup(6, 6)
    r = archive.verify(["integrity"], 6, 9, **WALG_TEST_SETTINGS)
    assert runs(r) == [(6, 6, 8, 3, "FOUND")] and r.results["integrity"].status == "OK"
    named = archive.verify(["integrity"], 6, 9, backup_name="base_" + wal(6, 7), **WALG_TEST_SETTINGS)
    assert runs(named) == [(6, 7, 8, 2, "FOUND")]


def test_timeline_check(archive):
    assert archive.verify(["timeline"], 1, 5).results["timeline"].status == "WARNING"  # nothing archived
    archive.segments(1, 1, 2)
    archive.history(2, "1\t0/2000100\tpromoted\n")
    t = archive.verify(["timeline"], 1, 3).results["timeline"]
    assert (t.status, t.current, t.highest) == ("FAILURE", 1, 2)  # a newer timeline than the server's
    assert archive.verify(["timeline"], 2, 3).results["timeline"].status == "OK"


def test_wal_show_matches_walgs_shapes(archive):
    archive.segments(1, 1, 2, 4, 5)
    archive.segments(2, 5, 6, 7)
    archive.history(2, "1\t0/50000A0\tno recovery target specified\n")
    name = archive.backup(1, 2)
    result = asyncio.run(wal_show(archive.settings(), FsStorage(str(archive.root))))
    doc = json.loads(result.json_text())
    assert [list(t) for t in doc] == [
        ["id", "parent_id", "switch_point_lsn", "start_segment", "end_segment", "segments_count",
         "missing_segments", "backups", "segment_range_size", "status"],
        ["id", "parent_id", "switch_point_lsn", "start_segment", "end_segment", "segments_count",
         "missing_segments", "segment_range_size", "status"]]  # no backups on timeline 2: no key
    assert doc[0]["missing_segments"] == [wal(1, 3)] and doc[0]["status"] == "LOST_SEGMENTS"
    assert doc[1]["switch_point_lsn"] == 0x50000A0 and doc[1]["parent_id"] == 1 and doc[1]["status"] == "OK"
    assert [b["backup_name"] for b in doc[0]["backups"]] == [name]
    assert " " not in result.json_text()  # compact, as Go's encoder writes it
    assert result.text().splitlines() == [
        "+-----+------------+-----------------+--------------------------+--------------------------+---------------+----------------+---------------+---------------+",
        "| TLI | PARENT TLI | SWITCHPOINT LSN | START SEGMENT            | END SEGMENT              | SEGMENT RANGE | SEGMENTS COUNT | STATUS        | BACKUPS COUNT |",
        "+-----+------------+-----------------+--------------------------+--------------------------+---------------+----------------+---------------+---------------+",
        "|   1 |          0 |             0/0 | 000000010000000000000001 | 000000010000000000000005 |             5 |              4 | LOST_SEGMENTS |             1 |",
        "|   2 |          1 |       0/50000A0 | 000000020000000000000005 | 000000020000000000000007 |             3 |              3 | OK            |             0 |",
        "+-----+------------+-----------------+--------------------------+--------------------------+---------------+----------------+---------------+---------------+",
    ]


def test_cli_exit_status_and_outputs(archive):
    archive.segments(1, 1, 2, 4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "AWS_", "PG"))}
    env["WALG_FILE_PREFIX"] = str(archive.root)

    def walrus(*args, **extra):
        return subprocess.run([WALRUS, *args], env={**env, **extra}, capture_output=True, text=True, timeout=60)

    ok = walrus("wal-verify", "integrity", "timeline", "--lsn", f"0/{3 * SEG + 0x100:X}", "--timeline", "1")
    lost = walrus("wal-verify", "integrity", "--json", "--lsn", f"0/{5 * SEG + 0x100:X}", "--timeline", "1",
                  "--backup-name", archive.backup(1, 1), WALG_UPLOAD_CONCURRENCY="1")
    assert ok.returncode == 0, ok.stderr
    assert "[wal-verify] integrity check status: OK" in ok.stdout and "Current cluster timeline: 1" in ok.stdout
    # segment 3 is missing below the one segment (4) that may still be on its way: lost
    assert lost.returncode == 1 and json.loads(lost.stdout)["integrity"]["status"] == "FAILURE"
    assert wal(1, 3) in lost.stderr and "HINT" in lost.stderr
    usage = walrus("wal-verify", "integrity", "--lsn", "0/100")
    assert usage.returncode == 2 and "--lsn and --timeline" in usage.stderr
    shown = walrus("wal-show", "--detailed-json", "--without-backups")
    assert shown.returncode == 0 and json.loads(shown.stdout)[0]["missing_segments"] == [wal(1, 3)]
