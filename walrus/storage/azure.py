"""Azure Blob Storage (WALG_AZ_PREFIX) on azure-storage-blob's asyncio client: staged blocks and ranged reads."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import re
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from urllib.parse import urlparse

import aiohttp
from azure.core import MatchConditions
from azure.core.exceptions import (ClientAuthenticationError, DecodeError, HttpResponseError, ServiceRequestError,
                                   ServiceResponseError)

from walrus.config import Settings
from walrus.errors import ConfigError, ObjectExists, ObjectNotFound, StorageError
from walrus.log import log
from walrus.storage.base import ByteStream, ObjectInfo, Storage, checked_key, join_key
from walrus.storage.chunked import (READ_CHUNK, PartPool, buffer_plan, md5_of, put_in_parts, read_ranges, sliced,
                                    transfer_share)
from walrus.storage.retry import Progress, RetryingStorage, RetryPolicy, TransientError, describe

# The SDK logs to "azure.*" (a warning per broken download, say); walrus reports failures itself, so
# without a handler of the application's those records must not reach logging's last resort (stderr).
logging.getLogger("azure").addHandler(logging.NullHandler())

# AZURE_ENVIRONMENT_NAME -> blob endpoint suffix; any other name means the public cloud (as WAL-G).
ENDPOINT_SUFFIXES = {
    "AzurePublicCloud": "core.windows.net",
    "AzureUSGovernmentCloud": "core.usgovcloudapi.net",
    "AzureChinaCloud": "core.chinacloudapi.cn",
    "AzureGermanCloud": "core.cloudapi.de",
}
MIN_BLOCK = 1024  # WAL-G raises a smaller WALG_AZURE_BUFFER_SIZE to this
MAX_BLOCK = 4000 << 20  # Azure's largest block (and, below 5000 MiB, largest Put Blob)
SHRUNK_BLOCK = 1 << 20  # the memory budget never shrinks blocks below this (50000 of them: 48 GiB)
MIN_RANGE = 4 << 20  # nor ranges below this: smaller ones would only add requests
MAX_BLOCKS = 50_000  # committed blocks per blob
DELETE_BATCH = 256  # sub-requests per Blob Batch request
LIST_PAGE = 5000  # the service's largest page
ATTEMPTS = 16  # tries per request; Azure has no setting for it (as S3's and GCS's defaults)
CONNECT_TIMEOUT = 20.0  # seconds to open a connection, at most AZURE_TRY_TIMEOUT
START_FROM_VERSION = "2026-02-06"  # the first service version that takes List Blobs' startFrom

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# ServerBusy and the like come with 5xx; Md5Mismatch (400) is a body damaged on its way: send it again.
_TRANSIENT_CODES = frozenset({"ServerBusy", "OperationTimedOut", "InternalError", "Md5Mismatch"})
_EXISTS_CODES = frozenset({"BlobAlreadyExists", "ConditionNotMet", ""})
_ENDPOINT_HINT = ("check AZURE_STORAGE_ACCOUNT and AZURE_ENDPOINT_SUFFIX or AZURE_ENVIRONMENT_NAME (or "
                  "WALRUS_AZURE_ENDPOINT), and the network to the endpoint")
_CONTAINER = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]|\$root|\$web|\$logs")


@dataclass(frozen=True)
class AzureConfig:
    """Everything the backend needs, resolved and checked from the settings."""

    container: str
    root: str  # blob name prefix inside the container, without leading or trailing slashes
    account: str
    endpoint: str  # the account's blob endpoint, e.g. https://ACCOUNT.blob.core.windows.net
    access_key: str | None = field(default=None, repr=False)
    sas_token: str | None = field(default=None, repr=False)  # without its leading '?'
    api_version: str | None = None
    block_size: int = 8 << 20
    block_buffers: int = 4  # the storage's PartPool: every upload's blocks together
    upload_concurrency: int = 4  # blocks of one upload in flight
    range_size: int = 8 << 20
    download_concurrency: int = 10  # ranges prefetched, all downloads together
    # AZURE_TRY_TIMEOUT in seconds: a try without progress for this long is abandoned (an upload's
    # body makes progress slice by slice as the connection takes it; a download's, read by read)
    timeout: float = 300.0
    attempts: int = ATTEMPTS

    @classmethod
    def from_settings(cls, settings: Settings) -> "AzureConfig":
        container, root = parse_prefix(settings.az_prefix)
        root = join_key(root, settings.storage_prefix or "")
        account = (settings.azure_storage_account or "").strip()
        if not account:
            raise ConfigError("AZURE_STORAGE_ACCOUNT is not set",
                              detail="WALG_AZ_PREFIX names a container; the storage account holding it is needed too",
                              hint="set AZURE_STORAGE_ACCOUNT to the storage account's name")
        if settings.azure_buffer_size > MAX_BLOCK:
            raise ConfigError("WALG_AZURE_BUFFER_SIZE is larger than Azure's largest block",
                              detail=f"it is {settings.azure_buffer_size} bytes; blocks are at most {MAX_BLOCK}",
                              hint="use 4000 MiB or less (8 MiB, the default, suits most uploads)")
        access_key = (settings.azure_storage_access_key or "").strip() or None
        if access_key:
            try:
                base64.b64decode(access_key, validate=True)
            except ValueError:
                raise ConfigError("AZURE_STORAGE_ACCESS_KEY is not an access key", detail="it is not base64",
                                  hint="copy key1 or key2 of the storage account's access keys whole") from None
        sas_token = (settings.azure_storage_sas_token or "").strip().lstrip("?") or None
        endpoint = (settings.azure_endpoint or "").strip().rstrip("/")
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint  # a bare host means HTTPS
        endpoint = endpoint or f"https://{account}.blob.{endpoint_suffix(settings)}"
        if not access_key and not sas_token and not endpoint.startswith("https://"):
            raise ConfigError("the default Azure credential chain needs an HTTPS endpoint",
                              detail=f"the endpoint is {endpoint}; bearer tokens are never sent in the clear",
                              hint="set AZURE_STORAGE_ACCESS_KEY or AZURE_STORAGE_SAS_TOKEN, or use an https:// "
                                   "WALRUS_AZURE_ENDPOINT")
        block, buffers, range_size, ranges = transfer_buffers(settings)
        return cls(container=container, root=root, account=account, endpoint=endpoint, access_key=access_key,
                   sas_token=sas_token, api_version=(settings.azure_blob_store_api_version or "").strip() or None,
                   block_size=block, block_buffers=buffers,
                   upload_concurrency=max(1, min(settings.azure_max_buffers, buffers)), range_size=range_size,
                   download_concurrency=ranges, timeout=settings.azure_try_timeout * 60.0)

    @property
    def auth(self) -> str:
        """Which credential is used, in WAL-G's order: the access key, else the SAS token, else the chain."""
        return "key" if self.access_key else "sas" if self.sas_token else "chain"

    def policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.attempts, timeout=self.timeout)


def transfer_buffers(settings: Settings) -> tuple[int, int, int, int]:
    """(block size, block buffers, range size, ranges prefetched) out of the storage's share of
    WALRUS_MEMORY_BUDGET.

    As WAL-G's, each of the WALG_UPLOAD_DISK_CONCURRENCY uploads has WALG_AZURE_MAX_BUFFERS buffers
    of WALG_AZURE_BUFFER_SIZE (the one being filled and the blocks in flight); a share too small
    makes the blocks smaller first (not below SHRUNK_BLOCK), then fewer. Ranged reads are as long
    as blocks, WALG_DOWNLOAD_CONCURRENCY of them prefetched, shrunk to fit the same way.
    """
    share = transfer_share(settings.memory_budget)
    wanted = max(MIN_BLOCK, settings.azure_buffer_size)
    buffers = max(1, settings.upload_disk_concurrency) * max(1, settings.azure_max_buffers)
    block, buffers = buffer_plan(share, wanted, buffers, minimum=min(SHRUNK_BLOCK, wanted), align=1 << 20)
    range_size, ranges = buffer_plan(share, wanted, settings.download_concurrency,
                                     minimum=min(MIN_RANGE, wanted), align=1 << 20)
    return block, buffers, range_size, ranges


def endpoint_suffix(settings: Settings) -> str:
    """AZURE_ENDPOINT_SUFFIX, else the one of AZURE_ENVIRONMENT_NAME (an unknown name: the public cloud's)."""
    if settings.azure_endpoint_suffix:
        return settings.azure_endpoint_suffix.strip().strip(".")
    name = settings.azure_environment_name or "AzurePublicCloud"
    if name not in ENDPOINT_SUFFIXES:
        log.warning(f"AZURE_ENVIRONMENT_NAME {name!r} is not one of {', '.join(ENDPOINT_SUFFIXES)}; "
                    "using AzurePublicCloud's endpoints, as WAL-G does")
        name = "AzurePublicCloud"
    return ENDPOINT_SUFFIXES[name]


def parse_prefix(prefix: str) -> tuple[str, str]:
    """azure://container/path -> (container, path)."""
    url = urlparse(prefix)
    if url.scheme != "azure" or not url.netloc:
        raise ConfigError(f"WALG_AZ_PREFIX {prefix!r} is not an Azure URL", hint="write it as azure://container/path")
    if not _CONTAINER.fullmatch(url.netloc):
        raise ConfigError(f"{url.netloc!r} in WALG_AZ_PREFIX is not a valid container name",
                          detail="container names are 3 to 63 lowercase letters, digits and single hyphens, "
                                 "beginning and ending with a letter or digit",
                          hint="write WALG_AZ_PREFIX as azure://container/path")
    return url.netloc, url.path.strip("/")


def open_azure(settings: Settings) -> Storage:
    """The configured Azure storage, its whole calls retried by the same policy its requests use."""
    config = AzureConfig.from_settings(settings)
    policy = config.policy()
    return RetryingStorage(AzureStorage(config, policy), policy)


class AzureStorage(Storage):
    """One container and prefix. The client is made on first use, inside the running event loop.

    walrus's retry policy is the only retry layer (the SDK's is off): every request runs under it,
    except the properties request of stat and the first range of a download, which RetryingStorage
    retries as whole calls (open_azure always wraps this class in it).
    """

    lists_in_key_order = True  # List Blobs returns names in lexical order, page after page

    def __init__(self, config: AzureConfig, policy: RetryPolicy):
        self.config = config
        self.policy = policy
        self.name = "default"
        self._container: Any = None
        self._credential: Any = None
        self._lock: asyncio.Lock | None = None
        self._prefetch_slots: asyncio.Semaphore | None = None
        self._blocks: PartPool | None = None
        self.upload_memory = config.block_size * config.block_buffers
        self.download_memory = config.range_size * config.download_concurrency

    def describe(self) -> str:
        c = self.config
        return f"Azure storage azure://{join_key(c.container, c.root)} (account {c.account} at {c.endpoint})"

    # -- client

    async def _client(self) -> Any:
        if self._container is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._container is None:
                    await self._connect()
        return self._container

    async def _connect(self) -> None:
        from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
        from azure.storage.blob.aio import ContainerClient

        c = self.config
        if c.auth == "key":
            credential: Any = AzureNamedKeyCredential(c.account, c.access_key)
        elif c.auth == "sas":
            credential = AzureSasCredential(c.sas_token)
        else:
            from azure.identity.aio import DefaultAzureCredential  # only its users pay for importing it

            credential = self._credential = DefaultAzureCredential()
        extra = {"api_version": c.api_version} if c.api_version else {}
        try:
            self._container = ContainerClient(
                c.endpoint, c.container, credential=credential, retry_total=0,  # walrus's policy retries
                connection_timeout=min(CONNECT_TIMEOUT, c.timeout), read_timeout=c.timeout,
                connection_data_block_size=READ_CHUNK, user_agent="walrus", **extra)
        except ValueError as e:  # the client library knows which versions it speaks, and lists them
            raise ConfigError("AZURE_BLOB_STORE_API_VERSION is not a Blob service version the client speaks",
                              detail=" ".join(str(e).split()),
                              hint="unset it, or use one of the versions listed") from None
        self._prefetch_slots = asyncio.Semaphore(c.download_concurrency)
        self._blocks = PartPool(c.block_size, c.block_buffers)

    async def close(self) -> None:
        container, credential = self._container, self._credential
        self._container, self._credential, self._lock = None, None, None
        if container is not None:
            await container.close()
        if credential is not None:
            await credential.close()

    async def _blob(self, full: str) -> Any:
        return (await self._client()).get_blob_client(full)

    # -- keys and errors

    def _key(self, key: str) -> str:
        return join_key(self.config.root, checked_key(key))

    def _rel(self, full: str) -> str:
        return full[len(self.config.root) + 1:] if self.config.root else full

    @contextlib.contextmanager
    def _errors(self, what: str, key: str | None = None) -> Iterator[None]:
        """Turn SDK and transport failures into walrus errors, transient or not.

        With `key`, BlobNotFound becomes ObjectNotFound(key); ContainerNotFound never does.
        """
        try:
            yield
        except DecodeError as e:  # a body cut short (IncompleteReadError) or garbled on its way
            raise TransientError(f"{what} failed: the connection to Azure broke", detail=describe(e),
                                 hint=_ENDPOINT_HINT) from None
        except ClientAuthenticationError as e:
            if e.response is not None:  # the service refused the credential (403)
                raise self._http_error(what, e) from None
            # the chain's message names each credential it tried and why it could not: all of it, on one line
            detail = " ".join(str(getattr(e, "message", e)).split())
            raise StorageError(f"{what} failed: no usable Azure credentials",
                               detail=detail if len(detail) <= 1000 else detail[:1000] + "...",
                               hint=self._credentials_hint()) from None
        except HttpResponseError as e:
            if key is not None and e.status_code == 404 and _code(e) in ("BlobNotFound", ""):
                raise ObjectNotFound(key) from None
            raise self._http_error(what, e) from None
        except ServiceRequestError as e:  # the request never reached the service
            if _tls_failure(e):
                raise StorageError(f"{what} failed: TLS verification of the Azure endpoint failed",
                                   detail=_first_line(e), hint="check WALRUS_AZURE_ENDPOINT and the system's CA "
                                                               "certificates (SSL_CERT_FILE)") from None
            raise TransientError(f"{what} failed: cannot connect to Azure at {self.config.endpoint}",
                                 detail=_first_line(e), hint=_ENDPOINT_HINT) from None
        except ServiceResponseError as e:  # sent, and no whole answer came: a timeout or a broken connection
            raise TransientError(f"{what} failed: no answer from Azure", detail=_first_line(e),
                                 hint=_ENDPOINT_HINT) from None
        except (aiohttp.ClientError, ConnectionError) as e:
            raise TransientError(f"{what} failed: the connection to Azure broke", detail=describe(e),
                                 hint=_ENDPOINT_HINT) from None
        except TimeoutError:
            raise TransientError(f"{what} timed out", detail=f"no progress for {self.config.timeout:g} s",
                                 hint=_ENDPOINT_HINT) from None

    def _http_error(self, what: str, e: HttpResponseError) -> StorageError:
        status, code = e.status_code or 0, _code(e)
        detail = f"Azure error {code or status}: {_first_line(e)}"
        if status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
            return TransientError(f"{what} failed", detail=detail,
                                  hint="Azure was unavailable or throttling; run the command again later")
        if code == "ContainerNotFound":
            return StorageError(f"Azure container {self.config.container!r} does not exist", detail=detail,
                                hint="create the container, or fix its name in WALG_AZ_PREFIX (azure://container/path)")
        if status == 403:
            return StorageError(f"{what} failed: access denied", detail=detail, hint=self._credentials_hint())
        if code == "ConditionNotMet":
            return StorageError(f"{what} failed: the object changed while it was being read", detail=detail,
                                hint="something overwrote it meanwhile; run the command again")
        if code in ("InvalidHeaderValue", "UnsupportedHeader") and self.config.api_version:
            return StorageError(f"{what} failed", detail=detail,
                                hint="the endpoint may not speak AZURE_BLOB_STORE_API_VERSION; check it")
        return StorageError(f"{what} failed", detail=detail)

    def _credentials_hint(self) -> str:
        account = f"the storage account {self.config.account!r} (AZURE_STORAGE_ACCOUNT)"
        if self.config.auth == "key":
            return f"check AZURE_STORAGE_ACCESS_KEY: it must be a key of {account} (and this host's clock right)"
        if self.config.auth == "sas":
            return (f"check AZURE_STORAGE_SAS_TOKEN: it must be a token of {account} for this container, not "
                    "expired, with read, add, create, write, delete and list permissions")
        return ("the default credential chain found no identity, or one without access: set AZURE_CLIENT_ID, "
                "AZURE_TENANT_ID and AZURE_CLIENT_SECRET (or use a managed identity) with a Storage Blob Data "
                f"role on the container of {account}; or set AZURE_STORAGE_ACCESS_KEY or AZURE_STORAGE_SAS_TOKEN")

    async def _call(self, what: str, request: Callable[[Any], Awaitable[Any]], full: str) -> Any:
        """request(blob client) under the retry policy, each try watched for progress."""

        async def attempt(progress: Progress) -> Any:
            blob = await self._blob(full)
            with self._errors(what):
                return await request(blob)

        return await self.policy.run(what, attempt)

    # -- reads

    async def stat(self, key: str) -> ObjectInfo | None:
        full = self._key(key)
        blob = await self._blob(full)
        try:
            with self._errors(f"stat of {key}", key):
                props = await blob.get_blob_properties()
        except ObjectNotFound:
            return None
        return ObjectInfo(self._rel(full), int(props.size), props.last_modified)

    async def list(self, folder: str, *, recursive: bool = False,
                   start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        base = join_key(self.config.root, folder)
        prefix = base + "/" if base else ""
        after = self._key(start_after) if start_after is not None else None
        if after is not None and not after.startswith(prefix) and after > prefix:
            return  # every name under the prefix sorts before start_after
        options: dict[str, Any] = {}
        if after is not None and after.startswith(prefix) and self._lists_from() and \
                (recursive or "/" not in after[len(prefix):]):  # startFrom takes one level in a folder listing
            options["start_from"] = after  # inclusive: `after` itself is skipped below
        what = f"listing of {join_key(folder) or '/'}"
        token = None
        while True:
            items, token = await self.policy.run(
                what, functools.partial(self._page, what, prefix, recursive, token, options))
            for item in items:
                name = item.name
                if name.endswith("/") or (after is not None and name <= after):
                    continue  # a sub-folder (or a console's folder placeholder), or not past start_after
                yield ObjectInfo(self._rel(name), int(item.size), item.last_modified)
            if not token:
                return
            options = {}  # the continuation token carries the position from now on

    async def _page(self, what: str, prefix: str, recursive: bool, token: str | None, options: dict[str, Any],
                    progress: Progress) -> tuple[list[Any], str | None]:
        """One page of List Blobs: its entries and the continuation token (None after the last page)."""
        container = await self._client()
        with self._errors(what):
            if recursive:
                listing = container.list_blobs(name_starts_with=prefix, results_per_page=LIST_PAGE, **options)
            else:
                listing = container.walk_blobs(name_starts_with=prefix, delimiter="/", results_per_page=LIST_PAGE,
                                               **options)
            pages = listing.by_page(continuation_token=token)
            page = await anext(pages, None)
            items = [item async for item in page] if page is not None else []
            return items, pages.continuation_token or None

    def _lists_from(self) -> bool:
        """Whether List Blobs may be asked to start from a name (service versions from 2026-02-06)."""
        return self.config.api_version is None or self.config.api_version >= START_FROM_VERSION

    async def keys_with_prefix(self, prefix: str, limit: int = 100) -> set[str] | None:
        """The keys starting with `prefix`, in one List Blobs request (at most `limit`)."""
        full = self._key(prefix)
        what = f"listing of {prefix}*"
        container = await self._client()

        async def attempt(progress: Progress) -> set[str]:
            with self._errors(what):
                pages = container.list_blobs(name_starts_with=full, results_per_page=limit).by_page()
                page = await anext(pages, None)
                return {self._rel(item.name) async for item in page} if page is not None else set()

        return await self.policy.run(what, attempt)

    async def get(self, key: str) -> ByteStream:
        """The first range is requested here, so an absent key raises before any byte is read."""
        full = self._key(key)
        head = await self._open_range(full, 0, self.config.range_size - 1, None, Progress(), initial=True)
        return read_ranges(head, functools.partial(self._open_range, full), range_size=self.config.range_size,
                           ahead=self.config.download_concurrency - 1, slots=self._prefetch_slots,
                           policy=self.policy, what=f"download of {key}")

    async def _open_range(self, full: str, start: int, end: int | None, etag: str | None, progress: Progress,
                          *, initial: bool = False) -> "_Range":
        """Get Blob for bytes start..end (None: the whole blob), pinned to `etag` when one is given.

        The SDK's generated operation, streamed: download_blob would read a whole range into memory
        before handing out its first byte, and retry broken bodies on its own. Only the initial
        request of a download reports a missing blob as ObjectNotFound; a later one fails as a
        StorageError, since the blob vanished mid-read.
        """
        blob = await self._blob(full)
        headers = {"If-Match": etag} if etag is not None else {}
        what = f"download of {self._rel(full)}"
        with self._errors(what, self._rel(full) if initial else None):
            try:
                response, body = await blob._client.blob.download(
                    range=f"bytes={start}-{end}" if end is not None else None, headers=headers,
                    cls=lambda pipeline_response, stream, _: (pipeline_response.http_response, stream))
            except HttpResponseError as e:
                if not (initial and end is not None and e.status_code == 416):
                    raise
                response = None  # an empty blob has no byte 0: ask for all of it
        if response is None:
            return await self._open_range(full, 0, None, etag, progress, initial=True)
        progress.touch()
        length = int(response.headers.get("Content-Length") or 0)
        found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("Content-Range") or "")
        if found:
            first, last, total = map(int, found.groups())
        else:  # the whole blob came back (no range asked)
            first, last, total = 0, length - 1, length
        if first != start or last - first + 1 != length:
            response.internal_response.close()
            raise TransientError(f"{what} failed", detail=f"asked for bytes {start}-{end}, got {first}-{last}")
        return _Range(response, body, first, last, total, response.headers.get("ETag"),
                      functools.partial(self._errors, what))

    # -- writes

    async def put(self, key: str, stream: AsyncIterable[bytes], *, exclusive: bool = False) -> int:
        """A stream shorter than one block is one Put Blob; a longer one is staged block by block and
        committed last (Put Block List), so a blob is only ever visible whole.

        exclusive: the Put Blob or the commit carries If-None-Match: *, so Azure itself refuses to
        replace a blob (409 BlobAlreadyExists), atomically. A refusal where the blob is the one we
        sent (its MD5, or its committed block list) is our own earlier try whose answer was lost:
        success.
        """
        full = self._key(key)

        def too_many() -> StorageError:
            return StorageError(f"upload of {key} failed: more than {MAX_BLOCKS} blocks",
                                detail=f"blocks are {self.config.block_size} bytes (WALG_AZURE_BUFFER_SIZE, "
                                       "within WALRUS_MEMORY_BUDGET)",
                                hint="raise WALRUS_MEMORY_BUDGET and WALG_AZURE_BUFFER_SIZE, or lower "
                                     "WALG_TAR_SIZE_THRESHOLD")

        async def start() -> _BlockUpload:
            return _BlockUpload(self, full)

        await self._client()  # the block pool belongs to the connection's event loop
        total, _ = await put_in_parts(
            stream, self._blocks, max_parts=MAX_BLOCKS, concurrency=self.config.upload_concurrency,
            put_whole=lambda data: self._put_blob(full, data, exclusive), start=start, too_many=too_many,
            exclusive=exclusive)
        return total

    async def _put_blob(self, full: str, data: memoryview, exclusive: bool) -> str:
        """One Put Blob, with the body's MD5 (Content-MD5: Azure refuses a damaged body) stored as the
        blob's own (x-ms-blob-content-md5), which tells a lost answer to an exclusive put from a
        refusal. The SDK's generated operation sends the pool's buffer as it is, where upload_blob copies it."""
        md5 = await md5_of(data)
        headers = {"x-ms-blob-content-md5": base64.b64encode(md5).decode()}
        if exclusive:
            headers["If-None-Match"] = "*"
        what = f"upload of {self._rel(full)}"

        async def attempt(progress: Progress) -> str:
            blob = await self._blob(full)
            with self._errors(what):
                try:
                    answer = await blob._client.block_blob.upload(
                        content_length=len(data), body=sliced((data,), progress), transactional_content_md5=md5,
                        headers=headers,
                        cls=lambda _, __, response_headers: response_headers)
                except HttpResponseError as e:
                    if exclusive and _already_exists(e):
                        return _EXISTS
                    raise
            return answer.get("ETag") or ""

        outcome = await self.policy.run(what, attempt)
        if outcome == _EXISTS:
            props = await self._call(f"stat of {self._rel(full)}", lambda b: b.get_blob_properties(), full)
            if props.content_settings.content_md5 != md5:
                raise ObjectExists(self._rel(full))
            return props.etag
        return outcome

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
        """One Blob Batch request of up to DELETE_BATCH deletes (snapshots included, as WAL-G), retried
        under the policy. Absent blobs are fine; sub-requests that failed transiently are sent again,
        as a failed request would be, and any other failure fails the delete."""
        left = list(batch)
        what = f"delete of {len(batch)} objects"

        async def attempt(progress: Progress) -> None:
            nonlocal left
            container = await self._client()
            with self._errors(what):
                answers = [a async for a in await container.delete_blobs(
                    *left, delete_snapshots="include", raise_on_any_failure=False)]
            failed = [(name, a) for name, a in zip(left, answers)
                      if a.status_code >= 300 and not (a.status_code == 404 and _sub_code(a) == "BlobNotFound")]
            if not failed:
                return
            left = [name for name, _ in failed]
            name, first = failed[0]
            detail = f"{self._rel(name)}: Azure error {_sub_code(first) or first.status_code}"
            if all(a.status_code in _TRANSIENT_STATUS or _sub_code(a) in _TRANSIENT_CODES for _, a in failed):
                raise TransientError(f"could not delete {len(failed)} of {len(batch)} objects", detail=detail)
            raise StorageError(f"could not delete {len(failed)} of {len(batch)} objects", detail=detail,
                               hint=self._credentials_hint() if first.status_code == 403 else None)

        await self.policy.run(what, attempt)

    # abandoned_uploads keeps the default (none): a failed upload leaves only uncommitted blocks, which
    # no request can remove from a blob that was never committed; Azure drops them after a week.


class _Range:
    """A Get Blob response for bytes first..last (storage.chunked.Range)."""

    def __init__(self, response: Any, body: Any, first: int, last: int, total: int, etag: str | None,
                 errors: Callable[[], contextlib.AbstractContextManager]):
        self.response = response
        self.body = body  # the transport's stream of the response body
        self.first, self.last, self.total, self.etag = first, last, total, etag
        self.errors = errors
        self._left = b""

    async def read(self, n: int) -> bytes:
        if not self._left:
            with self.errors():
                self._left = await anext(self.body, b"")
        chunk, self._left = (self._left, b"") if len(self._left) <= n else (self._left[:n], self._left[n:])
        return chunk

    def close(self) -> None:
        self.response.internal_response.close()  # aiohttp's: a body read to its end is back in the pool


class _BlockUpload:
    """One blob staged block by block (storage.chunked.PartUpload), each block retried from its buffer.

    Block ids are this upload's random nonce and the block number, 64 characters (88 in base64):
    every writer's ids have the same length, as Azure requires of a blob's blocks, and the length of
    the Go SDK's (WAL-G's), so blocks a crashed WAL-G upload left do not refuse ours. The nonce keeps
    writers racing for one key from staging over each other's blocks, and tells our commit from theirs.
    """

    def __init__(self, storage: AzureStorage, full: str):
        self.storage = storage
        self.full = full
        self.nonce = uuid.uuid4().hex
        self.what = f"upload of {storage._rel(full)}"

    def block_id(self, number: int) -> str:
        return f"{self.nonce}{number:032d}"

    async def send(self, number: int, data: memoryview) -> str:
        """Put Block with Content-MD5: a body damaged on its way is refused (Md5Mismatch), and sent again."""
        md5 = await md5_of(data)
        block = self.block_id(number)
        storage, what = self.storage, f"{self.what} (block {number})"

        async def attempt(progress: Progress) -> None:
            blob = await storage._blob(self.full)
            with storage._errors(what):
                await blob.stage_block(block, sliced((data,), progress), length=len(data),
                                       transactional_content_md5=md5)

        await storage.policy.run(what, attempt)
        return block

    async def complete(self, blocks: list[str], exclusive: bool) -> str:
        """Put Block List (with If-None-Match: * when exclusive); returns the blob's ETag.

        A retried commit whose first try succeeded unseen meets the blob committed: with our block
        list it is ours. (A plain commit retried just commits the same blocks again: committed ones
        count.) Any writer's commit drops every other uncommitted block of the blob, so a racing
        writer may find its blocks gone (InvalidBlockList): the key then holds the other's blob.
        """
        from azure.storage.blob import BlobBlock

        storage = self.storage
        conditions = {"match_condition": MatchConditions.IfMissing} if exclusive else {}

        async def attempt(progress: Progress) -> str:
            blob = await storage._blob(self.full)
            with storage._errors(self.what):
                try:
                    answer = await blob.commit_block_list([BlobBlock(b) for b in blocks], **conditions)
                except HttpResponseError as e:
                    if exclusive and _already_exists(e):
                        return _EXISTS
                    if _code(e) == "InvalidBlockList":
                        return _INVALID
                    raise
            return answer.get("etag") or ""

        outcome = await storage.policy.run(self.what, attempt)
        if outcome not in (_EXISTS, _INVALID):
            return outcome
        committed = await self._committed()
        if committed == blocks:
            return ""  # ours: an earlier try landed and its answer was lost
        if exclusive and committed is not None:
            raise ObjectExists(storage._rel(self.full))
        raise StorageError(f"{self.what} failed: its blocks were dropped before the commit",
                           detail="Azure no longer has them: another writer's commit of the key drops them (as "
                                  "does a week without a commit)",
                           hint="a key has one writer at a time; run the command again")

    async def _committed(self) -> list[str] | None:
        """The blob's committed block ids, or None when there is no blob."""
        try:
            committed, _ = await self.storage._call(f"{self.what} (block list)",
                                                    lambda b: b.get_block_list("committed"), self.full)
        except StorageError as e:
            if "BlobNotFound" in (e.detail or ""):
                return None
            raise
        return [b.id for b in committed]

    async def abort(self) -> None:
        """Nothing to do, and nothing that could be done: the staged blocks are invisible, the next
        commit of the key drops them, and no request deletes the uncommitted blocks of a blob that
        was never committed (Azure drops them after a week). Never raises."""


_EXISTS = "\0exists"  # a conditional write found a blob under its key (409 or 412)
_INVALID = "\0invalid"  # a commit named blocks the blob no longer has


def _already_exists(e: HttpResponseError) -> bool:
    return e.status_code in (409, 412) and _code(e) in _EXISTS_CODES


def _code(e: HttpResponseError) -> str:
    """Azure's error code: the SDK's, else the x-ms-error-code header, else the XML body's <Code>."""
    code = getattr(e, "error_code", None)
    if code:
        return str(getattr(code, "value", code))
    response = e.response
    if response is None:
        return ""
    header = response.headers.get("x-ms-error-code")
    if header:
        return header
    try:
        found = re.search(r"<Code>([^<]+)</Code>", response.text() or "")
    except Exception:  # a streamed body not read: no code to find
        return ""
    return found.group(1) if found else ""


def _sub_code(response: Any) -> str:
    return response.headers.get("x-ms-error-code") or ""


def _first_line(e: BaseException) -> str:
    text = getattr(e, "reason", None) if isinstance(e, HttpResponseError) else None
    text = text or getattr(e, "message", None) or str(e) or type(e).__name__
    return str(text).strip().splitlines()[0]


def _tls_failure(e: ServiceRequestError) -> bool:
    inner = getattr(e, "inner_exception", None)
    return isinstance(inner, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError))


