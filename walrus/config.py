"""One declarative table of settings (WAL-G's names) resolved once into a frozen Settings object."""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from walrus.codec import WRITABLE_METHODS
from walrus.configfile import default_config_path
from walrus.errors import ConfigError
from walrus.walg_settings import ACCEPTED, EXPORTED, IGNORED, OTHER_SETTINGS, READ_OUTSIDE_TABLE, REFUSED, WALE_ALIASES

if TYPE_CHECKING:
    from walrus.crypto import Crypter

# Go's strconv.ParseBool, which WAL-G uses for every boolean setting.
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected a boolean (true/false, 1/0, t/f)")


def parse_int(text: str) -> int:
    return int(text.strip(), 10)


def parse_positive_int(text: str) -> int:
    value = parse_int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def parse_size(text: str) -> int:
    """Bytes, with an optional binary suffix (K, M, G, KiB, MiB, GiB, KB, MB, GB all mean powers of 1024)."""
    t = text.strip()
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    upper = t.upper().removesuffix("IB").removesuffix("B")
    digits = upper.rstrip("KMGT")
    unit = upper[len(digits):]
    if not digits.isdigit() or unit not in units:
        raise ValueError("expected a byte count such as 1073741823, 512M or 4GiB")
    return int(digits) * units[unit]


def parse_rate(text: str) -> int:
    """A rate limit in bytes per second (WAL-G's integer, or a byte count with a suffix); at least 1."""
    value = parse_size(text)
    if value < 1:
        raise ValueError("must be at least 1 byte per second")
    return value


def _size_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_size(text)
        if not low <= value <= high:
            raise ValueError(f"must be between {low >> 10} KiB and {high >> 20} MiB")
        return value

    return parse


def parse_wal_size(text: str) -> int:
    """WAL segment size in MiB: PostgreSQL allows powers of two from 1 to 1024."""
    value = parse_int(text)
    if not 1 <= value <= 1024 or value & (value - 1):
        raise ValueError("PostgreSQL's WAL segment sizes are powers of two from 1 to 1024 (MiB)")
    return value


def parse_duration(text: str) -> float:
    """Seconds from a Go-style duration (WAL-G's): 1h30m, 60s, 500ms, or a plain number of seconds."""
    import re

    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ValueError("expected a duration such as 60s, 5m, 1h30m or 500ms")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _non_negative_int(text: str) -> int:
    value = parse_int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _delta_origin(text: str) -> str:
    if text not in ("LATEST", "LATEST_FULL"):  # WAL-G compares exactly, and stops on anything else
        raise ValueError("must be LATEST or LATEST_FULL")
    return text


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"is not valid JSON ({e})") from None


def _slot_name(text: str) -> str:
    """A replication slot's name by PostgreSQL's rule (it is sent unquoted in replication commands)."""
    if not 1 <= len(text) <= 63 or text.strip("abcdefghijklmnopqrstuvwxyz0123456789_"):
        raise ValueError("a slot name is 1 to 63 lowercase letters, digits and underscores")
    return text


def _text(text: str) -> str:
    return text.rstrip("\r\n")


def _verbatim(text: str) -> str:
    """Keys and passphrases: used exactly as given, as WAL-G uses them."""
    return text


def _host_port(text: str) -> str:
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, such as 127.0.0.1:8125")
    return text.strip()


def _string_map(text: str) -> dict:
    """A JSON object of names to values (WAL-G reads a map setting's environment value as JSON)."""
    value = _json(text)
    if not isinstance(value, dict):
        raise ValueError('expected a JSON object, such as {"host": "db1"}')
    return {str(k): str(v) for k, v in value.items()}


@dataclass(frozen=True)
class Setting:
    name: str  # the WAL-G environment / config-file name
    attr: str  # attribute on Settings
    parse: Callable[[str], Any]
    default: Any
    doc: str
    aliases: tuple[str, ...] = ()
    secret: bool = False


S = Setting
# Defined here for the settings table and walrus.fileio alike (fileio sits above config).
IO_METHODS = ("auto", "io_uring", "preadv")  # "preadv": plain preadv reads and write(2) sinks
DEFAULT_READ_INFLIGHT = 8 << 20  # bytes of io_uring reads in flight: later reads queue behind them


SETTINGS: tuple[Setting, ...] = (
    # storage
    S("WALG_FILE_PREFIX", "file_prefix", _text, None,
      "Store backups under this local directory (also file://localhost/path).", ("WALE_FILE_PREFIX",)),
    S("WALG_S3_PREFIX", "s3_prefix", _text, None, "Store backups in S3: s3://bucket/path.", ("WALE_S3_PREFIX",)),
    S("WALG_STORAGE_PREFIX", "storage_prefix", _text, None, "An extra sub-folder under the storage root."),
    # S3 (unset credentials, region and profile fall back to botocore's chain: environment,
    # ~/.aws, web identity, container and instance roles)
    S("AWS_ENDPOINT", "aws_endpoint", _text, None, "S3-compatible endpoint URL, e.g. http://minio:9000."),
    S("AWS_REGION", "aws_region", _text, None,
      "S3 region [default: the profile's region, else us-east-1, following the bucket's redirect on AWS]."),
    S("AWS_S3_FORCE_PATH_STYLE", "aws_s3_force_path_style", parse_bool, False,
      "Path-style S3 URLs (endpoint/bucket/key), which most S3-compatible servers need."),
    S("AWS_ACCESS_KEY_ID", "aws_access_key_id", _text, None, "S3 access key id (with the secret key).",
      ("AWS_ACCESS_KEY",), secret=True),
    S("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", _text, None, "S3 secret access key.",
      ("AWS_SECRET_KEY",), secret=True),
    S("AWS_SESSION_TOKEN", "aws_session_token", _text, None, "S3 session token of temporary keys.", secret=True),
    S("AWS_PROFILE", "aws_profile", _text, None, "Profile of ~/.aws/config and ~/.aws/credentials to use."),
    S("WALG_S3_STORAGE_CLASS", "s3_storage_class", _text, "STANDARD", "Storage class of uploaded objects.",
      ("S3_STORAGE_CLASS",)),
    S("WALG_S3_SSE", "s3_sse", _text, None, "Server-side encryption: AES256 or aws:kms.", ("S3_SSE",)),
    S("WALG_S3_SSE_KMS_ID", "s3_sse_kms_id", _text, None, "KMS key id; set exactly when WALG_S3_SSE is aws:kms.",
      ("S3_SSE_KMS_ID",)),
    S("WALG_S3_CA_CERT_FILE", "s3_ca_cert_file", _text, None, "CA bundle that verifies the S3 endpoint's certificate.",
      ("S3_CA_CERT_FILE",)),
    S("WALG_S3_MAX_PART_SIZE", "s3_max_part_size", parse_size, 20 << 20,
      "Multipart part size; an upload holds WALG_UPLOAD_CONCURRENCY + 1 parts in memory.", ("S3_MAX_PART_SIZE",)),
    S("WALG_S3_MAX_RETRIES", "s3_max_retries", parse_int, 15,
      "Retries of an S3 request that failed transiently (5xx, throttling, timeout, reset).", ("S3_MAX_RETRIES",)),
    S("WALRUS_S3_TIMEOUT", "s3_timeout", parse_positive_int, 60,
      "Seconds an S3 request may make no progress before it is abandoned (and retried)."),
    S("WALRUS_S3_CONNECT_TIMEOUT", "s3_connect_timeout", parse_positive_int, 10,
      "Seconds to wait for a connection to the S3 endpoint."),
    S("WALRUS_S3_CONDITIONAL_PUT", "s3_conditional_put", parse_bool, True,
      "Store WAL with If-None-Match: * so that no writer can replace an archived segment; set false for "
      "S3-compatible servers that ignore the header (each push is then checked before and verified after)."),
    S("WALRUS_S3_RANGE_SIZE", "s3_range_size", parse_size, 8 << 20,
      "Bytes per ranged GET; WALG_DOWNLOAD_CONCURRENCY ranges are buffered ahead at most."),
    # Google Cloud Storage (no GOOGLE_APPLICATION_CREDENTIALS: the metadata server's account, as WAL-G)
    S("WALG_GS_PREFIX", "gs_prefix", _text, None, "Store backups in Google Cloud Storage: gs://bucket/path.",
      ("WALE_GS_PREFIX",)),
    S("GOOGLE_APPLICATION_CREDENTIALS", "google_application_credentials", _text, None,
      "A service account's JSON key file (or gcloud's application-default credentials file)."),
    S("GCS_CONTEXT_TIMEOUT", "gcs_context_timeout", parse_positive_int, 3600,
      "Seconds one GCS call (a whole upload, download or listing) may take at most.", ("WALG_GCS_CONTEXT_TIMEOUT",)),
    S("GCS_NORMALIZE_PREFIX", "gcs_normalize_prefix", parse_bool, True,
      "Trim repeated slashes in WALG_GS_PREFIX; false keeps them (WAL-E's prefixes).", ("WALG_GCS_NORMALIZE_PREFIX",)),
    S("GCS_ENCRYPTION_KEY", "gcs_encryption_key", _text, None,
      "Customer-supplied AES-256 key (32 bytes, standard base64) for every object written and read.",
      ("WALG_GCS_ENCRYPTION_KEY",), secret=True),
    S("GCS_MAX_CHUNK_SIZE", "gcs_max_chunk_size", parse_size, 50 << 20,
      "Largest chunk of a resumable upload (a multiple of 256 KiB is used); chunks come out of "
      "WALRUS_MEMORY_BUDGET, which may make them smaller.", ("WALG_GCS_MAX_CHUNK_SIZE",)),
    S("GCS_MAX_RETRIES", "gcs_max_retries", parse_int, 16,
      "Retries of a GCS request that failed transiently (5xx, 429, timeout, reset).", ("WALG_GCS_MAX_RETRIES",)),
    S("STORAGE_EMULATOR_HOST", "storage_emulator_host", _text, None,
      "A GCS emulator's address (http://host:port), as Google's client libraries read it: no credentials are used."),
    # Azure Blob Storage (no key nor SAS token: the default credential chain, as WAL-G)
    S("WALG_AZ_PREFIX", "az_prefix", _text, None, "Store backups in Azure Blob Storage: azure://container/path.",
      ("WALE_AZ_PREFIX",)),
    S("AZURE_STORAGE_ACCOUNT", "azure_storage_account", _text, None, "The storage account (required with Azure)."),
    S("AZURE_STORAGE_ACCESS_KEY", "azure_storage_access_key", _text, None, "The storage account's access key.",
      secret=True),
    S("AZURE_STORAGE_SAS_TOKEN", "azure_storage_sas_token", _text, None,
      "A shared access signature token (used when no access key is set).", secret=True),
    S("AZURE_ENVIRONMENT_NAME", "azure_environment_name", _text, "AzurePublicCloud",
      "AzurePublicCloud, AzureUSGovernmentCloud, AzureChinaCloud or AzureGermanCloud: chooses the endpoint suffix."),
    S("AZURE_ENDPOINT_SUFFIX", "azure_endpoint_suffix", _text, None,
      "Blob endpoint suffix (e.g. core.windows.net) [default: the environment's]."),
    S("WALRUS_AZURE_ENDPOINT", "azure_endpoint", _text, None,
      "The account's whole blob endpoint URL (Azurite: http://127.0.0.1:10000/devstoreaccount1) [default: "
      "https://ACCOUNT.blob.SUFFIX]."),
    S("WALG_AZURE_BUFFER_SIZE", "azure_buffer_size", parse_size, 8 << 20,
      "Size of one staged block of an upload; blocks come out of WALRUS_MEMORY_BUDGET, which may make them "
      "smaller.", ("AZURE_BUFFER_SIZE",)),
    S("WALG_AZURE_MAX_BUFFERS", "azure_max_buffers", parse_positive_int, 4,
      "Blocks of one upload in flight at once (within WALRUS_MEMORY_BUDGET).", ("AZURE_MAX_BUFFERS",)),
    S("AZURE_TRY_TIMEOUT", "azure_try_timeout", parse_positive_int, 5,
      "Minutes one Azure request may take before it is abandoned and retried."),
    S("AZURE_BLOB_STORE_API_VERSION", "azure_blob_store_api_version", _text, None,
      "The Blob service API version to speak [default: the client library's]."),
    # data path
    S("WALG_COMPRESSION_METHOD", "compression_method", _choice(*WRITABLE_METHODS), "lz4",
      "Compression of WAL and backup parts: lz4, zstd, brotli, lzma or none."),
    S("WALG_ZSTD_LEVEL", "zstd_level", _choice("fastest", "default", "better", "best"), None,
      "zstd effort: fastest, default, better or best."),
    S("WALG_TAR_SIZE_THRESHOLD", "tar_size_threshold", parse_size, (1 << 30) - 1,
      "File bytes per tar part before a new part starts."),
    S("WALG_UPLOAD_CONCURRENCY", "upload_concurrency", parse_positive_int, 16,
      "Parallel uploads; above 1, wal-push also archives further .ready segments in the background."),
    S("WALG_INTEGRITY_MAX_DELAYED_WALS", "integrity_max_delayed_wals", _non_negative_int, 0,
      "wal-verify integrity: the newest segments missing from the archive that count as MISSING_DELAYED "
      "(a warning), before WALG_UPLOAD_CONCURRENCY more count as MISSING_UPLOADING (a warning) and the "
      "rest as MISSING_LOST (a failure)."),
    S("WALG_DOWNLOAD_CONCURRENCY", "download_concurrency", parse_positive_int, 10,
      "Parallel downloads: tar parts extracted at once by backup-fetch."),
    S("WALG_UPLOAD_DISK_CONCURRENCY", "upload_disk_concurrency", parse_positive_int, 1,
      "Tar parts filled from disk at once by backup-push."),
    S("WALG_TAR_DISABLE_FSYNC", "tar_disable_fsync", parse_bool, False,
      "Do not fsync restored files (faster, unsafe on power loss)."),
    S("WALG_VERIFY_PAGE_CHECKSUMS", "verify_page_checksums", parse_bool, False,
      "backup-push checks each page it reads as PostgreSQL does (header, and checksum where the cluster has "
      "data checksums); corrupt blocks are logged and recorded in files_metadata.json, and the backup completes."),
    S("WALG_STORE_ALL_CORRUPT_BLOCKS", "store_all_corrupt_blocks", parse_bool, False,
      "With WALG_VERIFY_PAGE_CHECKSUMS: record every corrupt block of a file in files_metadata.json, not the first 10."),
    S("WALG_STOP_BACKUP_TIMEOUT", "stop_backup_timeout", parse_duration, 600.0,
      "Longest backup-push waits, after pg_backup_stop, for the WAL its backup needs to be archived (a "
      "duration: 10m, 1h); 0 waits without limit. WAL-G's own default is no limit."),
    S("WALG_DELTA_MAX_STEPS", "delta_max_steps", _non_negative_int, 0,
      "Delta backups in a row before backup-push takes a full one again; 0 takes full backups only."),
    S("WALG_DELTA_ORIGIN", "delta_origin", _delta_origin, "LATEST",
      "What a delta builds on: LATEST (the newest backup, chaining deltas) or LATEST_FULL (its chain's full backup)."),
    S("WALG_DELTA_FROM_NAME", "delta_from_name", _text, None,
      "Build the delta on this backup instead (--delta-from-name wins)."),
    S("WALG_DELTA_FROM_USER_DATA", "delta_from_user_data", _json, None,
      "Build the delta on the backup with this JSON user data instead (--delta-from-user-data wins)."),
    S("WALRUS_BLOCK_MAP", "block_map", parse_bool, True,
      "Where WALG_DELTA_MAX_STEPS is above 0: wal-push records which relation blocks each WAL segment "
      "touches (a sidecar in blockmap_005/), and a delta reads only those blocks where the maps cover "
      "its range (else it scans pages); false: no maps, deltas scan."),
    S("WALG_SENTINEL_USER_DATA", "sentinel_user_data", _text, None,
      "JSON stored as the UserData of every backup-push's sentinel (--add-user-data wins)."),
    S("WALG_FETCH_TARGET_USER_DATA", "fetch_target_user_data", _text, None,
      "backup-fetch restores the backup whose user data is this JSON (--target-user-data wins)."),
    S("WALG_DISABLE_PARTIAL_RESTORE", "disable_partial_restore", parse_bool, False,
      "backup-push does not record database and table names (files_metadata.json's DatabasesByNames), "
      "so the backup cannot be restored with --restore-only; it then opens no connection to each database."),
    S("WALG_PREVENT_WAL_OVERWRITE", "prevent_wal_overwrite", parse_bool, False,
      "Compare with the archived copy before pushing WAL (walrus never overwrites with different bytes)."),
    S("WALG_PG_WAL_SIZE", "pg_wal_size", parse_wal_size, 16, "WAL segment size in MiB (the server's wal_segment_size)."),
    S("WALRUS_BUFFER_SIZE", "buffer_size", _size_between(64 << 10, 64 << 20), 2 << 20,
      "Size of one data-path buffer (64 KiB to 64 MiB, rounded down to whole 4 KiB pages): the unit of "
      "each disk read, compression job and restore write; every buffer costs the same hand-offs "
      "between threads, so larger ones cost less CPU per GiB."),
    S("WALRUS_MEMORY_BUDGET", "memory_budget", parse_size, 32 << 20,
      "Bytes of data-path buffers (reads, compression, uploads) a command may hold at once; at least six "
      "WAL blocks (6 x the larger of 4 MiB and WALRUS_BUFFER_SIZE: 24 MiB by default)."),
    S("WALRUS_IO_METHOD", "io_method", _choice(*IO_METHODS), "auto",
      "File I/O of the data path: io_uring, preadv/pwrite, or auto (io_uring where the kernel allows it)."),
    S("WALRUS_READ_INFLIGHT", "read_inflight", parse_size, DEFAULT_READ_INFLIGHT,
      "Bytes of file reads io_uring keeps in flight at once (the queue the disk sees); later reads "
      "wait their turn, so parts read side by side share the disk evenly."),
    S("WALRUS_DIRECT_IO", "direct_io", parse_bool, True,
      "Read and write large files (relation segments, WAL) with O_DIRECT, bypassing the page cache.",
      ("WALG_DIRECT_IO",)),
    S("WALRUS_DIRECT_IO_MIN", "direct_io_min", parse_size, 1 << 20,
      "Files at least this large use O_DIRECT when WALRUS_DIRECT_IO is on."),
    S("WALG_PREFETCH_DIR", "prefetch_dir", _text, None,
      "Directory under which wal-fetch keeps .wal-g/prefetch (default: beside DEST, i.e. pg_wal)."),
    S("TOTAL_BG_UPLOADED_LIMIT", "total_bg_uploaded_limit", parse_int, 32,
      "wal-push: how many further .ready segments one call may upload in the background (with "
      "WALG_UPLOAD_CONCURRENCY > 1); below 2 turns background uploads off."),
    S("WALG_NETWORK_RATE_LIMIT", "network_rate_limit", parse_rate, None,
      "Bytes per second sent to and received from storage, all transfers of a command together (--turbo: no limit)."),
    S("WALG_DISK_RATE_LIMIT", "disk_rate_limit", parse_rate, None,
      "Bytes per second backup-push reads from the data directory; without one, the server's read rate "
      "(BASE_BACKUP's MAX_RATE, 32 kB/s to 1 GiB/s) (--turbo: no limit)."),
    S("WALG_DAEMON_WAL_UPLOAD_TIMEOUT", "daemon_wal_upload_timeout", parse_duration, 60.0,
      "Longest a daemon wal-push may take before it answers an error (PostgreSQL then retries)."),
    S("PG_READY_RENAME", "pg_ready_rename", parse_bool, False,
      "Segments stored ahead of the archiver (wal-push's background uploads, the daemon's look-ahead) are "
      "marked archived (archive_status .ready renamed to .done), so PostgreSQL does not call "
      "archive_command for them; pg_stat_archiver then counts only the calls."),
    S("WALG_SLOTNAME", "slot_name", _slot_name, "walg",
      "The physical replication slot wal-receive streams from (created if missing): 1 to 63 lowercase "
      "letters, digits and underscores."),
    # encryption (WAL-G's precedence: PGP, then libsodium; keys are never logged or put in argv)
    S("WALG_PGP_KEY", "pgp_key", _verbatim, None,
      "Armored OpenPGP key ring (literal \\n allowed): public to push, secret to fetch too.", secret=True),
    S("WALG_PGP_KEY_PATH", "pgp_key_path", _text, None, "File holding the armored OpenPGP key ring."),
    S("WALG_PGP_KEY_PASSPHRASE", "pgp_key_passphrase", _verbatim, None,
      "Passphrase of the OpenPGP secret key.", secret=True),
    S("WALG_LIBSODIUM_KEY", "libsodium_key", _verbatim, None,
      "libsodium secretstream key (see WALG_LIBSODIUM_KEY_TRANSFORM).", secret=True),
    S("WALG_LIBSODIUM_KEY_PATH", "libsodium_key_path", _text, None, "File holding the libsodium key (trimmed)."),
    S("WALG_LIBSODIUM_KEY_TRANSFORM", "libsodium_key_transform", _choice("none", "hex", "base64"), "none",
      "How the libsodium key is read: none (at least 25 bytes, padded or cut to 32), hex or base64 (32 bytes)."),
    S("WALG_GPG_KEY_ID", "gpg_key_id", _text, None, "Not supported (WAL-G's external gpg); set, it is an error.",
      ("WALE_GPG_KEY_ID", "GPG_KEY_ID")),
    S("WALG_ENVELOPE_PGP_KEY", "envelope_pgp_key", _verbatim, None, "Not supported; set, it is an error.",
      ("WALG_ENVELOPE_PGP_KEY_PATH",), secret=True),
    S("WALG_CSE_KMS_ID", "cse_kms_id", _text, None, "Not supported; set, it is an error."),
    S("YC_CSE_KMS_KEY_ID", "yc_cse_kms_key_id", _text, None, "Not supported; set, it is an error."),
    # logging
    S("WALG_LOG_LEVEL", "log_level", _choice("normal", "devel", "error"), "normal",
      "NORMAL, DEVEL (debug) or ERROR."),
    S("WALG_LOG_DESTINATION", "log_destination", _text, None,
      "A file the log is appended to instead of standard error (stderr: standard error)."),
    # metrics (docs/METRICS.md), after every command; not sending or writing them never fails the command
    S("WALG_STATSD_ADDRESS", "statsd_address", _host_port, None,
      "Send WAL-G's metrics (walg_*) over UDP to this statsd or statsd_exporter, as HOST:PORT."),
    S("WALG_STATSD_EXTRA_TAGS", "statsd_extra_tags", _string_map, None,
      'Tags added to every statsd metric: a JSON object, such as {"host": "db1"}.'),
    S("WALRUS_METRICS_FILE", "metrics_file", _text, None,
      "A Prometheus textfile (node_exporter's textfile collector: DIR/NAME.prom) updated atomically after "
      "every command: last success and failure times, durations, runs, bytes, WAL segments pushed."),
    # PostgreSQL connection (libpq names)
    S("PGHOST", "pg_host", _text, None, "PostgreSQL host or socket directory."),
    S("PGPORT", "pg_port", parse_positive_int, None, "PostgreSQL port."),
    S("PGUSER", "pg_user", _text, None, "PostgreSQL user."),
    S("PGDATABASE", "pg_database", _text, None, "PostgreSQL database."),
    S("PGPASSWORD", "pg_password", _text, None, "PostgreSQL password.", secret=True),
    S("PGDATA", "pgdata", _text, None, "Data directory (backup-push's default, the daemon's cluster)."),
)
del S

_BY_NAME = {s.name: s for s in SETTINGS}
_BY_ALIAS = {alias: s for s in SETTINGS for alias in s.aliases}


def _spellings(s: Setting) -> tuple[str, ...]:
    """The names a table setting is read under: its own, its aliases, and WAL-E's where WAL-G reads them."""
    names = (s.name, *s.aliases)
    return names + tuple(old for name in names for old in WALE_ALIASES.get(name, ()))


def _wale_spelling(name: str) -> str:
    """WAL-G's GetWaleCompatibleSetting: WALG_X is also read as WALE_X, other names with WALE_ in front."""
    return "WALE_" + name.removeprefix("WALG_")


_OTHER = {o.name: o for o in OTHER_SETTINGS}
_OTHER_BY_SPELLING = {**{_wale_spelling(o.name): o for o in OTHER_SETTINGS}, **_OTHER}
KNOWN_NAMES = frozenset(n for s in SETTINGS for n in _spellings(s)) | frozenset(_OTHER_BY_SPELLING) | READ_OUTSIDE_TABLE


def flag_name(setting: str) -> str:
    """WAL-G's hidden per-setting flag: the setting's name in lower case, `_` as `-` (--walg-file-prefix)."""
    return "--" + setting.lower().replace("_", "-")


def setting_flags() -> dict[str, str]:
    """Every per-setting flag walrus accepts (WAL-G's, and walrus's own WALRUS_ settings) -> setting name."""
    names = [s.name for s in SETTINGS] + [a for s in SETTINGS for a in s.aliases] + [o.name for o in OTHER_SETTINGS]
    return {flag_name(name): name for name in names}


# init, repr and eq are written out below rather than generated: for a hundred fields the generated
# methods' source is compiled at every start of every command, which cost each archive_command call
# about 10 ms. They keep the generated ones' behaviour (repr=False and compare=False fields included).
@dataclass(frozen=True, init=False, repr=False, eq=False)
class Settings:
    """Resolved settings: one typed attribute per table entry, where each value came from, the
    config file read, and the crypter the key settings chose (checked at start-up)."""

    # BEGIN generated from SETTINGS by `python -m walrus.config` (tests/unit/test_config.py checks it)
    file_prefix: str | None
    s3_prefix: str | None
    storage_prefix: str | None
    aws_endpoint: str | None
    aws_region: str | None
    aws_s3_force_path_style: bool
    aws_access_key_id: str | None = dataclasses.field(repr=False)
    aws_secret_access_key: str | None = dataclasses.field(repr=False)
    aws_session_token: str | None = dataclasses.field(repr=False)
    aws_profile: str | None
    s3_storage_class: str
    s3_sse: str | None
    s3_sse_kms_id: str | None
    s3_ca_cert_file: str | None
    s3_max_part_size: int
    s3_max_retries: int
    s3_timeout: int
    s3_connect_timeout: int
    s3_conditional_put: bool
    s3_range_size: int
    gs_prefix: str | None
    google_application_credentials: str | None
    gcs_context_timeout: int
    gcs_normalize_prefix: bool
    gcs_encryption_key: str | None = dataclasses.field(repr=False)
    gcs_max_chunk_size: int
    gcs_max_retries: int
    storage_emulator_host: str | None
    az_prefix: str | None
    azure_storage_account: str | None
    azure_storage_access_key: str | None = dataclasses.field(repr=False)
    azure_storage_sas_token: str | None = dataclasses.field(repr=False)
    azure_environment_name: str
    azure_endpoint_suffix: str | None
    azure_endpoint: str | None
    azure_buffer_size: int
    azure_max_buffers: int
    azure_try_timeout: int
    azure_blob_store_api_version: str | None
    compression_method: str
    zstd_level: str | None
    tar_size_threshold: int
    upload_concurrency: int
    integrity_max_delayed_wals: int
    download_concurrency: int
    upload_disk_concurrency: int
    tar_disable_fsync: bool
    verify_page_checksums: bool
    store_all_corrupt_blocks: bool
    stop_backup_timeout: float
    delta_max_steps: int
    delta_origin: str
    delta_from_name: str | None
    delta_from_user_data: Any | None
    block_map: bool
    sentinel_user_data: str | None
    fetch_target_user_data: str | None
    disable_partial_restore: bool
    prevent_wal_overwrite: bool
    pg_wal_size: int
    buffer_size: int
    memory_budget: int
    io_method: str
    read_inflight: int
    direct_io: bool
    direct_io_min: int
    prefetch_dir: str | None
    total_bg_uploaded_limit: int
    network_rate_limit: int | None
    disk_rate_limit: int | None
    daemon_wal_upload_timeout: float
    pg_ready_rename: bool
    slot_name: str
    pgp_key: str | None = dataclasses.field(repr=False)
    pgp_key_path: str | None
    pgp_key_passphrase: str | None = dataclasses.field(repr=False)
    libsodium_key: str | None = dataclasses.field(repr=False)
    libsodium_key_path: str | None
    libsodium_key_transform: str
    gpg_key_id: str | None
    envelope_pgp_key: str | None = dataclasses.field(repr=False)
    cse_kms_id: str | None
    yc_cse_kms_key_id: str | None
    log_level: str
    log_destination: str | None
    statsd_address: str | None
    statsd_extra_tags: dict | None
    metrics_file: str | None
    pg_host: str | None
    pg_port: int | None
    pg_user: str | None
    pg_database: str | None
    pg_password: str | None = dataclasses.field(repr=False)
    pgdata: str | None
    # END generated
    sources: Mapping[str, str] = dataclasses.field(repr=False, compare=False)
    config_path: str | None = None
    exports: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    crypter: Crypter | None = dataclasses.field(default=None, repr=False, compare=False)

    def __init__(self, **values: Any) -> None:
        for f in dataclasses.fields(self):
            if f.name in values:
                value = values.pop(f.name)
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise TypeError(f"Settings() missing the setting {f.name!r}")
            object.__setattr__(self, f.name, value)
        if values:
            raise TypeError(f"Settings() got unknown settings: {', '.join(sorted(values))}")

    def __repr__(self) -> str:  # never the secrets (repr=False)
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr)
        return f"Settings({shown})"

    def _compared(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.compare)

    def __eq__(self, other: object) -> bool:
        return self._compared() == other._compared() if isinstance(other, Settings) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._compared())

    @property
    def segment_size(self) -> int:
        return self.pg_wal_size << 20


def settings_fields() -> str:
    """The Settings attributes the table defines, as source: `attr: type` with the parser's return
    type (Optional where the default is None); secrets are left out of repr."""
    lines = []
    for s in SETTINGS:
        kind = typing.get_type_hints(s.parse)["return"].__name__
        kind += " | None" if s.default is None else ""
        lines.append(f"    {s.attr}: {kind}" + (" = dataclasses.field(repr=False)" if s.secret else ""))
    return "\n".join(lines) + "\n"


def _write_settings_fields() -> None:
    """Regenerate the block above in this file (run after changing the table)."""
    with open(__file__, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    with open(__file__, "w", encoding="utf-8") as f:
        f.write(head + _BEGIN + "\n" + settings_fields() + _END + tail)


_BEGIN = "    # BEGIN generated from SETTINGS by `python -m walrus.config` (tests/unit/test_config.py checks it)"
_END = "    # END generated"


# WAL is read and compressed in blocks of the larger of this and WALRUS_BUFFER_SIZE (lz4's largest
# frame block), and a lone push holds at most six at once: two compression jobs on each of two
# cores and two reads ahead (walrus.wal.push; a test ties the two together).
WAL_BLOCK_MIN = 4 << 20
WAL_BLOCKS_PER_PUSH = 6


def minimum_memory_budget(buffer_size: int) -> int:
    """The least WALRUS_MEMORY_BUDGET the data path can keep to: one WAL push's blocks."""
    return WAL_BLOCKS_PER_PUSH * max(WAL_BLOCK_MIN, buffer_size - buffer_size % 4096)


def read_config_file(path: str) -> dict[str, str]:
    """A flat map of SETTING: value in any of viper's formats, chosen by the extension (JSON, TOML,
    YAML, Java properties, dotenv, INI; YAML for any other name). Names are case-insensitive, as in
    viper; values are stringified as viper does."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}", detail=e.strerror,
                          hint="check --config / WALG_CONFIG_PATH") from None
    kind = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else "yaml"
    if kind in ("hcl", "tfvars"):
        raise ConfigError(f"config file {path}: walrus does not read HCL",
                          hint="write the settings as JSON, YAML, TOML or KEY=value lines (.env)")
    try:
        data = _parse_config(text, kind)
    except Exception as e:  # each parser's own error: JSON, TOML, YAML, INI
        raise ConfigError(f"config file {path} is malformed", detail=str(e),
                          hint=f"it must be a flat {kind.upper()} map of SETTING: value") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} is not a map of settings",
                          hint='write it as {"WALG_FILE_PREFIX": "/backups", ...}')
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and str(key).upper() == "WALG_STATSD_EXTRA_TAGS":
            value = json.dumps(value)  # a map in the file, as WAL-G takes it; JSON in the environment
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config file {path}: {key} must be a scalar value")
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[str(key).upper()] = "" if value is None else str(value)
    return out


def _parse_config(text: str, kind: str) -> Any:
    if not text.strip():
        return {}
    if kind == "json":
        return json.loads(text)
    if kind == "toml":
        import tomllib

        return tomllib.loads(text)
    if kind in ("env", "dotenv", "properties", "props", "prop"):
        return _key_value_lines(text, dotenv=kind in ("env", "dotenv"))
    if kind == "ini":
        import configparser

        parser = configparser.ConfigParser(interpolation=None, default_section="default")
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string("[default]\n" + text)
        return {**parser.defaults(), **{f"{s}.{k}": v for s in parser.sections() for k, v in parser[s].items()
                                        if k not in parser.defaults()}}
    import yaml

    return yaml.safe_load(text)


def _key_value_lines(text: str, dotenv: bool) -> dict[str, str]:
    """dotenv (`[export ]KEY=value`, quotes stripped, ` #` comments) and Java properties (`key=value`,
    `key: value` or `key value`; # and ! comments), one setting a line, as viper's readers take them."""
    import shlex

    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or (not dotenv and line.startswith("!")):
            continue
        if dotenv and line.startswith("export "):
            line = line[len("export "):].lstrip()
        cut = min((i for i in (line.find("="), line.find(":")) if i > 0), default=-1)
        if cut < 0 and not dotenv:
            cut = line.find(" ")
        if cut < 0:
            raise ValueError(f"not a KEY=value line: {raw!r}")
        key, value = line[:cut].strip(), line[cut + 1:].strip()
        if dotenv and value[:1] in ("'", '"'):
            value = shlex.split(value, comments=True)[0] if value else ""
        elif dotenv and " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key] = value
    return out


def load_settings(env: Mapping[str, str] | None = None, config_path: str | None = None,
                  warn: Callable[[str], None] | None = None, flags: Mapping[str, str] | None = None,
                  turbo: bool = False) -> Settings:
    """Resolve the table once: command-line flags (--walg-upload-concurrency 4: WAL-G's hidden
    per-setting flags, by setting name here) over environment over config file over default.
    turbo (WAL-G's --turbo) lifts the rate limits."""
    env = os.environ if env is None else env
    flags = flags or {}
    path = config_path or default_config_path(env)
    file_values = read_config_file(path) if path else {}
    if warn is not None:
        for key in file_values:
            if key not in KNOWN_NAMES:
                warn(f"config file {path}: unknown setting {key} ignored{_did_you_mean(key)}")
        for key in env:
            if key.startswith(("WALG_", "WALE_", "WALRUS_")) and key not in KNOWN_NAMES:
                warn(f"environment: unknown setting {key} ignored{_did_you_mean(key)}")
    origins = (("command line", flags), ("environment", env), (f"config file {path}", file_values))
    exports = _other_settings(origins, warn)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        raw, source = None, "default"
        for origin, mapping in origins:
            for key in _spellings(s):
                if mapping.get(key) not in (None, ""):
                    raw, source = mapping[key], f"{origin} ({key})"
                    break
            if raw is not None:
                break
        if raw is None:
            values[s.attr] = s.default
        else:
            try:
                values[s.attr] = s.parse(raw)
            except ValueError as e:
                shown = "(hidden)" if s.secret else repr(raw)
                raise ConfigError(f"invalid value {shown} for {s.name}", detail=f"{e}; set in {source}",
                                  hint=f"{s.name}: {s.doc}") from None
        sources[s.attr] = source
    if turbo:  # WAL-G's --turbo: "ignore all kinds of throttling defined in config"
        for attr in ("network_rate_limit", "disk_rate_limit"):
            if values[attr] is not None:
                values[attr], sources[attr] = None, "--turbo"
    floor = minimum_memory_budget(values["buffer_size"])
    if values["memory_budget"] < floor:
        raise ConfigError(f"WALRUS_MEMORY_BUDGET is {values['memory_budget']} bytes, below the {floor >> 20} MiB "
                          "the data path needs at least",
                          detail=f"a WAL push holds up to {WAL_BLOCKS_PER_PUSH} blocks of "
                                 f"{floor // WAL_BLOCKS_PER_PUSH >> 20} MiB; set in {sources['memory_budget']}",
                          hint=f"set WALRUS_MEMORY_BUDGET to {floor >> 20}MiB or more (the default is 32MiB)")
    if values["zstd_level"] is not None and values["compression_method"] != "zstd":
        raise ConfigError("WALG_ZSTD_LEVEL is set but the compression method is not zstd",
                          detail=f"WALG_COMPRESSION_METHOD is {values['compression_method']}",
                          hint="unset WALG_ZSTD_LEVEL or set WALG_COMPRESSION_METHOD=zstd")
    # a configured key is checked here, before any work: unusable is an error, never plaintext
    from walrus.crypto import crypter_from_settings

    return Settings(**values, sources=sources, config_path=path, exports=exports,
                    crypter=crypter_from_settings(values, sources, warn))


def _did_you_mean(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(KNOWN_NAMES), n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def _other_settings(origins: tuple[tuple[str, Mapping[str, str]], ...],
                    warn: Callable[[str], None] | None) -> dict[str, str]:
    """WAL-G settings outside the table: refused ones fail here, before any work; ignored ones are
    named in a warning; exported ones set outside the environment are returned, to be put in it
    for the library that reads them (WAL-G exports its whole configuration the same way)."""
    exports = {}
    for other in OTHER_SETTINGS:
        found = next(((origin, key, mapping[key]) for origin, mapping in origins
                      for key in (other.name, _wale_spelling(other.name)) if mapping.get(key) not in (None, "")), None)
        if found is None or other.disposition == ACCEPTED or not other.applies(found[2]):
            continue
        origin, key, value = found
        if other.disposition == REFUSED:
            raise ConfigError(f"{key} is set, and walrus does not support it", detail=f"{other.reason}; set in {origin}",
                              hint=f"unset {key}; docs/WALG_COMPAT.md lists the WAL-G settings walrus does not act on")
        if other.disposition == IGNORED and warn is not None:
            warn(f"{key} is set ({origin}) but has no effect in walrus: {other.reason}")
        if other.disposition == EXPORTED and origin != "environment":
            exports[other.name] = value
    return exports


def settings_help() -> str:
    """The settings table as text, for --help and docs."""
    lines = []
    for s in SETTINGS:
        default = "" if s.default is None else f" [default: {s.default}]"
        lines.append(f"  {s.name:<28} {s.doc}{default}")
    return "\n".join(lines)


if __name__ == "__main__":
    _write_settings_fields()
