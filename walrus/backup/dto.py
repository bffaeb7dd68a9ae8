"""A backup's JSON documents (sentinel, metadata.json, files_metadata.json, Spec) as WAL-G has them."""
from __future__ import annotations

import codecs
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from walrus.errors import CorruptObject

DATE_FMT = "%Y-%m-%dT%H:%M:%S.%fZ"
TABLESPACE_FOLDER = "pg_tblspc"

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MICROSECOND = timedelta(microseconds=1)
# What Go's decoder leaves in a time.Time field the JSON does not mention.
GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=timezone.utc)

_CORRUPT_HINT = (
    "The object was not written by WAL-G or walrus, or it was damaged in storage; "
    "use another backup or restore the object from a copy."
)


# ---------------------------------------------------------------- Go time values


_GO_TIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:[0-5]\d)"
)


def format_go_time(dt: datetime, nanos: int = 0) -> str:
    """Go's RFC3339Nano for an aware datetime plus nanos (0..999) beyond its microseconds.

    Go trims trailing zeros of the fraction (.120000 prints as .12, .000000 prints nothing) and
    writes "Z" whenever the UTC offset is zero.
    """
    offset = dt.utcoffset()
    if offset is None:
        raise ValueError(f"cannot format a naive datetime as RFC3339: {dt!r}")
    text = (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
        f"T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    )
    fraction = dt.microsecond * 1000 + nanos
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    seconds = int(offset.total_seconds())
    if seconds == 0:
        return text + "Z"
    sign = "-" if seconds < 0 else "+"
    hours, minutes = divmod(abs(seconds) // 60, 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


def parse_go_time_ns(text: str) -> tuple[datetime, int]:
    """Parse RFC3339 with 0..9 fraction digits: (datetime to the microsecond, remaining nanos)."""
    match = _GO_TIME_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC3339 time: {text!r}")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    nanoseconds = int((match.group(7) or "").ljust(9, "0"))
    zone = match.group(8)
    if zone == "Z":
        tz = timezone.utc
    else:
        delta = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
        tz = timezone(-delta if zone[0] == "-" else delta)
    micro, nanos = divmod(nanoseconds, 1000)
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz), nanos


def parse_go_time(text: str) -> datetime:
    """Parse RFC3339 with 0..9 fraction digits and Z or an offset; digits past microseconds are dropped."""
    return parse_go_time_ns(text)[0]


def now_utc_micro() -> datetime:
    """Current UTC time rounded up to whole microseconds, as WAL-G stamps backups."""
    micros = -(-time.time_ns() // 1000)
    return _EPOCH + timedelta(microseconds=micros)


def system_identifier_from_pg(value: int) -> int:
    """WAL-G stores pg_control_system().system_identifier (a signed bigint) as its unsigned reading."""
    if not INT64_MIN <= value <= UINT64_MAX:
        raise ValueError(f"system identifier out of 64-bit range: {value}")
    return value & UINT64_MAX


# ---------------------------------------------------------------- Go JSON encoding


def _replace_per_byte(error: UnicodeError) -> tuple[str, int]:
    # Go's encoder substitutes U+FFFD for each invalid byte; Python's "replace" would merge a
    # truncated multi-byte sequence into one replacement character.
    assert isinstance(error, UnicodeDecodeError)
    return "\ufffd", error.start + 1


codecs.register_error("walrus-go-replace", _replace_per_byte)

# encoding/json (v1) escapes these so the output can be embedded in HTML and JavaScript.
_HTML_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def _quote(text: str, html: bool) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A name decoded from non-UTF-8 bytes (surrogateescape) is written the way Go writes those bytes.
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "walrus-go-replace")
    quoted = json.dumps(text, ensure_ascii=False)
    return quoted.translate(_HTML_ESCAPES) if html else quoted


def _go_float(value: float) -> str:
    """Format a float64 as Go's encoding/json does."""
    if not math.isfinite(value):
        raise ValueError(f"JSON cannot represent {value}")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    if abs(value) < 1e-6 or abs(value) >= 1e21:
        # Both languages print the shortest round-trip digits; Go drops the exponent's leading
        # zero only for negative exponents ("1e-07" becomes "1e-7", "1e+21" stays).
        return re.sub(r"e-0(\d)$", r"e-\1", repr(value))
    from decimal import Decimal  # here: only user data holds floats

    digits = Decimal(repr(value))
    if digits == digits.to_integral_value():
        return str(int(digits))
    return format(digits, "f")


def _as_go_interface(value: Any) -> Any:
    """The value WAL-G re-encodes after decoding user data into a Go interface{}.

    Numbers become float64 and objects become maps, which encoding/json writes with sorted keys.
    """
    if isinstance(value, dict):
        return {key: _as_go_interface(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_as_go_interface(item) for item in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _encode(value: Any, html: bool) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return _quote(value, html)
    if isinstance(value, dict):
        members = (f"{_quote(key, html)}:{_encode(item, html)}" for key, item in value.items())
        return "{" + ",".join(members) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_encode(item, html) for item in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _encode_indented(value: Any, indent: str, depth: int) -> str:
    """json.Encoder with SetIndent("", indent): one member per line, empty containers kept short."""
    inner, outer = indent * (depth + 1), indent * depth
    if isinstance(value, dict) and value:
        members = (f"{inner}{_quote(k, True)}: {_encode_indented(v, indent, depth + 1)}" for k, v in value.items())
        return "{\n" + ",\n".join(members) + "\n" + outer + "}"
    if isinstance(value, (list, tuple)) and value:
        items = (inner + _encode_indented(v, indent, depth + 1) for v in value)
        return "[\n" + ",\n".join(items) + "\n" + outer + "]"
    return _encode(value, html=True)


def go_json(value: Any, indent: str | None = None) -> str:
    """What WAL-G's commands print through encoding/json's Encoder: compact (or indented), HTML-safe."""
    return _encode(value, html=True) if indent is None else _encode_indented(value, indent, 0)


def _has_float(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _compact(doc: dict[str, Any], html: bool) -> bytes:
    """_encode's bytes, by the C encoder where its output is the same (a files_metadata.json of
    thousands of entries costs the per-value path tens of milliseconds): strings come out as
    _quote's json.dumps writes them, and the HTML escapes only ever occur inside strings. Not
    where Go's rules differ: floats (Go's own formatting) and names that are not valid UTF-8."""
    if not _has_float(doc):
        try:
            text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            return (text.translate(_HTML_ESCAPES) if html else text).encode("utf-8")
        except (UnicodeEncodeError, TypeError, ValueError):
            pass  # the per-value path says what is wrong, or writes what Go writes
    return _encode(doc, html=html).encode("utf-8")


def _dumps_v1(doc: dict[str, Any]) -> bytes:
    """encoding/json v1 output: compact, HTML-safe escapes, no trailing newline."""
    return _compact(doc, html=True)


def _dumps_v2(doc: dict[str, Any]) -> bytes:
    """encoding/json/v2 default output: compact, no HTML escaping, no trailing newline."""
    return _compact(doc, html=False)


# ---------------------------------------------------------------- tolerant decoding


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load(data: bytes | str, what: str) -> Any:
    # Go's decoder (v1 options) accepts invalid UTF-8 inside strings, replacing it.
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise CorruptObject(f"{what} is not valid JSON", detail=str(exc), hint=_CORRUPT_HINT) from exc


def _describe(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """A JSON object's members matched case-insensitively, as Go's decoder matches struct fields.

    Absent members and nulls read as None (Go leaves the field at its zero value); members the
    caller never asks for are ignored.
    """

    def __init__(self, obj: Any, what: str):
        if not isinstance(obj, dict):
            raise CorruptObject(
                f"{what} is not a JSON object", detail=f"found {_describe(obj)}", hint=_CORRUPT_HINT
            )
        self._members = {key.lower(): value for key, value in obj.items()}
        self.what = what

    def bad(self, key: str, expected: str) -> CorruptObject:
        return CorruptObject(
            f"{self.what} is not valid",
            detail=f'"{key}" must be {expected}, found {_describe(self._members.get(key.lower()))}',
            hint=_CORRUPT_HINT,
        )

    def raw(self, key: str) -> Any:
        return self._members.get(key.lower())

    def integer(self, key: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.bad(key, f"an integer in [{low}, {high}]")
        return value

    def uint64(self, key: str) -> int | None:
        return self.integer(key, 0, UINT64_MAX)

    def text(self, key: str) -> str | None:
        value = self.raw(key)
        if value is not None and not isinstance(value, str):
            raise self.bad(key, "a string")
        return value

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if value is not None and not isinstance(value, bool):
            raise self.bad(key, "true or false")
        return bool(value)

    def time_ns(self, key: str) -> tuple[datetime, int] | None:
        value = self.text(key)
        if value is None:
            return None
        try:
            return parse_go_time_ns(value)
        except ValueError:
            raise self.bad(key, "an RFC3339 time") from None

    def time(self, key: str) -> datetime | None:
        parsed = self.time_ns(key)
        return parsed[0] if parsed else None


# ---------------------------------------------------------------- tablespace spec


@dataclass
class TablespaceSpec:
    """Where a backup's tablespaces lived: the data directory and each tablespace OID's location."""

    base_prefix: str
    locations: dict[str, str] = field(default_factory=dict)  # OID (the pg_tblspc link name) -> loc

    def __post_init__(self) -> None:
        # WAL-G trims trailing slashes from every path it stores in the spec.
        self.base_prefix = self.base_prefix.rstrip("/")
        self.locations = {oid: loc.rstrip("/") for oid, loc in self.locations.items()}

    def to_json_obj(self) -> dict[str, Any]:
        """The spec as WAL-G marshals it: one flat Go map, hence sorted keys."""
        if not self.base_prefix:
            raise ValueError("tablespace spec has no base_prefix (the data directory)")
        obj: dict[str, Any] = {"base_prefix": self.base_prefix, "tablespaces": list(self.locations)}
        for oid, loc in self.locations.items():
            obj[oid] = {"loc": loc, "link": f"{TABLESPACE_FOLDER}/{oid}"}
        return {key: obj[key] for key in sorted(obj)}

    @classmethod
    def from_json_obj(cls, obj: Any) -> TablespaceSpec:
        """Read a spec (sentinel "Spec"/"spec" or a --restore-spec file); ValueError if malformed.

        Keys are matched exactly, as WAL-G reads the spec through a Go map.
        """
        if not isinstance(obj, dict):
            raise ValueError("tablespace spec must be a JSON object")
        base_prefix = obj.get("base_prefix")
        if not isinstance(base_prefix, str):
            raise ValueError('tablespace spec lacks a string "base_prefix"')
        names = obj.get("tablespaces")
        locations: dict[str, str] = {}
        for name in names if isinstance(names, list) else []:
            entry = obj.get(name) if isinstance(name, str) else None
            if not isinstance(entry, dict) or not isinstance(entry.get("loc"), str):
                raise ValueError(f"tablespace spec has no {{\"loc\": ...}} entry for {_describe(name)}")
            locations[name] = entry["loc"]
        return cls(base_prefix, locations)


# ---------------------------------------------------------------- files_metadata.json


@dataclass(kw_only=True)
class FileDescription:
    """One entry of files_metadata.json "Files": how a tar member was stored."""

    is_incremented: bool = False  # stored as a wi1 page increment
    is_skipped: bool = False  # unchanged since the delta base, not stored
    mtime: datetime
    mtime_nanos: int = 0  # nanoseconds beyond mtime's microseconds; Go keeps full precision
    updates_count: int = 0
    corrupt_blocks: dict[str, Any] | None = None  # {"CorruptBlocksCount": n, "SomeCorruptBlocks": [...]}

    @classmethod
    def for_mtime_ns(cls, mtime_ns: int, **fields: Any) -> FileDescription:
        """Entry for a file whose st_mtime_ns is mtime_ns, in local time as WAL-G records it."""
        micros, nanos = divmod(mtime_ns, 1000)
        local = (_EPOCH + timedelta(microseconds=micros)).astimezone()
        return cls(mtime=local, mtime_nanos=nanos, **fields)

    @property
    def mtime_ns(self) -> int:
        """Modification time in nanoseconds since the epoch; WAL-G skips a file only on exact equality."""
        return (self.mtime - _EPOCH) // _ONE_MICROSECOND * 1000 + self.mtime_nanos

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "IsIncremented": self.is_incremented,
            "IsSkipped": self.is_skipped,
            "MTime": format_go_time(self.mtime, self.mtime_nanos),
        }
        if self.corrupt_blocks is not None:
            obj["CorruptBlocks"] = {
                "CorruptBlocksCount": self.corrupt_blocks.get("CorruptBlocksCount", 0),
                "SomeCorruptBlocks": list(self.corrupt_blocks.get("SomeCorruptBlocks") or []),
            }
        obj["UpdatesCount"] = self.updates_count
        return obj

    @classmethod
    def from_json_obj(cls, obj: Any, what: str) -> FileDescription:
        fields = _Fields({} if obj is None else obj, what)
        mtime, nanos = fields.time_ns("MTime") or (GO_ZERO_TIME, 0)
        return cls(
            is_incremented=fields.flag("IsIncremented"),
            is_skipped=fields.flag("IsSkipped"),
            mtime=mtime,
            mtime_nanos=nanos,
            updates_count=fields.uint64("UpdatesCount") or 0,
            corrupt_blocks=_read_corrupt_blocks(fields.raw("CorruptBlocks"), what),
        )


def _read_corrupt_blocks(raw: Any, what: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    fields = _Fields(raw, f"{what} CorruptBlocks")
    blocks = fields.raw("SomeCorruptBlocks") or []
    if not isinstance(blocks, list) or not all(_is_uint32(block) for block in blocks):
        raise fields.bad("SomeCorruptBlocks", "a list of block numbers")
    return {"CorruptBlocksCount": fields.integer("CorruptBlocksCount") or 0, "SomeCorruptBlocks": blocks}


def _is_uint32(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT32_MAX


def _read_files(raw: Any, what: str) -> dict[str, FileDescription]:
    if not isinstance(raw, dict):
        raise CorruptObject(f"{what} is not valid", detail='"Files" must be an object', hint=_CORRUPT_HINT)
    return {name: FileDescription.from_json_obj(desc, f"{what} entry {name!r}") for name, desc in raw.items()}


def _read_tar_file_sets(raw: Any, what: str) -> dict[str, list[str]]:
    if not isinstance(raw, dict) or not all(
        members is None or (isinstance(members, list) and all(isinstance(m, str) for m in members))
        for members in raw.values()
    ):
        raise CorruptObject(
            f"{what} is not valid",
            detail='"TarFileSets" must map tar names to lists of member names',
            hint=_CORRUPT_HINT,
        )
    return {tar: list(members or []) for tar, members in raw.items()}


@dataclass
class FilesMetadata:
    """files_metadata.json: every file the backup covers and which tar holds which members."""

    files: dict[str, FileDescription] = field(default_factory=dict)  # keys are tar member names
    tar_file_sets: dict[str, list[str]] = field(default_factory=dict)  # tar object name -> members
    databases_by_names: dict[str, Any] | None = None  # kept as read; used by partial restore

    def lookup(self, member_name: str) -> FileDescription | None:
        """The entry for a tar member, with or without the leading "/".

        WAL-G local mode names members "/base/1/2", remote mode and WAL-RUS "base/1/2"; a delta
        chain may mix both, so both spellings must find the entry.
        """
        found = self.files.get(member_name)
        if found is None:
            other = member_name[1:] if member_name.startswith("/") else "/" + member_name
            found = self.files.get(other)
        return found

    def to_json(self) -> bytes:
        """Serialized as WAL-G's json/v2 default writer does; empty members are omitted."""
        doc: dict[str, Any] = {}
        if self.files:
            doc["Files"] = {name: desc.to_json_obj() for name, desc in self.files.items()}
        if self.tar_file_sets:
            doc["TarFileSets"] = self.tar_file_sets
        if self.databases_by_names:
            doc["DatabasesByNames"] = self.databases_by_names
        return _dumps_v2(doc)

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "files_metadata.json") -> FilesMetadata:
        fields = _Fields(_load(data, source), source)
        files, tar_sets = fields.raw("Files"), fields.raw("TarFileSets")
        databases = fields.raw("DatabasesByNames")
        if databases is not None and not isinstance(databases, dict):
            raise fields.bad("DatabasesByNames", "an object")
        return cls(
            files=_read_files(files, source) if files is not None else {},
            tar_file_sets=_read_tar_file_sets(tar_sets, source) if tar_sets is not None else {},
            databases_by_names=databases,
        )


# ---------------------------------------------------------------- sentinel


@dataclass(kw_only=True)
class Sentinel:
    """<name>_backup_stop_sentinel.json; its existence is what makes a backup exist."""

    start_lsn: int | None = None
    finish_lsn: int | None = None
    pg_version: int = 0
    system_identifier: int | None = None  # absent before PostgreSQL 9.6
    uncompressed_size: int = 0
    compressed_size: int = 0
    data_catalog_size: int = 0
    spec: TablespaceSpec | None = None
    user_data: Any = None  # None means absent
    files_metadata_disabled: bool = False
    delta_lsn: int | None = None  # the delta base's start LSN
    delta_from: str | None = None  # the delta base's backup name
    delta_full_name: str | None = None  # the full backup at the root of the chain
    delta_count: int | None = None  # 1 for the first delta after a full backup
    start_time: datetime | None = None  # None in V1 sentinels
    finish_time: datetime | None = None
    hostname: str = ""
    data_dir: str = ""
    is_permanent: bool = False  # as of push time; metadata.json is the source of truth
    version: int = 2  # a sentinel without "Version" reads as 1
    legacy_files: dict[str, FileDescription] | None = None  # inline "Files" of old WAL-G versions
    legacy_tar_file_sets: dict[str, list[str]] | None = None  # inline "TarFileSets"

    @property
    def is_delta(self) -> bool:
        return self.delta_from is not None

    def legacy_files_metadata(self) -> FilesMetadata | None:
        """The file list old WAL-G versions kept inside the sentinel, if this one has it."""
        if self.legacy_files is None:
            return None
        return FilesMetadata(files=self.legacy_files, tar_file_sets=self.legacy_tar_file_sets or {})

    def to_json(self) -> bytes:
        """The V2 sentinel, byte for byte as WAL-G writes it (legacy inline fields are never written)."""
        doc: dict[str, Any] = {"LSN": self.start_lsn}
        for key, value in (
            ("DeltaLSN", self.delta_lsn),
            ("DeltaFrom", self.delta_from),
            ("DeltaFullName", self.delta_full_name),
            ("DeltaCount", self.delta_count),
        ):
            if value is not None:
                doc[key] = value
        doc["PgVersion"] = self.pg_version
        doc["FinishLSN"] = self.finish_lsn
        if self.system_identifier is not None:
            doc["SystemIdentifier"] = self.system_identifier
        doc["UncompressedSize"] = self.uncompressed_size
        doc["CompressedSize"] = self.compressed_size
        if self.data_catalog_size:
            doc["DataCatalogSize"] = self.data_catalog_size
        if self.spec is not None:
            doc["Spec"] = self.spec.to_json_obj()
        if self.user_data is not None:
            doc["UserData"] = _as_go_interface(self.user_data)
        if self.files_metadata_disabled:
            doc["FilesMetadataDisabled"] = True
        doc["ChkpNum"] = None  # OrioleDB checkpoint number; always present, null for PostgreSQL
        doc["Version"] = self.version
        doc["StartTime"] = format_go_time(self.start_time or GO_ZERO_TIME)
        doc["FinishTime"] = format_go_time(self.finish_time or GO_ZERO_TIME)
        doc["DateFmt"] = DATE_FMT
        doc["Hostname"] = self.hostname
        doc["DataDir"] = self.data_dir
        doc["IsPermanent"] = self.is_permanent
        return _dumps_v1(doc)

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "backup sentinel") -> Sentinel:
        """Read any sentinel WAL-G, WAL-E or walrus wrote; CorruptObject if it is unusable."""
        fields = _Fields(_load(data, source), source)
        raw_spec = fields.raw("Spec")  # also matches WAL-E's lowercase "spec"
        try:
            spec = TablespaceSpec.from_json_obj(raw_spec) if raw_spec is not None else None
        except ValueError as exc:
            raise CorruptObject(f"{source} is not valid", detail=str(exc), hint=_CORRUPT_HINT) from exc
        legacy_files = fields.raw("Files")
        legacy_tar_sets = fields.raw("TarFileSets")
        sentinel = cls(
            start_lsn=fields.uint64("LSN"),
            finish_lsn=fields.uint64("FinishLSN"),
            pg_version=fields.integer("PgVersion") or 0,
            system_identifier=fields.uint64("SystemIdentifier"),
            uncompressed_size=fields.integer("UncompressedSize") or 0,
            compressed_size=fields.integer("CompressedSize") or 0,
            data_catalog_size=fields.integer("DataCatalogSize") or 0,
            spec=spec,
            user_data=fields.raw("UserData"),
            files_metadata_disabled=fields.flag("FilesMetadataDisabled"),
            # Old WAL-G versions wrote the base LSN as "DeltaFromLSN"; WAL-G lets it win.
            delta_lsn=_first_not_none(fields.uint64("DeltaFromLSN"), fields.uint64("DeltaLSN")),
            delta_from=fields.text("DeltaFrom"),
            delta_full_name=fields.text("DeltaFullName"),
            delta_count=fields.integer("DeltaCount"),
            start_time=fields.time("StartTime"),
            finish_time=fields.time("FinishTime"),
            hostname=fields.text("Hostname") or "",
            data_dir=fields.text("DataDir") or "",
            is_permanent=fields.flag("IsPermanent"),
            version=fields.integer("Version") or 1,
            legacy_files=_read_files(legacy_files, source) if legacy_files is not None else None,
            legacy_tar_file_sets=(
                _read_tar_file_sets(legacy_tar_sets, source) if legacy_tar_sets is not None else None
            ),
        )
        if sentinel.is_delta:
            missing = [
                key
                for key, value in (
                    ("DeltaLSN", sentinel.delta_lsn),
                    ("DeltaFullName", sentinel.delta_full_name),
                    ("DeltaCount", sentinel.delta_count),
                )
                if value is None
            ]
            if missing:
                raise CorruptObject(
                    f"{source} is inconsistent",
                    detail=f"it names a delta base (DeltaFrom) but lacks {', '.join(missing)}",
                    hint="WAL-G refuses such a backup too; restore from another backup.",
                )
        return sentinel


def _first_not_none(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


# ---------------------------------------------------------------- metadata.json


@dataclass(kw_only=True)
class ExtendedMetadata:
    """<name>/metadata.json: the small summary listings read; the source of truth for permanence."""

    start_time: datetime
    finish_time: datetime
    hostname: str = ""
    data_dir: str = ""
    pg_version: int = 0
    start_lsn: int = 0
    finish_lsn: int = 0
    is_permanent: bool = False
    system_identifier: int | None = None
    uncompressed_size: int = 0
    compressed_size: int = 0
    user_data: Any = None  # None means absent
    date_fmt: str = DATE_FMT

    @classmethod
    def from_sentinel(cls, sentinel: Sentinel) -> ExtendedMetadata:
        """The metadata.json WAL-G writes alongside a V2 sentinel (the two share these fields)."""
        start_time, finish_time = sentinel.start_time, sentinel.finish_time
        start_lsn, finish_lsn = sentinel.start_lsn, sentinel.finish_lsn
        if start_time is None or finish_time is None or start_lsn is None or finish_lsn is None:
            raise ValueError("metadata.json needs the sentinel's start/finish times and LSNs")
        return cls(
            start_time=start_time,
            finish_time=finish_time,
            start_lsn=start_lsn,
            finish_lsn=finish_lsn,
            hostname=sentinel.hostname,
            data_dir=sentinel.data_dir,
            pg_version=sentinel.pg_version,
            is_permanent=sentinel.is_permanent,
            system_identifier=sentinel.system_identifier,
            uncompressed_size=sentinel.uncompressed_size,
            compressed_size=sentinel.compressed_size,
            user_data=sentinel.user_data,
        )

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "start_time": format_go_time(self.start_time),
            "finish_time": format_go_time(self.finish_time),
            "date_fmt": self.date_fmt,
            "hostname": self.hostname,
            "data_dir": self.data_dir,
            "pg_version": self.pg_version,
            "start_lsn": self.start_lsn,
            "finish_lsn": self.finish_lsn,
            "is_permanent": self.is_permanent,
            "system_identifier": self.system_identifier,  # written as null, never omitted
            "uncompressed_size": self.uncompressed_size,
            "compressed_size": self.compressed_size,
        }
        if self.user_data is not None:
            doc["user_data"] = _as_go_interface(self.user_data)
        return _dumps_v1(doc)

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "metadata.json") -> ExtendedMetadata:
        fields = _Fields(_load(data, source), source)
        return cls(
            start_time=fields.time("start_time") or GO_ZERO_TIME,
            finish_time=fields.time("finish_time") or GO_ZERO_TIME,
            hostname=fields.text("hostname") or "",
            data_dir=fields.text("data_dir") or "",
            pg_version=fields.integer("pg_version") or 0,
            start_lsn=fields.uint64("start_lsn") or 0,
            finish_lsn=fields.uint64("finish_lsn") or 0,
            is_permanent=fields.flag("is_permanent"),
            system_identifier=fields.uint64("system_identifier"),
            uncompressed_size=fields.integer("uncompressed_size") or 0,
            compressed_size=fields.integer("compressed_size") or 0,
            user_data=fields.raw("user_data"),
            date_fmt=fields.text("date_fmt") or "",
        )
