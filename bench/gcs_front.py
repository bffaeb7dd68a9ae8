"""The bench's front for fake-gcs-server: nginx serves TLS and passes every request through, except the
chunks of resumable uploads, which this module's server streams to fake-gcs-server as the body of one
request per upload, finished by the upload's last chunk.

Why: fake-gcs-server recomputes the MD5 and CRC32C of the whole object at every chunk it receives, so
its CPU grows with the square of an upload's chunk count, and on a two-core machine that CPU is taken
from the tool being measured. GCS does not work that way, and which tool pays depends only on its
chunk size. Behind this front, every tool's resumable upload costs the emulator one hash of the object,
as a single-request upload does. nginx also adds the x-guploader-uploadid header GCS sends with a new
session (pgBackRest reads the session from it; fake-gcs-server puts it only in the Location URL).

Run as `python bench/gcs_front.py PORT UPSTREAM_URL`; `nginx_config` writes the nginx side."""
from __future__ import annotations

import asyncio
import os
import re
import sys

import aiohttp
from aiohttp import web

_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)$")
# what fake-gcs-server reads of a chunk (the session holds name and conditions; it ignores X-Goog-Hash)
_FORWARDED = ("Content-Type", "X-Goog-Encryption-Algorithm", "X-Goog-Encryption-Key",
              "X-Goog-Encryption-Key-Sha256", "Authorization")
_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


def nginx_config(*, root: str, port: int, cert: str, key: str, gcs_port: int, front_port: int, log: str) -> str:
    """nginx.conf for a TLS endpoint on 127.0.0.1:port: resumable-upload PUTs and DELETEs (they name an
    upload_id) go to the collector on front_port, everything else to fake-gcs-server on gcs_port; bodies
    stream both ways unbuffered."""
    temp = os.path.join(root, "nginx-temp")
    os.makedirs(temp, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers keep the temp directory's owner
    return f"""{user}worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {log} error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    upstream gcs {{ server 127.0.0.1:{gcs_port}; keepalive 16; }}
    upstream chunks {{ server 127.0.0.1:{front_port}; keepalive 16; }}
    map "$request_method $arg_upload_id" $backend {{ default gcs; "~^(PUT|DELETE) ." chunks; }}
    map $upstream_http_location $session {{ default ""; "~[?&]upload_id=(?<id>[^&]+)" $id; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-Proto https;  # fake-gcs-server builds session URLs from it
        proxy_read_timeout 600s;
        proxy_send_timeout 600s;
        location / {{
            proxy_pass http://$backend;
            add_header x-guploader-uploadid $session always;
        }}
    }}
}}
"""


class _Session:
    """One resumable upload, streamed to fake-gcs-server as a single request while its chunks arrive."""

    def __init__(self, client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self.received = 0
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=2)  # backpressure to the client
        self.answer = asyncio.ensure_future(self._send(client, url, headers))

    async def _body(self):
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    async def _send(self, client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> web.Response:
        # no Content-Range: fake-gcs-server takes the whole body as the object and finalizes it
        async with client.put(url, data=self._body(), headers=headers) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                headers={k: v for k, v in resp.headers.items() if k.lower() not in _HOP})


class Collector:
    """Resumable sessions by upload_id."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.sessions: dict[str, _Session] = {}
        self.client: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.client is not None
        uid = request.query.get("upload_id", "")
        if request.method == "DELETE":
            if (gone := self.sessions.pop(uid, None)) is not None:
                gone.answer.cancel()
            async with self.client.delete(self.upstream + request.path_qs) as resp:
                return web.Response(status=resp.status, body=await resp.read())
        found = _RANGE.match(request.headers.get("Content-Range", "").strip())
        body = await request.read()
        if found is None:
            return web.Response(status=400, text="Content-Range must be 'bytes a-b/total' or 'bytes */total'")
        session = self.sessions.get(uid)
        if session is None:
            headers = {name: request.headers[name] for name in _FORWARDED if name in request.headers}
            session = self.sessions[uid] = _Session(self.client, self.upstream + request.path_qs, headers)
        if found.group(1) is not None:
            first, last = int(found.group(1)), int(found.group(2))
            if first > session.received or last - first + 1 != len(body):
                return web.Response(status=400, text=f"chunk {first}-{last} does not follow {session.received} bytes")
            if last >= session.received:  # a resent chunk: only what was not taken yet
                await session.queue.put(body[session.received - first:])
                session.received = last + 1
        total = None if found.group(3) == "*" else int(found.group(3))
        if total is None or session.received < total:
            headers = {"Range": f"bytes=0-{session.received - 1}"} if session.received else {}
            if "X-Guploader-No-308" in request.headers:  # Go's client: 200 that says 308
                return web.Response(status=200, headers={**headers, "X-Http-Status-Code-Override": "308"})
            return web.Response(status=308, headers=headers)
        del self.sessions[uid]
        if session.received > total:
            session.answer.cancel()
            return web.Response(status=400, text=f"{session.received} bytes received for an object of {total}")
        await session.queue.put(None)
        return await session.answer


async def _serve(port: int, upstream: str) -> None:
    collector = Collector(upstream)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as client:
        collector.client = client
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", collector.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), sys.argv[2]))
