"""backup-verify and backup-push --verify on a real PostgreSQL 15 with data checksums, backed up by
walrus under a write load: a clean backup passes with its pages checksummed (no torn page taken for
damage); a damaged tar part, a damaged WAL segment, a missing WAL segment and a page corrupted on
disk before the backup are each found, named, and exit 1; backup-push --verify reports that page by
block number, records it in files_metadata.json as WAL-G does, and completes."""
from __future__ import annotations

import json
import os
import threading

import pytest

from tests.pgcluster import WALRUS, Cluster, make_workdir, remove_tree, walrus, write_config

pytestmark = pytest.mark.e2e


def verify(config: str, *args: str) -> tuple[int, dict, str]:
    out = walrus(["backup-verify", *args, "--json"], config=config, check=False)
    assert out.stdout, out.stderr.decode()
    return out.returncode, json.loads(out.stdout or b"{}"), out.stderr.decode()


def flip_byte(path: str, at: float) -> None:
    """One byte of a stored object changed, `at` of the way in."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(int(size * at))
        byte = f.read(1)
        f.seek(int(size * at))
        f.write(bytes([byte[0] ^ 0x55]))


def test_backup_verify_finds_damage_and_passes_a_clean_backup() -> None:
    root = make_workdir("walrus-e2e-bverify-")
    storage = os.path.join(root, "storage")
    config = write_config(os.path.join(root, "walg.json"), {
        "WALG_FILE_PREFIX": storage, "WALG_COMPRESSION_METHOD": "lz4", "WALG_PG_WAL_SIZE": "1"})
    cluster = Cluster.init(root, wal_segsize_mb=1, checksums=True)
    try:
        cluster.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p")
        cluster.start()
        cluster.psql("CREATE TABLE t(id serial PRIMARY KEY, body text);"
                     "INSERT INTO t(body) SELECT repeat(md5(g::text), 10) FROM generate_series(1, 20000) g")
        cluster.psql("CHECKPOINT")
        # writes while the backup reads: pages it copies may be torn, which recovery repairs
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                cluster.psql("UPDATE t SET body = upper(body) WHERE id % 50 = (random() * 50)::int", check=False)

        writer = threading.Thread(target=load)
        writer.start()
        try:
            pushed = json.loads(walrus(["backup-push", "--verify", cluster.data, "--json"], config=config,
                                       env=cluster.env).stdout)
        finally:
            stop.set()
            writer.join()
        name = pushed["backup_name"]
        assert pushed["corrupt_blocks"] == {}  # pages written while they were read are no false alarm
        rc, clean, err = verify(config)
        [report] = clean["backups"]
        assert rc == 0 and report["status"] == "OK", (err, report)
        assert report["data_checksums"] is True and report["pages_checked"] > 300 and report["wal_segments"] >= 1

        backup_dir = os.path.join(storage, "basebackups_005", name)
        part = os.path.join(backup_dir, "tar_partitions",
                            sorted(p for p in os.listdir(os.path.join(backup_dir, "tar_partitions"))
                                   if p.startswith("part_"))[0])
        original = open(part, "rb").read()
        flip_byte(part, 0.5)
        rc, damaged, err = verify(config, name)
        assert rc == 1 and damaged["backups"][0]["status"] == "FAILED"
        assert any(f["object"].endswith(os.path.basename(part)) for f in damaged["backups"][0]["faults"])
        assert os.path.basename(part) in err
        open(part, "wb").write(original)

        wal_dir = os.path.join(storage, "wal_005")
        first_segment = name[len("base_"):]
        segment = os.path.join(wal_dir, first_segment + ".lz4")
        kept = open(segment, "rb").read()
        flip_byte(segment, 0.3)
        rc, damaged, _ = verify(config, "LATEST")
        assert rc == 1 and [f["object"] for f in damaged["backups"][0]["faults"]] == [f"wal_005/{os.path.basename(segment)}"]
        os.remove(segment)
        rc, damaged, _ = verify(config, "--all")
        assert rc == 1 and "missing" in damaged["backups"][0]["faults"][0]["problem"]
        open(segment, "wb").write(kept)
        assert verify(config)[0] == 0

        # a page corrupted on disk, behind PostgreSQL's back, before a backup that no write touches
        relpath = cluster.psql("SELECT pg_relation_filepath('t')")
        cluster.stop()
        with open(os.path.join(cluster.data, relpath), "r+b") as f:
            f.seek(3 * 8192 + 4000)
            f.write(b"\x00garbage\x00")
        cluster.start()
        corrupt = walrus(["backup-push", cluster.data, "--json"], config=config, env={**cluster.env,
                         "WALG_VERIFY_PAGE_CHECKSUMS": "true"}, check=False)
        assert corrupt.returncode == 0, corrupt.stderr.decode()  # reported, and the backup completes
        pushed = json.loads(corrupt.stdout)
        second = pushed["backup_name"]
        assert pushed["corrupt_blocks"] == {f"/{relpath}": [3]}
        assert f"{relpath}: 1 corrupt block(s): 3" in corrupt.stderr.decode()
        described = json.load(open(os.path.join(storage, "basebackups_005", second, "files_metadata.json")))
        assert described["Files"][f"/{relpath}"]["CorruptBlocks"] == {"CorruptBlocksCount": 1, "SomeCorruptBlocks": [3]}
        rc, found, err = verify(config, second)
        faults = found["backups"][0]["faults"]
        assert rc == 1 and [f["problem"] for f in faults] == ["block 3 fails its page checksum or header check"]
        assert faults[0]["object"] == f"{second}/{relpath}"
    finally:
        cluster.stop()
        remove_tree(root)
