"""backup-fetch of delta chains laid out by hand in WAL-G's format (no walrus push involved): the
chain's levels, `wi1` increments applied in place, skipped files from below, and damaged chains."""
from __future__ import annotations

import json
import os
import struct
import subprocess
from array import array
from datetime import datetime, timezone
from pathlib import Path

import lz4.frame
import pytest

from tests.unit.test_backup_fetch import WALRUS, _tar, finish
from walrus.backup.dto import FileDescription, FilesMetadata, Sentinel
from walrus.pg.pages import BLOCK_SIZE, increment_head

FULL = "base_000000010000000000000002"
D1 = "base_000000010000000000000004_D_000000010000000000000002"
D2 = "base_000000010000000000000006_D_000000010000000000000004"
SYSID = 7300000000000000001


def page(seed: int) -> bytes:
    head = struct.pack("<IIHHHHHH", 0, seed + 1, 0, 0, 28, 8000, 8192, 8192 | 4)
    return head + bytes([seed % 251]) * (BLOCK_SIZE - len(head))


def increment(pages: list[bytes], changed: list[int]) -> bytes:
    """WAL-G's `wi1` member for a file now holding `pages`, carrying the `changed` blocks."""
    return increment_head(len(pages) * BLOCK_SIZE, array("I", changed)) + b"".join(pages[b] for b in changed)


def put_backup(store: Path, name: str, members: dict[str, bytes], *, incremented=(), skipped=(), base: str | None = None,
               full: str | None = None, count: int | None = None, sysid: int = SYSID, lsn: int = 0x2000028) -> None:
    """A backup in WAL-G's layout: one data part with `members`, backup_label, pg_control, its
    files_metadata.json (IsIncremented/IsSkipped as given) and its sentinel, delta fields included."""
    folder = store / "basebackups_005" / name / "tar_partitions"
    folder.mkdir(parents=True)
    data = {"/base": None, "/base/5": None, **members}
    (folder / "part_001.tar.lz4").write_bytes(lz4.frame.compress(_tar(data)))
    (folder / "backup_label.tar.lz4").write_bytes(lz4.frame.compress(_tar(
        {"backup_label": f"LABEL {name}\n".encode(), "tablespace_map": b""})))
    (folder / "pg_control.tar.lz4").write_bytes(lz4.frame.compress(_tar({"/global/pg_control": name.encode()})))
    stamp = 1_700_000_000 * 10**9
    files = {m: FileDescription.for_mtime_ns(stamp, is_incremented=m in incremented) for m in data}
    files.update({m: FileDescription.for_mtime_ns(stamp, is_skipped=True) for m in skipped})
    files["backup_label"] = files["tablespace_map"] = FileDescription.for_mtime_ns(stamp)
    sets = {"part_001.tar.lz4": list(data), "backup_label.tar.lz4": ["backup_label", "tablespace_map"]}
    (store / "basebackups_005" / name / "files_metadata.json").write_bytes(
        FilesMetadata(files=files, tar_file_sets=sets).to_json())
    now = datetime.now(timezone.utc)
    sentinel = Sentinel(start_lsn=lsn, finish_lsn=lsn + 0x100, pg_version=150000, system_identifier=sysid,
                        delta_from=base, delta_lsn=0x2000028 if base else None, delta_full_name=full,
                        delta_count=count, start_time=now, finish_time=now)
    (store / "basebackups_005" / f"{name}_backup_stop_sentinel.json").write_bytes(sentinel.to_json())


# the files of a three-level chain, and what each level changes
A0 = [page(i) for i in range(4)]  # paged: incremented twice, growing and then shrinking
A1 = [A0[0], page(11), A0[2], page(13), page(14)]
A2 = [page(20), A1[1], A1[2]]
B0, B1 = b"whole file, first", b"whole file, rewritten"  # copied whole in D1, skipped in D2
C0 = b"".join(page(30 + i) for i in range(2))  # skipped by D1, cut to one page with no page carried by D2


def build_chain(store: Path) -> dict[str, bytes]:
    put_backup(store, FULL, {"/base/5/16384": b"".join(A0), "/base/5/PG_VERSION": B0, "/base/5/16390": C0})
    put_backup(store, D1, {"/base/5/16384": increment(A1, [1, 3, 4]), "/base/5/PG_VERSION": B1,
                           "/base/5/16400": b"new in D1"},
               incremented={"/base/5/16384"}, skipped={"/base/5/16390"}, base=FULL, full=FULL, count=1,
               lsn=0x4000028)
    put_backup(store, D2, {"/base/5/16384": increment(A2, [0]), "/base/5/16390": increment([C0[:BLOCK_SIZE]], [])},
               incremented={"/base/5/16384", "/base/5/16390"}, skipped={"/base/5/PG_VERSION", "/base/5/16400"},
               base=D1, full=FULL, count=2, lsn=0x6000028)
    return {"base/5/16384": b"".join(A2), "base/5/PG_VERSION": B1, "base/5/16390": C0[:BLOCK_SIZE],
            "base/5/16400": b"new in D1", "backup_label": f"LABEL {D2}\n".encode(), "global/pg_control": D2.encode()}


def restored(target: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(target):
        for n in names:
            path = Path(dirpath) / n
            out[str(path.relative_to(target))] = path.read_bytes()
    return out


def run_fetch(store: Path, target: Path, name: str = D2) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_"))}
    env.update(HOME="/nonexistent", WALG_FILE_PREFIX=str(store), WALG_DOWNLOAD_CONCURRENCY="3")
    proc = subprocess.Popen([WALRUS, "backup-fetch", str(target), name], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    code, err, _ = finish(proc, 60)
    return code, err


def test_a_chain_restores_level_by_level(tmp_path):
    expected = build_chain(tmp_path / "store")
    code, err = run_fetch(tmp_path / "store", tmp_path / "out")
    assert code == 0, err
    got = restored(tmp_path / "out")
    got.pop("tablespace_map")
    assert got == expected


def test_a_delta_restores_as_it_was_in_the_middle_of_the_chain(tmp_path):
    build_chain(tmp_path / "store")
    code, err = run_fetch(tmp_path / "store", tmp_path / "out", D1)
    assert code == 0, err
    got = restored(tmp_path / "out")
    assert (got["base/5/16384"], got["base/5/PG_VERSION"], got["base/5/16390"]) == (b"".join(A1), B1, C0)


def _refused(tmp_path, damage) -> str:
    build_chain(tmp_path / "store")
    damage(tmp_path / "store" / "basebackups_005")
    code, err = run_fetch(tmp_path / "store", tmp_path / "out")
    assert code != 0
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "global" / "pg_control").exists()  # never a startable partial restore
    return err


def test_a_missing_base_is_refused_before_anything_is_written(tmp_path):
    err = _refused(tmp_path, lambda root: os.remove(root / f"{D1}_backup_stop_sentinel.json"))
    assert f"is built on {D1}, which is not in storage" in err
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_a_base_of_another_cluster_is_refused(tmp_path):
    def other(root: Path) -> None:
        path = root / f"{FULL}_backup_stop_sentinel.json"
        doc = json.loads(path.read_bytes())
        doc["SystemIdentifier"] = SYSID + 1
        path.write_text(json.dumps(doc))

    assert "mixes backups of different clusters" in _refused(tmp_path, other)


def _replace_part(root: Path, name: str, members: dict[str, bytes]) -> None:
    part = root / name / "tar_partitions" / "part_001.tar.lz4"
    part.write_bytes(lz4.frame.compress(_tar({"/base": None, "/base/5": None, **members})))


def test_a_bad_increment_header_is_refused(tmp_path):
    bad = b"wi2\x55" + increment(A2, [0])[4:]
    err = _refused(tmp_path, lambda root: _replace_part(root, D2, {"/base/5/16384": bad}))
    assert "invalid increment for /base/5/16384" in err and "version" in err


def test_an_increment_with_trailing_bytes_is_refused(tmp_path):
    err = _refused(tmp_path, lambda root: _replace_part(root, D2, {"/base/5/16384": increment(A2, [0]) + b"x"}))
    assert "declares 1 pages" in err


def test_an_increment_of_a_file_the_base_lacks_is_refused(tmp_path):
    def lacks(root: Path) -> None:  # the full backup's part loses the file its deltas increment
        _replace_part(root, FULL, {"/base/5/PG_VERSION": B0, "/base/5/16390": C0})

    err = _refused(tmp_path, lacks)
    assert "incomplete" in err or "increment of a file the delta's base does not hold" in err


def test_a_chain_that_loops_is_refused(tmp_path):
    def loop(root: Path) -> None:
        path = root / f"{FULL}_backup_stop_sentinel.json"
        doc = json.loads(path.read_bytes())
        doc.update(DeltaFrom=D2, DeltaLSN=1, DeltaFullName=FULL, DeltaCount=3)
        path.write_text(json.dumps(doc))

    assert "loops back" in _refused(tmp_path, loop)


@pytest.mark.parametrize("missing", ["/base/5/16390"])
def test_a_level_that_does_not_list_a_file_the_delta_needs_is_refused(tmp_path, missing):
    def unlist(root: Path) -> None:
        path = root / D1 / "files_metadata.json"
        doc = json.loads(path.read_bytes())
        del doc["Files"][missing]
        path.write_text(json.dumps(doc))

    assert "does not list base/5/16390" in _refused(tmp_path, unlist)
