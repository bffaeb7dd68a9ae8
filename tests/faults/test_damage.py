"""Damaged and missing objects of every kind, backups and WAL: detected with a clear error, never restored wrong."""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults import faulted, harness, pgenv
from tests.faults.figures import Outcome, rng, scenario, trials
from tests.faults.harness import TMP_RE
from tests.pgcluster import chown_to_user

pytestmark = pytest.mark.e2e

FAMILY = "damage"
WORKERS = faulted.WORKERS
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
# A restore of this small backup takes about a second; a clean error must come well within this.
FETCH_BOUND = 20.0
# Each case once in CI; in the long mode again with other random bytes and flip positions.
ROUNDS = trials(1, 4)


# -- the damage itself: each returns the object's new bytes, or None to delete it ----------------

def truncate_half(data: bytes, rnd) -> bytes:
    return data[:len(data) // 2]


def truncate_few(data: bytes, rnd) -> bytes:
    return data[:7]


def flip_end(data: bytes, rnd) -> bytes:
    """A byte among the last 8: the checksum or end mark of every format that has one."""
    i = len(data) - 1 - rnd.randrange(min(8, len(data)))
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def flip_middle(data: bytes, rnd) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def garbage(data: bytes, rnd) -> bytes:
    """Random bytes, a third as long (same-length garbage of an uncompressed, unencrypted object is
    indistinguishable from data: no format can see it)."""
    return rnd.randbytes(max(16, len(data) // 3))


def delete(data: bytes, rnd) -> None:
    return None


BYTE_DAMAGE = {"truncated to half": truncate_half, "truncated to 7 bytes": truncate_few,
               "byte flipped near the end": flip_end, "byte flipped in the middle": flip_middle,
               "replaced by garbage": garbage, "deleted": delete}
FLIPS = {"byte flipped near the end", "byte flipped in the middle"}


def json_garbage(data: bytes, rnd) -> bytes:
    return b'{"not json' + rnd.randbytes(32)


def json_wrong_shape(data: bytes, rnd) -> bytes:
    return b'["valid JSON", "of the wrong shape"]'


def drop_part_from_sets(data: bytes, rnd) -> bytes:
    """files_metadata.json without one data part in TarFileSets (its files still in Files)."""
    meta = json.loads(data)
    part = rnd.choice(sorted(p for p in meta["TarFileSets"] if p.startswith("part_")))
    del meta["TarFileSets"][part]
    return json.dumps(meta).encode()


def drop_part_and_files(data: bytes, rnd) -> bytes:
    """files_metadata.json without one data part and without the files it holds: consistent in itself,
    but the part is stored and its files are in the backup."""
    meta = json.loads(data)
    part = rnd.choice(sorted(p for p in meta["TarFileSets"] if p.startswith("part_")))
    for member in meta["TarFileSets"].pop(part):
        meta["Files"].pop(member, None)
    return json.dumps(meta).encode()


# -- backups ---------------------------------------------------------------------------------------

def backup_cases(pg: pgenv.PgEnv) -> list[tuple[str, str, str, object]]:
    """(object kind, damage name, path relative to the backup folder, damage function)."""
    data_parts = [p for p in pg.parts if p.startswith("part_")]
    cases = []
    for label, fn in BYTE_DAMAGE.items():
        # the first part, and one from the middle (another part is still extracting when it fails)
        for part in (data_parts[0], data_parts[len(data_parts) // 2]):
            cases.append(("tar data part", label, f"tar_partitions/{part}", fn))
        for special in (p for p in pg.parts if not p.startswith("part_")):
            cases.append((special.split(".")[0] + ".tar", label, f"tar_partitions/{special}", fn))
    for label, fn in (("deleted", delete), ("replaced by garbage", json_garbage),
                      ("valid JSON of the wrong shape", json_wrong_shape)):
        cases.append(("metadata.json", label, "metadata.json", fn))
    for label, fn in (("deleted", delete), ("replaced by garbage", json_garbage),
                      ("a part missing from TarFileSets", drop_part_from_sets),
                      ("a part and its files missing", drop_part_and_files)):
        cases.append(("files_metadata.json", label, "files_metadata.json", fn))
    for label, fn in (("deleted", delete), ("replaced by garbage", json_garbage)):
        cases.append(("sentinel", label, "../{backup}_backup_stop_sentinel.json", fn))
    return cases


def damage_file(path: str, fn, rnd) -> None:
    with open(path, "rb") as f:
        new = fn(f.read(), rnd)
    if new is None:
        os.unlink(path)
    else:
        harness.replace_file(path, new)


def test_damaged_backup_objects(pg_env, workdir):
    """backup-fetch of a backup with one object damaged or missing: a non-zero exit with a clear
    message within the bound, no global/pg_control left behind, or (only where the damage cannot
    matter) exactly the reference tree. Never exit 0 with a different tree: a deleted data part must
    fail the restore, not restore fewer files."""
    pg = pg_env
    cases = backup_cases(pg) * ROUNDS
    with scenario(FAMILY, "backup objects") as s:
        def trial(i: int) -> tuple[str, Outcome]:
            kind, label, rel, fn = cases[i]
            store = os.path.join(workdir, f"store{i}")
            harness.link_copy(pg.golden, store)
            folder = os.path.join(store, "basebackups_005", pg.backup)
            damage_file(os.path.normpath(os.path.join(folder, rel.format(backup=pg.backup))), fn, rng(s.name, i))
            target = os.path.join(workdir, f"target{i}")
            outcome = Outcome()
            fetched = harness.walrus(["backup-fetch", target, pg.backup], pg.golden_env(store), timeout=FETCH_BOUND)
            if harness.judge_exit(fetched, outcome):
                if diff := harness.digest_diff(harness.tree_digest(target), pg.reference):
                    outcome.worse("lost", f"backup-fetch exited 0 but {diff}")
            elif why := pgenv.startable_partial(target, pg.reference):
                outcome.worse("unclean", f"backup-fetch exited {fetched.rc} and PostgreSQL could start the "
                                         f"broken restore: {why}")
            detected = fetched.rc not in (0, None)  # refused to restore (clearly or not)
            s.tally(f"{kind} detected", detected)
            if not detected:  # harmless only if the tree is the reference (checked above); say which
                s.note(f"not detected: {label} of {os.path.basename(rel)}")
            harness.remove(store)
            harness.remove(target)
            return f"{kind} {label}", outcome

        s.run(len(cases), trial, WORKERS)
    s.check()


# -- WAL segments ------------------------------------------------------------------------------

SEGMENT_SIZE = 1 << 20
METHODS = ("lz4", "zstd", "brotli", "lzma", "none")
ENCRYPTIONS = ("none", "libsodium", "openpgp")
CHECKSUMMED = {"lz4", "zstd"}  # lz4 objects with walrus's seal, zstd frames with checksums


def encryption_env(kind: str, workdir: str) -> dict[str, str]:
    if kind == "libsodium":
        return {"WALG_LIBSODIUM_KEY": "walrus_test_libsodium_key_32byte"}
    if kind == "openpgp":
        key = os.path.join(workdir, "pgp.asc")  # a copy the server's OS user can read
        shutil.copyfile(os.path.join(FIXTURES, "walrus-cv25519.sec.asc"), key)
        chown_to_user(key)
        return {"WALG_PGP_KEY_PATH": key}
    return {}


def wal_cases() -> list[tuple[str, str, str]]:
    """(method, encryption, damage): flips only where the format or the encryption carries a
    checksum (none, brotli and LZMA-alone do not: a flipped byte there decodes silently)."""
    return [(m, e, d) for m in METHODS for e in ENCRYPTIONS for d in BYTE_DAMAGE
            if d not in FLIPS or m in CHECKSUMMED or e != "none"]


def test_damaged_wal_segments(workdir):
    """wal-fetch of a damaged segment exits 1 with a clear message and leaves no file at DEST; of a
    deleted one, exits 74 (PostgreSQL's "not archived")."""
    cases = wal_cases() * ROUNDS
    with scenario(FAMILY, "WAL segments") as s:
        wal = harness.mkdir(os.path.join(workdir, "pg_wal"))
        keys = {enc: encryption_env(enc, workdir) for enc in ENCRYPTIONS}
        archived: dict[tuple[str, str], tuple[str, str, bytes]] = {}  # (method, encryption) -> store, key, original

        def push(combo: tuple[str, str]) -> None:
            method, enc = combo
            n = METHODS.index(method) * 8 + ENCRYPTIONS.index(enc) + 1
            original = harness.segment_bytes(rng(s.name, method, enc), SEGMENT_SIZE)
            path = harness.write_file(os.path.join(wal, harness.wal_name(n)), original)
            store = harness.mkdir(os.path.join(workdir, f"store-{method}-{enc}"))
            env = {"WALG_FILE_PREFIX": store, "WALG_COMPRESSION_METHOD": method, "WALG_PG_WAL_SIZE": "1",
                   **keys[enc]}
            pushed = harness.walrus(["wal-push", path], env)
            assert pushed.rc == 0, pushed.describe()
            (key,) = [n for n in os.listdir(os.path.join(store, "wal_005")) if not TMP_RE.search(n)]
            archived[combo] = (store, key, original)

        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(push, [(m, e) for m in METHODS for e in ENCRYPTIONS]))

        def trial(i: int) -> tuple[str, Outcome]:
            method, enc, label = cases[i]
            source, key, original = archived[(method, enc)]
            store = os.path.join(workdir, f"trial{i}")
            harness.link_copy(source, store)
            damage_file(os.path.join(store, "wal_005", key), BYTE_DAMAGE[label], rng(s.name, i))
            dest_dir = harness.mkdir(os.path.join(workdir, f"dest{i}"))
            dest = os.path.join(dest_dir, "RECOVERYXLOG")
            env = {"WALG_FILE_PREFIX": store, "WALG_COMPRESSION_METHOD": method, "WALG_PG_WAL_SIZE": "1",
                   "WALG_DOWNLOAD_CONCURRENCY": "1",  # no background prefetch to outlive the trial
                   **keys[enc]}
            outcome = Outcome()
            fetched = harness.walrus(["wal-fetch", key.split(".")[0], dest], env, timeout=30)
            expected = 74 if label == "deleted" else 1
            exited_0 = harness.judge_exit(fetched, outcome)
            if exited_0:  # acceptable only with exactly the segment (a damage the decoder never reads)
                got = open(dest, "rb").read()
                if got != original:
                    outcome.worse("lost", f"wal-fetch exited 0 and wrote {len(got)} bytes that are not the segment")
            elif fetched.rc is not None and fetched.rc != expected:
                outcome.worse("unclean", f"wal-fetch exited {fetched.rc}, not {expected}"
                              + (" (74 tells PostgreSQL the segment is not archived: recovery would end early "
                                 "instead of failing)" if fetched.rc == 74 else "") + f": {fetched.describe()}")
            if not exited_0 and os.path.lexists(dest):
                outcome.worse("unclean", f"wal-fetch exited {fetched.rc} and left a file at DEST")
            s.tally(f"{method}/{enc} detected", outcome.kind == "clean")
            s.tally(f"{label} detected", outcome.kind == "clean")
            harness.remove(store)
            harness.remove(dest_dir)
            return f"{method}, encryption {enc}, {label}", outcome

        s.run(len(cases), trial, WORKERS)
    s.check()
