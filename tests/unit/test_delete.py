"""delete and backup-mark through the CLI, on file storage and on S3 (moto), over buckets in
WAL-G's layout that these fixtures write as WAL-G does (not through walrus)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from tests.s3server import s3_settings

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
SEG = 16 << 20
PREFIX = "walrus"


def wal(timeline: int, segno: int, suffix: str = ".lz4") -> str:
    return f"{timeline:08X}{segno // 256:08X}{segno % 256:08X}{suffix}"


def name_at(segno: int) -> str:
    return "base_" + wal(1, segno, "")


def sentinel(segno: int, *, permanent: bool = False, delta_from: str | None = None, user_data=None) -> bytes:
    """A V2 sentinel with WAL-G's fields, in WAL-G's key order."""
    lsn = segno * SEG + 0x28
    doc = {"LSN": lsn}
    if delta_from:
        doc.update(DeltaLSN=lsn - SEG, DeltaFrom=delta_from, DeltaFullName=delta_from, DeltaCount=1)
    doc.update(PgVersion=150000, FinishLSN=lsn + SEG, SystemIdentifier=7000000000000000001,
               UncompressedSize=100, CompressedSize=10)
    if user_data is not None:
        doc["UserData"] = user_data
    doc.update(ChkpNum=None, Version=2, StartTime="2026-01-01T00:00:00.000000Z",
               FinishTime="2026-01-01T00:01:00.000000Z", DateFmt="%Y-%m-%dT%H:%M:%S.%fZ",
               Hostname="db1", DataDir="/var/lib/postgresql/15/main", IsPermanent=permanent)
    return json.dumps(doc).encode()


def metadata(segno: int, *, permanent: bool = False, user_data=None, day: int = 1) -> bytes:
    lsn = segno * SEG + 0x28
    doc = {"start_time": f"2026-01-{day:02d}T00:00:00.000000Z", "finish_time": "2026-01-01T00:01:00.000000Z",
           "date_fmt": "%Y-%m-%dT%H:%M:%S.%fZ", "hostname": "db1", "data_dir": "/var/lib/postgresql/15/main",
           "pg_version": 150000, "start_lsn": lsn, "finish_lsn": lsn + SEG, "is_permanent": permanent,
           "system_identifier": 7000000000000000001, "uncompressed_size": 100, "compressed_size": 10}
    if user_data is not None:
        doc["user_data"] = user_data
    return json.dumps(doc).encode()


@dataclass
class Bucket:
    """One storage, written and read behind walrus's back."""

    env: dict[str, str]
    write: Callable[[str, bytes], None]
    keys: Callable[[], set[str]]
    read: Callable[[str], bytes]

    def walrus(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([WALRUS, *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check:
            assert out.returncode == 0, out.stderr
        return out

    def plan(self, *args: str) -> dict:
        return json.loads(self.walrus("delete", *args, "--json").stdout)

    def backup(self, segno: int, *, permanent: bool = False, delta_from: str | None = None, user_data=None,
               parts: int = 2, day: int = 1) -> str:
        name = name_at(segno) + (f"_D_{delta_from[5:]}" if delta_from else "")
        for i in range(1, parts + 1):
            self.write(f"basebackups_005/{name}/tar_partitions/part_{i:03d}.tar.lz4", b"part")
        self.write(f"basebackups_005/{name}/files_metadata.json", b'{"Files":{},"TarFileSets":{}}')
        self.write(f"basebackups_005/{name}/metadata.json", metadata(segno, permanent=permanent, user_data=user_data,
                                                                             day=day))
        self.write(f"basebackups_005/{name}_backup_stop_sentinel.json",
                   sentinel(segno, permanent=permanent, delta_from=delta_from, user_data=user_data))
        time.sleep(0.01)  # sentinels' LastModified order is the backups' order
        return name


def _base_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "AWS_", "PG"))}
    env["HOME"] = str(tmp_path)
    return env


@pytest.fixture(params=["fs", "s3"])
def bucket(request, tmp_path) -> Bucket:
    if request.param == "fs":
        root = tmp_path / "store"
        root.mkdir()
        clock = [1_700_000_000.0]

        def write(key: str, data: bytes) -> None:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            clock[0] += 60
            os.utime(path, (clock[0], clock[0]))  # distinct, ordered modification times

        def keys() -> set[str]:
            return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

        return Bucket({**_base_env(tmp_path), "WALG_FILE_PREFIX": str(root)}, write, keys,
                      lambda key: (root / key).read_bytes())
    moto, name = request.getfixturevalue("moto_server"), request.getfixturevalue("s3_bucket")
    return Bucket({**_base_env(tmp_path), **s3_settings(moto.endpoint, name, PREFIX)},
                  lambda key, data: moto.client.put_object(Bucket=name, Key=f"{PREFIX}/{key}", Body=data),
                  lambda: {k[len(PREFIX) + 1:] for k in moto.keys(name, PREFIX + "/")},
                  lambda key: moto.read(name, f"{PREFIX}/{key}"))


def walg_bucket(b: Bucket) -> dict[str, list[str]]:
    """Five backups (the second permanent, with its WAL 10..11), WAL 1..49 with a backup history
    file and a partial segment, a timeline history file, and a failed backup's folder."""
    for segno in range(1, 50):
        b.write(f"wal_005/{wal(1, segno)}", b"wal")
    b.write(f"wal_005/{wal(1, 20, '.00000028.backup.lz4')}", b"label")
    b.write(f"wal_005/{wal(1, 25, '.partial.lz4')}", b"partial")
    b.write("wal_005/00000002.history.lz4", b"history")
    names = [b.backup(2), b.backup(10, permanent=True), b.backup(20), b.backup(30), b.backup(40)]
    b.write(f"basebackups_005/{name_at(15)}/tar_partitions/part_001.tar.lz4", b"failed push")
    return {"backups": names}


# What WAL-G keeps of walg_bucket after `delete retain 2`: the two newest backups, the permanent
# one and the WAL from its start to its finish segment (10 and 11), every object from the
# target's start segment (30) on, and .history files; everything else older than the target goes,
# the failed backup's folder included.
def walg_kept_after_retain_2(before: set[str], names: list[str]) -> set[str]:
    kept = set()
    for key in before:
        folder, _, rest = key.partition("/")
        if folder == "wal_005":
            if ".history" in rest:
                kept.add(key)
                continue
            segno = int(rest[8:16], 16) * 256 + int(rest[16:24], 16)
            if segno >= 30 or segno in (10, 11):
                kept.add(key)
        elif any(n in key for n in (names[1], names[3], names[4])):
            kept.add(key)
    return kept


def test_retain_on_a_walg_bucket_keeps_what_walg_keeps(bucket):
    names = walg_bucket(bucket)["backups"]
    before = bucket.keys()
    plan = bucket.plan("retain", "2", "--grace", "0")  # the failed push's folder is new on S3
    assert plan["dry_run"] is True
    assert [b["backup_name"] for b in plan["delete"]] == [names[0], names[2]]
    assert {b["backup_name"]: b["reason"] for b in plan["keep"]} == {
        names[1]: "permanent", names[3]: "target: the oldest backup kept", names[4]: "newer than the target"}
    assert plan["wal"]["below_segment"] == wal(1, 30, "")
    assert plan["wal"]["permanent_ranges"] == [{"timeline": 1, "first": 10, "last": 11}]
    assert plan["garbage"]["backup_folders"] == [name_at(15)]
    assert bucket.keys() == before  # a dry run changes nothing

    out = bucket.walrus("delete", "retain", "2", "--confirm", "--grace", "0")
    assert "backups deleted: 2" in out.stdout
    assert bucket.keys() == walg_kept_after_retain_2(before, names)
    listed = json.loads(bucket.walrus("backup-list", "--json").stdout)
    assert [b["backup_name"] for b in listed] == [names[1], names[3], names[4]]
    # run again: nothing more to do
    again = bucket.plan("retain", "2", "--confirm")
    assert again["delete"] == [] and again["wal"]["objects"] == 0 and again["backup_objects"] == 0


def test_wal_below_the_cut_goes_on_every_timeline(bucket):
    """Three timelines interleaved in key order (S3 skips each timeline's kept segments by listing
    past them): everything below the cut goes on each, nothing at or above it on any."""
    for timeline in (1, 2, 3):
        for segno in range(1, 30):
            bucket.write(f"wal_005/{wal(timeline, segno)}", b"wal")
        bucket.write(f"wal_005/{timeline:08X}.history.lz4", b"history")
    bucket.write(f"wal_005/{wal(2, 12, '.partial.lz4')}", b"partial")
    bucket.write(f"wal_005/{wal(2, 25, '.00000028.backup.lz4')}", b"label")
    bucket.write("wal_005/README", b"not WAL")
    for segno in range(10, 20):  # walrus's block maps, named as their segments, go by the same cut
        bucket.write(f"blockmap_005/{wal(1, segno, '.zst')}", b"map")
    for segno in (5, 15, 20):
        bucket.backup(segno)
    before = bucket.keys()
    plan = bucket.plan("retain", "2", "--confirm")
    assert plan["wal"]["objects"] == 3 * 14 + 1 and [t["objects"] for t in plan["wal"]["timelines"]] == [14, 15, 14]
    assert plan["wal"]["block_maps"] == 5
    gone = {k for k in before if k.startswith("wal_005/0") and ".history" not in k
            and int(k[16:24], 16) * 256 + int(k[24:32], 16) < 15}
    maps_gone = {f"blockmap_005/{wal(1, segno, '.zst')}" for segno in range(10, 15)}
    assert len(gone) == 43 and bucket.keys() == before - gone - maps_gone - {k for k in before if name_at(5) in k}


def test_dry_run_text_names_everything_it_would_delete(bucket):
    names = walg_bucket(bucket)["backups"]
    before = bucket.keys()
    out = bucket.walrus("delete", "before", names[2], "--grace", "0").stdout
    assert "dry run, nothing is deleted" in out and "run again with --confirm" in out
    assert f"backups to delete: 1 (6 objects)\n  {names[0]}  " in out
    assert f"kept for a permanent backup: {wal(1, 10, '')} .. {wal(1, 11, '')}" in out
    assert f"timeline 1: 17 objects, {wal(1, 1)} .. {wal(1, 19)}" in out  # 1..19 but 10 and 11
    assert "garbage to delete: 1 backup folders without a sentinel" in out
    assert bucket.keys() == before


def test_everything_refuses_permanent_backups_and_force_deletes_all(bucket):
    walg_bucket(bucket)
    before = bucket.keys()
    out = bucket.walrus("delete", "everything", "--confirm", check=False)
    assert out.returncode == 1 and "permanent backups would be deleted" in out.stderr and "FORCE" in out.stderr
    assert bucket.keys() == before
    bucket.walrus("delete", "everything", "FORCE", "--confirm", "--grace", "0")
    assert bucket.keys() == set()


def test_target_deletes_the_deltas_built_on_it_and_no_wal(bucket):
    full = bucket.backup(2)
    delta = bucket.backup(5, delta_from=full)
    other = bucket.backup(9, user_data={"id": 7})
    bucket.write(f"wal_005/{wal(1, 1)}", b"wal")
    plan = bucket.plan("target", full)
    assert [b["backup_name"] for b in plan["delete"]] == [full, delta]
    bucket.walrus("delete", "target", full, "--confirm")
    assert bucket.keys() == {k for k in bucket.keys() if other in k or k.startswith("wal_005/")}
    assert f"wal_005/{wal(1, 1)}" in bucket.keys()
    bucket.walrus("delete", "target", "--target-user-data", '{"id": 7}', "--confirm")
    assert not any(other in k for k in bucket.keys())


def test_use_sentinel_time_orders_by_start_time(bucket):
    """Sentinels written in one order, backups started in another (a re-uploaded sentinel, a copied bucket)."""
    late = bucket.backup(30, day=9)  # its sentinel written first
    time.sleep(1.1)  # S3's LastModified has whole seconds
    early = bucket.backup(2, day=1)
    assert [b["backup_name"] for b in bucket.plan("retain", "1")["delete"]] == [late]
    assert [b["backup_name"] for b in bucket.plan("retain", "1", "--use-sentinel-time")["delete"]] == [early]


def test_backup_mark_is_what_retention_obeys(bucket):
    full = bucket.backup(2)
    delta = bucket.backup(5, delta_from=full)
    bucket.backup(9)
    out = json.loads(bucket.walrus("backup-mark", delta, "--json").stdout)
    assert out["changed"] == [full, delta]  # a delta is marked with the chain it restores from
    for name in (full, delta):
        doc = json.loads(bucket.read(f"basebackups_005/{name}/metadata.json"))
        assert doc["is_permanent"] is True and doc["hostname"] == "db1"  # the rest is kept
    listed = json.loads(bucket.walrus("backup-list", "--detail", "--json").stdout)
    assert [b["is_permanent"] for b in listed] == [True, True, False]
    assert bucket.plan("retain", "1")["delete"] == []

    refused = bucket.walrus("backup-mark", "-i", full, check=False)
    assert refused.returncode == 1 and "permanent delta backups are built on it" in refused.stderr
    bucket.walrus("backup-mark", "-i", delta)
    bucket.walrus("backup-mark", "-i", full)
    assert [b["backup_name"] for b in bucket.plan("retain", "1")["delete"]] == [full, delta]
    missing = bucket.walrus("backup-mark", "base_000000010000000000000063", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_garbage_spares_fresh_leftovers_until_the_grace_period(bucket):
    bucket.backup(20)
    bucket.write(f"basebackups_005/{name_at(5)}/tar_partitions/part_001.tar.lz4", b"a backup in progress?")
    bucket.write(f"wal_005/{wal(1, 3)}", b"wal")
    plan = bucket.plan("garbage")
    if "WALG_FILE_PREFIX" in bucket.env:
        assert plan["garbage"]["backup_folders"] == [name_at(5)]  # written long ago (the fixture's clock)
    else:
        assert plan["garbage"]["backup_folders"] == [] and plan["garbage"]["in_progress_left_alone"] == [name_at(5)]
    assert plan["wal"]["objects"] == 1
    bucket.walrus("delete", "garbage", "ARCHIVES", "--confirm")
    assert f"wal_005/{wal(1, 3)}" not in bucket.keys() and any(name_at(5) in k for k in bucket.keys())
    bucket.walrus("delete", "garbage", "--confirm", "--grace", "0")
    assert not any(name_at(5) in k for k in bucket.keys())


def test_garbage_aborts_abandoned_multipart_uploads(moto_server, s3_bucket, tmp_path):
    env = {**_base_env(tmp_path), **s3_settings(moto_server.endpoint, s3_bucket, PREFIX)}
    client = moto_server.client
    client.create_multipart_upload(Bucket=s3_bucket, Key=f"{PREFIX}/wal_005/{wal(1, 7)}")
    client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/not-ours")

    def run(*args):
        out = subprocess.run([WALRUS, "delete", "garbage", *args], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    # moto dates every upload 2010-11-10: a grace period longer than that leaves it alone
    assert "0 abandoned uploads" in run("--confirm", "--grace", "200000h")
    assert len(moto_server.pending_uploads(s3_bucket)) == 2
    out = run("--confirm", "--grace", "0")
    assert f"wal_005/{wal(1, 7)} (started" in out
    assert moto_server.pending_uploads(s3_bucket) == ["elsewhere/not-ours"]  # outside the prefix: not ours


def test_file_storage_temporaries_are_garbage_after_the_grace_period(tmp_path):
    root = tmp_path / "store"
    tmp = root / "wal_005" / f"{wal(1, 3)}.tmp.20260101T000000Z-0123abcd"
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"half a segment")
    env = {**_base_env(tmp_path), "WALG_FILE_PREFIX": str(root)}
    run = lambda *a: subprocess.run([WALRUS, "delete", "garbage", *a], env=env, capture_output=True, text=True,
                                    timeout=60)
    assert run("--confirm").returncode == 0 and tmp.exists()  # just written: maybe a push in progress
    os.utime(tmp, (time.time() - 2 * 86400,) * 2)
    out = run("--confirm")
    assert out.returncode == 0 and not tmp.exists() and "1 abandoned uploads" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["retain"], "one retention count"),
    (["retain", "0", "--confirm"], "cannot retain fewer than one backup"),
    (["before", "2999-01-01T00:00:00Z", "--confirm"], "in the future"),
    (["wipe"], "unknown delete mode"),
    (["target", "--target-user-data", "{oops"], "--target-user-data is not valid JSON"),
    (["retain", "1", "--grace", "soon"], "is not a duration"),
])
def test_bad_command_lines_fail_clearly_and_touch_nothing(tmp_path, args, message):
    root = tmp_path / "store"
    (root / "wal_005").mkdir(parents=True)
    (root / "wal_005" / wal(1, 1)).write_bytes(b"x")
    env = {**_base_env(tmp_path), "WALG_FILE_PREFIX": str(root)}
    out = subprocess.run([WALRUS, "delete", *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "ERROR: " in out.stderr and message in out.stderr and "HINT:" in out.stderr or "DETAIL" in out.stderr
    assert (root / "wal_005" / wal(1, 1)).exists()


def test_a_backup_whose_only_part_is_still_uploading_keeps_its_wal(tmp_path):
    """Two backups overlapping: one started before the newest finished, and nothing of it is stored
    yet but the temporary file of its first part. Its WAL, from its start on, must stay."""
    root = tmp_path / "store"
    b = Bucket({**_base_env(tmp_path), "WALG_FILE_PREFIX": str(root)},
               lambda key, data: ((root / key).parent.mkdir(parents=True, exist_ok=True), (root / key).write_bytes(data)),
               lambda: {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}, lambda key: b"")
    for segno in range(1, 40):
        b.write(f"wal_005/{wal(1, segno)}", b"wal")
    b.backup(10)
    b.backup(30)
    part = root / BASE_IN_PROGRESS / "tar_partitions" / "part_001.tar.lz4.tmp.20261204T000000Z-0123abcd"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"being written")
    plan = b.plan("retain", "1", "--confirm")
    assert plan["wal"]["below_segment"] == wal(1, 20, "") and plan["garbage"]["in_progress_left_alone"] == [
        BASE_IN_PROGRESS.rsplit("/", 1)[1]]
    assert any("a backup in progress" in note for note in plan["notes"])
    assert {k for k in b.keys() if k.startswith("wal_005/")} == {f"wal_005/{wal(1, s)}" for s in range(20, 40)}
    assert part.exists()


BASE_IN_PROGRESS = "basebackups_005/" + name_at(20)
