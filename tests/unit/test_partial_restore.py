"""Partial restore without a cluster: WAL-G's key syntax and wildcards, the DatabasesByNames backup-push
records from catalog rows, and which files a --restore-only restore keeps and which parts it downloads."""
from __future__ import annotations

import asyncio
import io
import tarfile
from datetime import datetime, timezone

import lz4.frame
import pytest

from walrus.backup.dto import FileDescription, FilesMetadata, Sentinel
from walrus.backup.fetch import backup_fetch
from walrus.backup.partial import (collect_databases_by_names, databases_by_names, name_pattern, parse_key,
                                   restore_only_filter, tables_new)
from walrus.config import load_settings
from walrus.errors import BackupError, CorruptObject
from walrus.pg.libpq import SessionError
from walrus.storage.fs import FsStorage

TS = "pg_tblspc/16450/PG_15_202209061"
SYSTEM = {"pg_catalog.pg_class": {"oid": 1259, "relfilenode": 1259},
          "pg_catalog.pg_class_oid_index": {"oid": 2662, "relfilenode": 2662}}
# WAL-G's shape: db1 (16384) and db2 (16385, its table in a tablespace); 16386 is not described
NAMES = {
    "postgres": {"oid": 5, "tables_new": dict(SYSTEM)},
    "db1": {"oid": 16384, "tables_new": {
        **SYSTEM,
        "public.t1": {"oid": 16390, "relfilenode": 16390, "subtables": {
            "public.t1_pkey": {"oid": 16396, "relfilenode": 16396},
            "pg_toast.pg_toast_16390": {"oid": 16393, "relfilenode": 16393}}},
        "public.t1_pkey": {"oid": 16396, "relfilenode": 16396},
        "public.t2": {"oid": 16400, "relfilenode": 16410},  # rewritten: its file is not its OID
        "sales.t1": {"oid": 16420, "relfilenode": 16420},
        "public.parted": {"oid": 16430, "relfilenode": 0, "subtables": {
            "public.parted_1": {"oid": 16431, "relfilenode": 16431}}}}},
    "db2": {"oid": 16385, "tables_new": {**SYSTEM, "public.t3": {"oid": 16500, "relfilenode": 16500}}},
}
FILES = ["PG_VERSION", "global/1262", "global/pg_control", "backup_label", "base", "base/5/1259", "base/5/16999",
         "base/16384", "base/16384/PG_VERSION", "base/16384/pg_filenode.map", "base/16384/1259",
         "base/16384/1259_fsm", "base/16384/2662", "base/16384/16390", "base/16384/16390.1",
         "base/16384/16390_fsm", "base/16384/16390_vm", "base/16384/16390_init", "base/16384/16396",
         "base/16384/16393", "base/16384/16410", "base/16384/16420", "base/16384/16431", "base/16384/99999",
         "base/16385", "base/16385/1259", "pg_tblspc/16450", TS, f"{TS}/16385", f"{TS}/16385/2662",
         f"{TS}/16385/16500", f"{TS}/16385/16500.2", f"{TS}/16385/16500_vm", "base/16386/16600"]
T1 = {"base/16384/16390", "base/16384/16390.1", "base/16384/16390_fsm", "base/16384/16390_vm",
      "base/16384/16390_init", "base/16384/16396", "base/16384/16393"}
T3 = {f"{TS}/16385/16500", f"{TS}/16385/16500.2", f"{TS}/16385/16500_vm"}
# restored whatever is chosen: all but the user relations' files of the described user databases
ALWAYS = set(FILES) - T1 - T3 - {"base/16384/16410", "base/16384/16420", "base/16384/16431", "base/16384/99999"}


def kept(keys: list[str], names=NAMES) -> set[str]:
    keep = restore_only_filter(names, keys, "base_X")
    return {f for f in FILES if keep(f)}


def test_system_relations_and_other_files_are_always_kept():
    # system relations of user databases, their non-relation files, system databases, global/,
    # and the database the backup could not describe (16386)
    assert kept(["postgres"]) == ALWAYS
    assert {"base/16384/2662", "base/16384/1259_fsm", "base/16384/pg_filenode.map", f"{TS}/16385/2662",
            "base/5/16999", "base/16386/16600", f"{TS}/16385", "pg_tblspc/16450"} <= ALWAYS


@pytest.mark.parametrize("key,table", [
    ("db", ("db", "")), ("db/t", ("db", "public.t")), ("db/s.t", ("db", "s.t")), ("db/s/t", ("db", "s.t")),
    ("d*/*", ("d*", "public.*")), ("my db/s.t", ("my db", "s.t"))])
def test_keys_parse_as_walg(key, table):
    assert parse_key(key) == table


@pytest.mark.parametrize("key", ["", "db/a.b.c", "db/s/t.x", "a/b/c/d"])
def test_malformed_keys_are_refused(key):
    with pytest.raises(BackupError, match="not a database or table name"):
        parse_key(key)


def test_star_is_the_only_wildcard():
    assert name_pattern("public.t*").fullmatch("public.t1_pkey")
    assert name_pattern("*").fullmatch("")
    assert not name_pattern("public.t1").fullmatch("publicXt1")  # WAL-G's regexp would match this
    assert name_pattern("a+b(c)").fullmatch("a+b(c)") and not name_pattern("a+b").fullmatch("aab")
    assert not name_pattern("db").fullmatch("db1")


def test_a_whole_database():
    assert kept(["db1"]) == {f for f in FILES if f.startswith("base/16384")} | ALWAYS


def test_a_table_brings_its_subtables_segments_and_forks():
    assert kept(["db1/t1"]) == ALWAYS | T1
    assert kept(["db1/public.t1"]) == kept(["db1/public/t1"]) == ALWAYS | T1


def test_a_table_by_schema_and_by_file_number():
    assert kept(["db1/sales.t1"]) == kept(["db1/sales/t1"]) == ALWAYS | {"base/16384/16420"}
    assert kept(["db1/t2"]) == ALWAYS | {"base/16384/16410"}  # its file number, not its OID
    assert kept(["db1/parted"]) == ALWAYS | {"base/16384/16431"}


def test_wildcards_and_several_keys():
    assert kept(["*/public.t3"]) == ALWAYS | T3  # db1 has no public.t3: another match is enough
    assert kept(["db1/public.t*"]) == ALWAYS | T1 | {"base/16384/16410"}
    assert kept(["db1/t1", "db2"]) == ALWAYS | T1 | T3
    assert kept(["db*"]) == set(FILES)


def test_unknown_names_are_errors_with_the_choices():
    with pytest.raises(BackupError, match="has no database 'db3'") as e:
        restore_only_filter(NAMES, ["db1", "db3"], "base_X")
    assert e.value.detail == "its databases: db1, db2, postgres"
    with pytest.raises(BackupError, match="no table 'public.t9' in database 'db\\*'") as e:
        restore_only_filter(NAMES, ["db*/t9"], "base_X")
    assert "schema" in e.value.hint


@pytest.mark.parametrize("names", [None, {}])
def test_a_backup_without_names_cannot_be_restored_in_part(names):
    with pytest.raises(BackupError, match="has no DatabasesByNames"):
        restore_only_filter(names, ["db1"], "base_X")


def test_no_keys_is_an_error():
    with pytest.raises(BackupError, match="names no database"):
        restore_only_filter(NAMES, [], "base_X")


@pytest.mark.parametrize("names", [{"db1": {"oid": "16384"}}, {"db1": []},
                                   {"db1": {"oid": 1, "tables_new": {"t": {"oid": 2}}}}])
def test_malformed_names_are_corrupt(names):
    with pytest.raises(CorruptObject, match="DatabasesByNames is malformed"):
        restore_only_filter(names, ["db1"], "base_X")


def test_walg_first_format_has_file_numbers_only():
    old = {"db1": {"oid": 16384, "tables": {"pg_catalog.pg_class": 1259, "public.t1": 16390, "sales.t1": 16420}}}
    # system by file number (as WAL-G up to v3.0.3 decided); db2 is not described, so restored whole
    assert kept(["db1/t1"], old) == (ALWAYS - {"base/16384/2662"}) | T3 | (T1 - {"base/16384/16396",
                                                                                "base/16384/16393"})


def test_walg_3_0_4_wrote_todays_shape_under_tables():
    v304 = {name: {"oid": info["oid"], "tables": info["tables_new"]} for name, info in NAMES.items()}
    assert kept(["db1/t1"], v304) == kept(["db1/t1"])


# ---------------------------------------------------------------- recording: catalog rows to tables_new

ROWS = [  # (oid, relfilenode, path, name, relkind, inheritance parents, owner)
    (1259, 0, "base/16384/1259", "pg_catalog.pg_class", "r", [], None),  # mapped: the path names its file
    (2662, 2662, None, "pg_catalog.pg_class_oid_index", "i", [], 1259),
    (16390, 16390, None, "public.t1", "r", [], None),
    (16393, 16393, None, "pg_toast.pg_toast_16390", "t", [], 16390),
    (16395, 16395, None, "pg_toast.pg_toast_16390_index", "i", [], 16393),
    (16396, 16396, None, "public.t1_pkey", "i", [], 16390),
    (16388, 16388, None, "public.t1_id_seq", "S", [], 16390),
    (16430, 0, None, "public.parted", "p", [], None),
    (16431, 0, None, "public.parted_1", "p", [16430], None),
    (16432, 16432, None, "public.parted_1_a", "r", [16431], None),
    (16433, 0, None, "public.parted_idx", "I", [], 16430),  # no storage
    (16434, 16434, None, "public.parted_1_a_idx", "i", [16433], 16432),
    (16440, 0, None, "public.v", "v", [], None),
]


def test_tables_new_in_walg_shape():
    def sub(oid, filenode=None):
        return {"oid": oid, "relfilenode": oid if filenode is None else filenode}

    assert tables_new(ROWS) == {
        "pg_catalog.pg_class": {**sub(1259), "subtables": {"pg_catalog.pg_class_oid_index": sub(2662)}},
        "pg_catalog.pg_class_oid_index": sub(2662),
        "pg_toast.pg_toast_16390": {**sub(16393), "subtables": {"pg_toast.pg_toast_16390_index": sub(16395)}},
        "pg_toast.pg_toast_16390_index": sub(16395),
        "public.parted": {**sub(16430, 0), "subtables": {"public.parted_1": sub(16431, 0),
                                                         "public.parted_1_a": sub(16432),
                                                         "public.parted_1_a_idx": sub(16434)}},
        "public.t1": {**sub(16390), "subtables": {"pg_toast.pg_toast_16390": sub(16393),
                                                  "pg_toast.pg_toast_16390_index": sub(16395),
                                                  "public.t1_id_seq": sub(16388), "public.t1_pkey": sub(16396)}},
        "public.t1_id_seq": sub(16388),
        "public.t1_pkey": sub(16396),
    }
    assert list(tables_new(ROWS)) == sorted(tables_new(ROWS))


def as_text(value):
    """A value as libpq gives it: text, '{..}' for an array, None for NULL."""
    if isinstance(value, list):
        return "{" + ",".join(map(str, value)) + "}"
    return None if value is None else str(value)


class FakeSession:
    def __init__(self, rows):
        self.rows = [tuple(map(as_text, row)) for row in rows]

    def query(self, sql):
        return self.rows

    def close(self):
        pass


def fake_connect(settings, dbname):
    if dbname == "locked":
        raise SessionError('FATAL:  permission denied for database "locked"')
    if dbname is None:
        return FakeSession([(16384, "db1", "f"), (1, "template1", "f"), (16390, "locked", "f"), (16391, "empty", "f")])
    return FakeSession([] if dbname == "empty" else ROWS[:2])


def test_collect_leaves_out_a_database_it_cannot_connect_to(log_lines):
    names = collect_databases_by_names(load_settings({}), fake_connect)
    assert list(names) == ["db1", "empty", "template1"]
    assert names["empty"] == {"oid": 16391}  # omitempty, as WAL-G writes it
    assert names["db1"] == {"oid": 16384, "tables_new": tables_new(ROWS[:2])}
    assert any("cannot connect to database 'locked'" in line for line in log_lines)


def test_a_failure_to_collect_is_a_warning_and_no_names(log_lines):
    def refused(settings, dbname):
        raise SessionError("connection refused")

    assert asyncio.run(databases_by_names(load_settings({}), connect=refused)) is None
    assert any("could not record database and table names" in line for line in log_lines)


# ---------------------------------------------------------------- backup_fetch(restore_only=...)

NAME = "base_000000010000000000000002"
PARTS = {
    "part_001.tar.lz4": ["/PG_VERSION", "/base", "/base/16384", "/base/16385", "/base/16384/1259",
                         "/base/16384/16390", "/base/16384/16390_vm", "/base/16385/1259"],
    "part_002.tar.lz4": ["/base/16385/16500", "/base/16385/16500.1"],  # db2's t3 only
    "part_003.tar.lz4": ["/base/16384/16420", "/base/16384/16396"],
    "backup_label.tar.lz4": ["backup_label", "tablespace_map"],
    "pg_control.tar.lz4": ["/global/pg_control"],
}


class RecordingFs(FsStorage):
    def __init__(self, root):
        super().__init__(root)
        self.gets = []

    async def get(self, key):
        self.gets.append(key.rsplit("/", 1)[-1])
        return await super().get(key)


def _build(store, names) -> None:
    folder = store / "basebackups_005" / NAME / "tar_partitions"
    folder.mkdir(parents=True)
    stamp = FileDescription.for_mtime_ns(1_700_000_000 * 10**9)
    files = {}
    for part, members in PARTS.items():
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for m in members:
                info = tarfile.TarInfo(m)
                if m in ("/base", "/base/16384", "/base/16385"):
                    info.type, info.mode = tarfile.DIRTYPE, 0o700
                    tar.addfile(info)
                else:
                    data = m.encode()
                    info.size, info.mode = len(data), 0o600
                    tar.addfile(info, io.BytesIO(data))
        (folder / part).write_bytes(lz4.frame.compress(out.getvalue()))
        if part != "pg_control.tar.lz4":
            files.update({m: stamp for m in members})
    tar_sets = {p: m for p, m in PARTS.items() if p != "pg_control.tar.lz4"}
    (store / "basebackups_005" / NAME / "files_metadata.json").write_bytes(
        FilesMetadata(files=files, tar_file_sets=tar_sets, databases_by_names=names).to_json())
    now = datetime.now(timezone.utc)
    (store / "basebackups_005" / f"{NAME}_backup_stop_sentinel.json").write_bytes(
        Sentinel(start_lsn=0x2000028, finish_lsn=0x2000100, pg_version=150000, start_time=now,
                 finish_time=now).to_json())


def _fetch(tmp_path, names, **kw):
    store = tmp_path / "store"
    if not store.exists():
        _build(store, names)
    storage = RecordingFs(str(store))
    settings = load_settings({"WALG_FILE_PREFIX": str(store), "HOME": str(tmp_path)})
    target = tmp_path / "restore"
    asyncio.run(backup_fetch(settings, storage, str(target), "LATEST", **kw))
    restored = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    return restored, storage.gets


def test_fetch_restores_the_chosen_and_skips_parts_of_nothing_chosen(tmp_path):
    restored, gets = _fetch(tmp_path, NAMES, restore_only=["db1/t1"])
    assert restored == {"PG_VERSION", "base/16384/1259", "base/16384/16390", "base/16384/16390_vm",
                        "base/16385/1259", "base/16384/16396", "backup_label", "tablespace_map",
                        "global/pg_control"}
    assert "part_002.tar.lz4" not in gets and "part_003.tar.lz4" in gets


def test_fetch_with_a_mask_restores_what_both_keep(tmp_path):
    restored, gets = _fetch(tmp_path, NAMES, restore_only=["db1", "db2"], mask="base/16385/*")
    assert restored == {"base/16385/1259", "base/16385/16500", "base/16385/16500.1"}
    assert "part_003.tar.lz4" not in gets


@pytest.mark.parametrize("names,keys,error", [(NAMES, ["db3"], "has no database"),
                                              (None, ["db1"], "has no DatabasesByNames")])
def test_fetch_refuses_before_writing_anything(tmp_path, names, keys, error):
    with pytest.raises(BackupError, match=error):
        _fetch(tmp_path, names, restore_only=keys)
    assert not (tmp_path / "restore").exists()
