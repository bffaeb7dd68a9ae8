"""Encryption through the real `walrus` command on file storage: startup checks, keys per command, WAL-E objects."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.crypto_stream import seal
from walrus import codec
from walrus.config import load_settings

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
FIXTURES = Path(__file__).parent.parent / "fixtures"
SEGMENT = "000000010000000000000003"
LIBSODIUM_KEY = "walrus_test_libsodium_key_32byte"  # WAL-RUS's interop key (transform none)
KEYS = {
    "libsodium": {"WALG_LIBSODIUM_KEY": LIBSODIUM_KEY},
    "openpgp": {"WALG_PGP_KEY_PATH": str(FIXTURES / "walrus-rsa2048-sesame.sec.asc"),
                "WALG_PGP_KEY_PASSPHRASE": "sesame"},
}
OTHER_KEYS = {
    "libsodium": {"WALG_LIBSODIUM_KEY": "another_libsodium_key_of_32bytes"},
    "openpgp": {"WALG_PGP_KEY_PATH": str(FIXTURES / "walrus-cv25519.sec.asc")},
}


def walrus(args, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_", "YC_"))}
    base["HOME"] = "/nonexistent"
    base["WALG_PG_WAL_SIZE"] = "1"  # the segments here: wal-fetch restores only whole segments
    base.update(env)
    return subprocess.run([WALRUS, *args], env=base, capture_output=True, text=True, timeout=120)


@pytest.fixture
def segment(tmp_path):
    path = tmp_path / "pg_wal" / SEGMENT
    path.parent.mkdir()
    path.write_bytes(os.urandom(300_000) + bytes((1 << 20) - 300_000))
    return path


@pytest.mark.parametrize("env,named,secret", [
    ({"WALG_LIBSODIUM_KEY": "too-short-key"}, "WALG_LIBSODIUM_KEY", "too-short-key"),
    ({"WALG_LIBSODIUM_KEY_PATH": "/nonexistent/key"}, "WALG_LIBSODIUM_KEY_PATH", None),
    ({"WALG_PGP_KEY": "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nbm90IGEga2V5\n-----END PGP PRIVATE KEY BLOCK-----"},
     "WALG_PGP_KEY", "bm90IGEga2V5"),
    ({"WALG_PGP_KEY_PATH": str(FIXTURES / "000000010000000000000024.lzo")}, "WALG_PGP_KEY_PATH", None),
    ({"WALG_CSE_KMS_ID": "arn:aws:kms:eu-west-1:1:key/x"}, "WALG_CSE_KMS_ID", None),
])
def test_unusable_key_exits_1_before_touching_storage(tmp_path, segment, env, named, secret):
    store = tmp_path / "store"
    proc = walrus(["wal-push", str(segment)], {"WALG_FILE_PREFIX": str(store), **env})
    assert proc.returncode == 1
    assert proc.stderr.startswith("ERROR: ") and named in proc.stderr and "HINT: " in proc.stderr
    assert not store.exists()
    assert secret is None or secret not in proc.stderr  # the key itself is never printed


@pytest.mark.parametrize("kind", list(KEYS))
def test_push_with_a_key_fetch_without_or_with_another_fails_naming_the_object(tmp_path, segment, kind):
    store = {"WALG_FILE_PREFIX": str(tmp_path / "store")}
    pushed = walrus(["wal-push", str(segment)], {**store, **KEYS[kind]})
    assert pushed.returncode == 0, pushed.stderr
    key = f"wal_005/{SEGMENT}.lz4"
    stored = (tmp_path / "store" / key).read_bytes()
    assert not stored.startswith(bytes.fromhex("04224D18"))  # not a bare lz4 frame

    dest = tmp_path / "RECOVERYXLOG"
    for env, problem in ((store, "cannot decompress"), ({**store, **OTHER_KEYS[kind]}, "cannot decrypt")):
        failed = walrus(["wal-fetch", SEGMENT, str(dest)], env)
        assert failed.returncode == 1, failed.stderr  # a real failure, not "not archived" (74)
        assert problem in failed.stderr and key in failed.stderr
        assert ("WALG_LIBSODIUM_KEY" if kind == "libsodium" else "WALG_PGP_KEY") in failed.stderr
        assert not dest.exists()

    fetched = walrus(["wal-fetch", SEGMENT, str(dest)], {**store, **KEYS[kind]})
    assert fetched.returncode == 0, fetched.stderr
    assert dest.read_bytes() == segment.read_bytes()


@pytest.mark.parametrize("kind", list(KEYS))
def test_overwrite_check_compares_decrypted_contents(tmp_path, segment, kind):
    env = {"WALG_FILE_PREFIX": str(tmp_path / "store"), **KEYS[kind]}
    assert walrus(["wal-push", str(segment)], env).returncode == 0
    again = walrus(["wal-push", str(segment), "--json"], env)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "already archived"
    data = segment.read_bytes()
    segment.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # always differs (a fixed byte matched 1 time in 256)
    different = walrus(["wal-push", str(segment)], env)
    assert different.returncode == 1 and "different contents" in different.stderr
    # without the key the archived copy cannot be compared: refused, never overwritten
    blind = walrus(["wal-push", str(segment)], {"WALG_FILE_PREFIX": env["WALG_FILE_PREFIX"]})
    assert blind.returncode == 1 and "cannot decompress" in blind.stderr


def test_wale_pgp_lzo_segment_is_fetched(tmp_path):
    wal = tmp_path / "store" / "wal_005"
    wal.mkdir(parents=True)
    name = "000000010000000000000024"
    (wal / f"{name}.lzo").write_bytes((FIXTURES / f"{name}.lzo").read_bytes())
    dest = tmp_path / "RECOVERYXLOG"
    proc = walrus(["wal-fetch", name, str(dest)],
                  {"WALG_FILE_PREFIX": str(tmp_path / "store"), "WALG_PGP_KEY_PATH": str(FIXTURES / "waleGpgKey"),
                   "WALG_PG_WAL_SIZE": "16"})
    assert proc.returncode == 0, proc.stderr
    data = dest.read_bytes()
    assert len(data) == 16 << 20 and int.from_bytes(data[8:16], "little") == 0x24 << 24


def _encrypted_tar(env: dict, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return seal("lz4", load_settings(env={"HOME": "/nonexistent", **env}).crypter, buf.getvalue())


@pytest.mark.parametrize("kind", list(KEYS))
def test_backup_list_needs_no_key_and_backup_fetch_decrypts_parts(tmp_path, kind):
    name = "base_000000010000000000000004"
    root = tmp_path / "store" / "basebackups_005"
    parts = root / name / "tar_partitions"
    parts.mkdir(parents=True)
    (root / f"{name}_backup_stop_sentinel.json").write_text("{}")  # JSON stays plaintext
    (parts / "part_001.tar.lz4").write_bytes(_encrypted_tar(KEYS[kind], {"PG_VERSION": b"15\n"}))
    (parts / "pg_control.tar.lz4").write_bytes(_encrypted_tar(KEYS[kind], {"global/pg_control": b"\x07" * 8192}))
    store = {"WALG_FILE_PREFIX": str(tmp_path / "store")}

    listed = walrus(["backup-list", "--json"], store)
    assert listed.returncode == 0, listed.stderr
    assert [b["backup_name"] for b in json.loads(listed.stdout)] == [name]

    blind = walrus(["backup-fetch", str(tmp_path / "blind"), "LATEST"], store)
    assert blind.returncode == 1 and "tar_partitions/p" in blind.stderr and "WALG_" in blind.stderr

    target = tmp_path / "restored"
    fetched = walrus(["backup-fetch", str(target), "LATEST"], {**store, **KEYS[kind]})
    assert fetched.returncode == 0, fetched.stderr
    assert (target / "PG_VERSION").read_bytes() == b"15\n"
    assert (target / "global" / "pg_control").read_bytes() == b"\x07" * 8192
