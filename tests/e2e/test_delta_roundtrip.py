"""End to end on a real PostgreSQL 15: a full backup and three deltas under pgbench (two read the WAL
block maps wal-push recorded, one scans pages; one is taken while pgbench writes), the chain's limit,
and a restore of the last delta that recovers to the end of the archive; on local files and on S3
(moto over HTTP)."""
from __future__ import annotations

import json
import os
from typing import Callable

import pytest

from tests.e2e.roundtrip import _pgbench
from tests.pgcluster import WALRUS, Cluster, make_workdir, remove_tree, walrus, write_config
from tests.s3server import s3_settings

pytestmark = pytest.mark.e2e

PREFIX = "cluster-1"


def full_then_deltas_then_restore(storage: Callable[[str], dict[str, str]],
                                  read: Callable[[str, str], bytes]) -> None:
    """The whole flow on one storage.

    storage(root) gives the settings that select the storage (root: this run's work directory);
    read(root, path) gives the object at `path` under the storage's prefix ("basebackups_005/...").
    """
    root = make_workdir("walrus-e2e-delta-")
    config = write_config(os.path.join(root, "walg.json"), {
        **storage(root), "WALG_COMPRESSION_METHOD": "lz4",
        "WALG_DELTA_MAX_STEPS": "3", "WALG_TAR_SIZE_THRESHOLD": str(8 << 20),
        "WALG_UPLOAD_DISK_CONCURRENCY": "2", "WALG_DOWNLOAD_CONCURRENCY": "3"})
    clusters: list[Cluster] = []
    try:
        primary = Cluster.init(root)
        clusters.append(primary)
        primary.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p")
        primary.start()
        _pgbench(primary, "-i", "-q", "-s", "4")
        primary.psql("CREATE TABLE quiet(id int PRIMARY KEY, body text);"
                     "INSERT INTO quiet SELECT g, md5(g::text) FROM generate_series(1, 50000) g;"
                     "CHECKPOINT")

        def push(**env: str) -> dict:
            return json.loads(walrus(["backup-push", primary.data, "--json"], config=config,
                                     env={**primary.env, **env}).stdout)

        full = push()
        assert full["delta_from"] is None
        pushed = [full]
        for step, method in enumerate(["block map", "page scan", "block map"]):
            _pgbench(primary, "-n", "-t", "300")  # touches a few pages of every pgbench table
            primary.psql("CHECKPOINT")
            # the last delta is taken while pgbench writes: blocks changed between the last archived
            # segment and the backup's start come from the map parsed out of pg_wal. Its rate is capped, so
            # that how many pages it dirties (and the size bound below) does not depend on the machine
            writer = _pgbench(primary, "-n", "-T", "4", "-R", "200", background=True) if step == 2 else None
            delta = push(**({"WALRUS_BLOCK_MAP": "false"} if method == "page scan" else {}))
            if writer is not None:
                assert writer.wait(timeout=60) == 0, writer.stderr.read()
            assert delta["delta_from"] == pushed[-1]["backup_name"], delta
            assert delta["delta_method"] == method, delta
            assert delta["backup_name"].endswith("_D_" + pushed[-1]["backup_name"][5:29])
            assert delta["compressed_size"] < full["compressed_size"] / 3, (delta, full)
            pushed.append(delta)
        assert read(root, "blockmap_005/" + pushed[1]["backup_name"][5:29] + ".zst")[:4] == b"\x28\xb5\x2f\xfd"
        metadata = read(root, f"basebackups_005/{pushed[-1]['backup_name']}/files_metadata.json")
        files = json.loads(metadata)["Files"]
        accounts = primary.psql("SELECT pg_relation_filepath('pgbench_accounts')")
        quiet = primary.psql("SELECT pg_relation_filepath('quiet')")
        assert files["/" + accounts]["IsIncremented"], files["/" + accounts]
        assert files["/" + quiet]["IsSkipped"], files["/" + quiet]  # untouched since the full backup

        fourth = push()  # WALG_DELTA_MAX_STEPS=3: the chain is full, a full backup starts the next
        assert fourth["delta_from"] is None

        _pgbench(primary, "-n", "-t", "200")
        digest = primary.digest()
        last = primary.psql("SELECT pg_walfile_name(pg_switch_wal())")
        primary.wait_archived(last)

        data = os.path.join(root, "restore")
        fetched = json.loads(walrus(["backup-fetch", data, pushed[-1]["backup_name"], "--json"],
                                    config=config).stdout)
        assert fetched["chain"] == [b["backup_name"] for b in pushed]
        open(os.path.join(data, "recovery.signal"), "w").close()
        restored = Cluster(data=data, sockdir=root)
        restored.configure(archive_mode="off", restore_command=f"{WALRUS} --config {config} wal-fetch %f %p")
        restored.start()
        clusters.append(restored)
        restored.wait_until("SELECT pg_is_in_recovery()", "f", timeout=300)
        assert restored.digest() == digest
    finally:
        for c in clusters:
            c.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)


def test_full_then_deltas_then_restore_of_the_chain() -> None:
    def read(root: str, path: str) -> bytes:
        with open(os.path.join(root, "storage", path), "rb") as f:
            return f.read()

    full_then_deltas_then_restore(lambda root: {"WALG_FILE_PREFIX": os.path.join(root, "storage")}, read)


def test_full_then_deltas_then_restore_of_the_chain_on_s3(moto_server, s3_bucket) -> None:
    def read(root: str, path: str) -> bytes:
        return moto_server.read(s3_bucket, f"{PREFIX}/{path}")

    full_then_deltas_then_restore(lambda root: s3_settings(moto_server.endpoint, s3_bucket, prefix=PREFIX), read)


def test_block_maps_name_every_block_pg_waldump_shows() -> None:
    """The compiled parser against PostgreSQL's own decoder, on WAL of a real server: every main-fork
    block reference pg_waldump prints is in the segments' maps, and relations and databases created
    by copying files (CREATE DATABASE ... FILE_COPY, a new relfilenode) are marked whole."""
    import re
    import subprocess

    from tests.pgcluster import pg_bindir
    from walrus.pg.walmap import WHOLE, BlockMap, SegmentParser, join_record
    from walrus.pg.xlog import parse_wal_file_name

    root = make_workdir("walrus-e2e-walmap-")
    clusters: list[Cluster] = []
    try:
        primary = Cluster.init(root, wal_segsize_mb=1)
        clusters.append(primary)
        primary.configure(archive_mode="off", wal_level="replica", wal_keep_size="512MB")  # no segment recycled
        primary.start()
        first = primary.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        _pgbench(primary, "-i", "-q", "-s", "2")
        _pgbench(primary, "-n", "-t", "500")
        primary.psql("CREATE DATABASE copied TEMPLATE template0 STRATEGY FILE_COPY")
        primary.psql("VACUUM FULL pgbench_branches")
        primary.psql("CREATE INDEX ON pgbench_history (mtime)")
        primary.psql("CHECKPOINT")
        _pgbench(primary, "-n", "-t", "200")
        last = primary.psql("SELECT pg_walfile_name(pg_switch_wal())")
        wal = os.path.join(primary.data, "pg_wal")
        names = sorted(n for n in os.listdir(wal) if len(n) == 24 and first <= n <= last)
        assert len(names) == parse_wal_file_name(last, 1 << 20)[1] - parse_wal_file_name(first, 1 << 20)[1] + 1
        union, maps = BlockMap(), []
        for name in names:
            timeline, segno = parse_wal_file_name(name, 1 << 20)
            parser = SegmentParser(timeline, 1 << 20, segno << 20)
            with open(os.path.join(wal, name), "rb") as f:
                parser.feed(f.read())
            maps.append(parser.finish())
            union.add(maps[-1].refs)
            if len(maps) > 1 and maps[-2].tail_len:
                union.add(join_record(maps[-2], maps[-1]))
        union.seal()
        ours = {tuple(union.refs[i:i + 4]) for i in range(0, len(union.refs), 4)}
        dump = subprocess.run([os.path.join(pg_bindir(), "pg_waldump"), "-p", wal, names[0], names[-1]],
                              capture_output=True, text=True, check=False).stdout
        theirs = {(int(s), int(d), int(r), int(b)) for s, d, r, fork, b in
                  re.findall(r"rel (\d+)/(\d+)/(\d+)(?: fork (\w+))? blk (\d+)", dump) if fork in ("", "main")}
        assert len(theirs) > 1000
        assert theirs - ours == set()
        assert ours - theirs == {q for q in ours if q[3] == WHOLE}  # nothing else extra
        copied = int(primary.psql("SELECT oid FROM pg_database WHERE datname = 'copied'"))
        assert (1663, copied, 0, WHOLE) in ours
        branches = int(primary.psql("SELECT relfilenode FROM pg_class WHERE relname = 'pgbench_branches'"))
        assert union.blocks(f"base/5/{branches}", 8192) is None  # VACUUM FULL wrote it anew
    finally:
        for c in clusters:
            c.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)
