"""WAL-G's settings that walrus's table does not act on, each with what walrus does when one is set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# What walrus does with a WAL-G setting it has no table entry for:
ACCEPTED = "accepted"  # no effect, silently: walrus already behaves so, or it matters only to something walrus lacks
IGNORED = "ignored"  # no effect, with a warning naming the setting: WAL-G would have acted on it
REFUSED = "refused"  # an error before any work: going on without it would lose or expose data
EXPORTED = "exported"  # passed to the library that reads it (botocore, libpq) through the environment


def _is_true(value: str) -> bool:
    return value.strip() in {"1", "t", "T", "TRUE", "true", "True"}


def _not(default: str) -> Callable[[str], bool]:
    return lambda value: value.strip().upper() != default.upper()


def _always(value: str) -> bool:
    return True


@dataclass(frozen=True)
class WalgSetting:
    name: str
    disposition: str
    reason: str  # why, for WALG_COMPAT.md and the warning or error
    applies: Callable[[str], bool] = _always  # the values the disposition is for (others: accepted)


W = WalgSetting
_NO_STORE = "walrus has no {} storage"

OTHER_SETTINGS: tuple[WalgSetting, ...] = (
    # storages walrus does not have: the prefix is refused, the backend's own settings mean nothing without it
    W("WALG_SWIFT_PREFIX", REFUSED, _NO_STORE.format("OpenStack Swift")),
    W("WALG_SSH_PREFIX", REFUSED, _NO_STORE.format("SSH")),
    W("WALG_OSS_PREFIX", REFUSED, _NO_STORE.format("Alibaba OSS") + "; OSS speaks S3: use WALG_S3_PREFIX"),
    *(W(name, ACCEPTED, "a setting of a storage walrus does not have (its prefix is refused)") for name in (
        "OS_AUTH_URL", "OS_PASSWORD", "OS_REGION_NAME", "OS_TENANT_NAME", "OS_USERNAME",
        "SSH_PASSWORD", "SSH_PORT", "SSH_PRIVATE_KEY_PATH", "SSH_USERNAME", "OSS_ACCESS_KEY_ID",
        "OSS_ACCESS_KEY_SECRET", "OSS_CONNECT_TIMEOUT", "OSS_COPY_PART_SIZE", "OSS_ENDPOINT", "OSS_MAX_RETRIES",
        "OSS_REGION", "OSS_ROLE_ARN", "OSS_ROLE_SESSION_NAME", "OSS_SESSION_TOKEN", "OSS_SKIP_VALIDATION",
        "OSS_UPLOAD_PART_SIZE")),
    # S3: botocore reads these itself; a config file's value is exported for it, as WAL-G exports its config
    *(W(name, EXPORTED, "read by botocore (the S3 client) from the environment") for name in (
        "AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION",
        "AWS_DEFAULT_OUTPUT")),
    W("AWS_ROLE_ARN", IGNORED, "walrus does not assume a role itself (botocore does with AWS_WEB_IDENTITY_TOKEN_FILE); "
      "use a profile with role_arn in ~/.aws/config and AWS_PROFILE"),
    W("AWS_ROLE_SESSION_NAME", ACCEPTED, "used only with AWS_ROLE_ARN"),
    W("AWS_DUAL_STACK", IGNORED, "walrus uses the endpoint's default addresses", _is_true),
    W("S3_ENDPOINT_PORT", REFUSED, "walrus takes the port from AWS_ENDPOINT: write it as http://host:port"),
    W("WALG_S3_ENDPOINT_PORT", REFUSED, "walrus takes the port from AWS_ENDPOINT: write it as http://host:port"),
    W("S3_ENDPOINT_PROTOCOL", REFUSED, "walrus takes the protocol from AWS_ENDPOINT: write it as http://host:port"),
    W("S3_ENDPOINT_SOURCE", REFUSED, "walrus does not look endpoints up; set AWS_ENDPOINT"),
    W("WALG_S3_ENDPOINT_SOURCE", REFUSED, "walrus does not look endpoints up; set AWS_ENDPOINT"),
    W("S3_LOG_LEVEL", ACCEPTED, "the S3 SDK's log level; WALG_LOG_LEVEL=DEVEL logs walrus's S3 requests"),
    W("WALG_S3_LOG_LEVEL", ACCEPTED, "the S3 SDK's log level; WALG_LOG_LEVEL=DEVEL logs walrus's S3 requests"),
    W("S3_DELETE_BATCH_SIZE", IGNORED, "walrus deletes in batches of 1,000 keys, S3's maximum"),
    W("S3_DISABLE_100_CONTINUE", ACCEPTED, "walrus does not send Expect: 100-continue"),
    W("S3_ENABLE_VERSIONING", IGNORED, "walrus does not read or delete object versions", _is_true),
    W("S3_MAX_THROTTLING_RETRY_DELAY", IGNORED, "walrus's retries back off on their own schedule"),
    W("S3_MIN_THROTTLING_RETRY_DELAY", IGNORED, "walrus's retries back off on their own schedule"),
    W("S3_RANGE_BATCH_ENABLED", ACCEPTED, "walrus always reads large objects in ranges (WALRUS_S3_RANGE_SIZE)"),
    W("WALG_S3_RANGE_BATCH_ENABLED", ACCEPTED, "walrus always reads large objects in ranges (WALRUS_S3_RANGE_SIZE)"),
    W("S3_RANGE_MAX_RETRIES", ACCEPTED, "a ranged read is retried like any request (WALG_S3_MAX_RETRIES)"),
    W("WALG_S3_RANGE_MAX_RETRIES", ACCEPTED, "a ranged read is retried like any request (WALG_S3_MAX_RETRIES)"),
    W("S3_REQUEST_ADDITIONAL_HEADERS", REFUSED, "walrus cannot add headers to S3 requests"),
    W("S3_RETENTION_MODE", REFUSED, "walrus does not set S3 Object Lock retention; objects would not be locked"),
    W("S3_RETENTION_PERIOD", REFUSED, "walrus does not set S3 Object Lock retention; objects would not be locked"),
    W("S3_SKIP_VALIDATION", ACCEPTED, "walrus does not validate the bucket at start-up"),
    W("S3_SSE_C", REFUSED, "walrus does not support customer-provided SSE keys (SSE-C)"),
    W("WALG_S3_SSE_C", REFUSED, "walrus does not support customer-provided SSE keys (SSE-C)"),
    W("S3_USE_LIST_OBJECTS_V1", IGNORED, "walrus lists with ListObjectsV2", _is_true),
    W("WALG_S3_USE_LIST_OBJECTS_V1", IGNORED, "walrus lists with ListObjectsV2", _is_true),
    W("S3_USE_YC_SESSION_TOKEN", REFUSED, "walrus does not support Yandex Cloud session tokens", _is_true),
    W("UPLOAD_CONCURRENCY", IGNORED, "walrus uploads WALG_UPLOAD_CONCURRENCY parts at once"),
    # encryption walrus does not have: data would be stored or read without it
    W("WALG_CSE_KMS_REGION", ACCEPTED, "used only with WALG_CSE_KMS_ID, which is refused"),
    W("WALG_ENVELOPE_CACHE_EXPIRATION", ACCEPTED, "used only with envelope encryption, which is refused"),
    W("WALG_ENVELOPE_PGP_YC_CSE_KMS_KEY_ID", REFUSED, "walrus does not support envelope encryption"),
    W("WALG_ENVELOPE_PGP_YC_ENDPOINT", ACCEPTED, "used only with envelope encryption, which is refused"),
    W("WALG_ENVELOPE_PGP_YC_SERVICE_ACCOUNT_KEY_FILE", ACCEPTED, "used only with envelope encryption, which is refused"),
    W("YC_SERVICE_ACCOUNT_KEY_FILE", ACCEPTED, "used only with YC_CSE_KMS_KEY_ID, which is refused"),
    # PostgreSQL connection: libpq (psycopg) reads these from the environment
    *(W(name, EXPORTED, "read by libpq from the environment") for name in (
        "PGAPPNAME", "PGPASSFILE", "PGSSLCERT", "PGSSLKEY", "PGSSLMODE", "PGSSLROOTCERT")),
    W("WALG_PG_BLOCK_SIZE", REFUSED, "walrus supports PostgreSQL's default 8192-byte blocks only", _not("8192")),
    W("WALG_PG_WAL_PAGE_SIZE", REFUSED, "walrus supports PostgreSQL's default 8192-byte WAL pages only", _not("8192")),
    # backups: features walrus does not have yet
    W("WALG_USE_WAL_DELTA", IGNORED, "walrus does not record WAL delta maps yet", _is_true),
    W("WALG_FORCE_WAL_DELTA", IGNORED, "walrus does not record WAL delta maps yet", _is_true),
    W("WALG_USE_RATING_COMPOSER", IGNORED, "walrus fills parts its own way (the backup's format is the same)", _is_true),
    W("WALG_USE_COPY_COMPOSER", IGNORED, "walrus fills parts its own way (the backup's format is the same)", _is_true),
    W("WALG_USE_DATABASE_COMPOSER", IGNORED, "walrus fills parts its own way (the backup's format is the same)",
      _is_true),
    W("WALG_WITHOUT_FILES_METADATA", IGNORED, "walrus always writes files_metadata.json (its memory stays bounded)",
      _is_true),
    W("WALG_ALIVE_CHECK_INTERVAL", ACCEPTED, "walrus's backup-push fails at once when its PostgreSQL session ends"),
    W("WALG_STREAM_CREATE_COMMAND", REFUSED, "walrus takes PostgreSQL backups only (not stream backups)"),
    W("WALG_STREAM_RESTORE_COMMAND", REFUSED, "walrus takes PostgreSQL backups only (not stream backups)"),
    W("WALG_USE_REVERSE_UNPACK", ACCEPTED, "a full backup has each file once: unpack order changes nothing"),
    W("WALG_SKIP_REDUNDANT_TARS", ACCEPTED, "a full backup has no redundant parts"),
    # WAL
    W("WALG_UPLOAD_WAL_METADATA", IGNORED, "walrus does not upload WAL metadata files", _not("NOMETADATA")),
    W("PGBACKREST_STANZA", ACCEPTED, "used by the pgbackrest commands, which walrus does not have"),
    # storage redundancy
    W("WALG_FAILOVER_STORAGES", REFUSED, "walrus has no failover storages; configure one storage"),
    *(W(f"WALG_FAILOVER_STORAGES_{suffix}", ACCEPTED, "used only with WALG_FAILOVER_STORAGES, which is refused")
      for suffix in ("CACHE_EMA_ALIVE_LIMIT", "CACHE_EMA_ALPHA_ALIVE_MAX", "CACHE_EMA_ALPHA_ALIVE_MIN",
                     "CACHE_EMA_ALPHA_DEAD_MAX", "CACHE_EMA_ALPHA_DEAD_MIN", "CACHE_EMA_DEAD_LIMIT", "CACHE_LIFETIME",
                     "CHECK", "CHECK_SIZE", "CHECK_TIMEOUT")),
    # tuning and runtime knobs with walrus equivalents, or none needed
    W("WALG_UPLOAD_QUEUE", ACCEPTED, "walrus's uploads queue in the bounded buffer pool (WALRUS_MEMORY_BUDGET)"),
    W("WALG_DOWNLOAD_FILE_RETRIES", ACCEPTED, "downloads are retried like any request (WALG_S3_MAX_RETRIES)"),
    W("WALG_DIRECT_IO_BLOCK_COUNT", ACCEPTED, "walrus's direct reads use WALRUS_BUFFER_SIZE buffers"),
    W("WALG_SERIALIZER_TYPE", ACCEPTED, "deprecated in WAL-G too; JSON is always written"),
    W("GOMAXPROCS", ACCEPTED, "a Go runtime setting"),
    W("GODEBUG", ACCEPTED, "a Go runtime setting"),
    W("PROFILE_MODE", ACCEPTED, "WAL-G's Go profiler"),
    W("PROFILE_PATH", ACCEPTED, "WAL-G's Go profiler"),
    W("PROFILE_SAMPLING_RATIO", ACCEPTED, "WAL-G's Go profiler"),
    W("HTTP_LISTEN", IGNORED, "walrus has no HTTP endpoint"),
    W("HTTP_EXPOSE_EXPVAR", IGNORED, "walrus has no HTTP endpoint", _is_true),
    W("HTTP_EXPOSE_PPROF", IGNORED, "walrus has no HTTP endpoint", _is_true),
)
del W

# WAL-G also reads these older spellings (WAL-E's), setting name -> alias.
WALE_ALIASES: dict[str, tuple[str, ...]] = {
    name: ("WALE_" + name,) for name in (
        "AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT", "AWS_REGION", "AWS_S3_FORCE_PATH_STYLE",
        "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN", "S3_CA_CERT_FILE", "S3_MAX_PART_SIZE",
        "S3_MAX_RETRIES", "S3_SSE", "S3_SSE_KMS_ID", "S3_STORAGE_CLASS")
}
# Read by WAL-G but not among its settings (no flag): not unknown.
READ_OUTSIDE_TABLE = frozenset({"WALG_CONFIG_PATH", "WALG_TARGET_STORAGE"})
