"""The shared expensive thing: a quiescent PG15 cluster archiving to file storage, one backup, its restore."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field

from tests.faults import harness
from tests.pgcluster import WALRUS, Cluster, pg_bindir, remove_tree, run, write_config

# Small parts, so that a backup of this small cluster has several (the damage and kill scenarios
# need a part to still be extracting while another fails).
TAR_SIZE_THRESHOLD = 4 << 20
# Files a backup-fetch writes that belong to one backup only: two backups of the same quiescent
# cluster differ in these and nowhere else.
PER_BACKUP = {"backup_label", "tablespace_map", "global/pg_control"}


@dataclass
class PgEnv:
    root: str
    store: str  # the live file storage: archive_command and backup-push write here
    golden: str  # a copy of storage holding only the reference backup: read-only, copied per trial
    cluster: Cluster
    settings: dict[str, str]
    backup: str = ""  # the reference backup's name
    parts: list[str] = field(default_factory=list)  # its TarFileSets keys (tar object names)
    reference: dict[str, str] = field(default_factory=dict)  # tree_digest of its restore
    push_seconds: float = 0.0
    fetch_seconds: float = 0.0

    def env(self, **extra: str) -> dict[str, str]:
        """Settings for a walrus command on the live storage, with the server's connection."""
        return {**self.settings, **self.cluster.env, **extra}

    def golden_env(self, store: str | None = None, **extra: str) -> dict[str, str]:
        return {**self.settings, "WALG_FILE_PREFIX": store or self.golden, **extra}

    def part_path(self, store: str, backup: str, part: str) -> str:
        return os.path.join(store, "basebackups_005", backup, "tar_partitions", part)


def build(scratch: str | None = None) -> PgEnv:
    root = harness.workdir("walrus-faults-pg-", scratch)
    store = harness.mkdir(os.path.join(root, "store"))
    settings = {"WALG_FILE_PREFIX": store, "WALG_COMPRESSION_METHOD": "lz4",
                "WALG_TAR_SIZE_THRESHOLD": str(TAR_SIZE_THRESHOLD), "WALG_UPLOAD_DISK_CONCURRENCY": "2",
                "WALG_DOWNLOAD_CONCURRENCY": "3", "WALG_PG_WAL_SIZE": "16",
                # backups are compared file by file, so the cluster must stay quiescent between them;
                # reading every database's names (--restore-only) connects to each, which writes
                # relcache init files and catalog statistics
                "WALG_DISABLE_PARTIAL_RESTORE": "true"}
    config = write_config(os.path.join(root, "walg.json"), settings)
    cluster = Cluster.init(root)
    env = PgEnv(root=root, store=store, golden=os.path.join(root, "golden"), cluster=cluster, settings=settings)
    try:
        # quiescent on purpose: no autovacuum, no timed checkpoints, so that backups taken minutes
        # apart hold the same data files and a restore can be compared byte for byte
        cluster.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p",
                          autovacuum="off", checkpoint_timeout="1h", max_wal_size="1GB")
        cluster.start()
        run([os.path.join(pg_bindir(), "pgbench"), "-h", cluster.sockdir, "-p", str(cluster.port), "-i", "-q",
             "-s", "1", "postgres"])
        cluster.psql(
            "CREATE TABLE notes(id serial PRIMARY KEY, body text);"
            "INSERT INTO notes(body) SELECT repeat(md5(g::text), 20) FROM generate_series(1, 5000) g;"
            # incompressible rows, stored uncompressed out of line: parts that lz4 cannot shrink
            "CREATE TABLE blobs(id int PRIMARY KEY, data bytea);"
            "ALTER TABLE blobs ALTER data SET STORAGE EXTERNAL;"
            "INSERT INTO blobs SELECT g, (SELECT decode(string_agg(lpad(to_hex((random() * 4294967295)::bigint), 8,"
            " '0'), ''), 'hex') FROM generate_series(1, 512 + g % 3)) FROM generate_series(1, 1500) g;"
            "CREATE INDEX ON notes(body);")
        # frozen and checkpointed: nothing is left for a later read or checkpoint to change on disk
        cluster.psql("VACUUM (FREEZE, ANALYZE)")
        cluster.psql("CHECKPOINT")

        began = time.monotonic()
        pushed = harness.walrus(["backup-push", cluster.data, "--json"], env.env(), timeout=300)
        env.push_seconds = time.monotonic() - began
        assert pushed.rc == 0, pushed.describe()
        result = json.loads(pushed.stdout)
        env.backup = result["backup_name"]

        # the golden copy: just this backup (sentinel, metadata, parts)
        base = os.path.join(env.golden, "basebackups_005")
        shutil.copytree(os.path.join(store, "basebackups_005", env.backup), os.path.join(base, env.backup))
        sentinel = f"{env.backup}_backup_stop_sentinel.json"
        shutil.copy(os.path.join(store, "basebackups_005", sentinel), os.path.join(base, sentinel))
        harness.chown_tree(env.golden)
        with open(os.path.join(base, env.backup, "files_metadata.json")) as f:
            env.parts = sorted(json.load(f)["TarFileSets"])
        data_parts = [p for p in env.parts if p.startswith("part_")]
        assert len(data_parts) >= 3, f"the reference backup has {data_parts}: too few parts for the scenarios"

        target = os.path.join(root, "reference-restore")
        began = time.monotonic()
        fetched = harness.walrus(["backup-fetch", target, env.backup], env.golden_env(), timeout=300)
        env.fetch_seconds = time.monotonic() - began
        assert fetched.rc == 0, fetched.describe()
        env.reference = harness.tree_digest(target)
        harness.remove(target)
        return env
    except BaseException:
        destroy(env)
        raise


def destroy(env: PgEnv) -> None:
    env.cluster.stop("immediate")
    if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
        remove_tree(env.root)


def startable_partial(target: str, reference: dict[str, str]) -> str | None:
    """Why a restore that did not exit 0 could be started by PostgreSQL on incomplete data (None if it
    cannot): it holds global/pg_control and is not the whole reference tree. (A restore stopped after
    its last rename is whole: nothing can make the window between that rename and the exit empty.)"""
    if not os.path.lexists(os.path.join(target, "global", "pg_control")):
        return None
    diff = harness.digest_diff(harness.tree_digest(target), reference)
    return None if diff is None else f"it holds global/pg_control, and {diff}"


def manifest_digest(store: str, backup: str) -> dict[str, str]:
    """What a restore of `backup` must hold, read from its own parts (those its files_metadata.json
    names) with the reference lz4 decoder and tarfile, not with walrus."""
    folder = os.path.join(store, "basebackups_005", backup)
    with open(os.path.join(folder, "files_metadata.json")) as f:
        meta = json.load(f)
    out: dict[str, str] = {}
    for part in meta["TarFileSets"]:
        with open(os.path.join(folder, "tar_partitions", part), "rb") as f:
            out.update(harness.tar_digest(harness.decompress(f.read(), "lz4")))
    return out


def without(digest: dict[str, str], names: set[str]) -> dict[str, str]:
    return {k: v for k, v in digest.items() if k not in names}


def listed_backup_problems(store: str, listed: list[dict]) -> list[str]:
    """Why backups that backup-list listed are not complete: a missing sentinel, an unreadable
    files_metadata.json, a part it names that is not stored (empty list: all complete)."""
    problems = []
    for b in listed:
        name = b["backup_name"]
        folder = os.path.join(store, "basebackups_005", name)
        if not os.path.isfile(os.path.join(store, "basebackups_005", f"{name}_backup_stop_sentinel.json")):
            problems.append(f"{name} is listed without its sentinel")
            continue
        try:
            with open(os.path.join(folder, "files_metadata.json")) as f:
                sets = json.load(f)["TarFileSets"]
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"{name} is listed but its files_metadata.json is unreadable ({e})")
            continue
        missing = [p for p in sets if not os.path.isfile(os.path.join(folder, "tar_partitions", p))]
        if missing:
            problems.append(f"{name} is listed but its parts {missing} are not stored")
        if not any(p.startswith("pg_control.tar") for p in sets):
            problems.append(f"{name} is listed but names no pg_control part")
    return problems


def stray_parts(store: str, backup: str) -> list[str]:
    """Parts in a backup's folder that its files_metadata.json does not name. backup-fetch restores
    every part in the folder, so such a part (say, of an earlier killed push of the same name) would
    be restored too. None is expected: pg_backup_start switches to a new WAL segment whenever the
    current one holds anything, and then writes its checkpoint there, so no two started backups of one
    server share a name."""
    folder = os.path.join(store, "basebackups_005", backup)
    with open(os.path.join(folder, "files_metadata.json")) as f:
        named = set(json.load(f)["TarFileSets"])
    stored = {n for n in os.listdir(os.path.join(folder, "tar_partitions")) if not harness.TMP_RE.search(n)}
    return sorted(stored - named)


def prune(store: str, listed: list[dict], keep: int = 3) -> None:
    """Keep the storage of a long run small: remove the folders of killed pushes (no sentinel) and all
    but the newest `keep` listed backups (sentinel first, as a delete does). Only between trials."""
    base = os.path.join(store, "basebackups_005")
    names = [b["backup_name"] for b in listed]
    old = set(names[:-keep]) if len(names) > keep else set()
    for name in old:
        os.unlink(os.path.join(base, f"{name}_backup_stop_sentinel.json"))
    for entry in os.listdir(base):
        folder = os.path.join(base, entry)
        if os.path.isdir(folder) and (entry in old or not os.path.exists(folder + "_backup_stop_sentinel.json")):
            shutil.rmtree(folder)
