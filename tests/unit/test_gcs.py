"""GCS specifics on fake-gcs-server over HTTP: settings, encryption keys, exclusive puts, resumable uploads under faults."""
from __future__ import annotations

import base64
import http.server
import json
import os
import threading
import time

import pytest

from tests.gcsserver import CHUNK, gcs_storage
from tests.s3server import Request
from tests.storage_helpers import chunks, run
from walrus.config import load_settings
from walrus.errors import ConfigError, ObjectExists, ObjectNotFound, StorageError
from walrus.storage import open_storage
from walrus.storage.gcs import (ALIGN, GcsConfig, GcsStorage, buffer_plans, parse_encryption_key,
                                parse_prefix)

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()


def nth(kind: str, n: int):
    """A proxy rule's `when`: the n-th request of that kind (1-based), counted as they arrive."""
    seen = {"count": 0}
    lock = threading.Lock()

    def when(request: Request) -> bool:
        if request.kind != kind:
            return False
        with lock:
            seen["count"] += 1
            return seen["count"] == n

    return when


def is_single_upload(r: Request) -> bool:
    return r.method == "POST" and "uploadType=multipart" in r.path


# -- settings

def test_prefix_parsing_and_normalization():
    assert parse_prefix("gs://bucket/walg/folder/") == ("bucket", "walg/folder/")
    assert parse_prefix("gs://bucket") == ("bucket", "")
    assert parse_prefix("gs://bucket//wal-e/x") == ("bucket", "wal-e/x/")
    # GCS_NORMALIZE_PREFIX=false keeps WAL-E's slashes, less the first one (as WAL-G)
    assert parse_prefix("gs://bucket//wal-e/x", normalize=False) == ("bucket", "/wal-e/x/")
    assert parse_prefix("gs://bucket/a//b", normalize=False) == ("bucket", "a//b/")
    for bad in ("s3://bucket/x", "gs:///x", "bucket/x"):
        with pytest.raises(ConfigError) as caught:
            parse_prefix(bad)
        assert "gs://bucket/path" in caught.value.hint


def test_settings_resolve(tmp_path):
    settings = load_settings(env={"WALG_GS_PREFIX": "gs://b/base", "WALG_STORAGE_PREFIX": "sub",
                                  "STORAGE_EMULATOR_HOST": "127.0.0.1:4443", "HOME": str(tmp_path)})
    config = GcsConfig.from_settings(settings)
    assert (config.bucket, config.root) == ("b", "base/sub/")
    assert config.endpoint == "http://127.0.0.1:4443" and config.emulator
    assert config.chunk_size % ALIGN == 0 and config.encryption_key is None
    assert GcsStorage(config, config.policy()).describe() == "GCS storage gs://b/base/sub (at http://127.0.0.1:4443)"
    verbatim = load_settings(env={"WALG_GS_PREFIX": "gs://b//wal-e", "GCS_NORMALIZE_PREFIX": "false",
                                  "WALG_STORAGE_PREFIX": "sub", "HOME": str(tmp_path)})
    assert GcsConfig.from_settings(verbatim).root == "/wal-e/sub/"
    real = GcsConfig.from_settings(load_settings(env={"WALG_GS_PREFIX": "gs://b", "HOME": str(tmp_path)}))
    assert real.endpoint == "https://storage.googleapis.com" and not real.emulator and real.root == ""


def test_settings_refused(tmp_path):
    base = {"WALG_GS_PREFIX": "gs://b/p", "HOME": str(tmp_path)}
    with pytest.raises(ConfigError) as caught:
        GcsConfig.from_settings(load_settings(env={**base, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "no")}))
    assert "not a file" in caught.value.message
    with pytest.raises(ConfigError):
        GcsConfig.from_settings(load_settings(env={**base, "GCS_MAX_RETRIES": "-1"}))


def test_chunks_are_aligned_and_within_the_budget(tmp_path):
    def plan(**env):
        return buffer_plans(load_settings(env={"WALG_GS_PREFIX": "gs://b", "HOME": str(tmp_path), **env}))

    (chunk, buffers), (range_size, ranges) = plan()
    # half the 32 MiB default budget, one lane: a chunk filling and one in flight
    assert chunk % ALIGN == 0 and chunk * buffers <= 16 << 20 and buffers == 2
    assert range_size * ranges <= 16 << 20
    (chunk, _), _ = plan(GCS_MAX_CHUNK_SIZE=str(ALIGN * 3 + 1000))  # rounded down to 256 KiB
    assert chunk == ALIGN * 3
    (chunk, _), (range_size, _) = plan(GCS_MAX_CHUNK_SIZE="1000")  # never below GCS's unit
    assert chunk == ALIGN and range_size == ALIGN
    (chunk, buffers), _ = plan(WALG_UPLOAD_DISK_CONCURRENCY="4", WALRUS_MEMORY_BUDGET="64MiB")
    assert buffers == 5 and chunk == 25 * ALIGN  # four filling, one in flight: 32 MiB / 5, down to 256 KiB


def test_encryption_key_is_checked_at_open(tmp_path):
    assert parse_encryption_key(KEY_A) == bytes(range(32))
    for bad, why in (("not base64!", "not valid base64"), (base64.b64encode(b"x" * 16).decode(), "16 bytes")):
        with pytest.raises(ConfigError) as caught:
            open_storage(load_settings(env={"WALG_GS_PREFIX": "gs://b", "GCS_ENCRYPTION_KEY": bad,
                                            "STORAGE_EMULATOR_HOST": "127.0.0.1:1", "HOME": str(tmp_path)}))
        assert why in caught.value.detail and "base64" in caught.value.hint


def test_objects_written_with_a_key_need_it_to_be_read(gcs_server, gcs_bucket, tmp_path):
    """Customer-supplied keys go with every write and read. fake-gcs-server ignores them; the test
    front refuses a read without the object's key, as GCS does (see tests/gcsserver.py)."""
    data = os.urandom(3 * CHUNK + 5)  # a resumable upload: every request of the session carries the key
    keyed = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path, GCS_ENCRYPTION_KEY=KEY_A)
    run(keyed, keyed.put("enc/big", chunks(data)))
    keyed = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path, GCS_ENCRYPTION_KEY=KEY_A)
    run(keyed, keyed.put_bytes("enc/small", b"secret"))
    keyed = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path, GCS_ENCRYPTION_KEY=KEY_A)
    assert run(keyed, keyed.get_bytes("enc/big")) == data
    for env in ({}, {"GCS_ENCRYPTION_KEY": KEY_B}):
        for key in ("enc/big", "enc/small"):
            other = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path, **env)
            with pytest.raises(StorageError) as caught:
                run(other, other.get_bytes(key))
            assert not isinstance(caught.value, ObjectNotFound)
            assert "GCS_ENCRYPTION_KEY" in caught.value.hint
    plain = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path)
    run(plain, plain.put_bytes("plain", b"x"))
    keyed = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path, GCS_ENCRYPTION_KEY=KEY_A)
    with pytest.raises(StorageError):  # and a key does not read an object written without one
        run(keyed, keyed.get_bytes("plain"))


def test_keys_with_prefix_and_prefix_layout(gcs_server, gcs_bucket, tmp_path):
    storage = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path)
    for name in ("wal_005/A.lz4", "wal_005/A.br", "wal_005/AB.lz4", "wal_005/B.lz4"):
        run(storage, storage.put_bytes(name, b"x"))
        storage = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path)
    assert run(storage, storage.keys_with_prefix("wal_005/A.")) == {"wal_005/A.lz4", "wal_005/A.br"}
    verbatim = open_storage(load_settings(env={"WALG_GS_PREFIX": f"gs://{gcs_bucket}//wal-e/x",
                                               "GCS_NORMALIZE_PREFIX": "false", "HOME": str(tmp_path),
                                               "STORAGE_EMULATOR_HOST": gcs_server.endpoint}))

    async def both():
        await verbatim.put_bytes("wal_005/C.lz4", b"c")
        return [o.key async for o in verbatim.list("wal_005")]

    assert run(verbatim, both()) == ["wal_005/C.lz4"]
    assert "/wal-e/x/wal_005/C.lz4" in gcs_server.keys(gcs_bucket)


def test_missing_bucket_is_not_an_absent_object(gcs_server, tmp_path):
    for call in (lambda s: s.get("wal_005/x"), lambda s: s.stat("wal_005/x"), lambda s: s.put_bytes("k", b"1"),
                 lambda s: s.keys_with_prefix("wal_005/x")):
        storage = gcs_storage(gcs_server.endpoint, "walrus-no-such-bucket", tmp_path)
        with pytest.raises(StorageError) as caught:
            run(storage, call(storage))
        assert not isinstance(caught.value, ObjectNotFound)
        assert "does not exist" in caught.value.message and "WALG_GS_PREFIX" in caught.value.hint


def test_a_replaced_object_fails_the_read_instead_of_mixing(gcs_server, gcs_bucket, tmp_path):
    data = os.urandom(4 * CHUNK)
    storage = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path, WALG_DOWNLOAD_CONCURRENCY="1")

    async def read_while_replaced():
        await storage.put("k", chunks(data))
        stream = await storage.get("k")
        first = await anext(stream)
        await storage.put_bytes("k", b"another version")
        return first + b"".join([c async for c in stream])

    with pytest.raises(StorageError) as caught:
        run(storage, read_while_replaced())
    assert "replaced or deleted" in caught.value.message


# -- exclusive puts and lost answers

def test_exclusive_put_whose_answer_was_lost_is_ours(gcs_server, gcs_bucket, gcs_fault_proxy, tmp_path):
    """The upload succeeded, its answer never came: the retry meets 412, and the object's MD5 is ours."""
    gcs_fault_proxy.fail("lose", 1, is_single_upload)
    storage = gcs_storage(gcs_fault_proxy.endpoint, gcs_bucket, tmp_path)
    assert run(storage, storage.put_bytes("wal_005/x.lz4", b"first", exclusive=True)) == 5
    assert [a for a, _ in gcs_fault_proxy.applied] == ["lose"]
    assert sum(is_single_upload(r) for r in gcs_fault_proxy.log) == 2  # the retry met the object
    assert gcs_server.read(gcs_bucket, "walrus/wal_005/x.lz4") == b"first"
    storage = gcs_storage(gcs_fault_proxy.endpoint, gcs_bucket, tmp_path)
    with pytest.raises(ObjectExists):  # other bytes are another writer's
        run(storage, storage.put_bytes("wal_005/x.lz4", b"second", exclusive=True))
    assert gcs_server.read(gcs_bucket, "walrus/wal_005/x.lz4") == b"first"


@pytest.mark.parametrize("exclusive", [False, True], ids=["plain", "exclusive"])
def test_resumable_upload_whose_final_answer_was_lost(gcs_server, gcs_bucket, gcs_fault_proxy, tmp_path,
                                                      exclusive):
    """The last chunk made the object, its answer never came: asking the session says it is done."""
    data = os.urandom(3 * CHUNK + 100)
    gcs_fault_proxy.fail("lose", 1, nth("part", 4))
    storage = gcs_storage(gcs_fault_proxy.endpoint, gcs_bucket, tmp_path)
    assert run(storage, storage.put("big", chunks(data), exclusive=exclusive)) == len(data)
    assert [a for a, _ in gcs_fault_proxy.applied] == ["lose"]
    assert gcs_server.read(gcs_bucket, "walrus/big") == data
    assert gcs_server.pending_uploads(gcs_bucket) == []


@pytest.mark.parametrize("action", ["drop", "drop-body", "lose", "503"])
def test_resumable_upload_resumes_after_a_broken_chunk(gcs_server, gcs_bucket, gcs_fault_proxy, tmp_path, action):
    """A chunk whose request broke (before, during or after GCS took it) is resumed from the offset
    the session reports: the object is the stream's bytes, none twice, none missing."""
    data = os.urandom(5 * CHUNK + 12345)
    gcs_fault_proxy.fail(action, 1, nth("part", 2))
    storage = gcs_storage(gcs_fault_proxy.endpoint, gcs_bucket, tmp_path)
    assert run(storage, storage.put("big", chunks(data))) == len(data)
    assert [a for a, _ in gcs_fault_proxy.applied] == [action]
    assert gcs_server.read(gcs_bucket, "walrus/big") == data
    # six chunks and a status query; and the broken chunk again where GCS never got it
    assert gcs_fault_proxy.count("part") == (7 if action in ("lose", "drop-body") else 8)


def test_chunk_persisted_in_part_is_completed(gcs_server, gcs_bucket, tmp_path):
    """GCS may keep less of a chunk than it was sent (its 308 says how much): the rest is sent again."""
    data = os.urandom(4 * ALIGN * 2 + 777)
    gcs_server.front.short_chunks = 2
    try:
        storage = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path, GCS_MAX_CHUNK_SIZE=str(2 * ALIGN))
        assert run(storage, storage.put("short", chunks(data))) == len(data)
        assert gcs_server.front.short_chunks == 0
    finally:
        gcs_server.front.short_chunks = 0
    assert gcs_server.read(gcs_bucket, "walrus/short") == data


# -- retries, stalls, refusals

def test_5xx_is_retried(gcs_server, gcs_bucket, gcs_fault_proxy, tmp_path, log_lines):
    data = os.urandom(2 * CHUNK + 1)
    gcs_fault_proxy.fail("503", 2, is_single_upload)
    gcs_fault_proxy.fail("500", 1, lambda r: r.kind == "part")
    gcs_fault_proxy.fail("503", 1, lambda r: r.kind == "get")
    storage = gcs_storage(gcs_fault_proxy.endpoint, gcs_bucket, tmp_path)

    async def work():
        await storage.put_bytes("small", b"x" * 100)
        await storage.put("big", chunks(data))
        return await storage.get_bytes("big")

    assert run(storage, work()) == data
    assert sorted(a for a, _ in gcs_fault_proxy.applied) == ["500", "503", "503", "503"]
    assert sum("retrying" in line and "GCS error 503" in line for line in log_lines) >= 3


@pytest.mark.parametrize("kind", ["get", "part"])
def test_a_stalled_request_is_abandoned_and_retried(gcs_server, gcs_bucket, gcs_fault_proxy, tmp_path, kind):
    data = os.urandom(3 * CHUNK + 10)
    storage = gcs_storage(gcs_server.endpoint, gcs_bucket, tmp_path)
    run(storage, storage.put("big", chunks(data)))
    gcs_fault_proxy.stall_seconds = 20
    gcs_fault_proxy.fail("stall", 1, lambda r: r.kind == kind)
    storage = gcs_storage(gcs_fault_proxy.endpoint, gcs_bucket, tmp_path, timeout=1)
    began = time.monotonic()
    if kind == "get":
        assert run(storage, storage.get_bytes("big")) == data
    else:
        assert run(storage, storage.put("big", chunks(data[::-1]))) == len(data)
        assert gcs_server.read(gcs_bucket, "walrus/big") == data[::-1]
    assert [a for a, _ in gcs_fault_proxy.applied] == ["stall"]
    assert time.monotonic() - began < 10  # the watchdog's second, not the stall's twenty


def test_context_timeout_bounds_a_whole_upload(gcs_server, gcs_bucket, gcs_fault_proxy, tmp_path):
    gcs_fault_proxy.stall_seconds = 20
    gcs_fault_proxy.fail("stall", 100, lambda r: r.kind == "part")
    storage = gcs_storage(gcs_fault_proxy.endpoint, gcs_bucket, tmp_path, GCS_CONTEXT_TIMEOUT="2")
    began = time.monotonic()
    with pytest.raises(StorageError) as caught:
        run(storage, storage.put("big", chunks(os.urandom(3 * CHUNK))))
    assert time.monotonic() - began < 10
    assert "GCS_CONTEXT_TIMEOUT" in caught.value.detail and "GCS_CONTEXT_TIMEOUT" in caught.value.hint
    assert gcs_server.keys(gcs_bucket) == []


class _Refusing(http.server.ThreadingHTTPServer):
    """Answers every request with `status` and a GCS JSON error, counting the requests."""

    def __init__(self, status: int):
        self.status, self.requests = status, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                return

            def do_GET(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests += 1
                body = json.dumps({"error": {"code": server.status, "message": "Caller does not have "
                                             "storage.objects.get access to the Google Cloud Storage object."}})
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            do_POST = do_PUT = do_DELETE = do_GET

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.mark.parametrize("status", [401, 403])
def test_access_denied_is_not_retried_and_names_the_credentials(tmp_path, status):
    server = _Refusing(status)
    try:
        for call in (lambda s: s.get("k"), lambda s: s.stat("k"), lambda s: s.put_bytes("k", b"1"),
                     lambda s: s.keys_with_prefix("k"), lambda s: s.delete(["k"])):
            storage = gcs_storage(server.endpoint, "bucket", tmp_path)
            before = server.requests
            with pytest.raises(StorageError) as caught:
                run(storage, call(storage))
            assert not isinstance(caught.value, ObjectNotFound)
            assert "access denied" in caught.value.message and "GOOGLE_APPLICATION_CREDENTIALS" in caught.value.hint
            assert server.requests - before == 1
    finally:
        server.shutdown()
        server.server_close()


def test_service_account_token_is_sent(tmp_path):
    """Without an emulator, every request carries an OAuth token that gcloud-aio-auth got for the
    service account's key (here from a local token endpoint named in the key file)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            return

        def _send(self, body: dict):
            payload = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self):  # the token endpoint
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send({"access_token": "token-for-walrus", "expires_in": 3600, "token_type": "Bearer"})

        def do_GET(self):  # a listing
            seen.append(self.headers.get("Authorization") or "")
            self._send({"items": [{"name": "p/wal_005/A.lz4", "size": "1", "updated": "2024-01-02T03:04:05.123Z"}]})

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
        key_file = tmp_path / "sa.json"
        key_file.write_text(json.dumps({"type": "service_account", "client_email": "walrus@test.iam.gserviceaccount.com",
                                        "private_key": pem, "private_key_id": "k1", "token_uri": f"{url}/token",
                                        "project_id": "test"}))
        config = GcsConfig(bucket="b", root="p/", endpoint=url, credentials=str(key_file))
        storage = GcsStorage(config, config.policy())

        async def listed():
            return [o.key async for o in storage.list("wal_005")]

        assert run(storage, listed()) == ["wal_005/A.lz4"]
        assert seen == ["Bearer token-for-walrus"]
    finally:
        server.shutdown()
        server.server_close()
