"""S3 for tests: moto in server mode on 127.0.0.1 (real HTTP), and a fault-injecting proxy in front of it."""
from __future__ import annotations

import http.client
import http.server
import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable

from tests.pgcluster import free_port
from tests.storage_helpers import Emulator, settings_at
from walrus.storage import open_storage
from walrus.storage.base import Storage

MOTO_SERVER = os.path.join(os.path.dirname(sys.executable), "moto_server")
ACCESS_KEY = "walrus-test-key"
SECRET_KEY = "walrus-test-secret"
# moto enforces S3's 5 MiB minimum part size unless told otherwise; small parts keep tests fast.
MIN_PART_SIZE = 64 << 10


class MotoServer(Emulator):
    """`moto_server` as a subprocess on a free port; buckets are made per test."""

    def __init__(self) -> None:
        self.port = free_port()
        self._client = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["S3_UPLOAD_PART_MIN_SIZE"] = str(MIN_PART_SIZE)
        self.launch([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)], self.port, "moto_server", env=env)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client(self):
        """A plain botocore client straight to moto, to set up and check what walrus did."""
        if self._client is None:
            import botocore.session
            from botocore.config import Config

            self._client = botocore.session.get_session().create_client(
                "s3", region_name="us-east-1", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY, config=Config(s3={"addressing_style": "path"}))
        return self._client

    def new_bucket(self) -> str:
        name = f"walrus-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def pending_uploads(self, bucket: str) -> list[str]:
        """Multipart uploads begun and neither completed nor aborted."""
        return [u["Key"] for u in self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    def read(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_settings(endpoint: str, bucket: str, prefix: str = "walrus", **extra: str) -> dict[str, str]:
    """walrus settings for a test bucket: static keys, path style, small parts and ranges, short timeouts."""
    settings = {
        "WALG_S3_PREFIX": f"s3://{bucket}/{prefix}", "AWS_ENDPOINT": endpoint, "AWS_REGION": "us-east-1",
        "AWS_S3_FORCE_PATH_STYLE": "true", "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "WALG_S3_MAX_PART_SIZE": str(256 << 10), "WALRUS_S3_RANGE_SIZE": str(256 << 10),
        "WALG_UPLOAD_CONCURRENCY": "4", "WALG_DOWNLOAD_CONCURRENCY": "4",
        "WALRUS_S3_TIMEOUT": "5", "WALRUS_S3_CONNECT_TIMEOUT": "2", "WALG_S3_MAX_RETRIES": "4",
    }
    settings.update(extra)
    return settings


def s3_storage(endpoint: str, bucket: str, home, **extra: str) -> Storage:
    """The storage open_storage makes of s3_settings."""
    return open_storage(settings_at(s3_settings(endpoint, bucket, **extra), home))


# -- the fault-injecting proxy

S3_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
             503: ("SlowDown", "Please reduce your request rate."),
             501: ("NotImplemented", "A header you provided implies functionality that is not implemented.")}
ACTIONS = ("500", "503", "drop", "drop-body", "lose", "stall")  # transient: a retry may succeed
PERMANENT_ACTIONS = ("501",)  # an endpoint that lacks a request: retrying cannot help
# How the proxy treats S3's conditional writes (If-None-Match on PutObject, CompleteMultipartUpload):
# pass them on one at a time, answer 501 NotImplemented as servers without them do, or drop the
# header as servers that ignore it do. One at a time because moto checks the key and then writes
# it in two steps (two racing conditional writes of one new key both succeeded in 13 of 40
# CompleteMultipartUpload races and 4 of 40 PutObject ones), where S3 guarantees one winner.
CONDITIONAL_MODES = ("pass", "refuse", "ignore")


@dataclass
class Request:
    method: str
    path: str  # path and query string, as sent
    label: str | None = None  # the kind a proxy's `classify` gave it (other storage APIs than S3's)

    @property
    def is_part(self) -> bool:
        return self.method == "PUT" and "partNumber=" in self.path

    @property
    def is_get(self) -> bool:
        return self.method == "GET" and "list-type=" not in self.path and "uploads" not in self.path

    @property
    def kind(self) -> str:
        """"part" for UploadPart, "get" for GetObject, else the method (or the proxy's own label)."""
        if self.label is not None:
            return self.label
        return "part" if self.is_part else "get" if self.is_get else self.method


@dataclass
class _Rule:
    action: str
    count: int  # faults left to apply (a fault handed out and given back counts again)
    when: Callable[[Request], bool]


@dataclass
class _Schedule:
    actions: tuple[str, ...]
    every: int  # fail every n-th request
    limit: int  # then stop
    seen: int = 0  # requests counted towards the next slot
    taken: int = 0  # faults applied or handed out and not yet given back; never above limit
    owed: list[str] = field(default_factory=list)  # given back: the next requests take them first
    last: int = -2  # `seen` of the last request a fault took effect on


@dataclass
class _Fault:
    """A fault handed to one request: recorded in `applied` when it takes effect, else given back."""
    action: str
    source: _Rule | _Schedule
    settled: bool = False
    at: int = 0  # the schedule's count of requests when it was handed out


@dataclass
class FaultProxy:
    """A reverse proxy to `upstream` that fails chosen requests, bounded in count and time.

    Actions: "500" / "503" (S3's InternalError / SlowDown), "drop" (close without a response),
    "drop-body" (send the headers and half the body, then close), "lose" (forward, then close
    without a response: done, but the client never hears), "stall" (stop reading and answering
    for `stall_seconds`, then close). A request body is read before an error is sent.
    `applied` lists only faults that took effect: a "drop-body" meets answers with no body to cut
    (HEAD, an empty 200), and then its rule or schedule slot stays armed for the next request.
    `latency` delays every forwarded request, so that concurrent ones overlap visibly in `peak`.

    Other storage APIs than S3's: `classify` labels requests ("part", "get", ...: Request.kind),
    `error_body(status)` renders an error answer (content type, body) in the API's own dialect.
    Absolute URLs to the upstream in answers (a resumable upload's Location) are rewritten to point
    at the proxy, so a client that follows them stays behind it.
    """

    upstream_port: int
    stall_seconds: float = 30.0
    latency: float = 0.0
    conditional: str = "pass"  # one of CONDITIONAL_MODES
    serialised: int = 0  # conditional writes passed on one at a time
    on_forwarded: Callable[[Request], None] | None = None  # called once S3 answered, before the client hears
    classify: Callable[[Request], str] | None = None
    error_body: Callable[[int], tuple[str, bytes]] | None = None
    log: list[Request] = field(default_factory=list)
    applied: list[tuple[str, Request]] = field(default_factory=list)
    peak: dict[str, int] = field(default_factory=dict)  # most requests of each kind in flight at once

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._conditional_lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._schedule: _Schedule | None = None
        self._stopping = threading.Event()
        self._in_flight: dict[str, int] = {}
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, action: str, count: int = 1, when: Callable[[Request], bool] = lambda r: True) -> None:
        """Apply `action` to the next `count` requests that match `when` (on which it can take effect)."""
        assert action in ACTIONS + PERMANENT_ACTIONS
        with self._lock:
            self._rules.append(_Rule(action, count, when))

    def fail_every(self, every: int, actions: tuple[str, ...], limit: int) -> None:
        """Fail every `every`-th request, cycling through `actions`, `limit` times in all; a slot whose
        fault cannot take effect passes to the next request."""
        with self._lock:
            self._schedule = _Schedule(actions, every, limit)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._schedule = None

    def _decide(self, request: Request) -> _Fault | None:
        with self._lock:
            self.log.append(request)
            for rule in self._rules:
                if rule.count > 0 and rule.when(request):
                    rule.count -= 1
                    return _Fault(rule.action, rule)
            s = self._schedule
            if s is None or s.taken >= s.limit:
                return None
            s.seen += 1
            if s.seen % s.every == 0:  # a slot: its fault, or owed behind the others when too close
                s.owed.append(s.actions[(s.seen // s.every) % len(s.actions)])
            # Never faults on two requests in a row: owed faults would otherwise fall on one retrying
            # request, each of its attempts in turn, until its retries ran out (a burst no real
            # storage sends, and a failure the schedule, not the code under test, made).
            if not s.owed or s.seen - s.last < 2:
                return None
            action = s.owed.pop(0)
            s.taken += 1
            return _Fault(action, s, at=s.seen)

    def _settle(self, fault: _Fault, request: Request, took_effect: bool) -> None:
        """Records a fault that took effect; gives one that did not back to its rule or schedule.
        Only the first call for a fault counts."""
        with self._lock:
            if fault.settled:
                return
            fault.settled = True
            if took_effect:
                self.applied.append((fault.action, request))
                if isinstance(fault.source, _Schedule):
                    fault.source.last = max(fault.source.last, fault.at)
            elif isinstance(fault.source, _Rule):
                fault.source.count += 1
            else:
                fault.source.taken -= 1
                fault.source.owed.append(fault.action)

    def stall(self) -> None:
        self.stall_for(self.stall_seconds)

    def stall_for(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def entered(self, request: Request, delta: int) -> None:
        with self._lock:
            n = self._in_flight[request.kind] = self._in_flight.get(request.kind, 0) + delta
            self.peak[request.kind] = max(self.peak.get(request.kind, 0), n)

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for r in self.log if r.kind == kind)

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()


_HOP_BY_HOP = {"connection", "keep-alive", "expect", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection"}


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered as a server would
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    owner: FaultProxy
    _counted: "Request | None" = None  # the request being served, while it counts as in flight

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        return

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            pieces = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, up to the blank line
                        pass
                    return b"".join(pieces)
                pieces.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after the chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send_response(self, code, message=None) -> None:
        self._left()  # the answer starts: the client may send its next request before this returns
        super().send_response(code, message)

    def _drop(self) -> None:
        self._left()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self) -> None:
        request = Request(self.command, self.path)
        if self.owner.classify is not None:
            request.label = self.owner.classify(request)
        self.owner.entered(request, +1)
        self._counted = request
        fault = None
        try:
            fault = self.owner._decide(request)
            self._serve(request, fault)
        finally:
            if fault is not None:  # not settled by now (the client hung up first, say): it had no effect
                self.owner._settle(fault, request, took_effect=False)
            self._left()

    def _left(self) -> None:
        """The request no longer counts as in flight: before the client can hear from it (an
        answer, or the connection closed under it), whose next request or retry would otherwise
        be counted while this one still is (a false peak)."""
        if self._counted is not None:
            self.owner.entered(self._counted, -1)
            self._counted = None

    def _serve(self, request: Request, fault: _Fault | None) -> None:
        action = fault.action if fault is not None else None
        if action == "stall":
            self.owner._settle(fault, request, took_effect=True)  # recorded now: the stall outlasts the client
            self.owner.stall()
            self._drop()
            return
        body = self._body()
        if action == "drop":
            self.owner._settle(fault, request, took_effect=True)
            self._drop()
            return
        if action in ("500", "503", "501"):
            self.owner._settle(fault, request, took_effect=True)
            self._answer_error(int(action), *S3_ERRORS[int(action)])
            return
        if self.owner.latency:
            self.owner.stall_for(self.owner.latency)
        if self.headers.get("If-None-Match") and self.command in ("PUT", "POST"):
            if self.owner.conditional == "refuse":
                self._answer_error(501, "NotImplemented", "A header you provided implies functionality "
                                                          "that is not implemented.")
                return
            if self.owner.conditional == "ignore":
                del self.headers["If-None-Match"]
        if self.headers.get("If-None-Match") and self.command in ("PUT", "POST"):
            with self.owner._conditional_lock:  # atomic, as S3's are (see CONDITIONAL_MODES)
                self.owner.serialised += 1
                status, headers, payload = self._forward(body)
        else:
            status, headers, payload = self._forward(body)
        if self.owner.on_forwarded is not None:
            self.owner.on_forwarded(request)
        if action == "lose":  # S3 did it, the client never hears: what a retry then finds
            self.owner._settle(fault, request, took_effect=True)
            self._drop()
            return
        cut = action == "drop-body" and len(payload) > 1
        if action == "drop-body":
            # a body of one byte or none (HEAD, an empty 200 or 204) cannot be cut short: the fault
            # goes back before this answer does, so it is armed for the client's next request
            self.owner._settle(fault, request, took_effect=cut)
        self.send_response(status)
        upstream = f"http://127.0.0.1:{self.owner.upstream_port}"
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value.replace(upstream, self.owner.endpoint))
        length = next((v for n, v in headers if n.lower() == "content-length"), None)
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(payload)))
        self.end_headers()
        if cut:
            self.wfile.write(payload[:len(payload) // 2])
            self.wfile.flush()
            self._drop()
            return
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _answer_error(self, status: int, code: str, message: str) -> None:
        if self.owner.error_body is not None:
            content_type, xml = self.owner.error_body(status)
        else:
            content_type = "application/xml"
            xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                   f"<Message>{message}</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.owner.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                headers["Content-Length"] = str(len(body))  # the body was read whole: it goes on with its length
            conn.request(self.command, self.path, body=body if body else None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()
