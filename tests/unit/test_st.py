"""`walrus st` (WAL-G's storage tools) through the real command, on file storage and on S3 (moto)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import lz4.frame
import pytest

from tests.s3server import s3_settings
from walrus.st import StorageToolError, go_glob, go_time

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
LIBSODIUM_KEY = "walrus_test_libsodium_key_32byte"
SEGMENT = "000000010000000000000003"


def walrus(args, env, *, check=False, stdin: bytes | None = None):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_", "YC_"))}
    base["HOME"] = "/nonexistent"
    base["WALG_PG_WAL_SIZE"] = "1"
    base.update(env)
    proc = subprocess.run([WALRUS, *args], env=base, capture_output=True, input=stdin, timeout=120)
    proc.stdout_text, proc.stderr_text = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if check:
        assert proc.returncode == 0, proc.stderr_text
    return proc


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def env(store) -> dict[str, str]:
    return {"WALG_FILE_PREFIX": str(store)}


def write(store: Path, key: str, data: bytes) -> Path:
    path = store / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def row(kind: str, size: int, time: str, name: str, widths: tuple[int, int, int, int]) -> str:
    return kind.ljust(widths[0]) + str(size).ljust(widths[1]) + time.ljust(widths[2]) + name.ljust(widths[3]) + " "


def local_time(path: Path) -> str:
    return go_time(datetime.fromtimestamp(path.stat().st_mtime, timezone.utc), local=True)


# -- ls and stat --------------------------------------------------------------------------------------


def test_ls_prints_walgs_table_folders_first(store, env):
    a = write(store, "a.txt", b"abc")
    write(store, "folder/b", b"x" * 10)
    write(store, "zz/sub/c", b"c")
    write(store, "zz/.d.tmp.20260101T000000Z-0123abcd", b"a temporary upload")  # never listed
    out = walrus(["st", "ls"], env, check=True).stdout_text
    t = local_time(a)
    widths = (5, 5, max(len(t), 13) + 1, len("folder/") + 1)
    assert out == "\n".join([
        "type size " + "last modified".ljust(widths[2]) + "name",
        row("dir", 0, "0001-01-01 00:00:00 +0000 UTC", "folder/", widths),
        row("dir", 0, "0001-01-01 00:00:00 +0000 UTC", "zz/", widths),
        row("obj", 3, t, "a.txt", widths),
    ]) + "\n"


def test_ls_recursive_is_breadth_first_and_relative_to_path(store, env):
    files = {"r/z.txt": b"1", "r/b/y": b"22", "r/a/x/deep": b"333", "r/a/w": b"4444", "r/c": b"55555"}
    paths = {key: write(store, key, data) for key, data in files.items()}
    out = walrus(["st", "ls", "-r", "r"], env, check=True).stdout_text.splitlines()
    assert [line.split()[-1] for line in out[1:]] == ["c", "z.txt", "a/w", "b/y", "a/x/deep"]
    # columns: every row's name starts where the header's does
    assert {line.index(line.split()[-1]) for line in out[1:]} == {out[0].index("name")}
    assert local_time(paths["r/a/x/deep"]) in out[-1]
    empty = walrus(["st", "ls", "nothing/here"], env, check=True).stdout_text
    assert empty == "type size last modified name\n"


def test_ls_json_and_stat(store, env):
    write(store, "f/one", b"12345")
    listing = walrus(["st", "ls", "f", "--json"], env, check=True).stdout_text
    assert '"name": "one"' in listing and '"size": 5' in listing
    stat = walrus(["st", "stat", "f/one"], env, check=True).stdout_text.splitlines()
    assert stat[0].startswith("type size last modified") and stat[1].split()[:2] == ["obj", "5"]
    assert stat[1].rstrip().endswith(" f/one")
    missing = walrus(["st", "stat", "f/two"], env)
    assert missing.returncode == 1 and "not found" in missing.stderr_text


def test_go_time_matches_gos_time_string():
    dt = datetime(2026, 3, 4, 5, 6, 7, 120000, tzinfo=timezone.utc)
    assert go_time(dt, local=False) == "2026-03-04 05:06:07.12 +0000 UTC"
    assert go_time(dt.replace(microsecond=0), local=False) == "2026-03-04 05:06:07 +0000 UTC"
    assert go_time(None, local=False) == "0001-01-01 00:00:00 +0000 UTC"


@pytest.mark.parametrize("pattern,yes,no", [
    ("base_*", ["base_", "base_0001"], ["base", "xbase_1"]),
    ("?.lz4", ["a.lz4"], ["ab.lz4", ".lz4"]),
    ("part_00[1-3].tar*", ["part_001.tar.lz4", "part_003.tar"], ["part_004.tar"]),
    ("[^a-c]x", ["dx", "zx"], ["ax", "cx"]),
    ("a\\*b", ["a*b"], ["axb"]),
])
def test_glob_is_gos_path_match(pattern, yes, no):
    match = go_glob(pattern)
    assert all(match(s) for s in yes) and not any(match(s) for s in no)


@pytest.mark.parametrize("pattern", ["[", "[]", "a[b-]", "x\\", "[z-a]"])
def test_malformed_glob_is_an_error(pattern):
    with pytest.raises(StorageToolError):
        go_glob(pattern)


def test_glob_ls_cat_rm(store, env):
    for key in ("basebackups_005/base_1/x", "basebackups_005/base_2/y", "basebackups_005/other/z", "wal_005/s1"):
        write(store, key, key.encode())
    out = walrus(["st", "ls", "-g", "basebackups_005/base_*"], env, check=True).stdout_text
    assert out.startswith("basebackups_005/base_1/:\ntype size") and "basebackups_005/base_2/:" in out
    assert " x " in out and " y " in out and "other" not in out
    assert walrus(["st", "cat", "--glob", "basebackups_005/*/?"], env, check=True).stdout == \
        b"basebackups_005/base_1/xbasebackups_005/base_2/ybasebackups_005/other/z"
    walrus(["st", "-g", "rm", "basebackups_005/base_*"], env, check=True)
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()) == \
        ["basebackups_005/other/z", "wal_005/s1"]
    refused = walrus(["st", "stat", "-g", "wal_005/*"], env)
    assert refused.returncode == 1 and "--glob" in refused.stderr_text


# -- put, get, cat ------------------------------------------------------------------------------------


def test_put_compresses_encrypts_and_wal_fetch_reads_it_back(store, env, tmp_path):
    env = {**env, "WALG_LIBSODIUM_KEY": LIBSODIUM_KEY}
    segment = tmp_path / SEGMENT
    segment.write_bytes(os.urandom(300_000) + bytes((1 << 20) - 300_000))
    walrus(["st", "put", str(segment), f"wal_005/{SEGMENT}"], env, check=True)
    stored = store / "wal_005" / (SEGMENT + ".lz4")
    raw = stored.read_bytes()
    assert raw[:4] != b"\x04\x22\x4d\x18"  # encrypted: no lz4 magic at the start
    walrus(["wal-fetch", SEGMENT, str(tmp_path / "restored")], env, check=True)
    assert (tmp_path / "restored").read_bytes() == segment.read_bytes()
    # st get: decrypted and decompressed by default; as stored with both flags
    walrus(["st", "get", f"wal_005/{SEGMENT}.lz4", str(tmp_path / "got")], env, check=True)
    assert (tmp_path / "got").read_bytes() == segment.read_bytes()
    walrus(["st", "get", "--no-decrypt", "--no-decompress", f"wal_005/{SEGMENT}.lz4", str(tmp_path / "raw")], env,
           check=True)
    assert (tmp_path / "raw").read_bytes() == raw
    # decompressing what is still encrypted fails, and leaves nothing at DEST
    failed = walrus(["st", "get", "--no-decrypt", f"wal_005/{SEGMENT}.lz4", str(tmp_path / "bad")], env)
    assert failed.returncode == 1 and "ERROR" in failed.stderr_text
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))  # nor its temporary file
    # cat: as stored by default, plaintext with --decrypt --decompress
    assert walrus(["st", "cat", f"wal_005/{SEGMENT}.lz4"], env, check=True).stdout == raw
    plain = walrus(["st", "cat", "--decrypt", "--decompress", f"wal_005/{SEGMENT}.lz4"], env, check=True)
    assert plain.stdout == segment.read_bytes()


def test_put_without_compression_or_encryption_and_into_a_folder(store, env, tmp_path):
    env = {**env, "WALG_LIBSODIUM_KEY": LIBSODIUM_KEY, "WALG_COMPRESSION_METHOD": "zstd"}
    src = tmp_path / "notes.txt"
    src.write_bytes(b"plain words\n" * 1000)
    walrus(["st", "put", "--no-compress", "--no-encrypt", str(src), "/docs/notes.txt"], env, check=True)
    assert (store / "docs" / "notes.txt").read_bytes() == src.read_bytes()
    walrus(["st", "put", "--no-encrypt", str(src), "docs/notes.txt"], env, check=True)
    assert (store / "docs" / "notes.txt.zst").is_file()
    (tmp_path / "into").mkdir()
    walrus(["st", "get", "--no-decrypt", "docs/notes.txt.zst", str(tmp_path / "into")], env, check=True)
    assert (tmp_path / "into" / "notes.txt.zst").read_bytes() == src.read_bytes()  # DEST was a folder
    # an unknown extension is written as stored, with a warning, as WAL-G does
    got = walrus(["st", "cat", "--decompress", "docs/notes.txt"], env, check=True)
    assert got.stdout == src.read_bytes() and "WARNING" in got.stderr_text


def test_put_refuses_to_overwrite_unless_forced_and_reads_stdin(store, env, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"first")
    walrus(["st", "put", str(src), "x/f"], env, check=True)
    again = walrus(["st", "put", str(src), "x/f"], env)
    assert again.returncode == 1 and "already exists" in again.stderr_text and "-f" in again.stderr_text
    walrus(["st", "put", "-s", "-f", "x/f"], env, check=True, stdin=b"second")
    assert lz4.frame.decompress((store / "x" / "f.lz4").read_bytes()) == b"second"
    usage = walrus(["st", "put", str(src)], env)
    assert usage.returncode == 2
    folder = walrus(["st", "put", str(tmp_path), "y"], env)
    assert folder.returncode == 1 and "directory" in folder.stderr_text


def test_get_errors_leave_nothing(store, env, tmp_path):
    write(store, "k", b"data")
    missing = walrus(["st", "get", "nope", str(tmp_path / "out")], env)
    assert missing.returncode == 1 and "'nope' not found" in missing.stderr_text
    (tmp_path / "exists").write_bytes(b"mine")
    taken = walrus(["st", "get", "k", str(tmp_path / "exists")], env)
    assert taken.returncode == 1 and "already exists" in taken.stderr_text
    assert (tmp_path / "exists").read_bytes() == b"mine"
    all_target = walrus(["st", "get", "--target", "all", "k", str(tmp_path / "o")], env)
    assert all_target.returncode == 1 and "'all'" in all_target.stderr_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "store"]
    assert walrus(["st", "cat", "missing"], env).returncode == 1


# -- rm, check, refused options ---------------------------------------------------------------------------


def test_rm_an_object_or_a_folder_never_a_string_prefix(store, env):
    for key in ("a/b/c", "a/b/d/e", "a/bc", "a/b_backup_stop_sentinel.json"):
        write(store, key, b"1")
    walrus(["st", "rm", "a/b"], env, check=True)  # the folder a/b: a/bc and the sentinel stay
    left = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    assert left == ["a/b_backup_stop_sentinel.json", "a/bc"]
    walrus(["st", "rm", "a/bc"], env, check=True)  # one object
    assert not (store / "a" / "bc").exists()
    gone = walrus(["st", "rm", "a/nothing"], env)
    assert gone.returncode == 1 and "does not exist" in gone.stderr_text


def test_rm_a_large_folder_in_batches(store, env):
    for i in range(2500):
        write(store, f"big/{i // 100}/{i}", b"")
    out = walrus(["st", "rm", "big/", "--json"], env, check=True).stdout_text
    assert '"deleted": 2500' in out and not (store / "big").exists()


def test_check_read_and_write(store, env):
    write(store, "here", b"1")
    walrus(["st", "check", "read"], env, check=True)
    walrus(["st", "check", "read", "here"], env, check=True)
    missing = walrus(["st", "check", "read", "here", "gone", "also"], env)
    assert missing.returncode == 1 and "files are missing: gone, also" in missing.stderr_text
    wrote = walrus(["st", "check", "write"], env, check=True)
    assert "Write check OK" in wrote.stderr_text
    assert [p.name for p in store.iterdir()] == ["here"]
    unreadable = walrus(["st", "check", "read"], {"WALG_FILE_PREFIX": str(store / "absent")})
    assert unreadable.returncode == 1


@pytest.mark.parametrize("args,named", [
    (["st", "-t", "failover1", "ls"], "failover1"),
    (["st", "ls", "--target", "failover1"], "failover1"),
    (["st", "ls", "--all-versions"], "--all-versions"),
    (["st", "rm", "--version-id", "v1", "x"], "--version-id"),
    (["st", "transfer", "files", "wal_005/", "--source", "failover1"], "transfer"),
    (["st", "copy", "--from", "a.json", "--to", "b.json", "-d"], "--decrypt-source"),
])
def test_refused_options_name_what_is_missing(env, args, named):
    proc = walrus(args, env)
    assert proc.returncode == 1 and named in proc.stderr_text and "HINT" in proc.stderr_text


def test_target_default_and_all_are_the_one_storage(store, env):
    write(store, "x", b"1")
    assert " x " in walrus(["st", "--target", "default", "ls"], env, check=True).stdout_text
    assert " x " in walrus(["st", "ls", "-t", "all"], env, check=True).stdout_text


# -- S3 ---------------------------------------------------------------------------------------------------


def test_ls_on_s3_finds_folders_by_skipping_past_them(moto_server, s3_bucket, tmp_path):
    env = s3_settings(moto_server.endpoint, s3_bucket)
    for i in range(1200):  # more than a listing page below one folder
        moto_server.client.put_object(Bucket=s3_bucket, Key=f"walrus/wal_005/{i:024X}", Body=b"")
    for key in ("walrus/a.txt", "walrus/basebackups_005/base_1/x", "walrus/zz/y"):
        moto_server.client.put_object(Bucket=s3_bucket, Key=key, Body=b"abc")
    lines = walrus(["st", "ls"], env, check=True).stdout_text.splitlines()
    assert [line.split()[0] + " " + line.split()[-1] for line in lines[1:]] == \
        ["dir basebackups_005/", "dir wal_005/", "dir zz/", "obj a.txt"]
    assert " +0000 UTC " in lines[-1]  # S3's times, in UTC as WAL-G prints them
    recursive = walrus(["st", "ls", "-r", "basebackups_005"], env, check=True).stdout_text.splitlines()
    assert [line.split()[-1] for line in recursive[1:]] == ["base_1/x"]
    walrus(["st", "rm", "wal_005"], env, check=True)
    assert moto_server.keys(s3_bucket, "walrus/wal_005/") == []


def test_engine_listing_restarts_only_where_keys_are_ordered(tmp_path):
    """The skip-ahead restarts a listing with start_after; file storage (directory order) lists once."""
    from walrus.st import _children
    from walrus.storage.fs import FsStorage

    for key in ("a/1", "a/2", "b/3", "c"):
        write(tmp_path, key, b"")
    dirs, objects = asyncio.run(_children(FsStorage(str(tmp_path)), ""))
    assert dirs == {"a/", "b/"} and [o.key for o in objects] == ["c"]
