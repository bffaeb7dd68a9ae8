"""delete under faults: a kill -9 at any moment leaves every listed backup whole (sentinels go first,
WAL last) and re-runs end where an uninterrupted run ends; a wal-push running meanwhile loses nothing
at or above the cut; a backup being taken (no sentinel yet) is never deleted."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import pytest

from tests.faults import faulted, harness, pgenv
from tests.faults.figures import Outcome, Scenario, rng, scenario, trials
from tests.s3server import s3_settings

pytestmark = pytest.mark.e2e

FAMILY = "delete"
KILLS = trials(10, 200)  # file storage, every listed backup checked object by object
RESTORE_KILLS = trials(2, 40)  # file storage, every listed backup restored with backup-fetch (5 restores a trial)
S3_KILLS = trials(2, 200)  # S3: the bucket is filled anew for each trial (about 4 s of moto)
RACES = trials(4, 60)
S3_RACES = trials(2, 30)
WORKERS = faulted.WORKERS
CMD_TIMEOUT = faulted.CMD_TIMEOUT
SEGMENT_SIZE = 16 << 20  # the default WALG_PG_WAL_SIZE: wal_name(n) is the n-th segment's name
PUSH_SIZE = 256 << 10  # pushed segments: wal-push does not check their size, and small ones are quick
KEEP = 2
DELETE = ["delete", "retain", str(KEEP), "--confirm"]
GARBAGE = ["delete", "garbage", "--grace", "0", "--confirm"]
BASE = "basebackups_005"
SENTINEL = "_backup_stop_sentinel.json"
DAY = 86400.0

# File storage: five backups of the shared cluster's real backup (10 MB, 11 objects each) and 8000 WAL
# objects; retain 2 deletes three backups and 4818 WAL objects (five batches of at most 1000), so
# that most of the command's time is deleting rather than starting up.
FILE_STARTS = [16, 1616, 3216, 4816, 6416]
FILE_WAL_LAST = 8000
# S3: five synthetic backups and 1100 WAL objects, 1022 of them below the cut (two batches); moto
# takes about 3 ms an object to fill a bucket, so the WAL is mostly below the cut.
S3_STARTS = [16, 300, 600, 1020, 1060]
S3_WAL_LAST = 1100


# -- the bucket as the test means it to be -------------------------------------------------------

@dataclass
class Layout:
    """Every object of a bucket in WAL-G's layout with its bytes; the complete backups, oldest first,
    with the keys that make each one; the WAL objects by segment number."""

    objects: dict[str, bytes] = field(default_factory=dict)
    mtimes: dict[str, float] = field(default_factory=dict)  # file storage: objects written long ago
    backups: list[tuple[str, int]] = field(default_factory=list)  # (name, start segment)
    keys_of: dict[str, list[str]] = field(default_factory=dict)  # sentinel first, then its folder
    wal: dict[str, int] = field(default_factory=dict)  # WAL key -> segment number
    _prints: dict[str, dict[str, str]] = field(default_factory=dict)

    def put(self, key: str, data: bytes, mtime: float | None = None) -> str:
        self.objects[key] = data
        if mtime is not None:
            self.mtimes[key] = mtime
        return key

    def fingerprints(self, kind: str) -> dict[str, str]:
        """key -> what a snapshot of a bucket of that kind holds for it: sha256 (file), md5 (S3's ETag)."""
        if kind not in self._prints:
            digest = hashlib.sha256 if kind == "file" else hashlib.md5
            self._prints[kind] = {k: digest(v).hexdigest() for k, v in self.objects.items()}
        return self._prints[kind]

    @property
    def doomed(self) -> list[str]:
        return [n for n, _ in self.backups[:-KEEP]]

    @property
    def kept(self) -> list[str]:
        return [n for n, _ in self.backups[-KEEP:]]

    @property
    def cut(self) -> int:
        """retain KEEP deletes WAL below the oldest kept backup's start segment."""
        return self.backups[-KEEP][1]

    def expected_end(self, kind: str) -> dict[str, str]:
        """What retain KEEP leaves: everything but the doomed backups and the WAL below the cut."""
        gone = {k for n in self.doomed for k in self.keys_of[n]}
        gone |= {k for k, seg in self.wal.items() if seg < self.cut}
        return {k: v for k, v in self.fingerprints(kind).items() if k not in gone}


def go_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# The shape of the documents of a WAL-G backup (as backup-push writes them, see pgenv's golden copy).
SYNTHETIC_SENTINEL = {"LSN": 0, "PgVersion": 150018, "FinishLSN": 0, "SystemIdentifier": 7715510047379626437,
                      "UncompressedSize": 4096, "CompressedSize": 4096, "DataCatalogSize": 4096, "ChkpNum": None,
                      "Version": 2, "StartTime": "", "FinishTime": "", "DateFmt": "%Y-%m-%dT%H:%M:%S.%fZ",
                      "Hostname": "db1", "DataDir": "/var/lib/postgresql/15/main", "IsPermanent": False}
SYNTHETIC_METADATA = {"start_time": "", "finish_time": "", "date_fmt": "%Y-%m-%dT%H:%M:%S.%fZ", "hostname": "db1",
                      "data_dir": "/var/lib/postgresql/15/main", "pg_version": 150018, "start_lsn": 0,
                      "finish_lsn": 0, "is_permanent": False, "system_identifier": 7715510047379626437,
                      "uncompressed_size": 4096, "compressed_size": 4096}


@dataclass
class Documents:
    """A backup's sentinel and metadata.json (patched per backup: LSNs, times) and files_metadata.json."""

    sentinel: dict
    metadata: dict
    files_metadata: bytes

    def render(self, start: int, began: float, finished: float) -> tuple[bytes, bytes]:
        """(sentinel, metadata.json) of a backup starting in segment `start`: its LSNs agree with its name."""
        lsn = start * SEGMENT_SIZE + 40
        sentinel = {**self.sentinel, "LSN": lsn, "FinishLSN": lsn + 216, "StartTime": go_time(began),
                    "FinishTime": go_time(finished)}
        metadata = {**self.metadata, "start_lsn": lsn, "finish_lsn": lsn + 216, "start_time": go_time(began),
                    "finish_time": go_time(finished)}
        return (json.dumps(sentinel, separators=(",", ":")).encode(),
                json.dumps(metadata, separators=(",", ":")).encode())


def real_parts(pg: pgenv.PgEnv) -> tuple[dict[str, bytes], Documents]:
    """The shared cluster's reference backup: its parts and documents, to be stored under other names
    (backup-fetch reads a backup by its name's keys; nothing inside the objects names the backup)."""
    folder = os.path.join(pg.golden, BASE, pg.backup)
    parts = {}
    for part in pg.parts:
        with open(os.path.join(folder, "tar_partitions", part), "rb") as f:
            parts[part] = f.read()
    with open(os.path.join(pg.golden, BASE, pg.backup + SENTINEL), "rb") as f:
        sentinel = json.load(f)
    with open(os.path.join(folder, "metadata.json"), "rb") as f:
        metadata = json.load(f)
    with open(os.path.join(folder, "files_metadata.json"), "rb") as f:
        files_metadata = f.read()
    return parts, Documents(sentinel, metadata, files_metadata)


def synthetic_parts(seed: str) -> tuple[dict[str, bytes], Documents]:
    """Small parts of random bytes, named as a backup-push names them: delete never reads a part."""
    r = rng(seed, "parts")
    names = ["part_001.tar.lz4", "part_002.tar.lz4", "backup_label.tar.lz4", "pg_control.tar.lz4"]
    parts = {n: r.randbytes(r.randrange(512, 2048)) for n in names}
    files_metadata = json.dumps({"Files": {}, "TarFileSets": {n: [] for n in names}}).encode()
    return parts, Documents(SYNTHETIC_SENTINEL, SYNTHETIC_METADATA, files_metadata)


def build_layout(seed: str, starts: list[int], wal_last: int, parts: dict[str, bytes], docs: Documents,
                 gaps: frozenset[int] = frozenset()) -> Layout:
    """Backups starting in the given segments, one a day, the newest an hour ago (their objects dated
    so on file storage), each with its backup history file in wal_005/; WAL objects of random bytes for
    segments 1..wal_last but the gaps (delete reads names only)."""
    lay = Layout()
    now = time.time()
    for k, start in enumerate(starts):
        name = "base_" + harness.wal_name(start)
        finished = now - 3600 - (len(starts) - 1 - k) * DAY
        began = finished - 1800
        sentinel, metadata = docs.render(start, began, finished)
        keys = [lay.put(f"{BASE}/{name}{SENTINEL}", sentinel, finished)]
        keys += [lay.put(f"{BASE}/{name}/tar_partitions/{part}", data, began) for part, data in parts.items()]
        keys.append(lay.put(f"{BASE}/{name}/files_metadata.json", docs.files_metadata, finished))
        keys.append(lay.put(f"{BASE}/{name}/metadata.json", metadata, finished))
        lay.backups.append((name, start))
        lay.keys_of[name] = keys
        history = lay.put(f"wal_005/{harness.wal_name(start)}.00000028.backup.lz4", rng(seed, "history", k).randbytes(90))
        lay.wal[history] = start
    r = rng(seed, "wal")
    for seg in range(1, wal_last + 1):
        data = r.randbytes(r.randrange(64, 256))
        if seg not in gaps:
            lay.wal[lay.put(f"wal_005/{harness.wal_name(seg)}.lz4", data)] = seg
    return lay


# -- buckets: file storage and S3 -----------------------------------------------------------------

class FileBucket:
    kind = "file"

    def __init__(self, root: str):
        self.root = root
        self.env = {"WALG_FILE_PREFIX": root}

    @staticmethod
    def write(root: str, lay: Layout) -> "FileBucket":
        for key, data in lay.objects.items():
            path = os.path.join(root, key)
            harness.mkdir(os.path.dirname(path))
            harness.write_file(path, data)
            if key in lay.mtimes:
                os.utime(path, (lay.mtimes[key], lay.mtimes[key]))
        return FileBucket(root)

    @staticmethod
    def copy(template: str, root: str) -> "FileBucket":
        """A copy made of hard links (harness.link_copy): a delete unlinks, it never writes in place."""
        harness.link_copy(template, root)
        return FileBucket(root)

    def snapshot(self) -> dict[str, str]:
        return harness.tree_digest(self.root)

    def read(self, key: str) -> bytes | None:
        return harness.read_or_none(os.path.join(self.root, key))

    def drop(self) -> None:
        harness.remove(self.root)


class S3Bucket:
    """A bucket of its own on moto; walrus works under its prefix walrus/."""

    kind = "s3"
    PREFIX = "walrus"

    def __init__(self, moto):
        self.moto = moto
        self.bucket = moto.new_bucket()
        self.env = s3_settings(moto.endpoint, self.bucket, self.PREFIX)

    def key(self, key: str) -> str:
        return f"{self.PREFIX}/{key}"

    def fill(self, lay: Layout, objects: dict[str, bytes] | None = None) -> "S3Bucket":
        """Everything but the sentinels at once, then the sentinels oldest first: LastModified orders
        the backups (ties, as moto's whole seconds make them, are broken by name, which agrees)."""
        objects = lay.objects if objects is None else objects
        put = lambda k: self.moto.client.put_object(Bucket=self.bucket, Key=self.key(k), Body=objects[k])
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, [k for k in objects if not k.endswith(SENTINEL)]))
        for key in [k for k in objects if k.endswith(SENTINEL)]:
            put(key)
        return self

    def snapshot(self) -> dict[str, str]:
        pages = self.moto.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.PREFIX + "/")
        return {o["Key"][len(self.PREFIX) + 1:]: o["ETag"].strip('"') for page in pages for o in page.get("Contents", [])}

    def read(self, key: str) -> bytes | None:
        try:
            return self.moto.read(self.bucket, self.key(key))
        except self.moto.client.exceptions.NoSuchKey:
            return None

    def drop(self) -> None:
        """Empty the bucket and remove it: moto keeps everything in memory, and a long run fills hundreds."""
        client = self.moto.client
        for upload in client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        keys = self.moto.keys(self.bucket)
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                              "Quiet": True})
        client.delete_bucket(Bucket=self.bucket)


# -- checks -----------------------------------------------------------------------------------------

def short(keys: list[str], limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def listed_problems(lay: Layout, kind: str, snap: dict[str, str], listed: list[str]) -> tuple[list[str], list[str]]:
    """(lost, unclean) after a kill: every backup backup-list lists has its sentinel, metadata.json,
    files_metadata.json and every part byte-equal to the original, and every WAL object from its start
    segment on; the backups retain keeps are listed; no object differs from what was written."""
    prints = lay.fingerprints(kind)
    starts = dict(lay.backups)
    lost, unclean = [], []
    for name in listed:
        if name not in starts:
            unclean.append(f"backup-list lists {name}, which was never stored")
            continue
        gone = [k for k in lay.keys_of[name] if snap.get(k) != prints[k]]
        if gone:
            lost.append(f"{name} is listed but {len(gone)} of its objects are gone or changed ({short(gone)})")
        wal = [k for k, seg in lay.wal.items() if seg >= starts[name] and snap.get(k) != prints[k]]
        if wal:
            lost.append(f"{name} is listed but {len(wal)} WAL objects from its start segment on are gone "
                        f"({short(wal)})")
    for name in lay.kept:
        if name not in listed:
            lost.append(f"{name}, which retain {KEEP} keeps, is no longer listed")
    changed = [k for k, v in snap.items() if k in prints and v != prints[k]]
    if changed:
        lost.append(f"{len(changed)} objects hold other bytes than were written ({short(changed)})")
    strange = [k for k in snap if k not in prints]
    if strange:
        unclean.append(f"{len(strange)} objects that were never written ({short(strange)})")
    return lost, unclean


def end_problems(snap: dict[str, str], want: dict[str, str], outcome: Outcome, when: str) -> None:
    """The bucket must be exactly `want`: anything of it missing or changed is lost; anything more
    (of the deleted backups, or WAL below the cut) is a delete that did not finish its work."""
    missing = [k for k in want if k not in snap]
    changed = [k for k in want if k in snap and snap[k] != want[k]]
    extra = [k for k in snap if k not in want]
    if missing:
        outcome.worse("lost", f"{when}: {len(missing)} objects that an uninterrupted run keeps are gone ({short(missing)})")
    if changed:
        outcome.worse("lost", f"{when}: {len(changed)} kept objects hold other bytes ({short(changed)})")
    if extra:
        outcome.worse("unclean", f"{when}: {len(extra)} objects that an uninterrupted run deletes are left "
                                 f"({short(extra)})")


def stage(lay: Layout, snap: dict[str, str]) -> str:
    """How far the killed delete got, from what is left."""
    sentinels = [lay.keys_of[n][0] for n in lay.doomed]
    folders = [k for n in lay.doomed for k in lay.keys_of[n][1:]]
    wal = [k for k, seg in lay.wal.items() if seg < lay.cut]
    gone = [sum(1 for k in keys if k not in snap) for keys in (sentinels, folders, wal)]
    if not any(gone):
        return "before deleting anything"
    if gone[0] < len(sentinels):
        return "among the sentinels"
    if gone[1] < len(folders):
        return "among the backup folders"
    if gone[2] < len(wal):
        return "in the WAL sweep"
    return "after the WAL sweep"


# -- kill -9 -------------------------------------------------------------------------------------

def kill_time(name: str, i: int, count: int, typical: float) -> float:
    """Trial i's kill time: uniform over the i-th of `count` equal slices of the typical duration, so
    that the times of all trials are uniform over it and even a few trials (CI) cover all of it: the
    start-up (most of an S3 delete's time) as well as the deleting."""
    return typical * (i + rng(name, "at", i).random()) / count


def measure_delete(lay: Layout, make: Callable[[int], FileBucket | S3Bucket]) -> tuple[float, dict[str, str]]:
    """delete retain KEEP's typical duration, WORKERS at once on fresh buckets as the trials run; and
    the end state of an uninterrupted run (then delete garbage), checked against the layout's."""
    with ThreadPoolExecutor(WORKERS) as pool:
        buckets = list(pool.map(make, range(WORKERS)))
    results: list[harness.Result] = []
    threads = [threading.Thread(target=lambda b=b: results.append(harness.walrus(DELETE, b.env, timeout=CMD_TIMEOUT)))
               for b in buckets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.rc == 0, f"delete fails without any fault: {r.describe()}"
    garbage = harness.walrus(GARBAGE, buckets[0].env, timeout=CMD_TIMEOUT)
    assert garbage.rc == 0, f"delete garbage fails without any fault: {garbage.describe()}"
    end = buckets[0].snapshot()
    kind = buckets[0].kind
    for b in buckets:
        b.drop()
    diff = harness.digest_diff(end, lay.expected_end(kind))
    assert diff is None, f"an uninterrupted delete retain {KEEP} does not end as planned: {diff}"
    return sorted(r.seconds for r in results)[len(results) // 2], end


def kill_trial(s: Scenario, lay: Layout, bucket: FileBucket | S3Bucket, fault_at: float, end: dict[str, str],
               restore: Callable[[FileBucket, list[str]], list[str]] | None = None) -> Outcome:
    """delete retain KEEP --confirm, kill -9 at fault_at. Then: every listed backup whole (and, with
    `restore`, restoring); the re-runs (delete retain KEEP, delete garbage --grace 0) exit 0 and leave
    exactly what an uninterrupted run leaves."""
    outcome = Outcome()
    first = harness.walrus(DELETE, bucket.env, timeout=CMD_TIMEOUT, fault_at=fault_at, sig=signal.SIGKILL)
    harness.judge_exit(first, outcome, sig=signal.SIGKILL)
    snap = bucket.snapshot()
    s.note("exited before the kill" if first.signalled is None else f"killed {stage(lay, snap)}")
    listed, result = faulted.list_backups(bucket.env)
    if listed is None:
        outcome.worse("hang" if result.hung else "unclean", f"backup-list failed after the kill: {result.describe()}")
    else:
        names = [b["backup_name"] for b in listed]
        lost, unclean = listed_problems(lay, bucket.kind, snap, names)
        for problem in lost:
            outcome.worse("lost", f"after the kill at {fault_at:.3f}s: {problem}")
        for problem in unclean:
            outcome.worse("unclean", f"after the kill at {fault_at:.3f}s: {problem}")
        doomed_listed = [n for n in lay.doomed if n in names]
        if 0 < len(doomed_listed) < len(lay.doomed):
            s.tally("killed among the sentinels: those left are the oldest", doomed_listed == lay.doomed[:len(doomed_listed)])
        if restore is not None and not lost:
            for problem in restore(bucket, names):
                outcome.worse("lost", f"after the kill at {fault_at:.3f}s: {problem}")
            s.note("listed backups restored", len(names))
    for args in (DELETE, GARBAGE):
        again = harness.walrus(args, bucket.env, timeout=CMD_TIMEOUT)
        if again.rc != 0:
            outcome.worse("hang" if again.hung else "unclean", f"the re-run failed: {again.describe()}")
    end_problems(bucket.snapshot(), end, outcome, "after the re-runs")
    return outcome


def restorer(pg: pgenv.PgEnv, directory: str) -> Callable[[FileBucket, list[str]], list[str]]:
    """backup-fetch of each listed backup (all of them copies of the reference backup): each must
    restore exactly the reference tree."""
    def restore(bucket: FileBucket, names: list[str]) -> list[str]:
        problems = []
        for name in names:
            target = os.path.join(directory, os.path.basename(bucket.root) + "-" + name)
            fetched = harness.walrus(["backup-fetch", target, name], pg.golden_env(bucket.root), timeout=120)
            if fetched.rc != 0:
                problems.append(f"{name} is listed but does not restore: {fetched.describe()}")
            elif diff := harness.digest_diff(harness.tree_digest(target), pg.reference):
                problems.append(f"{name} restores, but {diff}")
            harness.remove(target)
        return problems
    return restore


def gaps_and_tail(starts: list[int], wal_last: int) -> tuple[frozenset[int], list[int]]:
    """Segments a wal-push archives while the delete runs, all at or above the cut (the oldest kept
    backup's start): three missing from the bucket between the kept backups (archived late: the cut
    segment itself among them) and one after the last one stored (archived now)."""
    cut, newest = starts[-KEEP], starts[-1]
    gaps = frozenset({cut, cut + 3, newest + 7})
    return gaps, sorted(gaps) + [wal_last + 1]


@dataclass
class Rig:
    """One backend's bucket: its layout, fresh copies of it, delete retain's typical duration and the
    end state of an uninterrupted run; shared by the kill and wal-push scenarios of the backend."""

    lay: Layout
    make: Callable[[str], FileBucket | S3Bucket]  # a fresh bucket holding the layout, by a unique tag
    empty: Callable[[str], FileBucket | S3Bucket]  # an empty bucket, by a unique tag
    directory: str  # scratch space: pg_wal folders, restores
    pushed: list[int]  # segments the wal-push scenario archives
    typical: float = 0.0  # delete retain KEEP --confirm
    push_typical: float = 0.0  # wal-push of one segment
    end: dict[str, str] = field(default_factory=dict)
    setup_seconds: float = 0.0

    def measure(self) -> "Rig":
        began = time.monotonic()
        self.typical, self.end = measure_delete(self.lay, lambda k: self.make(f"m{k}"))

        def push(k: int) -> None:
            bucket = self.empty(f"p{k}")
            pg_wal = harness.mkdir(os.path.join(self.directory, f"pw{k}"))
            path = harness.write_file(os.path.join(pg_wal, harness.wal_name(1)), bytes(PUSH_SIZE))
            pushed = harness.walrus(["wal-push", path], bucket.env, timeout=CMD_TIMEOUT)
            assert pushed.rc == 0, f"wal-push fails without any fault: {pushed.describe()}"
            bucket.drop()
            harness.remove(pg_wal)

        self.push_typical = faulted.measure(push, 1, WORKERS)
        self.setup_seconds = round(self.setup_seconds + time.monotonic() - began, 1)
        return self

    def noted(self, s: Scenario, push: bool = False) -> None:
        s.note("objects", len(self.lay.objects), add=False)
        s.note("typical s", round(self.typical, 3), add=False)
        if push:
            s.note("typical wal-push s", round(self.push_typical, 3), add=False)
        s.note("shared set-up s", self.setup_seconds, add=False)


@pytest.fixture(scope="module")
def file_rig(pg_env, scratch):
    """Five copies of the reference backup under other names, 8000 WAL objects (file storage): a
    template written once, copied as hard links per trial."""
    began = time.monotonic()
    directory = harness.workdir("walrus-faults-delete-", scratch)
    parts, docs = real_parts(pg_env)
    gaps, pushed = gaps_and_tail(FILE_STARTS, FILE_WAL_LAST)
    lay = build_layout("delete, file storage", FILE_STARTS, FILE_WAL_LAST, parts, docs, gaps)
    template = FileBucket.write(harness.mkdir(os.path.join(directory, "template")), lay).root
    rig = Rig(lay, lambda tag: FileBucket.copy(template, os.path.join(directory, tag)),
              lambda tag: FileBucket(harness.mkdir(os.path.join(directory, tag))), directory, pushed,
              setup_seconds=time.monotonic() - began)
    yield rig.measure()
    if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
        harness.remove(directory)


@pytest.fixture(scope="module")
def s3_rig(moto_server, scratch):
    """Five synthetic backups and 1100 WAL objects, put into a bucket of its own per trial."""
    directory = harness.workdir("walrus-faults-delete-", scratch)
    parts, docs = synthetic_parts("delete, S3")
    gaps, pushed = gaps_and_tail(S3_STARTS, S3_WAL_LAST)
    lay = build_layout("delete, S3", S3_STARTS, S3_WAL_LAST, parts, docs, gaps)
    yield Rig(lay, lambda tag: S3Bucket(moto_server).fill(lay), lambda tag: S3Bucket(moto_server), directory,
              pushed).measure()
    if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
        harness.remove(directory)


def kill_scenario(name: str, rig: Rig, count: int, restore=None) -> None:
    with scenario(FAMILY, name) as s:
        rig.noted(s)

        def trial(i: int) -> Outcome:
            bucket = rig.make(f"t{i}")
            try:
                return kill_trial(s, rig.lay, bucket, kill_time(s.name, i, count, rig.typical), rig.end, restore)
            finally:
                bucket.drop()

        s.run(count, trial, WORKERS)
    s.check()


def test_kill_delete_file(file_rig):
    """kill -9 delete retain 2 --confirm at a time drawn uniformly over its duration: every backup
    still listed is whole (sentinels go first) with its WAL (WAL goes last); re-runs finish the job."""
    kill_scenario("kill -9 retain 2, file storage", file_rig, KILLS)


def test_kill_delete_file_restore(file_rig, pg_env, workdir):
    """As above, and every backup listed after the kill is restored with backup-fetch (each is a copy
    of the reference backup under another name) and compared with the reference tree."""
    kill_scenario("kill -9 retain 2, listed ones restored", file_rig, RESTORE_KILLS, restorer(pg_env, workdir))


def test_kill_delete_s3(s3_rig):
    kill_scenario("kill -9 retain 2, S3", s3_rig, S3_KILLS)


# -- wal-push while delete runs -------------------------------------------------------------------

def race_trial(s: Scenario, rig: Rig, bucket: FileBucket | S3Bucket, pg_wal: str, i: int) -> Outcome:
    """delete retain KEEP --confirm, and two wal-push threads, each archiving two segments one after
    the other from a random moment: from one push's duration before the delete starts to the delete's
    typical duration after, so that the first push of each publishes while the delete runs or close
    to it. Then: every command exited 0; every pushed segment is stored and decodes to its bytes; the
    rest is exactly what an uninterrupted delete leaves (nothing at or above the cut, nothing of the
    kept backups, deleted)."""
    outcome = Outcome()
    r = rng(s.name, i)
    segments = rig.pushed
    data = {seg: harness.segment_bytes(rng(s.name, i, seg), PUSH_SIZE) for seg in segments}
    order = r.sample(segments, len(segments))
    lanes = [order[0::2], order[1::2]]
    lead = rig.push_typical  # the delete starts this late: a lane may start up to a push's duration before it
    offsets = [r.uniform(0, lead + rig.typical) for _ in lanes]
    pushed: list[tuple[int, float, float, harness.Result]] = []
    deleted: list[harness.Result] = []
    began = time.monotonic()

    def lane(k: int) -> None:
        time.sleep(max(0.0, began + offsets[k] - time.monotonic()))
        for seg in lanes[k]:
            path = harness.write_file(os.path.join(pg_wal, harness.wal_name(seg)), data[seg])
            start = time.monotonic() - began - lead
            result = harness.walrus(["wal-push", path], bucket.env, timeout=CMD_TIMEOUT)
            pushed.append((seg, start, time.monotonic() - began - lead, result))

    def delete() -> None:
        time.sleep(max(0.0, began + lead - time.monotonic()))
        deleted.append(harness.walrus(DELETE, bucket.env, timeout=CMD_TIMEOUT))

    threads = [threading.Thread(target=delete)] + [threading.Thread(target=lane, args=(k,)) for k in range(len(lanes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (d,) = deleted
    if d.rc != 0:
        outcome.worse("hang" if d.hung else "unclean", f"delete failed beside wal-push: {d.describe()}")
    for seg, start, end, result in pushed:
        s.tally("pushes published (exited) while the delete ran", 0 < end < d.seconds)
        if result.rc != 0:
            outcome.worse("hang" if result.hung else "unclean", f"wal-push failed beside delete: {result.describe()}")
        elif problem := harness.same_object(bucket.read(f"wal_005/{harness.wal_name(seg)}.lz4"), data[seg]):
            outcome.worse("lost", f"wal-push of {harness.wal_name(seg)} exited 0 (at {start:.2f}..{end:.2f}s, the "
                                  f"delete ran 0..{d.seconds:.2f}s) but the archived object {problem}")
    keys = {f"wal_005/{harness.wal_name(seg)}.lz4" for seg in segments}
    end_problems({k: v for k, v in bucket.snapshot().items() if k not in keys}, rig.lay.expected_end(bucket.kind),
                 outcome, f"after delete (0..{d.seconds:.2f}s) beside wal-push")
    return outcome


def race_scenario(name: str, rig: Rig, count: int) -> None:
    with scenario(FAMILY, name) as s:
        rig.noted(s, push=True)

        def trial(i: int) -> Outcome:
            bucket = rig.make(f"r{i}")
            pg_wal = harness.mkdir(os.path.join(rig.directory, f"w{i}"))
            try:
                return race_trial(s, rig, bucket, pg_wal, i)
            finally:
                bucket.drop()
                harness.remove(pg_wal)

        s.run(count, trial, WORKERS)
    s.check()


def test_delete_beside_wal_push_file(file_rig):
    race_scenario("retain 2 beside wal-push, file storage", file_rig, RACES)


def test_delete_beside_wal_push_s3(s3_rig):
    race_scenario("retain 2 beside wal-push, S3", s3_rig, S3_RACES)


# -- a backup being taken ---------------------------------------------------------------------------

PROGRESS_STARTS = [100, 200, 300]
PROGRESS_WAL_LAST = 360
# Backups being taken (parts stored, no sentinel yet), named before the newest complete backup: one
# older than every complete backup (a long one), one between the two newest.
IN_PROGRESS = ["base_" + harness.wal_name(50), "base_" + harness.wal_name(250)]
STALE = "base_" + harness.wal_name(20)  # a backup-push that died three days ago: garbage
PROGRESS_COMMANDS = [["delete", "retain", "1", "--confirm", "--json"], ["delete", "garbage", "--confirm", "--json"],
                     ["delete", "everything", "--confirm", "--json"]]


def in_progress_objects(seed: str) -> dict[str, bytes]:
    r = rng(seed, "in progress")
    return {f"{BASE}/{name}/tar_partitions/part_{n:03d}.tar.lz4": r.randbytes(r.randrange(512, 2048))
            for name in IN_PROGRESS for n in (1, 2, 3)}


def progress_checks(outcome: Outcome, s: Scenario, args: list[str], result: harness.Result, lay: Layout,
                    snap: set[str]) -> None:
    """The command exited 0, reported the folders as left alone, and did the rest of its work (so
    that "untouched" is not just a command that touched nothing)."""
    if result.rc != 0:
        outcome.worse("hang" if result.hung else "unclean", f"{' '.join(args)} failed: {result.describe()}")
        return
    try:
        alone = json.loads(result.stdout)["garbage"]["in_progress_left_alone"]
    except (ValueError, KeyError, TypeError) as e:
        outcome.worse("unclean", f"{' '.join(args)} printed no JSON report ({e}): {result.stdout[:200]}")
        return
    s.tally("reported as left alone (written to recently)", set(IN_PROGRESS) <= set(alone))
    mode = args[1]
    names = [n for n, _ in lay.backups]
    want = {"retain": names[-1:], "garbage": names, "everything": []}[mode]
    listed = sorted(n for n in names if lay.keys_of[n][0] in snap)
    if listed != want:
        outcome.worse("unclean", f"{' '.join(args)} left the complete backups {listed}, not {want}")


def test_backup_in_progress_file(workdir):
    """A folder with parts and no sentinel, its last part written a moment ago (its first two days
    ago: a long backup) and an upload under way (a temporary name), named before the newest complete
    backup: delete retain 1, delete garbage (grace 24h) and delete everything leave it untouched. A
    folder untouched for three days is garbage, and goes."""
    with scenario(FAMILY, "backup in progress, file storage") as s:
        parts, docs = synthetic_parts(s.name)
        lay = build_layout(s.name, PROGRESS_STARTS, PROGRESS_WAL_LAST, parts, docs)
        stale = {f"{BASE}/{STALE}/tar_partitions/{p}": d for p, d in parts.items()}
        for i, args in enumerate(PROGRESS_COMMANDS):
            outcome = Outcome()
            bucket = FileBucket.write(harness.mkdir(os.path.join(workdir, f"t{i}")), lay)
            for key, data in stale.items():
                path = os.path.join(bucket.root, key)
                harness.mkdir(os.path.dirname(path))
                harness.write_file(path, data)
                os.utime(path, (time.time() - 3 * DAY,) * 2)
            fresh = in_progress_objects(s.name)
            for n, name in enumerate(IN_PROGRESS):
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                fresh[f"{BASE}/{name}/tar_partitions/part_004.tar.lz4.tmp.{stamp}-{n:08x}"] = b"half an upload"
            for key, data in fresh.items():
                path = os.path.join(bucket.root, key)
                harness.mkdir(os.path.dirname(path))
                harness.write_file(path, data)
                if key.endswith("part_001.tar.lz4"):
                    os.utime(path, (time.time() - 2 * DAY,) * 2)
            result = harness.walrus(args, bucket.env, timeout=CMD_TIMEOUT)
            gone = [k for k, v in fresh.items() if bucket.read(k) != v]
            if gone:
                outcome.worse("lost", f"{' '.join(args)} deleted {len(gone)} objects of backups being taken "
                                      f"({short(gone)})")
            snap = set(bucket.snapshot())
            progress_checks(outcome, s, args, result, lay, snap)
            if left := [k for k in stale if k in snap]:
                outcome.worse("unclean", f"{' '.join(args)} left the stale folder of a dead backup-push ({short(left)})")
            s.add(outcome, " ".join(args[:2]))
            bucket.drop()
    s.check()


def test_backup_in_progress_s3(moto_server):
    """As on file storage, with every object written a moment ago (S3 has no way to date one back).
    Not covered here: a multipart upload under way in the folder. moto reports every upload as
    initiated on 2010-11-10 (moto/s3/responses.py, list_multipart_uploads), so any grace finds it
    abandoned; file storage covers an upload under way (a temporary name) instead."""
    with scenario(FAMILY, "backup in progress, S3") as s:
        parts, docs = synthetic_parts(s.name)
        lay = build_layout(s.name, PROGRESS_STARTS, PROGRESS_WAL_LAST, parts, docs)
        for args in PROGRESS_COMMANDS:
            outcome = Outcome()
            bucket = S3Bucket(moto_server).fill(lay)
            fresh = in_progress_objects(s.name)
            bucket.fill(lay, fresh)
            result = harness.walrus(args, bucket.env, timeout=CMD_TIMEOUT)
            gone = [k for k, v in fresh.items() if bucket.read(k) != v]
            if gone:
                outcome.worse("lost", f"{' '.join(args)} deleted {len(gone)} objects of backups being taken "
                                      f"({short(gone)})")
            progress_checks(outcome, s, args, result, lay, set(bucket.snapshot()))
            s.add(outcome, " ".join(args[:2]))
            bucket.drop()
    s.check()


def test_backup_in_progress_keeps_its_wal(workdir):
    """A backup being taken needs the WAL from its start segment on, as much as its parts: when its
    sentinel is written it is the newest backup, and it restores only with that WAL. delete retain 1
    and delete garbage must keep it as they keep the folder."""
    parts, docs = synthetic_parts("in progress, WAL")
    lay = build_layout("in progress, WAL", PROGRESS_STARTS, PROGRESS_WAL_LAST, parts, docs)
    oldest = min(int(name[-8:], 16) for name in IN_PROGRESS)  # base_<timeline><log><seg>: segments below 256
    problems = []
    for i, args in enumerate(PROGRESS_COMMANDS[:2]):
        bucket = FileBucket.write(harness.mkdir(os.path.join(workdir, f"t{i}")), lay)
        for key, data in in_progress_objects("in progress, WAL").items():
            path = os.path.join(bucket.root, key)
            harness.mkdir(os.path.dirname(path))
            harness.write_file(path, data)
        result = harness.walrus(args, bucket.env, timeout=CMD_TIMEOUT)
        assert result.rc == 0, result.describe()
        gone = sorted(k for k, seg in lay.wal.items() if seg >= oldest and bucket.read(k) is None)
        if gone:
            problems.append(f"{' '.join(args)}: {len(gone)} WAL objects from segment {oldest} on, which a backup "
                            f"in progress needs, are gone ({short(gone)})")
        bucket.drop()
    assert not problems, "\n".join(problems)
