"""backup-fetch of a built backup: completeness checks, a failing part ending the others, signals, a full disk."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import lz4.frame
import pytest

from walrus.backup.dto import FileDescription, FilesMetadata, Sentinel

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
NAME = "base_000000010000000000000002"
BIG = 160 << 20  # bytes of the large part's files: its extraction is still running when a small part fails


def _pattern(size: int, seed: int) -> bytes:
    """Compressible but not trivially: lz4 decodes it at hundreds of MiB/s, not GiB/s like zeros."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def _tar(members: dict[str, bytes | None]) -> bytes:
    """A tar part: None is a directory. Written the way WAL-G writes parts (PAX, slash-led names)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build_backup(store: Path, big: int = BIG) -> dict[str, bytes]:
    """A backup of three data parts, backup_label and pg_control, in WAL-G's layout; returns its files."""
    parts = {
        "part_001.tar.lz4": {"/base": None, "/base/1": None, "/base/1/16384": _pattern(big, 1)},
        "part_002.tar.lz4": {"/base/1/2619": _pattern(300_000, 2), "/PG_VERSION": b"15\n"},
        "part_003.tar.lz4": {"/global": None, "/global/1262": _pattern(8192, 3), "/base/1/1259": _pattern(16384, 4)},
        "backup_label.tar.lz4": {"backup_label": b"START WAL LOCATION: 0/2000028\n", "tablespace_map": b""},
        "pg_control.tar.lz4": {"/global/pg_control": _pattern(8192, 5)},
    }
    folder = store / "basebackups_005" / NAME / "tar_partitions"
    folder.mkdir(parents=True)
    stamp = FileDescription.for_mtime_ns(1_700_000_000 * 10**9)
    files, tar_sets, contents = {}, {}, {}
    for part, members in parts.items():
        (folder / part).write_bytes(lz4.frame.compress(_tar(members)))
        if part != "pg_control.tar.lz4":  # WAL-G lists neither pg_control nor its part
            tar_sets[part] = list(members)
            files.update({m: stamp for m in members})
        contents.update({m.lstrip("/"): data for m, data in members.items() if data is not None})
    (store / "basebackups_005" / NAME / "files_metadata.json").write_bytes(
        FilesMetadata(files=files, tar_file_sets=tar_sets).to_json())
    now = datetime.now(timezone.utc)
    sentinel = Sentinel(start_lsn=0x2000028, finish_lsn=0x2000100, pg_version=150000,
                        uncompressed_size=sum(map(len, contents.values())), start_time=now, finish_time=now)
    (store / "basebackups_005" / f"{NAME}_backup_stop_sentinel.json").write_bytes(sentinel.to_json())
    return contents


def fetch(store: Path, target: Path, **env: str) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_"))}
    full.update(HOME="/nonexistent", WALG_FILE_PREFIX=str(store), WALG_DOWNLOAD_CONCURRENCY="3", **env)
    return subprocess.Popen([WALRUS, "backup-fetch", str(target), "LATEST"], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, bound: float) -> tuple[int, str, float]:
    """Wait at most `bound` seconds (a hang fails the test instead of hanging it)."""
    began = time.monotonic()
    try:
        _, err = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"backup-fetch did not end within {bound} s")
    return proc.returncode, err, time.monotonic() - began


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def backup(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    store = tmp_path_factory.mktemp("store")
    return store, build_backup(store)


@pytest.fixture
def copy(backup, tmp_path) -> Path:
    """The backup's storage, copied so that a test may damage it."""
    store, _ = backup
    subprocess.run(["cp", "-a", str(store), str(tmp_path / "store")], check=True)
    return tmp_path / "store"


def part(store: Path, name: str) -> Path:
    return store / "basebackups_005" / NAME / "tar_partitions" / name


def test_restores_whole_and_leaves_no_staging(backup, tmp_path):
    store, contents = backup
    rc, err, _ = finish(fetch(store, tmp_path / "restore"), 120)
    assert rc == 0, err
    assert tree(tmp_path / "restore") == contents


@pytest.mark.parametrize("damage", ["truncated", "byte flipped near the end", "garbage"])
def test_a_failing_part_ends_the_restore_within_seconds(copy, tmp_path, damage):
    """The large part is still extracting when the small one fails: the command ends with that error
    (it used to wait forever: the loop joined a thread that was waiting for the loop)."""
    small = part(copy, "part_002.tar.lz4")
    raw = small.read_bytes()
    small.write_bytes({"truncated": raw[:len(raw) // 2],
                       "byte flipped near the end": raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:],
                       "garbage": os.urandom(len(raw))}[damage])
    rc, err, seconds = finish(fetch(copy, tmp_path / "restore"), 30)
    assert rc == 1 and "ERROR:" in err and "part_002" in err and "internal error" not in err, err
    assert seconds < 10, seconds
    assert not (tmp_path / "restore" / "global" / "pg_control").exists()
    assert "partial restore" in err


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_damaged_pg_control_part_leaves_nothing_startable(copy, tmp_path, damage):
    control = part(copy, "pg_control.tar.lz4")
    if damage == "deleted":
        control.unlink()
    else:
        control.write_bytes(control.read_bytes()[:20])
    rc, err, _ = finish(fetch(copy, tmp_path / "restore"), 60)
    assert rc == 1 and "pg_control" in err, err
    assert not (tmp_path / "restore" / "global" / "pg_control").exists()
    assert not (tmp_path / "restore" / ".walrus-pg_control").exists()


def test_a_missing_part_is_found_before_anything_is_written(copy, tmp_path):
    """It used to exit 0 having restored the parts that were there."""
    part(copy, "part_003.tar.lz4").unlink()
    rc, err, _ = finish(fetch(copy, tmp_path / "restore"), 30)
    assert rc == 1 and "incomplete" in err and "part_003.tar.lz4" in err, err
    assert not (tmp_path / "restore").exists()


def test_a_stored_part_the_metadata_does_not_name_fails(copy, tmp_path):
    """files_metadata.json consistent but short of a part and its files: those files would be skipped
    as not in the backup, and the restore would succeed without them."""
    meta = copy / "basebackups_005" / NAME / "files_metadata.json"
    doc = FilesMetadata.from_json(meta.read_bytes())
    for member in doc.tar_file_sets.pop("part_002.tar.lz4"):
        doc.files.pop(member)
    meta.write_bytes(doc.to_json())
    rc, err, _ = finish(fetch(copy, tmp_path / "restore"), 30)
    assert rc == 1 and "does not name" in err and "part_002.tar.lz4" in err, err
    assert not (tmp_path / "restore").exists()


def test_a_part_missing_files_it_should_hold_fails(copy, tmp_path):
    """A part that is a whole tar but not the one the backup wrote (here, one member short)."""
    part(copy, "part_003.tar.lz4").write_bytes(lz4.frame.compress(_tar({"/global": None,
                                                                        "/global/1262": _pattern(8192, 3)})))
    rc, err, _ = finish(fetch(copy, tmp_path / "restore"), 60)
    assert rc == 1 and "incomplete" in err and "base/1/1259" in err, err
    assert not (tmp_path / "restore" / "global" / "pg_control").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_restore_promptly(backup, tmp_path, sig):
    store, _ = backup
    proc = fetch(store, tmp_path / "restore", WALG_TAR_DISABLE_FSYNC="true")
    deadline = time.monotonic() + 30
    big = tmp_path / "restore" / "base" / "1" / "16384"
    while not (big.exists() and big.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the large part is being written
    proc.send_signal(sig)
    rc, err, seconds = finish(proc, 30)
    if rc == 0:
        pytest.skip("the restore finished before the signal")  # a very fast disk; never seen here
    assert seconds < 5, seconds
    # ended by the signal itself, as PostgreSQL expects of a restore_command it stops, once it has
    # said so and cleaned up
    assert rc == -sig, (rc, err)
    assert f"ERROR: stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err, err
    assert not (tmp_path / "restore" / "global" / "pg_control").exists()
    assert not (tmp_path / "restore" / ".walrus-pg_control").exists()


@contextlib.contextmanager
def small_filesystem(path: Path, megabytes: int):
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_target_ends_the_restore_with_a_clear_error(backup, tmp_path):
    store, _ = backup
    with small_filesystem(tmp_path / "small", 64) as small:
        rc, err, seconds = finish(fetch(store, small / "restore"), 60)
        assert rc == 1 and "full" in err and "internal error" not in err, err
        assert seconds < 20, seconds
        assert not (small / "restore" / "global" / "pg_control").exists()
