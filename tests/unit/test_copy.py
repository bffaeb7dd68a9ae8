"""`walrus copy` (and `st copy`): backups and their WAL streamed unchanged between storages, sentinels last."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.s3server import s3_settings
from walrus.backup.copy import copy_backups
from walrus.backup.dto import ExtendedMetadata, Sentinel
from walrus.storage.fs import FsStorage

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
SEG = 16 << 20  # WAL-G's default segment size: the LSNs below are in 16 MiB segments
FIRST = "base_000000010000000000000002"  # WAL 2..4 (start 0/2000028, finish 0/4000100)
SECOND = "base_000000010000000000000005"  # WAL 5..6


def walrus(args, *, check=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_", "YC_"))}
    env["HOME"] = "/nonexistent"
    proc = subprocess.run([WALRUS, *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def config(path: Path, settings: dict[str, str]) -> str:
    path.write_text(json.dumps(settings))
    return str(path)


def wal(n: int, tli: int = 1) -> str:
    return f"wal_005/{tli:08X}{0:08X}{n:08X}.lz4"


def add_backup(store: Path, name: str, start: int, finish: int, delta_from: str | None = None) -> None:
    """A backup in WAL-G's layout, its parts random bytes: copy never decodes what it copies."""
    folder = store / "basebackups_005" / name
    (folder / "tar_partitions").mkdir(parents=True)
    for part in ("part_001.tar.lz4", "part_002.tar.lz4", "backup_label.tar.lz4", "pg_control.tar.lz4"):
        (folder / "tar_partitions" / part).write_bytes(os.urandom(70_000))
    (folder / "files_metadata.json").write_bytes(b'{"Files":{},"TarFileSets":{}}')
    now = datetime.now(timezone.utc)
    delta = {"delta_from": delta_from, "delta_lsn": 0x2000028, "delta_full_name": FIRST, "delta_count": 1} \
        if delta_from else {}
    sentinel = Sentinel(start_lsn=start, finish_lsn=finish, pg_version=150000, start_time=now, finish_time=now,
                        **delta)
    (folder / "metadata.json").write_bytes(ExtendedMetadata.from_sentinel(sentinel).to_json())
    (store / "basebackups_005" / f"{name}_backup_stop_sentinel.json").write_bytes(sentinel.to_json())


@pytest.fixture
def source(tmp_path) -> Path:
    """Two backups, WAL segments 1 to 7 on timeline 1 with a .backup file, and a timeline history file."""
    store = tmp_path / "source"
    add_backup(store, FIRST, 0x2000028, 0x4000100)
    add_backup(store, SECOND, 0x5000028, 0x6000100)
    (store / "wal_005").mkdir()
    for n in range(1, 8):
        (store / wal(n)).write_bytes(os.urandom(5000 + n))
    (store / "wal_005" / "000000010000000000000002.00000028.backup.lz4").write_bytes(b"backup history")
    (store / "wal_005" / "00000002.history.lz4").write_bytes(b"timeline history")
    return store


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def backup_keys(store: Path, name: str) -> set[str]:
    return {k for k in tree(store) if k.startswith(f"basebackups_005/{name}")}


def test_copy_one_backup_with_the_wal_it_needs(source, tmp_path):
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    dst = config(tmp_path / "to.json", {"WALG_FILE_PREFIX": str(tmp_path / "target")})
    out = walrus(["copy", "--from", src, "--to", dst, "--backup-name", FIRST, "--json"], check=True)
    copied = tree(tmp_path / "target")
    expected = backup_keys(source, FIRST) | {wal(2), wal(3), wal(4), "wal_005/00000002.history.lz4",
                                             "wal_005/000000010000000000000002.00000028.backup.lz4"}
    assert set(copied) == expected
    assert all(copied[k] == (source / k).read_bytes() for k in copied)  # byte for byte
    result = json.loads(out.stdout)
    assert result["backups"] == [FIRST] and result["copied"] == len(expected) and result["skipped"] == 0
    # the copy is a working storage: backup-list and wal-fetch read it
    listed = walrus(["--config", dst, "backup-list", "--json"], check=True)
    assert [b["backup_name"] for b in json.loads(listed.stdout)] == [FIRST]


def test_a_second_copy_skips_what_is_there_and_with_history_adds_later_wal(source, tmp_path):
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    dst = config(tmp_path / "to.json", {"WALG_FILE_PREFIX": str(tmp_path / "target")})
    walrus(["copy", "-f", src, "-t", dst, "-b", FIRST], check=True)
    again = walrus(["copy", "-f", src, "-t", dst, "-b", FIRST, "-w"], check=True)
    assert "copied 3 objects" in again.stdout and "skipped 12" in again.stdout  # segments 5, 6, 7
    assert {wal(n) for n in range(2, 8)} <= set(tree(tmp_path / "target"))
    assert wal(1) not in tree(tmp_path / "target")  # before the backup: never needed


def test_copy_all_backups_by_default_and_with_all(source, tmp_path):
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    for flag in ([], ["--all"]):
        target = tmp_path / f"target{len(flag)}"
        dst = config(tmp_path / "to.json", {"WALG_FILE_PREFIX": str(target)})
        out = json.loads(walrus(["copy", "--from", src, "--to", dst, "--json", *flag], check=True).stdout)
        assert out["backups"] == [FIRST, SECOND]
        assert backup_keys(target, FIRST) == backup_keys(source, FIRST)
        assert backup_keys(target, SECOND) == backup_keys(source, SECOND)
        assert {k for k in tree(target) if k.endswith(".lz4") and "wal_005/0000000100" in k} == \
            {wal(n) for n in range(2, 7)} | {"wal_005/000000010000000000000002.00000028.backup.lz4"}
    both = walrus(["copy", "--from", src, "--to", dst, "--all", "-b", FIRST])
    assert both.returncode == 2


def test_without_history_is_the_default_and_excludes_with_history(source, tmp_path):
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    dst = config(tmp_path / "to.json", {"WALG_FILE_PREFIX": str(tmp_path / "target")})
    walrus(["copy", "-f", src, "-t", dst, "-b", SECOND, "--without-history"], check=True)
    assert {k for k in tree(tmp_path / "target") if k.startswith("wal_005/0000000100")} == {wal(5), wal(6)}
    assert walrus(["copy", "-f", src, "-t", dst, "--with-history", "--without-history"]).returncode == 2


def test_missing_or_broken_wal_is_an_error_before_anything_is_copied(source, tmp_path):
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    dst = config(tmp_path / "to.json", {"WALG_FILE_PREFIX": str(tmp_path / "target")})
    (source / wal(6)).unlink()  # SECOND's last segment, and a gap in FIRST's history
    missing = walrus(["copy", "-f", src, "-t", dst, "-b", SECOND])
    assert missing.returncode == 1 and "000000010000000000000006" in missing.stderr
    gap = walrus(["copy", "-f", src, "-t", dst, "-b", FIRST, "--with-history"])  # 5, then 7: a gap
    assert gap.returncode == 1 and "gap" in gap.stderr
    absent = walrus(["copy", "-f", src, "-t", dst, "-b", "base_000000010000000000000009"])
    assert absent.returncode == 1 and "not found" in absent.stderr
    assert tree(tmp_path / "target") == {}
    walrus(["copy", "-f", src, "-t", dst, "-b", FIRST], check=True)  # its own WAL is whole


def test_a_different_object_at_the_target_is_a_conflict(source, tmp_path):
    target = tmp_path / "target"
    (target / "wal_005").mkdir(parents=True)
    (target / wal(3)).write_bytes(b"other bytes")
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    dst = config(tmp_path / "to.json", {"WALG_FILE_PREFIX": str(target)})
    conflict = walrus(["copy", "-f", src, "-t", dst, "-b", FIRST])
    assert conflict.returncode == 1 and wal(3) in conflict.stderr and "HINT" in conflict.stderr
    assert tree(target) == {wal(3): b"other bytes"}


def test_the_environment_does_not_redirect_either_side(source, tmp_path):
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    dst = config(tmp_path / "to.json", {"WALG_FILE_PREFIX": str(tmp_path / "target")})
    env = {**os.environ, "HOME": "/nonexistent", "WALG_FILE_PREFIX": str(tmp_path / "elsewhere")}
    subprocess.run([WALRUS, "copy", "-f", src, "-t", dst, "-b", FIRST], env=env, check=True, capture_output=True)
    assert backup_keys(tmp_path / "target", FIRST) and not (tmp_path / "elsewhere").exists()


class Recording(FsStorage):
    """File storage that records the order in which objects are published."""

    def __init__(self, root: str):
        super().__init__(root)
        self.published: list[str] = []

    async def put(self, key, stream, *, exclusive=False):
        stored = await super().put(key, stream, exclusive=exclusive)
        self.published.append(key)
        return stored


def test_sentinels_are_published_last_and_a_delta_after_its_base(source, tmp_path):
    delta = "base_000000010000000000000006"
    add_backup(source, delta, 0x6000028, 0x6000100, delta_from=SECOND)
    target = Recording(str(tmp_path / "target"))
    result = asyncio.run(copy_backups(FsStorage(str(source)), target, name=delta, with_history=False,
                                      segment_size=SEG, jobs=4, budget=1 << 20, per_put=1 << 20))
    order = target.published
    assert result.backups == [delta] and set(order) == backup_keys(source, SECOND) | backup_keys(source, delta) | {
        wal(6), "wal_005/00000002.history.lz4"}
    sentinels = [k for k in order if k.endswith("_backup_stop_sentinel.json")]
    assert order[-2:] == sentinels == [f"basebackups_005/{SECOND}_backup_stop_sentinel.json",
                                       f"basebackups_005/{delta}_backup_stop_sentinel.json"]
    metadata = [i for i, k in enumerate(order) if k.endswith("/metadata.json")]
    assert min(metadata) > max(i for i, k in enumerate(order) if k not in sentinels and not k.endswith("/metadata.json"))


def test_st_copy_copies_a_prefix_unchanged(source, tmp_path):
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    dst = config(tmp_path / "to.json", {"WALG_FILE_PREFIX": str(tmp_path / "target")})
    walrus(["st", "copy", "--from", src, "--to", dst, "--prefix", "wal_005/"], check=True)
    assert tree(tmp_path / "target") == {k: v for k, v in tree(source).items() if k.startswith("wal_005/")}
    everything = walrus(["st", "copy", "--from", src, "--to", dst, "--json"], check=True)
    assert json.loads(everything.stdout)["skipped"] == 9
    assert tree(tmp_path / "target") == tree(source)


def test_copy_from_file_storage_to_s3(source, tmp_path, moto_server, s3_bucket):
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    dst = config(tmp_path / "to.json", s3_settings(moto_server.endpoint, s3_bucket, prefix="copied"))
    big = source / "basebackups_005" / FIRST / "tar_partitions" / "part_003.tar.lz4"
    big.write_bytes(os.urandom(700_000))  # several of the test's 256 KiB parts: a multipart upload
    walrus(["copy", "--from", src, "--to", dst], check=True)
    keys = set(moto_server.keys(s3_bucket, "copied/"))
    expected = {k for k in tree(source) if k != wal(1) and k != wal(7)}
    assert keys == {f"copied/{k}" for k in expected}
    assert all(moto_server.read(s3_bucket, f"copied/{k}") == (source / k).read_bytes() for k in expected)
    assert moto_server.pending_uploads(s3_bucket) == []
    listed = walrus(["--config", dst, "backup-list", "--json"], check=True)
    assert sorted(b["backup_name"] for b in json.loads(listed.stdout)) == [FIRST, SECOND]
    again = walrus(["copy", "--from", src, "--to", dst, "--json"], check=True)
    assert json.loads(again.stdout)["copied"] == 0 and json.loads(again.stdout)["skipped"] == len(expected)


def test_config_errors_name_the_side(source, tmp_path):
    src = config(tmp_path / "from.json", {"WALG_FILE_PREFIX": str(source)})
    unreadable = walrus(["copy", "--from", src, "--to", str(tmp_path / "absent.json")])
    assert unreadable.returncode == 1 and "--to" in unreadable.stderr and "HINT" in unreadable.stderr
    empty = walrus(["copy", "--from", config(tmp_path / "empty.json", {}), "--to", src])
    assert empty.returncode == 1 and "--from" in empty.stderr and "configures no storage" in empty.stderr
