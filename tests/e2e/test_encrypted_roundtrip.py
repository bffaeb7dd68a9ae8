"""End to end with encryption (libsodium, OpenPGP) on file storage and S3: the shared archive/backup/restore flow.

Besides the flow's own checks: every stored WAL object and tar part is ciphertext, backup-list
works without the key, and wal-fetch without it fails (exit 1, not 74).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.roundtrip import backup_and_point_in_time_restore
from tests.pgcluster import chown_to_user, walrus, write_config
from tests.s3server import s3_settings

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).parent.parent / "fixtures"
LZ4_MAGIC = bytes.fromhex("04224D18")
PKESK_NEW_FORMAT = 0xC1  # OpenPGP new-format packet tag 1: what a walrus OpenPGP object starts with


def _key_settings(kind: str, root: str) -> dict[str, str]:
    if kind == "libsodium":
        return {"WALG_LIBSODIUM_KEY": "e2e_libsodium_key_for_walrus_32b"}
    key = os.path.join(root, "walrus-rsa2048.asc")  # a copy the server's OS user can read
    shutil.copyfile(FIXTURES / "walrus-rsa2048-sesame.sec.asc", key)
    chown_to_user(key)
    return {"WALG_PGP_KEY_PATH": key, "WALG_PGP_KEY_PASSPHRASE": "sesame"}


def _check_encrypted(kind: str, root: str, objects: list[tuple[str, bytes]], storage_only: dict[str, str]) -> None:
    wal = [(k, head) for k, head in objects if "/wal_005/" in "/" + k]
    parts = [(k, head) for k, head in objects if "/tar_partitions/" in k]
    assert wal and parts
    for key, head in wal + parts:
        assert not head.startswith(LZ4_MAGIC), f"{key} is stored in plaintext"
        if kind == "openpgp":
            assert head[0] == PKESK_NEW_FORMAT, f"{key} does not start with an OpenPGP PKESK packet"
    # the JSON documents stay plaintext: listing needs no key
    keyless = write_config(os.path.join(root, "keyless.json"), storage_only)
    listed = json.loads(walrus(["backup-list", "--json", "--detail"], config=keyless).stdout)
    assert len(listed) == 1 and listed[0]["backup_name"].startswith("base_")
    segment = next(k.rsplit("/", 1)[1].split(".")[0] for k, _ in wal if len(k.rsplit("/", 1)[1].split(".")[0]) == 24)
    blind = walrus(["wal-fetch", segment, os.path.join(root, "blind-fetch")], config=keyless, check=False)
    assert blind.returncode == 1 and b"cannot decompress" in blind.stderr


@pytest.mark.parametrize("kind", ["libsodium", "openpgp"])
def test_encrypted_restore_on_file_storage(kind: str) -> None:
    def storage(root: str) -> dict[str, str]:
        return {"WALG_FILE_PREFIX": os.path.join(root, "storage"), **_key_settings(kind, root)}

    def wal_names(root: str) -> list[str]:
        base = Path(root, "storage")
        objects = [(str(p.relative_to(base)), p.read_bytes()[:16]) for p in base.rglob("*") if p.is_file()]
        _check_encrypted(kind, root, objects, {"WALG_FILE_PREFIX": str(base)})
        return os.listdir(base / "wal_005")

    backup_and_point_in_time_restore("lz4", 16, storage, wal_names)


@pytest.mark.parametrize("kind", ["libsodium", "openpgp"])
def test_encrypted_restore_on_s3(moto_server, s3_bucket, kind: str) -> None:
    prefix = f"encrypted-{kind}"

    def connection() -> dict[str, str]:
        return s3_settings(moto_server.endpoint, s3_bucket, prefix=prefix)

    def storage(root: str) -> dict[str, str]:
        return {**connection(), **_key_settings(kind, root)}

    def wal_names(root: str) -> list[str]:
        keys = moto_server.keys(s3_bucket, f"{prefix}/")
        objects = [(k[len(prefix) + 1:], moto_server.read(s3_bucket, k)[:16]) for k in keys
                   if "/wal_005/" in k or "/tar_partitions/" in k]
        _check_encrypted(kind, root, objects, connection())
        return [k.rsplit("/", 1)[1] for k in keys if k.startswith(f"{prefix}/wal_005/")]

    backup_and_point_in_time_restore("lz4", 16, storage, wal_names)
