"""S3 storage (WALG_S3_PREFIX) on aiobotocore: streamed multipart uploads and parallel ranged downloads."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import os
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from urllib.parse import urlparse

import aiohttp
import botocore.exceptions as bce
from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

from walrus.config import Settings
from walrus.errors import ConfigError, ObjectExists, ObjectNotFound, StorageError
from walrus.log import log
from walrus.storage.base import ByteStream, ObjectInfo, Storage, Upload, checked_key, join_key
from walrus.storage.chunked import PartPool, buffer_plan, md5_of, put_in_parts, read_ranges, transfer_share
from walrus.storage.retry import Progress, RetryingStorage, RetryPolicy, TransientError, describe

MIN_PART_SIZE = 5 << 20  # S3 refuses smaller parts except the last one
MIN_RANGE_SIZE = 4 << 20  # smaller ranges would only add requests
MAX_PARTS = 10_000  # S3's limit per multipart upload
DELETE_BATCH = 1000  # S3's limit per DeleteObjects request
COMPLETE_TIMEOUT_FACTOR = 5  # CompleteMultipartUpload may legitimately take minutes on large uploads
# Tries of an abort, whatever WALG_S3_MAX_RETRIES says: the upload has already failed, so clean up
# without waiting out a full retry cycle, but do not give up on the first fault either (an upload
# left pending keeps its parts stored until a lifecycle rule removes them).
ABORT_ATTEMPTS = 4

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
# Error codes that say "try again": throttling, the server's own trouble, a body that arrived damaged.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestThrottled", "InternalError", "ServiceUnavailable", "RequestTimeout", "OperationAborted",
    "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch"})
_CREDENTIAL_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "403"})
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# S3-compatible servers out of disk or quota (MinIO, Ceph RGW); AWS itself never fills up.
_FULL_CODES = frozenset({"XMinioStorageFull", "QuotaExceeded", "InsufficientStorage", "StorageFull"})
_REGION_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException",
                           "301", "400"})
_CREDENTIALS_HINT = ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), AWS_PROFILE, "
                     "or the instance or web-identity role, and that it may use this bucket")
_ENDPOINT_HINT = "check AWS_ENDPOINT (or the network to S3) and that the endpoint is up"
_TLS_HINT = "set WALG_S3_CA_CERT_FILE to the CA bundle that signed the endpoint's certificate"


@dataclass(frozen=True)
class S3Config:
    """Everything the backend needs, resolved and checked from the settings."""

    bucket: str
    root: str  # key prefix inside the bucket, without leading or trailing slashes
    endpoint: str | None = None
    region: str | None = None
    force_path_style: bool = False
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    storage_class: str = "STANDARD"
    sse: str | None = None
    sse_kms_id: str | None = None
    ca_cert_file: str | None = None
    part_size: int = 20 << 20
    part_buffers: int = 2  # the storage's PartPool: every upload's parts together
    range_size: int = 8 << 20
    upload_concurrency: int = 16  # parts of one upload in flight
    download_concurrency: int = 10  # ranges prefetched, all downloads together
    upload_lanes: int = 1
    connect_timeout: float = 10
    timeout: float = 60
    max_retries: int = 15
    conditional_put: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3Config":
        bucket, root = parse_prefix(settings.s3_prefix)
        root = join_key(root, settings.storage_prefix or "")
        sse = settings.s3_sse or None
        if (sse == "aws:kms") != bool(settings.s3_sse_kms_id):
            raise ConfigError("WALG_S3_SSE_KMS_ID must be set exactly when WALG_S3_SSE is aws:kms",
                              detail=f"WALG_S3_SSE is {sse or 'unset'}, WALG_S3_SSE_KMS_ID is "
                                     f"{'set' if settings.s3_sse_kms_id else 'unset'}",
                              hint="set WALG_S3_SSE=aws:kms with a KMS key id, or AES256 without one")
        if sse not in (None, "AES256", "aws:kms"):
            raise ConfigError(f"invalid value {sse!r} for WALG_S3_SSE", hint="use AES256 or aws:kms")
        if settings.s3_max_retries < 0:
            raise ConfigError("WALG_S3_MAX_RETRIES must not be negative",
                              detail=f"it is {settings.s3_max_retries}", hint="0 disables retries")
        if settings.s3_ca_cert_file and not os.path.isfile(settings.s3_ca_cert_file):
            raise ConfigError(f"WALG_S3_CA_CERT_FILE {settings.s3_ca_cert_file} is not a file",
                              hint="point it at a PEM bundle of the CA certificates that sign the endpoint's")
        endpoint = settings.aws_endpoint or None
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint  # a bare host means HTTPS, as in the AWS SDKs
        # Parts and prefetched ranges come out of the storage's share of WALRUS_MEMORY_BUDGET: a part
        # being filled per lane and one more in flight, at most WALG_S3_MAX_PART_SIZE each, smaller
        # to fit (not below S3's 5 MiB); WALG_DOWNLOAD_CONCURRENCY ranges, smaller or fewer to fit.
        # Raise the budget for bigger parts and more of them in flight on high-latency links.
        lanes = settings.upload_disk_concurrency
        share = transfer_share(settings.memory_budget)
        part_size, part_buffers = buffer_plan(share, settings.s3_max_part_size, lanes + 1,
                                              minimum=min(MIN_PART_SIZE, settings.s3_max_part_size), align=1 << 20)
        range_size, ranges = buffer_plan(share, settings.s3_range_size, settings.download_concurrency,
                                         minimum=min(MIN_RANGE_SIZE, settings.s3_range_size), align=1 << 20)
        return cls(bucket=bucket, root=root, endpoint=endpoint, region=settings.aws_region or None,
                   force_path_style=settings.aws_s3_force_path_style,
                   access_key=(settings.aws_access_key_id or "").strip() or None,
                   secret_key=(settings.aws_secret_access_key or "").strip() or None,
                   session_token=settings.aws_session_token or None, profile=settings.aws_profile or None,
                   storage_class=settings.s3_storage_class, sse=sse, sse_kms_id=settings.s3_sse_kms_id or None,
                   ca_cert_file=settings.s3_ca_cert_file or None, part_size=part_size, part_buffers=part_buffers,
                   range_size=range_size, upload_concurrency=max(1, min(settings.upload_concurrency, part_buffers)),
                   download_concurrency=ranges, upload_lanes=lanes, connect_timeout=settings.s3_connect_timeout,
                   timeout=settings.s3_timeout, max_retries=settings.s3_max_retries,
                   conditional_put=settings.s3_conditional_put)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.max_retries + 1, timeout=self.timeout)


def parse_prefix(prefix: str) -> tuple[str, str]:
    """s3://bucket/path -> (bucket, path)."""
    url = urlparse(prefix)
    if url.scheme != "s3" or not url.netloc:
        raise ConfigError(f"WALG_S3_PREFIX {prefix!r} is not an S3 URL", hint="write it as s3://bucket/path")
    return url.netloc, url.path.strip("/")


def open_s3(settings: Settings) -> Storage:
    """The configured S3 storage, its whole calls retried by the same policy its requests use."""
    config = S3Config.from_settings(settings)
    policy = config.policy()
    return RetryingStorage(S3Storage(config, policy), policy)


class S3Storage(Storage):
    """One bucket and prefix. The client is made on first use, inside the running event loop.

    Every request runs under the retry policy, except HEAD and the first GET of a download, which
    RetryingStorage retries as whole calls (open_s3 always wraps this class in it).
    """

    def __init__(self, config: S3Config, policy: RetryPolicy):
        self.config = config
        self.policy = policy
        self.name = "default"
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock: asyncio.Lock | None = None
        self._prefetch_slots: asyncio.Semaphore | None = None
        self._parts: PartPool | None = None
        self.upload_memory = config.part_size * config.part_buffers
        self.download_memory = config.range_size * config.download_concurrency
        # Exclusive puts send If-None-Match: * until the endpoint answers that it cannot (501); from
        # then on they check before and verify after instead (see put).
        self.conditional = config.conditional_put

    def describe(self) -> str:
        where = f" at {self.config.endpoint}" if self.config.endpoint else ""
        return f"S3 storage s3://{join_key(self.config.bucket, self.config.root)}{where}"

    # -- client

    async def _s3(self) -> Any:
        if self._client is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._client is None:
                    await self._connect()
        return self._client

    async def _connect(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        c = self.config
        session = get_session()
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
        try:
            if c.profile:
                session.set_config_variable("profile", c.profile)
            if c.access_key and c.secret_key:  # static keys first, as WAL-G; otherwise botocore's chain
                session.set_credentials(c.access_key, c.secret_key, c.session_token)
            region = c.region or session.get_config_variable("region") or "us-east-1"
        except bce.ProfileNotFound as e:
            raise ConfigError(f"AWS profile {c.profile!r} not found", detail=str(e),
                              hint="check AWS_PROFILE and ~/.aws/config") from None
        pool = c.upload_concurrency * c.upload_lanes + 2 * c.download_concurrency + 4
        config = AioConfig(
            connect_timeout=c.connect_timeout, read_timeout=c.timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},  # walrus's policy is the only retry layer
            max_pool_connections=pool,
            s3={"addressing_style": "path" if c.force_path_style else "auto"},
            # Content-MD5 is sent on every upload instead: S3-compatible servers that predate the
            # flexible checksums accept it, and S3 verifies it.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            user_agent_extra="walrus")
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(session.create_client(
            "s3", region_name=region, endpoint_url=c.endpoint, verify=c.ca_cert_file, config=config))
        self._stack = stack
        self._prefetch_slots = asyncio.Semaphore(c.download_concurrency)
        self._parts = PartPool(c.part_size, c.part_buffers)

    async def close(self) -> None:
        stack, self._stack, self._client, self._lock = self._stack, None, None, None
        if stack is not None:
            await stack.aclose()

    # -- keys and errors

    def _key(self, key: str) -> str:
        return join_key(self.config.root, checked_key(key))

    def _rel(self, full: str) -> str:
        return full[len(self.config.root) + 1:] if self.config.root else full

    @contextlib.contextmanager
    def _errors(self, what: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore and transport failures into walrus errors, transient or not.

        With `key`, a missing object becomes ObjectNotFound(key). (A HEAD cannot tell a missing
        bucket from a missing key: both are a bare 404.)
        """
        try:
            yield
        except bce.ClientError as e:
            if key is not None and _code(e) in _MISSING_CODES:
                raise ObjectNotFound(key) from None
            raise self._client_error(what, e) from None
        except (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError) as e:
            raise StorageError(f"{what} failed: no usable S3 credentials", detail=str(e),
                               hint=_CREDENTIALS_HINT) from None
        except bce.SSLError as e:
            raise StorageError(f"{what} failed: TLS verification of the S3 endpoint failed", detail=str(e),
                               hint=_TLS_HINT) from None
        except (bce.EndpointConnectionError, bce.ConnectTimeoutError) as e:
            raise TransientError(f"{what} failed: cannot connect to S3", detail=str(e), hint=_ENDPOINT_HINT) from None
        except (bce.ReadTimeoutError, TimeoutError):  # the HTTP client's read timeout: the same limit as the watchdog's
            raise TransientError(f"{what} timed out", detail=f"no progress for {self.config.timeout:g} s",
                                 hint=_ENDPOINT_HINT) from None
        except (bce.ResponseStreamingError, bce.IncompleteReadError, bce.ConnectionClosedError,
                bce.HTTPClientError, aiohttp.ClientError, ConnectionError) as e:
            raise TransientError(f"{what} failed: the connection to S3 broke", detail=describe(e),
                                 hint=_ENDPOINT_HINT) from None
        except bce.ParamValidationError as e:
            raise StorageError(f"{what} failed: S3 rejected the request's parameters", detail=str(e),
                               hint="check WALG_S3_PREFIX and the WALG_S3_* settings") from None

    def _client_error(self, what: str, e: bce.ClientError) -> StorageError:
        error = e.response.get("Error") or {}
        code = _code(e)
        status = int((e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        detail = f"S3 error {code or status}: {error.get('Message') or 'no message'}"
        if status == 507 or code in _FULL_CODES:  # retrying cannot help, and the hint must say why
            return StorageError(f"{what} failed: the storage is full", detail=detail,
                                hint="free space in the bucket's storage (or raise its quota), then run the command again")
        if status == 501 or code == "NotImplemented":  # the endpoint lacks the request: no retry can help
            return StorageError(f"{what} failed: the S3 endpoint does not implement it", detail=detail,
                                hint="this S3-compatible storage lacks part of the S3 API that the command needs")
        if status >= 500 or code in _TRANSIENT_CODES:
            return TransientError(f"{what} failed", detail=detail,
                                  hint="S3 was unavailable or throttling; raise WALG_S3_MAX_RETRIES to wait longer")
        if code == "NoSuchBucket":
            return StorageError(f"S3 bucket {self.config.bucket!r} does not exist", detail=detail,
                                hint="create the bucket, or fix the bucket name in WALG_S3_PREFIX (s3://bucket/path)")
        if code in _CREDENTIAL_CODES:
            return StorageError(f"{what} failed: access denied", detail=detail, hint=_CREDENTIALS_HINT)
        if code in _REGION_CODES:
            return StorageError(f"{what} failed", detail=detail,
                                hint="set AWS_REGION to the bucket's region (and AWS_ENDPOINT for S3-compatible storage)")
        if code == "EntityTooSmall":
            return StorageError(f"{what} failed: a part was too small", detail=detail,
                                hint=f"WALG_S3_MAX_PART_SIZE must be at least {MIN_PART_SIZE >> 20} MiB")
        if code == "InvalidStorageClass":
            return StorageError(f"{what} failed", detail=detail, hint="check WALG_S3_STORAGE_CLASS")
        if code.startswith("KMS."):
            return StorageError(f"{what} failed", detail=detail, hint="check WALG_S3_SSE_KMS_ID and its key policy")
        if code == "PreconditionFailed":
            return StorageError(f"{what} failed: the object changed while it was being read", detail=detail,
                                hint="something overwrote it meanwhile; run the command again")
        return StorageError(f"{what} failed", detail=detail)

    async def _call(self, what: str, op: str, *, timeout: float | None = None, policy: RetryPolicy | None = None,
                    body: Callable[[Progress], dict[str, Any]] | None = None, **params: Any) -> dict[str, Any]:
        """One S3 operation under the retry policy; `body` makes each try's fresh request body."""
        s3 = await self._s3()

        async def attempt(progress: Progress) -> dict[str, Any]:
            extra = body(progress) if body is not None else {}
            with self._errors(what):
                return await getattr(s3, op)(Bucket=self.config.bucket, **params, **extra)

        return await (policy or self.policy).run(what, attempt, timeout=timeout)

    # -- reads

    async def stat(self, key: str) -> ObjectInfo | None:
        full = self._key(key)
        s3 = await self._s3()
        try:
            with self._errors(f"stat of {key}", key):
                head = await s3.head_object(Bucket=self.config.bucket, Key=full)
        except ObjectNotFound:
            return None
        return ObjectInfo(self._rel(full), int(head["ContentLength"]), head["LastModified"])

    lists_in_key_order = True

    async def list(self, folder: str, *, recursive: bool = False, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        base = join_key(self.config.root, folder)
        params: dict[str, Any] = {"Prefix": base + "/" if base else ""}
        if not recursive:
            params["Delimiter"] = "/"
        if start_after is not None:
            params["StartAfter"] = self._key(start_after)
        token = None
        while True:
            if token:
                params["ContinuationToken"] = token
            page = await self._call(f"listing of {join_key(folder) or '/'}", "list_objects_v2", **params)
            for obj in page.get("Contents") or ():
                full = obj["Key"]
                if full.endswith("/"):
                    continue  # a folder placeholder (consoles create them), not an object
                yield ObjectInfo(self._rel(full), int(obj["Size"]), obj["LastModified"])
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    async def keys_with_prefix(self, prefix: str, limit: int = 100) -> set[str] | None:
        """The keys starting with `prefix`, in one LIST request (at most `limit`).

        wal-push and wal-fetch use it to find which extension a WAL file was archived under with one
        request instead of one GET per extension.
        """
        full = self._key(prefix)
        page = await self._call(f"listing of {prefix}*", "list_objects_v2", Prefix=full, MaxKeys=limit)
        return {self._rel(obj["Key"]) for obj in page.get("Contents") or ()}

    async def get(self, key: str) -> ByteStream:
        """The first range is requested here, so an absent key raises before any byte is read."""
        full = self._key(key)
        head = await self._open_range(full, 0, self.config.range_size - 1, None, Progress(), initial=True)
        return read_ranges(head, functools.partial(self._open_range, full), range_size=self.config.range_size,
                           ahead=self.config.download_concurrency - 1, slots=self._prefetch_slots,
                           policy=self.policy, what=f"download of {key}")

    async def _open_range(self, full: str, start: int, end: int | None, etag: str | None,
                          progress: Progress, *, initial: bool = False) -> "_Range":
        """GET bytes start..end (None: the whole object), pinned to `etag` when one is given.

        Only the initial request of a download reports a missing key as ObjectNotFound; later
        ones fail as a StorageError, since the object vanished mid-read.
        """
        s3 = await self._s3()
        params: dict[str, Any] = {"Bucket": self.config.bucket, "Key": full}
        if end is not None:
            params["Range"] = f"bytes={start}-{end}"
        if etag is not None:
            params["IfMatch"] = etag
        what = f"download of {self._rel(full)}"
        with self._errors(what, self._rel(full) if initial else None):
            try:
                resp = await s3.get_object(**params)
            except bce.ClientError as e:
                if not (initial and end is not None and _code(e) == "InvalidRange"):
                    raise
                resp = None
        if resp is None:  # an empty object has no byte 0
            return await self._open_range(full, 0, None, etag, progress, initial=True)
        progress.touch()
        length = int(resp["ContentLength"])
        found = _CONTENT_RANGE.fullmatch(resp.get("ContentRange") or "")
        if found:
            first, last, total = map(int, found.groups())
        else:  # the whole object came back (no Range asked, or the server ignored it)
            first, last, total = 0, length - 1, length
        if first != start or last - first + 1 != length:
            resp["Body"].close()
            raise TransientError(f"{what} failed", detail=f"asked for bytes {start}-{end}, got {first}-{last}")
        return _Range(resp["Body"], first, last, total, resp.get("ETag"), functools.partial(self._errors, what))

    # -- writes

    def _object_args(self) -> dict[str, Any]:
        c = self.config
        args: dict[str, Any] = {"StorageClass": c.storage_class}  # always sent, as WAL-G does
        if c.sse:
            args["ServerSideEncryption"] = c.sse
        if c.sse_kms_id:
            args["SSEKMSKeyId"] = c.sse_kms_id
        return args

    async def put(self, key: str, stream: AsyncIterable[bytes], *, exclusive: bool = False) -> int:
        """A stream shorter than one part is one PUT; a longer one a multipart upload, completed last.

        The object is visible only once S3 has it whole: after the single PUT, or after
        CompleteMultipartUpload. Any failure before that aborts the multipart upload.

        exclusive: the PUT or the Complete carries If-None-Match: *, so S3 itself refuses to
        replace an object (412), atomically. A 412 whose object carries our own ETag is our own
        earlier try, whose answer was lost: success. Where the endpoint does not implement
        conditional writes (501, or WALRUS_S3_CONDITIONAL_PUT=false), the key is checked before the
        upload and the object's ETag verified after it: a writer that raced us and lost its bytes
        to ours then fails its own verification, so no writer ever reports success for bytes that
        are not stored (but the object may briefly hold the loser's bytes).
        """
        full = self._key(key)
        if exclusive and not self.conditional and await self.stat(key) is not None:
            raise ObjectExists(key)

        def too_many() -> StorageError:
            return StorageError(f"upload of {key} failed: more than {MAX_PARTS} parts",
                                detail=f"parts are {self.config.part_size} bytes (WALG_S3_MAX_PART_SIZE, within "
                                       "WALRUS_MEMORY_BUDGET)",
                                hint="raise WALRUS_MEMORY_BUDGET and WALG_S3_MAX_PART_SIZE (S3 allows 10000 parts "
                                     "per object), or lower WALG_TAR_SIZE_THRESHOLD")

        await self._s3()  # the part pool belongs to the connection's event loop
        total, etag = await put_in_parts(
            stream, self._parts, max_parts=MAX_PARTS, concurrency=self.config.upload_concurrency,
            put_whole=lambda data: self._put_single(full, data, exclusive),
            start=lambda: self._start_multipart(full), too_many=too_many, exclusive=exclusive)
        if exclusive and not self.conditional and not await self._holds(full, etag):
            raise ObjectExists(key)  # another writer replaced our bytes (or we theirs, and they find out)
        return total

    async def _put_single(self, full: str, data: memoryview, exclusive: bool) -> str:
        """One PutObject; returns the ETag S3 gives these bytes."""
        md5 = await md5_of(data)
        etag = f'"{md5.hex()}"'
        what = f"upload of {self._rel(full)}"
        s3 = await self._s3()

        async def attempt(progress: Progress) -> str | None:
            conditional = {"IfNoneMatch": "*"} if exclusive and self.conditional else {}
            with self._errors(what):
                try:
                    await s3.put_object(Bucket=self.config.bucket, Key=full, ContentMD5=_b64(md5),
                                        ContentLength=len(data), Body=_Body(data, progress), **conditional,
                                        **self._object_args())
                except bce.ClientError as e:
                    if conditional and (outcome := _conditional_outcome(e)) is not None:
                        return outcome
                    raise
            return None

        outcome = await self.policy.run(what, attempt)
        if outcome == _UNSUPPORTED:
            self._no_conditional_writes()
            if await self.stat(self._rel(full)) is not None:
                raise ObjectExists(self._rel(full))
            return await self._put_single(full, data, exclusive)
        if outcome == _EXISTS and not await self._holds(full, etag):
            raise ObjectExists(self._rel(full))
        return etag

    def _no_conditional_writes(self) -> None:
        if self.conditional:
            self.conditional = False
            log.warning(f"{self.describe()} does not implement conditional writes (If-None-Match); WAL is "
                        "checked before and verified after each upload instead")

    async def _holds(self, full: str, etag: str) -> bool:
        """Whether the object under `full` is the one with `etag` (ours, or bytes identical to ours)."""
        info = await self._call(f"stat of {self._rel(full)}", "head_object", Key=full)
        return info.get("ETag") == etag

    async def _start_multipart(self, full: str) -> "_S3Upload":
        what = f"upload of {self._rel(full)}"
        s3 = await self._s3()
        tries = 0

        async def attempt(progress: Progress) -> dict[str, Any]:
            nonlocal tries
            tries += 1
            with self._errors(what):
                return await s3.create_multipart_upload(Bucket=self.config.bucket, Key=full, **self._object_args())

        try:
            upload_id = (await self.policy.run(what, attempt))["UploadId"]
        except BaseException as e:
            # a try whose answer never came (lost, or cancelled while S3 worked on it) may have
            # created an upload: find and abort it, even while being cancelled
            if tries > 1 or isinstance(e, asyncio.CancelledError):
                await asyncio.shield(self._abort_lost_creates(full, None))
            raise
        if tries > 1:
            await self._abort_lost_creates(full, upload_id)
        return _S3Upload(self, full, upload_id)

    async def _abort_lost_creates(self, full: str, keep: str | None) -> None:
        """A retried CreateMultipartUpload whose earlier try succeeded unseen (the answer was lost) left an
        upload nobody will complete; abort every upload of this key but `keep` (ours). A key has one
        writer but for two pushes of one WAL name racing, and an upload of theirs aborted here only
        makes their push fail (and be retried): it never loses data. Best effort, ABORT_ATTEMPTS
        tries a request: a lifecycle rule (AbortIncompleteMultipartUpload) covers the rest."""
        policy = replace(self.policy, attempts=ABORT_ATTEMPTS)
        try:
            page = await self._call(f"listing of the uploads of {self._rel(full)}", "list_multipart_uploads",
                                    policy=policy, Prefix=full)
            for upload in page.get("Uploads") or ():
                if upload.get("Key") == full and upload.get("UploadId") != keep:
                    await self._call(f"upload of {self._rel(full)} (abort of a lost try)", "abort_multipart_upload",
                                     policy=policy, Key=full, UploadId=upload["UploadId"])
        except Exception as e:
            log.warning(f"could not abort the lost multipart uploads of {self._rel(full)}: {describe(e)}")

    async def abandoned_uploads(self, folder: str, started_before: datetime, limit: int = 100_000) -> list[Upload]:
        """Multipart uploads under folder begun before started_before and never
        completed or aborted (a writer killed mid-upload leaves one; S3 bills its parts until a
        lifecycle rule or this removes it). Every page of ListMultipartUploads, at most limit."""
        base = join_key(self.config.root, folder)
        params: dict[str, Any] = {"Prefix": base + "/" if base else ""}
        out: list[Upload] = []
        while len(out) < limit:
            page = await self._call(f"listing of the multipart uploads under {join_key(folder) or '/'}",
                                    "list_multipart_uploads", **params)
            for upload in page.get("Uploads") or ():
                if upload["Initiated"] < started_before:
                    out.append(Upload(self._rel(upload["Key"]), upload["Initiated"], upload["UploadId"]))
            if not page.get("IsTruncated"):
                break
            params["KeyMarker"] = page.get("NextKeyMarker")
            params["UploadIdMarker"] = page.get("NextUploadIdMarker")
        return out[:limit]

    async def discard_uploads(self, uploads: Iterable[Upload]) -> None:
        """Abort what abandoned_uploads found (an upload already gone is fine)."""
        for upload in uploads:
            try:
                await self._call(f"abort of the multipart upload of {upload.key}", "abort_multipart_upload",
                                 Key=self._key(upload.key), UploadId=upload.upload_id)
            except StorageError as e:
                if "NoSuchUpload" not in (e.detail or ""):
                    raise
                # completed or aborted meanwhile: gone is what was wanted

    async def delete(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(self._key(key))
            if len(batch) == DELETE_BATCH:
                await self._delete_batch(batch)
                batch = []
        if batch:
            await self._delete_batch(batch)

    async def _delete_batch(self, batch: list[str]) -> None:
        """One DeleteObjects request of up to DELETE_BATCH keys, retried under the policy; S3 may
        fail some keys of a request that succeeded (SlowDown, InternalError per key): those are
        sent again, as a failed request would be, and any other per-key error is a failure."""
        s3 = await self._s3()
        left = list(batch)

        async def attempt(progress: Progress) -> None:
            nonlocal left
            with self._errors(f"delete of {len(left)} objects"):
                result = await s3.delete_objects(Bucket=self.config.bucket,
                                                 Delete={"Objects": [{"Key": k} for k in left], "Quiet": True})
            errors = result.get("Errors") or []
            if not errors:
                return
            left = [e.get("Key", "") for e in errors]
            first = errors[0]
            detail = f"{self._rel(first.get('Key', ''))}: S3 error {first.get('Code')}: {first.get('Message')}"
            if all(e.get("Code") in _TRANSIENT_CODES for e in errors):
                raise TransientError(f"could not delete {len(errors)} of {len(batch)} objects", detail=detail)
            raise StorageError(f"could not delete {len(errors)} of {len(batch)} objects", detail=detail,
                               hint=_CREDENTIALS_HINT if first.get("Code") == "AccessDenied" else None)

        await self.policy.run(f"delete of {len(batch)} objects", attempt)


@dataclass
class _Range:
    """A GetObject response for bytes first..last (storage.chunked.Range)."""

    body: Any  # aiobotocore StreamingBody
    first: int
    last: int
    total: int
    etag: str | None
    errors: Callable[[], contextlib.AbstractContextManager]  # S3Storage._errors for this download

    async def read(self, n: int) -> bytes:
        with self.errors():
            return await self.body.read(n)

    def close(self) -> None:
        self.body.close()


class _S3Upload:
    """One multipart upload (storage.chunked.PartUpload): each part retried from its buffer."""

    def __init__(self, storage: S3Storage, full: str, upload_id: str):
        self.storage = storage
        self.full = full
        self.upload_id = upload_id
        self.what = f"upload of {storage._rel(full)}"

    async def send(self, number: int, data: memoryview) -> tuple[str, bytes]:
        md5 = await md5_of(data)
        done = await self.storage._call(
            f"{self.what} (part {number})", "upload_part", Key=self.full, UploadId=self.upload_id,
            PartNumber=number, ContentMD5=_b64(md5), ContentLength=len(data),
            body=lambda p: {"Body": _Body(data, p)})
        return done["ETag"], md5

    async def complete(self, parts: list[tuple[str, bytes]], exclusive: bool) -> str:
        """CompleteMultipartUpload (with If-None-Match: * when exclusive); returns the object's ETag."""
        listing = {"Parts": [{"ETag": etag, "PartNumber": n} for n, (etag, _) in enumerate(parts, 1)]}
        # A retried Complete whose first try succeeded unseen meets NoSuchUpload (or, exclusive, a
        # 412): the object's multipart ETag (MD5 of the parts' MD5s, dash, part count) tells
        # whether it is ours.
        expected = f'"{hashlib.md5(b"".join(md5 for _, md5 in parts)).hexdigest()}-{len(parts)}"'
        tries = 0
        storage = self.storage

        async def attempt(progress: Progress) -> str | None:
            nonlocal tries
            tries += 1
            s3 = await storage._s3()
            conditional = {"IfNoneMatch": "*"} if exclusive and storage.conditional else {}
            try:
                with storage._errors(self.what):
                    try:
                        await s3.complete_multipart_upload(Bucket=storage.config.bucket, Key=self.full,
                                                           UploadId=self.upload_id, MultipartUpload=listing,
                                                           **conditional)
                    except bce.ClientError as e:
                        if conditional and (outcome := _conditional_outcome(e)) is not None:
                            return outcome
                        raise
            except StorageError as e:
                if tries > 1 and "NoSuchUpload" in (e.detail or "") and await self._landed(expected):
                    return None
                raise
            return None

        while True:
            outcome = await storage.policy.run(self.what, attempt,
                                               timeout=storage.policy.timeout * COMPLETE_TIMEOUT_FACTOR)
            if outcome == _UNSUPPORTED:
                storage._no_conditional_writes()
                if await storage.stat(storage._rel(self.full)) is not None:
                    raise ObjectExists(storage._rel(self.full))
                continue
            if outcome == _EXISTS and not await self._landed(expected):
                raise ObjectExists(storage._rel(self.full))  # put() aborts the upload
            return expected

    async def _landed(self, etag: str) -> bool:
        s3 = await self.storage._s3()
        with self.storage._errors(self.what):
            head = await s3.head_object(Bucket=self.storage.config.bucket, Key=self.full)
        return head.get("ETag") == etag

    async def abort(self) -> None:
        """AbortMultipartUpload, so S3 keeps no parts; never raises."""
        policy = replace(self.storage.policy, attempts=ABORT_ATTEMPTS)
        try:
            await self.storage._call(f"{self.what} (abort)", "abort_multipart_upload", policy=policy,
                                     Key=self.full, UploadId=self.upload_id)
        except Exception as e:  # the upload stays invisible; only its stored parts remain
            log.warning(f"could not abort the multipart upload of {self.storage._rel(self.full)}: {describe(e)}; "
                        "its parts stay stored until a lifecycle rule (AbortIncompleteMultipartUpload) removes them")


class _Body(io.RawIOBase):
    """A request body over a part's buffer; each read by the HTTP client counts as progress."""

    def __init__(self, data: memoryview, progress: Progress):
        super().__init__()
        self._data = memoryview(data)
        self._pos = 0
        self._progress = progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._data)

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        self._progress.touch()
        return n

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size is None or size < 0 else min(len(self._data), self._pos + size)
        out = bytes(self._data[self._pos:end])
        self._pos = end
        self._progress.touch()
        return out

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _parse_timestamp(value: Any) -> Any:
    """S3's ISO 8601 times (each listed object's LastModified) by Python's own parser: botocore's
    default (dateutil) takes most of the CPU of a listing page. Anything else goes to botocore's."""
    if isinstance(value, str) and value.endswith("Z"):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return DEFAULT_TIMESTAMP_PARSER(value)


def _code(e: bce.ClientError) -> str:
    return str((e.response.get("Error") or {}).get("Code") or "")


_EXISTS = "exists"  # a conditional write found an object under its key (412)
_UNSUPPORTED = "unsupported"  # the endpoint does not implement conditional writes (501)


def _conditional_outcome(e: bce.ClientError) -> str | None:
    """What a failed conditional write means, or None if it failed for another reason."""
    status = int((e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    code = _code(e)
    if code == "PreconditionFailed" or status == 412:
        return _EXISTS
    if code == "NotImplemented" or status == 501:
        return _UNSUPPORTED
    return None




def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()
