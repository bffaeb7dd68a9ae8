"""End to end retention on a real PostgreSQL 15, on file storage and on S3 (moto over HTTP).

Four backups with WAL archived between them, then `delete retain 2`: the dry run changes nothing
and names the two oldest backups; confirmed, it removes every object of those two and exactly the
WAL below the oldest kept backup's start segment, and each kept backup still restores and recovers
to the end of the archive with the source's final contents.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from tests.pgcluster import WALRUS, Cluster, make_workdir, remove_tree, walrus, write_config
from tests.s3server import s3_settings

pytestmark = pytest.mark.e2e

PREFIX = "cluster-1"
BACKUPS = 4
RETAIN = 2
WAL_NAME_RE = re.compile(r"[0-9A-F]{24}")
HISTORY_RE = re.compile(r"[0-9A-F]{8}\.history")

# (storage, WAL segment size in MiB): 1 MiB segments on file storage make the WAL between backups
# span several segments (and segment numbers depend on WALG_PG_WAL_SIZE); S3 keeps PostgreSQL's
# default 16 MiB, since each walrus command pays its start-up there (see test_s3_roundtrip.py).
CASES = [("file", 1), ("s3", 16)]

# A listing: key -> what would change if the object were rewritten (file storage: size and mtime,
# and folders as "key/" -> None, so that an emptied folder left behind shows; S3: size and ETag).
Listing = dict[str, object]


def segno(wal_name: str, segsize_mb: int) -> int:
    """The segment number of a 24-hex WAL file name (the first 24 characters of an object name)."""
    per_xlogid = 0x100000000 // (segsize_mb << 20)
    return int(wal_name[8:16], 16) * per_xlogid + int(wal_name[16:24], 16)


def _file_listing(base: str) -> Listing:
    out: Listing = {}
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for d in dirnames:
            out[f"{prefix}{d}/"] = None
        for f in filenames:
            st = os.stat(os.path.join(dirpath, f))
            out[prefix + f] = (st.st_size, st.st_mtime_ns)
    return out


def _wal_objects(listing: Listing, wal_prefix: str) -> dict[str, str]:
    """{key: object name} of the objects (not folders) under wal_005/."""
    return {k: k[len(wal_prefix):] for k in listing if k.startswith(wal_prefix) and not k.endswith("/")}


def _write(cluster: Cluster, batch: int) -> None:
    """Inserts, updates and deletes touching earlier batches, then a WAL switch."""
    cluster.psql(f"INSERT INTO items(batch, body) SELECT {batch}, repeat(md5(g::text || '{batch}'), 8) "
                 f"FROM generate_series(1, 4000) g;"
                 f"UPDATE items SET body = upper(body) WHERE id % 7 = {batch % 7};"
                 f"DELETE FROM items WHERE id % 97 = {batch};"
                 f"INSERT INTO events(batch) VALUES ({batch})")
    cluster.psql("SELECT pg_switch_wal()")


def _restore(root: str, name: str, config: str) -> Cluster:
    """backup-fetch NAME into a fresh directory and start it to recover to the end of the archive
    (recovery.signal, restore_command = walrus wal-fetch, no recovery target)."""
    data = os.path.join(root, f"restore-{name}")
    fetched = json.loads(walrus(["backup-fetch", data, name, "--json"], config=config).stdout)
    assert fetched["backup_name"] == name, fetched
    label = open(os.path.join(data, "backup_label")).read()
    # the backup restored is the one asked for: it starts in the segment its name gives
    assert f"(file {name[len('base_'):]})" in label, label
    open(os.path.join(data, "recovery.signal"), "w").close()
    restored = Cluster(data=data, sockdir=root)
    restored.configure(archive_mode="off", restore_command=f"{WALRUS} --config {config} wal-fetch %f %p")
    restored.start()
    return restored


@pytest.mark.parametrize("kind,segsize", CASES, ids=[c[0] for c in CASES])
def test_delete_retain_keeps_restorable_backups(request, kind: str, segsize: int) -> None:
    root = make_workdir(f"walrus-e2e-retain-{kind}-")
    if kind == "file":
        storage_root = os.path.join(root, "storage")
        settings = {"WALG_FILE_PREFIX": storage_root}
        key_prefix = ""

        def listing() -> Listing:
            return _file_listing(storage_root) if os.path.isdir(storage_root) else {}
    else:
        moto_server = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
        settings = s3_settings(moto_server.endpoint, bucket, prefix=PREFIX)
        key_prefix = f"{PREFIX}/"

        def listing() -> Listing:
            # the whole bucket, not just the prefix: nothing may be left anywhere
            pages = moto_server.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            return {o["Key"]: (o["Size"], o["ETag"]) for page in pages for o in page.get("Contents", [])}
    wal_prefix = f"{key_prefix}wal_005/"
    config = write_config(os.path.join(root, "walg.json"), {
        **settings, "WALG_COMPRESSION_METHOD": "lz4", "WALG_PG_WAL_SIZE": str(segsize)})
    clusters: list[Cluster] = []
    try:
        # -- four backups, with writes and WAL switches between them, then more WAL after the last
        source = Cluster.init(root, wal_segsize_mb=segsize)
        clusters.append(source)
        source.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p")
        source.start()
        source.psql("CREATE TABLE items(id serial PRIMARY KEY, batch int NOT NULL, body text);"
                    "CREATE TABLE events(batch int PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")
        names: list[str] = []
        at_backup: list[dict[str, str]] = []
        for i in range(BACKUPS):
            _write(source, i)
            pushed = json.loads(walrus(["backup-push", source.data, "--json"], config=config, env=source.env).stdout)
            names.append(pushed["backup_name"])
            at_backup.append(source.digest())
        _write(source, BACKUPS)
        source.psql("INSERT INTO events(batch) VALUES (-1)")
        expected = source.digest()
        last = source.psql("SELECT pg_walfile_name(pg_switch_wal())")
        source.wait_archived(last)
        assert source.psql("SELECT failed_count FROM pg_stat_archiver") == "0"
        source.stop()
        clusters.remove(source)
        # the end state is not any backup's: a restore must replay WAL archived after each kept backup
        assert all(expected != d for d in at_backup)

        listed = [b["backup_name"] for b in json.loads(walrus(["backup-list", "--json"], config=config).stdout)]
        assert listed == names, (listed, names)
        starts = [segno(n[len("base_"):], segsize) for n in names]
        assert all(WAL_NAME_RE.fullmatch(n[len("base_"):]) for n in names), names
        assert starts == sorted(set(starts)), f"each backup must start in a later segment: {names}"

        before = listing()
        wal_before = _wal_objects(before, wal_prefix)
        assert f"{wal_prefix}{last}.lz4" in before, "the last segment switched to is not archived"
        for name in wal_before.values():
            assert WAL_NAME_RE.match(name) or HISTORY_RE.match(name), f"unexpected object in wal_005/: {name}"
        wal_segnos = {k: segno(n, segsize) for k, n in wal_before.items() if WAL_NAME_RE.match(n)}
        plain = {segno(n, segsize) for n in wal_before.values() if WAL_NAME_RE.fullmatch(n.split(".")[0])
                 and n.count(".") <= 1}  # segments, not <segment>.<offset>.backup history files
        for a, b in zip(starts, starts[1:] + [segno(last, segsize) + 1]):
            assert set(range(a, b)) <= plain, f"WAL segments missing between {a:X} and {b:X}: {sorted(plain)}"
        deleted, kept = names[:BACKUPS - RETAIN], names[BACKUPS - RETAIN:]
        cut = starts[BACKUPS - RETAIN]
        doomed_wal = {k for k, s in wal_segnos.items() if s < cut}
        assert doomed_wal, "no WAL below the oldest kept backup: the test would prove nothing"
        doomed_backup = {k for k in before if any(n in k for n in deleted)}
        assert {k for k in doomed_backup if not k.endswith("/")} >= {
            f"{key_prefix}basebackups_005/{n}_backup_stop_sentinel.json" for n in deleted}
        # kept backups' keys do not contain a deleted backup's name (names are fixed-width: no prefixes)
        assert not any(n in k for n in deleted for k in before if any(m in k for m in kept))

        # -- dry run: the plan, and nothing changes
        plain_text = walrus(["delete", "retain", str(RETAIN)], config=config)
        assert "dry run" in plain_text.stdout.decode(), plain_text.stdout.decode()
        dry = json.loads(walrus(["delete", "retain", str(RETAIN), "--json"], config=config).stdout)
        assert dry["dry_run"] is True
        assert [b["backup_name"] for b in dry["delete"]] == deleted, dry
        assert [b["backup_name"] for b in dry["keep"]] == kept, dry
        assert dry["wal"]["below_segment"] == names[BACKUPS - RETAIN][len("base_"):], dry["wal"]
        assert dry["wal"]["objects"] == len(doomed_wal), (dry["wal"], sorted(doomed_wal))
        assert dry["backup_objects"] == len([k for k in doomed_backup if not k.endswith("/")]), dry
        assert listing() == before, "a dry run changed the storage"
        assert [b["backup_name"] for b in json.loads(walrus(["backup-list", "--json"], config=config).stdout)] \
            == names

        # -- confirmed: exactly the two oldest backups and the WAL below the cut go
        done = json.loads(walrus(["delete", "retain", str(RETAIN), "--confirm", "--json"], config=config).stdout)
        assert done["dry_run"] is False
        assert [b["backup_name"] for b in done["delete"]] == deleted, done
        assert done["wal"]["objects"] == len(doomed_wal), done["wal"]
        listed = [b["backup_name"] for b in json.loads(walrus(["backup-list", "--json"], config=config).stdout)]
        assert listed == kept
        after = listing()
        left = [k for k in after if any(n in k for n in deleted)]
        assert left == [], f"objects of deleted backups left in storage: {left}"
        wal_after = _wal_objects(after, wal_prefix)
        below = [n for n in wal_after.values() if WAL_NAME_RE.match(n) and segno(n, segsize) < cut]
        assert below == [], f"WAL below {names[BACKUPS - RETAIN]} left in storage: {below}"
        lost = [n for k, n in wal_before.items() if k not in doomed_wal and k not in wal_after]
        assert lost == [], f"WAL at or after the oldest kept backup deleted: {lost}"
        # and nothing else changed: every other object is there, unrewritten, and nothing was added
        assert after == {k: v for k, v in before.items() if k not in doomed_wal | doomed_backup}

        # a second run finds nothing more to delete
        again = json.loads(walrus(["delete", "retain", str(RETAIN), "--confirm", "--json"], config=config).stdout)
        assert again["delete"] == [] and again["wal"]["objects"] == 0, again
        assert listing() == after

        # -- each kept backup restores and recovers to the end of the archive
        for name in kept:
            restored = _restore(root, name, config)
            clusters.append(restored)
            restored.wait_until("SELECT pg_is_in_recovery()", "f", timeout=300)
            assert restored.digest() == expected, f"{name} did not recover to the end of the archive"
            restored.stop()
            clusters.remove(restored)
    finally:
        for c in clusters:
            c.stop("immediate")
        if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
            remove_tree(root)
