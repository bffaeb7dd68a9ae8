"""Backup JSON documents: WAL-G's exact bytes on write, WAL-G's (and older tools') forms on read."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from walrus.backup.dto import (
    DATE_FMT,
    ExtendedMetadata,
    FileDescription,
    FilesMetadata,
    Sentinel,
    TablespaceSpec,
    format_go_time,
    now_utc_micro,
    parse_go_time,
    parse_go_time_ns,
    system_identifier_from_pg,
)
from walrus.errors import CorruptObject

UTC = timezone.utc
MSK = timezone(timedelta(hours=3))


def one_line(text: str) -> bytes:
    """A JSON example from the spec, wrapped over lines for reading, as the compact bytes Go writes."""
    return "".join(line.strip() for line in text.strip().splitlines()).encode()


# spec 2.1, local full backup
SPEC_FULL_SENTINEL = one_line("""
{"LSN":33554472,"PgVersion":160002,"FinishLSN":33554704,"SystemIdentifier":7381234567890123456,
"UncompressedSize":23456789,"CompressedSize":3456789,"DataCatalogSize":23999999,"ChkpNum":null,
"Version":2,"StartTime":"2026-01-02T03:04:05.123457Z","FinishTime":"2026-01-02T03:04:09.000001Z",
"DateFmt":"%Y-%m-%dT%H:%M:%S.%fZ","Hostname":"db1","DataDir":"/var/lib/postgresql/16/main",
"IsPermanent":false}
""")

# spec 2.2, one element of WAL-G's cmd/pg/exporter/testdata/backup-list.json (list fields removed)
REAL_METADATA = one_line("""
{"start_time":"2025-12-20T02:00:01.793015Z","finish_time":"2025-12-20T02:00:18.538578Z",
"date_fmt":"%Y-%m-%dT%H:%M:%S.%fZ","hostname":"superpg","data_dir":"/pgroot/data",
"pg_version":150015,"start_lsn":3325915299880,"finish_lsn":3325916080832,"is_permanent":false,
"system_identifier":7507672962298572862,"uncompressed_size":2604967632,"compressed_size":858502390}
""")


def full_sentinel() -> Sentinel:
    return Sentinel(
        start_lsn=0x2000028,
        finish_lsn=0x2000110,
        pg_version=160002,
        system_identifier=7381234567890123456,
        uncompressed_size=23456789,
        compressed_size=3456789,
        data_catalog_size=23999999,
        start_time=datetime(2026, 1, 2, 3, 4, 5, 123457, tzinfo=UTC),
        finish_time=datetime(2026, 1, 2, 3, 4, 9, 1, tzinfo=UTC),
        hostname="db1",
        data_dir="/var/lib/postgresql/16/main",
    )


# ---------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("dt", "nanos", "text"),
    [
        (datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=UTC), 0, "2026-01-02T03:04:05.12Z"),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), 0, "2026-01-02T03:04:05Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 1, tzinfo=UTC), 0, "2026-01-02T03:04:05.000001Z"),
        (datetime(2026, 1, 2, 3, 4, 0, 123456, tzinfo=MSK), 789, "2026-01-02T03:04:00.123456789+03:00"),
        (datetime(2026, 1, 2, 3, 4, 0, tzinfo=MSK), 500, "2026-01-02T03:04:00.0000005+03:00"),
        (datetime(2026, 7, 1, tzinfo=timezone(-timedelta(hours=5, minutes=30))), 0, "2026-07-01T00:00:00-05:30"),
        (datetime(2026, 7, 1, tzinfo=timezone(timedelta(0))), 0, "2026-07-01T00:00:00Z"),
        (datetime(1, 1, 1, tzinfo=UTC), 0, "0001-01-01T00:00:00Z"),
    ],
)
def test_go_time_format_and_parse(dt: datetime, nanos: int, text: str) -> None:
    assert format_go_time(dt, nanos) == text
    assert parse_go_time_ns(text) == (dt, nanos)
    parsed = parse_go_time(text)
    assert parsed == dt and parsed.utcoffset() == dt.utcoffset()


def test_format_go_time_refuses_naive() -> None:
    with pytest.raises(ValueError):
        format_go_time(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "text",
    ["", "2026-01-02 03:04:05Z", "2026-01-02T03:04:05", "2026-01-02T03:04:05.Z", "2026-01-02T03:04:05.1234567890Z",
     "2026-01-02T03:04:05z", "2026-13-02T03:04:05Z", "2026-01-02T03:04:05+0300", "2026-01-02T03:04:05+03:60"],
)
def test_parse_go_time_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_time(text)


def test_now_utc_micro_rounds_up() -> None:
    before_ns = time.time_ns()
    now = now_utc_micro()
    after_ns = time.time_ns()
    assert now.utcoffset() == timedelta(0)
    micros = (now - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert -(-before_ns // 1000) <= micros <= -(-after_ns // 1000)


def test_system_identifier_from_pg() -> None:
    assert system_identifier_from_pg(7381234567890123456) == 7381234567890123456
    assert system_identifier_from_pg(-1) == 2**64 - 1
    assert system_identifier_from_pg(-(2**63)) == 2**63
    with pytest.raises(ValueError):
        system_identifier_from_pg(2**64)


# ---------------------------------------------------------------- tablespace spec


def test_tablespace_spec_is_written_as_a_sorted_go_map() -> None:
    spec = TablespaceSpec("/var/lib/postgresql/16/main/", {"16384": "/srv/ts1/", "9999": "/srv/ts0"})
    obj = spec.to_json_obj()
    assert list(obj) == ["16384", "9999", "base_prefix", "tablespaces"]
    assert obj["base_prefix"] == "/var/lib/postgresql/16/main"
    assert obj["tablespaces"] == ["16384", "9999"]
    assert obj["16384"] == {"loc": "/srv/ts1", "link": "pg_tblspc/16384"}
    assert TablespaceSpec.from_json_obj(obj) == spec


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"tablespaces": []},
        {"base_prefix": 5},
        {"base_prefix": "/d", "tablespaces": ["1"]},
        {"base_prefix": "/d", "tablespaces": ["1"], "1": {"link": "pg_tblspc/1"}},
        {"base_prefix": "/d", "tablespaces": [1]},
    ],
)
def test_tablespace_spec_rejects_malformed(obj: object) -> None:
    with pytest.raises(ValueError):
        TablespaceSpec.from_json_obj(obj)


def test_tablespace_spec_without_base_prefix_cannot_be_written() -> None:
    with pytest.raises(ValueError):
        TablespaceSpec("/").to_json_obj()


# ---------------------------------------------------------------- sentinel: writing


def test_sentinel_matches_spec_example_byte_for_byte() -> None:
    assert full_sentinel().to_json() == SPEC_FULL_SENTINEL


def test_sentinel_round_trip() -> None:
    sentinel = full_sentinel()
    assert Sentinel.from_json(sentinel.to_json()) == sentinel
    assert Sentinel.from_json(SPEC_FULL_SENTINEL) == sentinel


def test_delta_sentinel_with_tablespace_and_user_data() -> None:
    sentinel = Sentinel(
        start_lsn=67108904,
        finish_lsn=67109200,
        pg_version=160002,
        uncompressed_size=10,
        compressed_size=5,
        delta_lsn=33554472,
        delta_from="base_000000010000000000000002",
        delta_full_name="base_000000010000000000000002",
        delta_count=1,
        spec=TablespaceSpec("/var/lib/postgresql/16/main", {"16384": "/srv/ts1"}),
        user_data={"y": 4, "x": [3]},
        start_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        finish_time=datetime(2026, 1, 2, 3, 4, 6, 500000, tzinfo=UTC),
        hostname="db1",
        data_dir="/var/lib/postgresql/16/main",
        is_permanent=True,
    )
    expected = one_line("""
    {"LSN":67108904,"DeltaLSN":33554472,"DeltaFrom":"base_000000010000000000000002",
    "DeltaFullName":"base_000000010000000000000002","DeltaCount":1,"PgVersion":160002,
    "FinishLSN":67109200,"UncompressedSize":10,"CompressedSize":5,
    "Spec":{"16384":{"loc":"/srv/ts1","link":"pg_tblspc/16384"},"base_prefix":"/var/lib/postgresql/16/main",
    "tablespaces":["16384"]},"UserData":{"x":[3],"y":4},"ChkpNum":null,"Version":2,
    "StartTime":"2026-01-02T03:04:05Z","FinishTime":"2026-01-02T03:04:06.5Z","DateFmt":"%Y-%m-%dT%H:%M:%S.%fZ",
    "Hostname":"db1","DataDir":"/var/lib/postgresql/16/main","IsPermanent":true}
    """)
    assert sentinel.to_json() == expected
    again = Sentinel.from_json(expected)
    assert again.is_delta
    assert again == Sentinel(**{**sentinel.__dict__, "user_data": {"x": [3], "y": 4}})


def test_sentinel_omitempty_rules() -> None:
    sentinel = Sentinel(
        pg_version=150000,
        system_identifier=0,
        files_metadata_disabled=True,
        user_data={},
        start_time=datetime(2026, 1, 1, tzinfo=UTC),
        finish_time=datetime(2026, 1, 1, tzinfo=UTC),
    )
    doc = json.loads(sentinel.to_json())
    assert doc["LSN"] is None and doc["FinishLSN"] is None and doc["ChkpNum"] is None
    assert doc["SystemIdentifier"] == 0  # a present zero is kept, only an absent one is omitted
    assert doc["UserData"] == {}  # Go omits only a nil interface
    assert doc["FilesMetadataDisabled"] is True
    for omitted in ("DeltaLSN", "DeltaFrom", "DeltaFullName", "DeltaCount", "DataCatalogSize", "Spec"):
        assert omitted not in doc
    assert "FilesMetadataDisabled" not in json.loads(full_sentinel().to_json())
    assert "UserData" not in json.loads(full_sentinel().to_json())


def test_sentinel_escapes_like_encoding_json() -> None:
    sentinel = full_sentinel()
    sentinel.hostname = 'a<b>&"c"\n\u2028é'
    sentinel.user_data = {"note": "x<y", "n": 12345678901234567890, "f": [1.0, 1e21, 1e-7, 0.5, 1e16]}
    text = sentinel.to_json().decode()
    assert '"Hostname":"a\\u003cb\\u003e\\u0026\\"c\\"\\n\\u2028é"' in text
    # user data went through Go's interface{}: float64 numbers, sorted keys
    assert '"UserData":{"f":[1,1e+21,1e-7,0.5,10000000000000000],"n":12345678901234567000,"note":"x\\u003cy"}' in text


def test_sentinel_writes_non_utf8_names_like_go() -> None:
    sentinel = full_sentinel()
    sentinel.data_dir = b"/data/\xe2\x82x".decode("utf-8", "surrogateescape")
    assert '"DataDir":"/data/\ufffd\ufffdx"' in sentinel.to_json().decode()


# ---------------------------------------------------------------- sentinel: reading legacy forms


def test_v1_sentinel_with_inline_files_and_delta_from_lsn() -> None:
    data = b"""{
      "LSN": 67108904, "DeltaFromLSN": 33554472, "DeltaFrom": "base_000000010000000000000002",
      "DeltaFullName": "base_000000010000000000000002", "DeltaCount": 1, "PgVersion": 100005,
      "FinishLSN": 67109200, "UserData": null,
      "Files": {"/base/1/2": {"IsIncremented": true, "IsSkipped": false, "MTime": "2019-05-01T10:00:00.5+03:00"},
                "/PG_VERSION": {"IsSkipped": true, "MTime": "2019-05-01T10:00:00Z"}},
      "TarFileSets": {"part_1.tar.lz4": ["/base/1/2", "/PG_VERSION"]}
    }"""
    sentinel = Sentinel.from_json(data)
    assert sentinel.is_delta
    assert sentinel.delta_lsn == 33554472
    assert sentinel.version == 1
    assert sentinel.start_time is None and sentinel.finish_time is None
    assert sentinel.user_data is None
    files = sentinel.legacy_files_metadata()
    assert files is not None
    assert files.tar_file_sets == {"part_1.tar.lz4": ["/base/1/2", "/PG_VERSION"]}
    entry = files.lookup("base/1/2")
    assert entry is not None and entry.is_incremented
    assert entry.mtime == datetime(2019, 5, 1, 7, 0, 0, 500000, tzinfo=UTC)
    assert files.files["/PG_VERSION"].is_skipped


def test_v2_sentinel_has_no_legacy_files() -> None:
    sentinel = Sentinel.from_json(SPEC_FULL_SENTINEL)
    assert sentinel.legacy_files is None and sentinel.legacy_files_metadata() is None


def test_wal_e_lowercase_spec() -> None:
    data = b"""{
        "LSN": 83886080, "PgVersion": 160000,
        "spec": {"base_prefix": "/pgdata/test", "tablespaces": ["16451"],
                 "16451": {"loc": "/pgdata/tablespace1", "link": "pg_tblspc/16451"}}
    }"""
    sentinel = Sentinel.from_json(data)
    assert sentinel.spec == TablespaceSpec("/pgdata/test", {"16451": "/pgdata/tablespace1"})
    assert not sentinel.is_delta


def test_remote_mode_sentinel_with_empty_tablespaces() -> None:
    data = (
        b'{"LSN":50331688,"PgVersion":160002,"FinishLSN":50331904,"SystemIdentifier":7381234567890123456,'
        b'"UncompressedSize":31000000,"CompressedSize":4000000,'
        b'"Spec":{"base_prefix":"/var/lib/postgresql/16/main","tablespaces":[]},"ChkpNum":null,"Version":2,'
        b'"StartTime":"2026-01-02T03:04:05.5Z","FinishTime":"2026-01-02T03:04:09Z",'
        b'"DateFmt":"%Y-%m-%dT%H:%M:%S.%fZ","Hostname":"db1","DataDir":"/var/lib/postgresql/16/main",'
        b'"IsPermanent":false}'
    )
    sentinel = Sentinel.from_json(data)
    assert sentinel.spec == TablespaceSpec("/var/lib/postgresql/16/main", {})
    assert sentinel.data_catalog_size == 0
    assert sentinel.to_json() == data


def test_delta_missing_delta_count_is_corrupt() -> None:
    data = (
        b'{"LSN":67108904,"DeltaLSN":33554472,"DeltaFrom":"base_000000010000000000000002",'
        b'"DeltaFullName":"base_000000010000000000000002","PgVersion":160002,"FinishLSN":67109200}'
    )
    with pytest.raises(CorruptObject, match="inconsistent") as info:
        Sentinel.from_json(data, source="base_000000010000000000000004_backup_stop_sentinel.json")
    assert "base_000000010000000000000004" in info.value.message
    assert info.value.detail and "DeltaCount" in info.value.detail


def test_sentinel_keys_are_case_insensitive_and_unknown_keys_ignored() -> None:
    data = b' {\n "lsn": 1, "finishlsn": 2, "PGVERSION": 90600, "Unknown": {"deep": [1]}, "ChkpNum": null,\n' \
           b' "filesmetadatadisabled": true, "version": 2 }\n'
    sentinel = Sentinel.from_json(data)
    assert (sentinel.start_lsn, sentinel.finish_lsn, sentinel.pg_version) == (1, 2, 90600)
    assert sentinel.files_metadata_disabled and sentinel.version == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"LSN":1} x', "not valid JSON"),
        (b'{"LSN":NaN}', "not valid JSON"),
        (b"[1,2]", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'{"LSN":-1}', "not valid"),
        (b'{"LSN":1.5}', "not valid"),
        (b'{"LSN":"16/0"}', "not valid"),
        (b'{"LSN":18446744073709551616}', "not valid"),
        (b'{"PgVersion":true}', "not valid"),
        (b'{"IsPermanent":"yes"}', "not valid"),
        (b'{"StartTime":"yesterday"}', "not valid"),
        (b'{"Spec":{"tablespaces":[]}}', "not valid"),
        (b'{"Files":[]}', "not valid"),
    ],
)
def test_unusable_sentinels_are_corrupt(data: bytes, message: str) -> None:
    with pytest.raises(CorruptObject, match=message):
        Sentinel.from_json(data)


# ---------------------------------------------------------------- metadata.json


def test_metadata_round_trip_of_real_example() -> None:
    meta = ExtendedMetadata.from_json(REAL_METADATA)
    assert meta.start_lsn == 0x306_60000028
    assert meta.start_time == datetime(2025, 12, 20, 2, 0, 1, 793015, tzinfo=UTC)
    assert meta.system_identifier == 7507672962298572862
    assert meta.user_data is None
    assert meta.to_json() == REAL_METADATA


def test_metadata_reads_backup_list_rows_and_null_identifier() -> None:
    row = json.loads(REAL_METADATA)
    row.update(backup_name="base_000000430000030600000060", time="2025-12-20T02:00:19.896Z", system_identifier=None)
    meta = ExtendedMetadata.from_json(json.dumps(row, indent=2).encode())
    assert meta.system_identifier is None
    assert b'"system_identifier":null,' in meta.to_json()


def test_metadata_from_sentinel() -> None:
    sentinel = full_sentinel()
    sentinel.user_data = {"k": "v"}
    meta = ExtendedMetadata.from_sentinel(sentinel)
    assert meta.to_json() == one_line("""
    {"start_time":"2026-01-02T03:04:05.123457Z","finish_time":"2026-01-02T03:04:09.000001Z",
    "date_fmt":"%Y-%m-%dT%H:%M:%S.%fZ","hostname":"db1","data_dir":"/var/lib/postgresql/16/main",
    "pg_version":160002,"start_lsn":33554472,"finish_lsn":33554704,"is_permanent":false,
    "system_identifier":7381234567890123456,"uncompressed_size":23456789,"compressed_size":3456789,
    "user_data":{"k":"v"}}
    """)
    assert meta.date_fmt == DATE_FMT
    with pytest.raises(ValueError):
        ExtendedMetadata.from_sentinel(Sentinel())


def test_metadata_rejects_non_object() -> None:
    with pytest.raises(CorruptObject, match="metadata.json is not a JSON object"):
        ExtendedMetadata.from_json(b'"x"')


# ---------------------------------------------------------------- files_metadata.json


def test_files_metadata_exact_output() -> None:
    mtime = datetime(2026, 1, 2, 3, 4, 0, 123456, tzinfo=MSK)
    files = FilesMetadata(
        files={
            "/base/16384/16385": FileDescription(mtime=mtime, mtime_nanos=789),
            "/base/16384/99": FileDescription(
                mtime=mtime,
                corrupt_blocks={"CorruptBlocksCount": 12, "SomeCorruptBlocks": [1, 2]},
            ),
            "/a<b": FileDescription(is_skipped=True, mtime=mtime, updates_count=3),
        },
        tar_file_sets={"part_001.tar.lz4": ["/base/16384/16385", "/base/16384/99", "/a<b"]},
    )
    expected = (
        '{"Files":{'
        '"/base/16384/16385":{"IsIncremented":false,"IsSkipped":false,'
        '"MTime":"2026-01-02T03:04:00.123456789+03:00","UpdatesCount":0},'
        '"/base/16384/99":{"IsIncremented":false,"IsSkipped":false,"MTime":"2026-01-02T03:04:00.123456+03:00",'
        '"CorruptBlocks":{"CorruptBlocksCount":12,"SomeCorruptBlocks":[1,2]},"UpdatesCount":0},'
        '"/a<b":{"IsIncremented":false,"IsSkipped":true,"MTime":"2026-01-02T03:04:00.123456+03:00",'
        '"UpdatesCount":3}},'
        '"TarFileSets":{"part_001.tar.lz4":["/base/16384/16385","/base/16384/99","/a<b"]}}'
    ).encode()
    assert files.to_json() == expected  # json/v2 defaults: no HTML escaping
    assert FilesMetadata.from_json(expected) == files


def test_files_metadata_omits_empty_members_and_keeps_databases() -> None:
    assert FilesMetadata().to_json() == b"{}"
    databases = {"postgres": {"oid": 5, "tables_new": {"public.t": {"oid": 16390, "relfilenode": 16390}}}}
    files = FilesMetadata(databases_by_names=databases)
    assert files.to_json() == (
        b'{"DatabasesByNames":{"postgres":{"oid":5,"tables_new":'
        b'{"public.t":{"oid":16390,"relfilenode":16390}}}}}'
    )
    assert FilesMetadata.from_json(files.to_json()).databases_by_names == databases


def test_files_metadata_lookup_normalises_leading_slash() -> None:
    mtime = datetime(2026, 1, 1, tzinfo=UTC)
    local_mode = FilesMetadata(files={"/base/1/2": FileDescription(mtime=mtime, is_incremented=True)})
    remote_mode = FilesMetadata(files={"base/1/2": FileDescription(mtime=mtime, is_skipped=True)})
    for member in ("/base/1/2", "base/1/2"):
        found_local = local_mode.lookup(member)
        found_remote = remote_mode.lookup(member)
        assert found_local is not None and found_local.is_incremented
        assert found_remote is not None and found_remote.is_skipped
    assert local_mode.lookup("base/1/3") is None


def test_files_metadata_tolerant_read() -> None:
    data = b"""{"files": {"backup_label": {"isskipped": false, "mtime": "2026-01-02T03:04:00Z", "Extra": 1},
                          "tablespace_map": null},
                "tarfilesets": {"backup_label.tar.lz4": ["backup_label"], "empty.tar": null}}"""
    files = FilesMetadata.from_json(data)
    assert files.files["backup_label"].mtime == datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    assert files.files["tablespace_map"].mtime == datetime(1, 1, 1, tzinfo=UTC)
    assert files.tar_file_sets == {"backup_label.tar.lz4": ["backup_label"], "empty.tar": []}
    assert files.databases_by_names is None


@pytest.mark.parametrize(
    "data",
    [
        b'{"Files":{"/x":{"MTime":5}}}',
        b'{"Files":{"/x":{"UpdatesCount":-1}}}',
        b'{"Files":{"/x":{"CorruptBlocks":{"SomeCorruptBlocks":["1"]}}}}',
        b'{"TarFileSets":{"part_001.tar":"x"}}',
        b'{"DatabasesByNames":[]}',
    ],
)
def test_files_metadata_rejects_wrong_types(data: bytes) -> None:
    with pytest.raises(CorruptObject):
        FilesMetadata.from_json(data)


def test_file_description_keeps_nanosecond_mtime() -> None:
    mtime_ns = 1767322800_123456789
    desc = FileDescription.for_mtime_ns(mtime_ns, is_incremented=True)
    assert desc.mtime.utcoffset() is not None
    assert desc.mtime_ns == mtime_ns
    back = FilesMetadata.from_json(FilesMetadata(files={"/f": desc}).to_json()).files["/f"]
    assert back.mtime_ns == mtime_ns and back.is_incremented


# -- the C encoder's shortcut writes exactly what the per-value Go encoder writes

def _random_doc(rng, depth=0):
    """Nested objects of every kind JSON holds but floats, with names full of what Go escapes."""
    alphabet = ["a", "Z", "/", "<", ">", "&", '"', "\\", "\n", "\t", "\x01", "\x7f", "\u2028", "\u2029", "é", "☃", "𝄞"]

    def text():
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))

    kind = rng.randrange(7 if depth < 4 else 5)
    if kind == 0:
        return text()
    if kind == 1:
        return rng.randrange(-2 ** 63, 2 ** 64)
    if kind == 2:
        return rng.choice([True, False])
    if kind == 3:
        return None
    if kind == 4:
        return rng.randrange(0, 10)
    if kind == 5:
        return [_random_doc(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {text(): _random_doc(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


@pytest.mark.parametrize("html", [True, False])
def test_the_fast_compact_encoding_is_the_go_encoding(html):
    import random

    from walrus.backup.dto import _compact, _encode

    rng = random.Random(20)
    for _ in range(2000):
        doc = {"Files": _random_doc(rng)}
        assert _compact(doc, html) == _encode(doc, html).encode("utf-8")


def test_floats_and_names_not_utf8_take_the_go_path():
    from walrus.backup.dto import _compact

    assert _compact({"a": [1.0, 1e-7, 2.5]}, html=False) == b'{"a":[1,1e-7,2.5]}'  # Go's float formatting
    raw_name = b"base/\xff\xfe".decode("utf-8", "surrogateescape")  # a file name that is not UTF-8
    assert _compact({raw_name: True}, html=True) == '{"base/\ufffd\ufffd":true}'.encode("utf-8")
