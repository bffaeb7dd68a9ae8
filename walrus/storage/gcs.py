"""Google Cloud Storage (WALG_GS_PREFIX) over its JSON API on aiohttp: resumable uploads, ranged downloads."""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Iterator
from urllib.parse import quote, urlencode, urlparse

import aiohttp
from yarl import URL

from walrus.config import Settings
from walrus.errors import ConfigError, ObjectExists, ObjectNotFound, StorageError
from walrus.log import log
from walrus.storage.base import ByteStream, ObjectInfo, Storage, checked_key, join_key
from walrus.storage.chunked import PartPool, buffer_plan, md5_of, put_in_parts, read_ranges, sliced, transfer_share
from walrus.storage.retry import Progress, RetryingStorage, RetryPolicy, TransientError, describe

GCS_API = "https://storage.googleapis.com"
ALIGN = 256 << 10  # every chunk of a resumable upload but the last is a multiple of this (GCS refuses others)
RANGE_SIZE = 8 << 20  # bytes per ranged GET at most
MIN_RANGE_SIZE = 4 << 20  # smaller ranges would only add requests
REQUEST_TIMEOUT = 60.0  # a request that makes no progress this long is abandoned and retried
LIST_PAGE = 1000  # GCS's largest page of a listing
DELETE_CONCURRENCY = 16  # the JSON API deletes one object per request (batches aside): this many at once
ABORT_ATTEMPTS = 4  # tries of a session's cancellation: the upload failed already, clean up without a long wait
SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
_CREDENTIALS_HINT = ("check GOOGLE_APPLICATION_CREDENTIALS (a service account's JSON key, or gcloud's "
                     "application-default credentials), or the instance's service account, and that it may use "
                     "this bucket")
_ENDPOINT_HINT = "check the network to Google Cloud Storage (or STORAGE_EMULATOR_HOST) and that the endpoint is up"
_KEY_HINT = ("check GCS_ENCRYPTION_KEY: an object written with a customer-supplied key is read only with that "
             "same key, and one written without a key only without one")
_EXISTS = "exists"  # a write with ifGenerationMatch=0 met an object under its key (412)


@dataclass(frozen=True)
class GcsConfig:
    """Everything the backend needs, resolved and checked from the settings."""

    bucket: str
    root: str  # the prefix of every key: "" or ending in "/" (kept verbatim when GCS_NORMALIZE_PREFIX=false)
    endpoint: str = GCS_API
    emulator: bool = False  # STORAGE_EMULATOR_HOST: plain HTTP, no credentials
    credentials: str | None = None  # a credentials file; None: gcloud's default chain
    encryption_key: bytes | None = field(default=None, repr=False)
    chunk_size: int = 16 << 20
    chunk_buffers: int = 2  # the storage's PartPool: every upload's chunks together
    range_size: int = RANGE_SIZE
    download_concurrency: int = 10  # ranges prefetched, all downloads together
    context_timeout: float = 3600
    timeout: float = REQUEST_TIMEOUT
    max_retries: int = 16

    @classmethod
    def from_settings(cls, settings: Settings) -> "GcsConfig":
        bucket, root = parse_prefix(settings.gs_prefix, settings.gcs_normalize_prefix, settings.storage_prefix)
        if settings.gcs_max_retries < 0:
            raise ConfigError("GCS_MAX_RETRIES must not be negative", detail=f"it is {settings.gcs_max_retries}",
                              hint="0 disables retries")
        emulator = (settings.storage_emulator_host or "").strip()
        endpoint = GCS_API
        if emulator:
            endpoint = (emulator if "://" in emulator else "http://" + emulator).rstrip("/")
        credentials = settings.google_application_credentials or None
        if credentials and not emulator and not os.path.isfile(credentials):
            raise ConfigError(f"GOOGLE_APPLICATION_CREDENTIALS {credentials} is not a file",
                              hint="point it at a service account's JSON key file, or unset it to use gcloud's "
                                   "credentials or the instance's service account")
        (chunk, chunks), (range_size, ranges) = buffer_plans(settings)
        return cls(bucket=bucket, root=root, endpoint=endpoint, emulator=bool(emulator), credentials=credentials,
                   encryption_key=parse_encryption_key(settings.gcs_encryption_key), chunk_size=chunk,
                   chunk_buffers=chunks, range_size=range_size, download_concurrency=ranges,
                   context_timeout=settings.gcs_context_timeout,
                   timeout=min(REQUEST_TIMEOUT, settings.gcs_context_timeout),
                   max_retries=settings.gcs_max_retries)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.max_retries + 1, timeout=self.timeout)


def buffer_plans(settings: Settings) -> tuple[tuple[int, int], tuple[int, int]]:
    """((chunk size, chunk buffers), (range size, ranges)) out of the storage's share of
    WALRUS_MEMORY_BUDGET. Chunks: one being filled per upload lane and one more in flight (a session
    takes one chunk at a time, so lanes take turns sending), at most GCS_MAX_CHUNK_SIZE, smaller to
    fit, in multiples of 256 KiB and not below it. Fewer, larger chunks rather than two per lane:
    a session takes its chunks one round trip after another, so a chunk's size is what one round
    trip carries. Ranges: WALG_DOWNLOAD_CONCURRENCY of at most 8 MiB (and at most a chunk), smaller
    or fewer to fit."""
    share = transfer_share(settings.memory_budget)
    chunk = max(ALIGN, settings.gcs_max_chunk_size // ALIGN * ALIGN)
    wanted_range = min(RANGE_SIZE, chunk)
    return (buffer_plan(share, chunk, settings.upload_disk_concurrency + 1, minimum=ALIGN, align=ALIGN),
            buffer_plan(share, wanted_range, settings.download_concurrency,
                        minimum=min(MIN_RANGE_SIZE, wanted_range), align=ALIGN))


def parse_prefix(prefix: str, normalize: bool = True, sub: str | None = None) -> tuple[str, str]:
    """gs://bucket/path (and WALG_STORAGE_PREFIX `sub`) -> (bucket, "path/sub/"). Normalized, each
    loses its outer slashes; verbatim (GCS_NORMALIZE_PREFIX=false, WAL-E's prefixes), only its first
    one, as in WAL-G: gs://bucket//path keys its objects "/path/...". Inner slashes stay either way
    (WAL-G's too)."""
    url = urlparse(prefix)
    if url.scheme != "gs" or not url.netloc:
        raise ConfigError(f"WALG_GS_PREFIX {prefix!r} is not a GCS URL", hint="write it as gs://bucket/path")
    root = ""
    for part in (url.path, sub or ""):
        part = part.strip("/") if normalize else part.removeprefix("/")
        root += part + "/" if part and not part.endswith("/") else part
    return url.netloc, root


def parse_encryption_key(value: str | None) -> bytes | None:
    """GCS_ENCRYPTION_KEY: standard base64 of exactly 32 bytes (an AES-256 key), or None."""
    if not value:
        return None
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = None
    if key is None or len(key) != 32:
        raise ConfigError("GCS_ENCRYPTION_KEY is not a 32-byte key in base64",
                          detail="it is not valid base64" if key is None else f"it decodes to {len(key)} bytes",
                          hint="set it to an AES-256 key in standard base64, such as `openssl rand -base64 32` "
                               "prints; objects written with a key can only be read with the same key")
    return key


def open_gcs(settings: Settings) -> Storage:
    """The configured GCS storage, its whole calls retried by the same policy its requests use."""
    config = GcsConfig.from_settings(settings)
    policy = config.policy()
    return RetryingStorage(GcsStorage(config, policy), policy)


class GcsStorage(Storage):
    """One bucket and prefix. The HTTP session (and the OAuth token source) is made on first use,
    inside the running event loop.

    Every request runs under the retry policy, except the metadata GET of stat and the first GET of
    a download, which RetryingStorage retries as whole calls (open_gcs always wraps this class in
    it). Uploads, stats, listings and deletes are bounded as a whole by GCS_CONTEXT_TIMEOUT; a
    download is not (as WAL-G's reads are not): each of its requests is, by the no-progress watchdog.

    abandoned_uploads and discard_uploads keep the base defaults: a resumable upload's session holds
    no object, cannot be listed, and expires by itself after a week.
    """

    def __init__(self, config: GcsConfig, policy: RetryPolicy):
        self.config = config
        self.policy = policy
        self.name = "default"
        self._http: aiohttp.ClientSession | None = None
        self._token: Any = None  # gcloud.aio.auth.Token, without an emulator
        self._prefetch_slots: asyncio.Semaphore | None = None
        self._chunks: PartPool | None = None
        self.upload_memory = config.chunk_size * config.chunk_buffers
        self.download_memory = config.range_size * config.download_concurrency
        key = config.encryption_key
        self._key_headers = {} if key is None else {
            "x-goog-encryption-algorithm": "AES256", "x-goog-encryption-key": _b64(key),
            "x-goog-encryption-key-sha256": _b64(hashlib.sha256(key).digest())}

    def describe(self) -> str:
        where = f" (at {self.config.endpoint})" if self.config.emulator else ""
        return f"GCS storage gs://{join_key(self.config.bucket, self.config.root)}{where}"

    # -- connection

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            c = self.config
            self._token = None if c.emulator else _token_source(c.credentials)  # first: it may refuse the file
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=2 * c.download_concurrency + DELETE_CONCURRENCY + 16),
                # sock_read: the same limit as the watchdog's, for a server that stops answering
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, c.timeout), sock_read=c.timeout),
                auto_decompress=False, headers={"User-Agent": "walrus"})
            self._prefetch_slots = asyncio.Semaphore(c.download_concurrency)
            self._chunks = PartPool(c.chunk_size, c.chunk_buffers)
        return self._http

    async def close(self) -> None:
        http, token, self._http, self._token = self._http, self._token, None, None
        if token is not None:
            with contextlib.suppress(Exception):
                await token.close()
        if http is not None:
            await http.close()

    async def _headers(self, extra: dict[str, str] | None = None, *, keyed: bool = True) -> dict[str, str]:
        """A request's headers: the access token, the customer-supplied key (`keyed`), `extra`."""
        headers = dict(self._key_headers) if keyed else {}
        self._session()  # makes the token source on first use
        if self._token is not None:
            try:
                headers["Authorization"] = f"Bearer {await self._token.get()}"
            except Exception as e:  # gcloud-aio-auth has retried already
                raise StorageError("could not get a Google access token", detail=describe(e),
                                   hint=_CREDENTIALS_HINT) from None
        headers.update(extra or {})
        return headers

    def _object_url(self, full: str, *, upload: bool = False) -> str:
        base = f"{self.config.endpoint}/{'upload/' if upload else ''}storage/v1/b/{quote(self.config.bucket, safe='')}/o"
        return base if upload or not full else f"{base}/{quote(full, safe='')}"

    async def _send(self, method: str, url: str, progress: Progress, *, params: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None, body: tuple[bytes | memoryview, ...] | None = None,
                    keyed: bool = True) -> aiohttp.ClientResponse:
        """One request; the response is returned open, whatever its status."""
        headers = await self._headers(headers, keyed=keyed)
        data = None
        if body is not None:
            headers["Content-Length"] = str(sum(len(piece) for piece in body))
            data = sliced(body, progress)
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        resp = await self._session().request(method, URL(url, encoded=True), headers=headers, data=data,
                                             allow_redirects=False)
        progress.touch()
        return resp

    async def _exchange(self, what: str, method: str, url: str, progress: Progress,
                        **kwargs: Any) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        """One request whose answer is read whole: (status, its JSON or {}, the response, closed)."""
        with self._errors(what):
            async with await self._send(method, url, progress, **kwargs) as resp:
                payload = await resp.read()
        progress.touch()
        return resp.status, _json(payload), resp

    async def _call(self, what: str, method: str, url: str, *, ok: tuple[int, ...] = (200, 201, 204),
                    none_on: tuple[int, ...] = (), policy: RetryPolicy | None = None,
                    **kwargs: Any) -> dict[str, Any] | None:
        """A JSON request under the retry policy: its answer, None on a status in `none_on`, any
        other a walrus error."""

        async def attempt(progress: Progress) -> dict[str, Any] | None:
            status, answer, resp = await self._exchange(what, method, url, progress, **kwargs)
            if status in ok:
                return answer
            if status in none_on:
                return None
            raise self._status_error(what, status, answer, resp)

        return await (policy or self.policy).run(what, attempt)

    @contextlib.asynccontextmanager
    async def _bounded(self, what: str) -> AsyncIterator[None]:
        """GCS_CONTEXT_TIMEOUT over a whole call: past it the call fails for good."""
        deadline = asyncio.timeout(self.config.context_timeout)
        try:
            async with deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            raise StorageError(f"{what} timed out", detail=f"it took more than GCS_CONTEXT_TIMEOUT "
                                                           f"({self.config.context_timeout:g} s)",
                               hint="raise GCS_CONTEXT_TIMEOUT, or check the network to GCS") from None

    # -- keys and errors

    def _key(self, key: str) -> str:
        return self.config.root + checked_key(key)

    def _rel(self, full: str) -> str:
        return full[len(self.config.root):]

    def _folder(self, folder: str) -> str:
        rel = join_key(folder)
        return self.config.root + rel + "/" if rel else self.config.root

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Transport failures as walrus errors: transient but for TLS verification and a bad URL."""
        try:
            yield
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as e:
            raise StorageError(f"{what} failed: TLS with GCS failed", detail=describe(e), hint=_ENDPOINT_HINT) from None
        except aiohttp.InvalidURL as e:
            raise StorageError(f"{what} failed: invalid URL", detail=str(e),
                               hint="check WALG_GS_PREFIX and STORAGE_EMULATOR_HOST") from None
        except TimeoutError:  # the client's read timeout: the same limit as the watchdog's
            raise TransientError(f"{what} timed out", detail=f"no progress for {self.config.timeout:g} s",
                                 hint=_ENDPOINT_HINT) from None
        except (aiohttp.ClientError, ConnectionError) as e:
            raise TransientError(f"{what} failed: the connection to GCS broke", detail=describe(e),
                                 hint=_ENDPOINT_HINT) from None

    def _status_error(self, what: str, status: int, answer: dict[str, Any],
                      resp: aiohttp.ClientResponse | None = None) -> StorageError:
        """A walrus error for a failed answer: transient for 408, 429 and 5xx."""
        message = _message(answer) or (resp.reason if resp is not None else None) or "no message"
        detail = f"GCS error {status}: {message}"
        if status in (408, 429) or status >= 500:
            return TransientError(f"{what} failed", detail=detail,
                                  hint="GCS was unavailable or throttling; raise GCS_MAX_RETRIES to wait longer")
        if status in (401, 403):
            return StorageError(f"{what} failed: access denied", detail=detail, hint=_CREDENTIALS_HINT)
        if status == 404 and "bucket does not exist" in message.lower():
            return self._no_bucket(detail)
        if status == 400 and "encrypt" in message.lower():
            return StorageError(f"{what} failed: wrong encryption key", detail=detail, hint=_KEY_HINT)
        return StorageError(f"{what} failed", detail=detail)

    def _upload_error(self, what: str, status: int, answer: dict[str, Any], resp: aiohttp.ClientResponse) -> StorageError:
        if status == 404:  # an upload's only 404: the bucket
            return self._no_bucket(f"GCS error 404: {_message(answer) or 'Not Found'}")
        return self._status_error(what, status, answer, resp)

    def _no_bucket(self, detail: str) -> StorageError:
        return StorageError(f"GCS bucket {self.config.bucket!r} does not exist", detail=detail,
                            hint="create the bucket, or fix the bucket name in WALG_GS_PREFIX (gs://bucket/path)")

    async def _missing(self, what: str, key: str, answer: dict[str, Any], resp: aiohttp.ClientResponse) -> StorageError:
        """What a 404 of an object request means: the object is absent (ObjectNotFound), or the bucket
        is. GCS's message tells ("No such object: ...", "The specified bucket does not exist."); an
        answer that does not (an emulator's bare Not Found) is settled by listing the bucket, which
        only a missing bucket refuses with 404."""
        message = (_message(answer) or "").lower()
        if "no such object" in message:
            return ObjectNotFound(key)
        if "bucket does not exist" not in message:
            status, answer, resp = await self._exchange(what, "GET", self._object_url(""), Progress(),
                                                        params={"maxResults": 1, "prefix": self.config.root},
                                                        keyed=False)
            if status == 200:
                return ObjectNotFound(key)
            if status != 404:
                return self._status_error(what, status, answer, resp)
        return self._no_bucket(f"GCS error 404: {_message(answer) or 'Not Found'}")

    # -- reads

    async def _metadata(self, full: str, *, retried: bool = True) -> dict[str, Any] | None:
        """The object's resource (size, updated, generation, md5Hash), or None when it is absent."""
        what = f"stat of {self._rel(full)}"

        async def attempt(progress: Progress) -> dict[str, Any] | None:
            status, answer, resp = await self._exchange(what, "GET", self._object_url(full), progress)
            if status == 200:
                return answer
            if status == 404:
                error = await self._missing(what, self._rel(full), answer, resp)
                if isinstance(error, ObjectNotFound):
                    return None
                raise error
            raise self._status_error(what, status, answer, resp)

        if not retried:
            return await attempt(Progress())
        return await self.policy.run(what, attempt)

    async def stat(self, key: str) -> ObjectInfo | None:
        full = self._key(key)
        async with self._bounded(f"stat of {key}"):
            found = await self._metadata(full, retried=False)
        return None if found is None else ObjectInfo(self._rel(full), int(found["size"]), _time(found["updated"]))

    # GCS lists names in lexicographic (UTF-8 byte) order, which is Python's order of str keys.
    lists_in_key_order = True

    async def list(self, folder: str, *, recursive: bool = False, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        what = f"listing of {join_key(folder) or '/'}"
        params: dict[str, Any] = {"prefix": self._folder(folder), "maxResults": LIST_PAGE,
                                  "fields": "items(name,size,updated),nextPageToken"}
        if not recursive:
            params["delimiter"] = "/"
        after = self._key(start_after) if start_after is not None else None
        if after is not None:
            params["startOffset"] = after  # inclusive: the key itself is skipped below
        while True:
            page = await self._listing(what, dict(params))
            for item in page.get("items") or ():
                name = item["name"]
                if (after is not None and name <= after) or name.endswith("/"):
                    continue  # the start_after key itself; a folder placeholder (consoles create them)
                yield ObjectInfo(self._rel(name), int(item["size"]), _time(item["updated"]))
            token = page.get("nextPageToken")
            if not token:
                return
            params["pageToken"] = token

    async def keys_with_prefix(self, prefix: str, limit: int = 100) -> set[str] | None:
        """The keys starting with `prefix`, in one listing request (at most `limit`): wal-push and
        wal-fetch find the extension a WAL file was archived under with one request."""
        page = await self._listing(f"listing of {prefix}*", {"prefix": self._key(prefix), "maxResults": limit,
                                                              "fields": "items(name)"})
        return {self._rel(item["name"]) for item in page.get("items") or ()}

    async def _listing(self, what: str, params: dict[str, Any]) -> dict[str, Any]:
        """One page of a listing, bounded by GCS_CONTEXT_TIMEOUT."""
        async with self._bounded(what):
            page = await self._call(what, "GET", self._object_url(""), params=params, none_on=(404,), keyed=False)
        if page is None:  # a listing's only 404: the bucket
            raise self._no_bucket("GCS error 404: the bucket does not exist")
        return page

    async def get(self, key: str) -> ByteStream:
        """The first range is requested here, so an absent key raises before any byte is read."""
        full = self._key(key)
        self._session()
        head = await self._open_range(full, 0, self.config.range_size - 1, None, Progress(), initial=True)
        return read_ranges(head, functools.partial(self._open_range, full), range_size=self.config.range_size,
                           ahead=self.config.download_concurrency - 1, slots=self._prefetch_slots,
                           policy=self.policy, what=f"download of {key}")

    async def _open_range(self, full: str, start: int, end: int | None, generation: str | None,
                          progress: Progress, *, initial: bool = False) -> "_Range":
        """GET bytes start..end (None: the whole object), of `generation` when one is given: a later
        range of an object replaced or deleted meanwhile fails (404) instead of mixing versions.

        Only the first request of a download reports a missing key as ObjectNotFound."""
        what = f"download of {self._rel(full)}"
        params = {"alt": "media"}
        if generation is not None:
            params["generation"] = generation
        headers = {"Range": f"bytes={start}-{end}"} if end is not None else {}
        with self._errors(what):
            resp = await self._send("GET", self._object_url(full), progress, params=params, headers=headers)
            if resp.status not in (200, 206):
                async with resp:
                    answer = _json(await resp.read())
        if resp.status == 416 and initial and end is not None:  # an empty object has no byte 0
            return await self._open_range(full, 0, None, generation, progress, initial=True)
        if resp.status == 404:
            if initial:
                raise await self._missing(what, self._rel(full), answer, resp)
            raise StorageError(f"{what} failed: the object was replaced or deleted while it was read",
                               detail=f"GCS error 404: {_message(answer) or 'Not Found'}",
                               hint="something overwrote or deleted it meanwhile; run the command again")
        if resp.status not in (200, 206):
            raise self._status_error(what, resp.status, answer, resp)
        length = int(resp.headers.get("Content-Length", -1))
        found = _content_range(resp.headers.get("Content-Range"))
        first, last, total = found if found and resp.status == 206 else (0, length - 1, length)
        if first != start or last - first + 1 != length:
            resp.close()
            raise TransientError(f"{what} failed", detail=f"asked for bytes {start}-{end}, got {first}-{last}")
        return _Range(resp, first, last, total, resp.headers.get("x-goog-generation") or generation,
                      functools.partial(self._errors, what))

    # -- writes

    async def put(self, key: str, stream: AsyncIterable[bytes], *, exclusive: bool = False) -> int:
        """A stream shorter than one chunk is one multipart upload; a longer one a resumable upload,
        fed chunk by chunk and finalized by its last chunk, which carries the total size: GCS shows
        the object only then. Any failure before that cancels the session.

        exclusive: the upload carries ifGenerationMatch=0, so GCS itself refuses (412), atomically,
        to replace an object. A 412 whose object holds our MD5 is our own earlier try, whose answer
        was lost: success."""
        full = self._key(key)
        self._session()

        def too_many() -> StorageError:  # GCS has no limit on a resumable upload's chunks
            return StorageError(f"upload of {key} failed: too many chunks")

        async with self._bounded(f"upload of {key}"):
            total, _ = await put_in_parts(
                stream, self._chunks, max_parts=1 << 62, concurrency=1,  # a session takes chunks in order
                put_whole=lambda data: self._put_single(full, data, exclusive),
                start=lambda: self._start_resumable(full, exclusive), too_many=too_many, exclusive=exclusive)
        return total

    async def _put_single(self, full: str, data: memoryview, exclusive: bool) -> str:
        """One multipart upload (the object's metadata and bytes in one request); its generation.
        The metadata carries the MD5, which GCS checks before it stores anything."""
        what = f"upload of {self._rel(full)}"
        md5 = _b64(await md5_of(data))
        boundary = secrets.token_hex(16)  # 128 random bits: never found in the data by chance
        head = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{json.dumps({'name': full, 'md5Hash': md5})}\r\n"
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        params = {"uploadType": "multipart", "name": full, **({"ifGenerationMatch": 0} if exclusive else {})}

        async def attempt(progress: Progress) -> dict[str, Any] | str:
            status, answer, resp = await self._exchange(
                what, "POST", self._object_url(full, upload=True), progress, params=params,
                headers={"Content-Type": f"multipart/related; boundary={boundary}"}, body=(head, data, tail))
            if status in (200, 201):
                return answer
            if status == 412 and exclusive:
                return _EXISTS
            raise self._upload_error(what, status, answer, resp)

        outcome = await self.policy.run(what, attempt)
        if outcome == _EXISTS:
            return await self._ours(full, md5)
        return str(outcome.get("generation", ""))

    async def _ours(self, full: str, md5: str) -> str:
        """After a 412: the generation of the object under `full` if it holds our bytes (our own try
        whose answer was lost, or a writer of identical bytes), else ObjectExists."""
        found = await self._metadata(full)
        if found is None or found.get("md5Hash") != md5:
            raise ObjectExists(self._rel(full))
        return str(found.get("generation", ""))

    async def _start_resumable(self, full: str, exclusive: bool) -> "_Resumable":
        """Open a resumable upload session. A retried request whose first try succeeded unseen leaves
        a session nobody feeds; it holds no object and expires after a week."""
        what = f"upload of {self._rel(full)}"
        params = {"uploadType": "resumable", "name": full, **({"ifGenerationMatch": 0} if exclusive else {})}

        async def attempt(progress: Progress) -> str:
            status, answer, resp = await self._exchange(
                what, "POST", self._object_url(full, upload=True), progress, params=params,
                headers={"Content-Type": "application/json; charset=UTF-8",
                         "X-Upload-Content-Type": "application/octet-stream"},
                body=(json.dumps({"name": full}).encode(),))
            if status in (200, 201) and resp.headers.get("Location"):
                return resp.headers["Location"]
            if status == 412 and exclusive:  # GCS may check the precondition already here
                raise ObjectExists(self._rel(full))
            raise self._upload_error(what, status, answer, resp)

        return _Resumable(self, full, await self.policy.run(what, attempt))

    async def delete(self, keys: Iterable[str]) -> None:
        """One DELETE per key, DELETE_CONCURRENCY at once, each retried; absent keys are fine."""
        names = iter([self._key(k) for k in keys])  # every key checked before any is deleted

        async def worker() -> None:
            for full in names:
                await self._call(f"delete of {self._rel(full)}", "DELETE", self._object_url(full),
                                 none_on=(404,), keyed=False)

        async with self._bounded("delete"):
            workers = [asyncio.ensure_future(worker()) for _ in range(DELETE_CONCURRENCY)]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)


class _Resumable:
    """One resumable upload session (storage.chunked.PartUpload), fed one chunk at a time.

    Invariant: `offset` is what GCS said it has persisted. Chunks of the full (aligned) size are
    sent as they come; a shorter one can only be the last (put_in_parts fills every other one), so
    it is sent with the total size: the request that finalizes the object. A stream that ends on a
    chunk boundary is finalized by complete() with an empty request. A request that broke is never
    simply repeated: GCS is first asked how far it got (it may have persisted all, some or none of
    the chunk), and the rest is sent from there.
    """

    def __init__(self, storage: GcsStorage, full: str, session: str):
        self.storage = storage
        self.full = full
        self.session = session
        self.what = f"upload of {storage._rel(full)}"
        self.offset = 0
        self.md5 = hashlib.md5()
        self.generation: str | None = None  # once finalized

    async def send(self, number: int, data: memoryview) -> None:
        await asyncio.to_thread(self.md5.update, data)  # hashlib releases the GIL
        if len(data) % ALIGN:
            await self._finish(data)
        else:
            await self._upload(data, final=False)

    async def complete(self, tokens: list[Any], exclusive: bool) -> str:
        if self.generation is None:
            await self._finish(memoryview(b""))
        return self.generation

    async def _finish(self, data: memoryview) -> None:
        """The last bytes, with the total size: GCS makes the object (or refuses, exclusive, 412)."""
        md5 = _b64(self.md5.digest())
        outcome = await self._upload(data, final=True, md5=md5)
        if outcome == _EXISTS:
            self.generation = await self.storage._ours(self.full, md5)  # else ObjectExists: put_in_parts aborts
            return
        stored = outcome.get("md5Hash")
        if stored and stored != md5:
            raise StorageError(f"{self.what} failed: GCS stored other bytes than were sent",
                               detail=f"MD5 {stored}, expected {md5}", hint="run the command again")
        self.generation = str(outcome.get("generation", ""))

    async def _upload(self, data: memoryview, *, final: bool, md5: str | None = None) -> Any:
        """Send `data`, which follows the bytes persisted so far, until GCS holds all of it (final:
        until it made the object); returns the object's resource, _EXISTS (final, 412) or None."""
        start = self.offset
        end = start + len(data)
        total = str(end) if final else "*"
        storage = self.storage
        broke = False

        async def attempt(progress: Progress) -> Any:
            nonlocal broke
            if broke:  # ask how far GCS got before sending more
                state = await self._query(progress, total, md5)
                if state is not None:
                    return state
            broke = True
            while True:
                if self.offset < start or self.offset > end:
                    raise StorageError(f"{self.what} failed: GCS lost track of the upload",
                                       detail=f"it holds {self.offset} bytes; {start} were sent before this chunk",
                                       hint="run the command again")
                rest = data[self.offset - start:]
                if not rest and not final:
                    return None
                headers = {"Content-Range": f"bytes {self.offset}-{end - 1}/{total}" if rest else f"bytes */{total}"}
                if final and md5:
                    headers["X-Goog-Hash"] = f"md5={md5}"  # GCS refuses to finalize other bytes
                status, answer, resp = await storage._exchange(self.what, "PUT", self.session, progress,
                                                               headers=headers, body=(rest,))
                if status == 308 and rest:
                    before, self.offset = self.offset, _persisted(resp)
                    if self.offset > before:
                        continue  # all sent, or GCS kept less than it was sent: the rest again
                state = self._outcome(status, answer, resp, final)
                if state is not None:
                    return state

        return await storage.policy.run(self.what, attempt)

    async def _query(self, progress: Progress, total: str, md5: str | None) -> Any:
        """Ask the session how many bytes it holds (into `offset`); the final outcome, if there is one.
        With the total size, a session that holds every byte finalizes the object."""
        headers = {"Content-Range": f"bytes */{total}", **({"X-Goog-Hash": f"md5={md5}"} if md5 else {})}
        status, answer, resp = await self.storage._exchange(self.what, "PUT", self.session, progress,
                                                            headers=headers, body=(b"",))
        if status == 308:
            self.offset = _persisted(resp)
            return None
        return self._outcome(status, answer, resp, total != "*")

    def _outcome(self, status: int, answer: dict[str, Any], resp: aiohttp.ClientResponse, final: bool) -> Any:
        if status in (200, 201):
            if not final:
                raise StorageError(f"{self.what} failed: GCS finalized the object before its end",
                                   detail=f"after {self.offset} bytes", hint="run the command again")
            return answer
        if status == 412 and final:
            return _EXISTS
        if status in (404, 410):
            raise StorageError(f"{self.what} failed: the upload session is gone", detail=f"GCS error {status}: "
                               f"{_message(answer) or 'no message'}", hint="it expired or was cancelled; run the "
                                                                            "command again")
        if status == 308:
            raise TransientError(f"{self.what} failed", detail=f"GCS kept no byte of a chunk at offset {self.offset}")
        raise self.storage._status_error(self.what, status, answer, resp)

    async def abort(self) -> None:
        """Cancel the session (GCS answers 499); never raises: an unfinished session shows nothing."""
        policy = replace(self.storage.policy, attempts=ABORT_ATTEMPTS)
        try:
            await self.storage._call(f"{self.what} (cancel)", "DELETE", self.session, ok=(499, 200, 204),
                                     none_on=(404, 410), policy=policy, keyed=False)
        except Exception as e:
            log.warning(f"could not cancel the resumable upload of {self.storage._rel(self.full)}: {describe(e)}; "
                        "its session expires by itself within a week")


@dataclass
class _Range:
    """A media GET response for bytes first..last (storage.chunked.Range); etag is the generation."""

    resp: aiohttp.ClientResponse
    first: int
    last: int
    total: int
    etag: str | None
    errors: Any  # GcsStorage._errors for this download

    async def read(self, n: int) -> bytes:
        with self.errors():
            return await self.resp.content.read(n)

    def close(self) -> None:
        if self.resp.content.at_eof():
            self.resp.release()  # read whole: the connection goes back to the pool
        else:
            self.resp.close()


def _token_source(credentials: str | None) -> Any:
    """gcloud-aio-auth's Token: a service account's key, gcloud's authorized-user file, or the
    metadata server, tried in Google's order (used for OAuth tokens only)."""
    try:
        from gcloud.aio.auth import Token
    except ImportError:
        raise ConfigError("GCS needs the gcloud-aio-auth package",
                          hint="install it (pip install gcloud-aio-auth), or reinstall walrus") from None
    try:
        return Token(service_file=credentials, scopes=SCOPES)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError("cannot read the Google credentials", detail=describe(e), hint=_CREDENTIALS_HINT) from None


def _persisted(resp: aiohttp.ClientResponse) -> int:
    """The bytes a session holds, from a 308's Range header ("bytes=0-N"; none: no byte)."""
    found = (resp.headers.get("Range") or "").rpartition("-")[2]
    return int(found) + 1 if found.isdigit() else 0


def _content_range(value: str | None) -> tuple[int, int, int] | None:
    """ "bytes 0-99/1000" -> (0, 99, 1000)."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    first, _, last = span.partition("-")
    try:
        return int(first), int(last), int(total)
    except ValueError:
        return None


def _json(payload: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(payload) if payload.strip() else {}
    except ValueError:
        return {"error": {"message": payload[:200].decode(errors="replace").strip()}}
    return answer if isinstance(answer, dict) else {}


def _message(answer: dict[str, Any]) -> str | None:
    error = answer.get("error")
    if isinstance(error, dict):
        return error.get("message")
    return error if isinstance(error, str) else None


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)




def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
