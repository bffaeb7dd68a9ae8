"""S3 under failure: a proxy in front of moto fails, drops and stalls requests; walrus retries or fails cleanly."""
from __future__ import annotations

import asyncio
import http.client
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import lz4.frame
import pytest

from tests.s3server import SECRET_KEY, FaultProxy, Request, s3_settings, s3_storage
from tests.storage_helpers import chunks, pulled_while_held, run
from walrus.config import load_settings
from walrus.errors import ObjectNotFound, StorageError
from walrus.storage import open_storage
from walrus.storage.retry import RetryingStorage, RetryPolicy, TransientError

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
PART = 256 << 10
SEGMENT = "000000010000000000000007"
KEY = f"walrus/wal_005/{SEGMENT}.lz4"


def is_part(r: Request) -> bool:
    return r.is_part


def is_get(r: Request) -> bool:
    return r.is_get


def is_listing(r: Request) -> bool:
    return r.method == "GET" and "list-type=2" in r.path


def is_complete(r: Request) -> bool:
    return r.method == "POST" and "uploadId=" in r.path


# -- the proxy itself

def _through(proxy: FaultProxy, method: str, path: str) -> bytes | None:
    """One plain HTTP request through the proxy: the body, or None when it was cut short."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.server.server_address[1], timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        assert response.status == 200
        try:
            return response.read()
        except http.client.IncompleteRead:
            return None
    finally:
        conn.close()


def test_a_fault_that_cannot_take_effect_stays_armed(moto_server, s3_bucket, fault_proxy):
    """A body cut short is no fault on an answer with no body (HEAD): not recorded, and left for the next request."""
    moto_server.client.put_object(Bucket=s3_bucket, Key="obj", Body=b"0123456789", ACL="public-read")
    path = f"/{s3_bucket}/obj"  # public: read without signing
    fault_proxy.fail("drop-body", 1)
    assert _through(fault_proxy, "HEAD", path) == b"" and fault_proxy.applied == []
    assert _through(fault_proxy, "GET", path) is None
    assert _through(fault_proxy, "GET", path) == b"0123456789"  # the rule's one fault is spent
    assert [(a, r.method) for a, r in fault_proxy.applied] == [("drop-body", "GET")]

    fault_proxy.applied.clear()
    fault_proxy.fail_every(2, ("drop-body",), limit=1)
    assert _through(fault_proxy, "HEAD", path) == b""
    assert _through(fault_proxy, "HEAD", path) == b""  # the second request's slot, passed on
    assert _through(fault_proxy, "GET", path) is None
    assert _through(fault_proxy, "GET", path) == b"0123456789"  # limit reached
    assert [(a, r.method) for a, r in fault_proxy.applied] == [("drop-body", "GET")]


# -- the library, through the proxy

def test_transient_failures_are_retried(moto_server, s3_bucket, fault_proxy, tmp_path):
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path)
    fault_proxy.fail("503", 2, is_part)
    fault_proxy.fail("500", 1, is_part)
    fault_proxy.fail("drop", 1, lambda r: r.method == "POST" and r.path.endswith("?uploads"))
    fault_proxy.fail("drop-body", 1, is_get)  # the head range breaks mid-body: resumed where it broke
    data = os.urandom(5 * PART + 7)
    assert run(storage, storage.put("obj", chunks(data))) == len(data)
    assert run(storage, storage.get_bytes("obj")) == data
    assert len(fault_proxy.applied) == 5
    assert moto_server.pending_uploads(s3_bucket) == []


def test_a_failed_part_is_retried_alone(moto_server, s3_bucket, fault_proxy, tmp_path):
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path)
    fault_proxy.fail("503", 3, lambda r: r.is_part and "partNumber=3&" in r.path + "&")
    data = os.urandom(4 * PART + 1)
    run(storage, storage.put("obj", chunks(data)))
    parts = [r.path for r in fault_proxy.log if r.is_part]
    assert len(parts) == 5 + 3  # five parts, the third sent four times
    assert moto_server.read(s3_bucket, "walrus/obj") == data


def test_exhausted_retries_fail_and_abort(moto_server, s3_bucket, fault_proxy, tmp_path):
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path, WALG_S3_MAX_RETRIES="2")
    fault_proxy.fail("503", 10**6, is_part)
    with pytest.raises(StorageError) as caught:
        run(storage, storage.put("obj", chunks(os.urandom(3 * PART))))
    assert "after 3 attempts" in caught.value.message and "SlowDown" in caught.value.detail
    assert not isinstance(caught.value, TransientError)
    assert moto_server.keys(s3_bucket) == []
    assert moto_server.pending_uploads(s3_bucket) == []
    assert any(r.method == "DELETE" and "uploadId=" in r.path for r in fault_proxy.log)


def test_a_lost_complete_response_is_recognised(moto_server, s3_bucket, fault_proxy, tmp_path):
    """S3 completed the upload but the answer was lost: the retry meets NoSuchUpload, and the
    object's multipart ETag shows it is ours."""
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path)
    fault_proxy.fail("drop-body", 1, is_complete)
    data = os.urandom(3 * PART)
    run(storage, storage.put("obj", chunks(data)))
    assert sum(1 for r in fault_proxy.log if is_complete(r)) == 2
    assert moto_server.read(s3_bucket, "walrus/obj") == data


def test_a_lost_create_response_leaves_no_upload_behind(moto_server, s3_bucket, fault_proxy, tmp_path):
    """S3 created a multipart upload but the answer was lost: the retry creates another, and the first,
    which nobody would ever complete or abort, is aborted (it would keep its parts stored forever)."""
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path)
    fault_proxy.fail("drop-body", 1, lambda r: r.method == "POST" and r.path.endswith("?uploads"))
    data = os.urandom(3 * PART)
    run(storage, storage.put("obj", chunks(data)))
    assert [a for a, _ in fault_proxy.applied] == ["drop-body"]
    assert moto_server.read(s3_bucket, "walrus/obj") == data
    assert moto_server.pending_uploads(s3_bucket) == []


def test_a_lost_create_then_exhausted_retries_leave_no_upload_behind(moto_server, s3_bucket, fault_proxy, tmp_path):
    """The first CreateMultipartUpload succeeded unseen and every later try failed: the upload fails,
    and the one the lost try created is still found and aborted."""
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path, WALG_S3_MAX_RETRIES="1")
    is_create = lambda r: r.method == "POST" and r.path.endswith("?uploads")  # noqa: E731
    fault_proxy.fail("lose", 1, is_create)
    fault_proxy.fail("503", 1, is_create)
    with pytest.raises(StorageError) as caught:
        run(storage, storage.put("obj", chunks(os.urandom(3 * PART))))
    assert "after 2 attempts" in caught.value.message
    assert [a for a, _ in fault_proxy.applied] == ["lose", "503"]
    assert moto_server.pending_uploads(s3_bucket) == []
    assert moto_server.keys(s3_bucket) == []


def test_a_stalled_request_is_abandoned_and_retried(moto_server, s3_bucket, fault_proxy, tmp_path):
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path, WALRUS_S3_TIMEOUT="1")
    fault_proxy.fail("stall", 1, is_part)
    fault_proxy.fail("stall", 1, is_get)
    data = os.urandom(2 * PART + 5)
    began = time.monotonic()
    run(storage, storage.put("obj", chunks(data)))
    assert run(storage, storage.get_bytes("obj")) == data
    assert time.monotonic() - began < 15
    assert [a for a, _ in fault_proxy.applied] == ["stall", "stall"]


def test_a_stalled_endpoint_ends_in_a_clear_error(s3_bucket, fault_proxy, tmp_path):
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path, WALRUS_S3_TIMEOUT="1",
                          WALG_S3_MAX_RETRIES="1")
    fault_proxy.fail("stall", 10**6)
    for call in (lambda: storage.get("obj"), lambda: storage.put_bytes("obj", b"x")):
        began = time.monotonic()
        with pytest.raises(StorageError) as caught:
            run(storage, call())
        assert time.monotonic() - began < 10
        assert "after 2 attempts" in caught.value.message and "no progress for 1 s" in caught.value.detail


def test_an_unreachable_endpoint_says_so(s3_bucket, tmp_path):
    from tests.pgcluster import free_port

    storage = s3_storage(f"http://127.0.0.1:{free_port()}", s3_bucket, tmp_path, WALG_S3_MAX_RETRIES="1")
    with pytest.raises(StorageError) as caught:
        run(storage, storage.get("obj"))
    assert "AWS_ENDPOINT" in caught.value.hint


def test_a_missing_bucket_is_a_clear_error(moto_server, tmp_path):
    storage = s3_storage(moto_server.endpoint, "no-such-bucket-here", tmp_path)
    for call in (lambda: storage.get("wal_005/x.lz4"), lambda: storage.put_bytes("x", b"1"),
                 lambda: storage.list("wal_005").__anext__()):
        with pytest.raises(StorageError) as caught:
            run(storage, call())
        assert not isinstance(caught.value, ObjectNotFound)
        assert "'no-such-bucket-here' does not exist" in caught.value.message
        assert "WALG_S3_PREFIX" in caught.value.hint


def test_deletes_go_in_batches_of_1000(s3_bucket, fault_proxy, tmp_path):
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path)
    run(storage, storage.delete(f"wal_005/{i:024X}" for i in range(2500)))
    assert sum(1 for r in fault_proxy.log if r.method == "POST" and "delete" in r.path) == 3


def test_upload_memory_is_bounded_by_parts_in_flight(moto_server, s3_bucket, tmp_path):
    """With the first parts held by the endpoint, the upload stops pulling from its source after
    WALG_UPLOAD_CONCURRENCY parts in flight plus the one being filled."""
    proxy = FaultProxy(moto_server.port, stall_seconds=1.5)
    try:
        storage = s3_storage(proxy.endpoint, s3_bucket, tmp_path, WALG_UPLOAD_CONCURRENCY="2")
        proxy.fail("stall", 2, is_part)
        assert pulled_while_held(storage) <= 3 * PART + (16 << 10)  # of ten parts, in pieces of 16 KiB
        assert proxy.peak["part"] <= 2
    finally:
        proxy.stop()


def test_downloads_fetch_ranges_in_parallel_within_the_limit(moto_server, s3_bucket, tmp_path):
    data = os.urandom(12 * PART + 3)
    moto_server.client.put_object(Bucket=s3_bucket, Key="walrus/obj", Body=data)
    proxy = FaultProxy(moto_server.port, latency=0.1)
    try:
        storage = s3_storage(proxy.endpoint, s3_bucket, tmp_path, WALG_DOWNLOAD_CONCURRENCY="3")
        assert run(storage, storage.get_bytes("obj")) == data
        assert proxy.count("get") == 13  # one GET per range
        assert proxy.peak["get"] == 3  # ranges overlap, but never more than the limit
    finally:
        proxy.stop()


@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_an_object_changed_mid_download_is_not_spliced(moto_server, s3_bucket, tmp_path, change):
    moto_server.client.put_object(Bucket=s3_bucket, Key="walrus/obj", Body=os.urandom(4 * PART))
    storage = s3_storage(moto_server.endpoint, s3_bucket, tmp_path, WALG_DOWNLOAD_CONCURRENCY="1")

    async def read_across_a_change():
        stream = await storage.get("obj")
        await anext(stream)
        if change == "replaced":
            moto_server.client.put_object(Bucket=s3_bucket, Key="walrus/obj", Body=os.urandom(4 * PART))
        else:
            moto_server.client.delete_object(Bucket=s3_bucket, Key="walrus/obj")
        return [c async for c in stream]

    with pytest.raises(StorageError) as caught:
        run(storage, read_across_a_change())
    # not ObjectNotFound: past the first byte, a vanished object is a failure, never "not archived"
    assert not isinstance(caught.value, ObjectNotFound)
    if change == "replaced":
        assert "changed while it was being read" in caught.value.message


# -- settings

def test_prefix_and_settings_resolve(tmp_path):
    from walrus.storage.s3 import S3Config

    env = {"HOME": str(tmp_path), "WALG_S3_PREFIX": "s3://bucket/some/path/", "WALG_STORAGE_PREFIX": "/sub/",
           "AWS_ENDPOINT": "minio.example:9000", "S3_MAX_PART_SIZE": "8MiB", "AWS_SECRET_KEY": "s3cr3t",
           "AWS_ACCESS_KEY": "id", "S3_STORAGE_CLASS": "GLACIER_IR"}
    config = S3Config.from_settings(load_settings(env=env))
    assert (config.bucket, config.root) == ("bucket", "some/path/sub")
    assert config.endpoint == "https://minio.example:9000"
    assert config.part_size == 8 << 20 and config.storage_class == "GLACIER_IR"
    assert (config.access_key, config.secret_key) == ("id", "s3cr3t")
    assert "s3cr3t" not in repr(config)


@pytest.mark.parametrize("prefix", ["bucket/path", "s3:///path", "gs://bucket/path"])
def test_malformed_prefix_is_refused(tmp_path, prefix):
    from walrus.errors import ConfigError

    with pytest.raises(ConfigError, match="not an S3 URL"):
        open_storage(load_settings(env={"HOME": str(tmp_path), "WALG_S3_PREFIX": prefix}))


def test_retrying_storage_wraps_any_backend(tmp_path):
    """The wrapper retries whole calls on transient errors only, and a give-up is final."""
    from walrus.storage.fs import FsStorage

    class Flaky(FsStorage):
        failures = 2
        calls = 0

        async def stat(self, key):
            Flaky.calls += 1
            if Flaky.failures:
                Flaky.failures -= 1
                raise ConnectionResetError("reset by peer")
            return await super().stat(key)

    storage = RetryingStorage(Flaky(str(tmp_path)), RetryPolicy(attempts=3, base_delay=0.01))
    run(storage, storage.put_bytes("k", b"v"))
    assert run(storage, storage.stat("k")).size == 1 and Flaky.calls == 3
    Flaky.failures, Flaky.calls = 5, 0
    with pytest.raises(StorageError, match="after 3 attempts"):
        run(storage, storage.stat("k"))
    assert Flaky.calls == 3
    with pytest.raises(ObjectNotFound):  # not transient: no retry
        run(storage, storage.get("absent"))


# -- the command line: every wal-push succeeds whole or fails leaving nothing, within its time

def cli(args: list[str], settings: dict[str, str], home, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_"))}
    env.update(settings, HOME=str(home), AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(home / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-creds"))
    began = time.monotonic()
    proc = subprocess.run([WALRUS, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - began


@pytest.fixture
def segment(tmp_path):
    path = tmp_path / "pg_wal" / SEGMENT
    path.parent.mkdir()
    path.write_bytes(os.urandom(1_200_000) + bytes(800_000))
    return path


SCENARIOS = [  # (name, faults, settings, expected outcome: "ok" or "fail")
    ("5xx on parts", lambda p: (p.fail("503", 3, is_part), p.fail("500", 1, is_part)), {}, "ok"),
    ("dropped connections", lambda p: p.fail("drop", 3), {}, "ok"),
    ("probe listings cut", lambda p: p.fail("drop-body", 3, is_listing), {}, "ok"),
    ("a part stalls", lambda p: p.fail("stall", 1, is_part), {"WALRUS_S3_TIMEOUT": "1"}, "ok"),
    ("complete answer lost", lambda p: p.fail("drop-body", 1, is_complete), {}, "ok"),
    # each request has 5 tries (WALG_S3_MAX_RETRIES=4); a request alone fails no two tries in a row,
    # since only every third request fails: exhausting its tries would take other requests in
    # flight to fill exactly the two places between each of its tries, four times over
    ("every third request", lambda p: p.fail_every(3, ("500", "503", "drop", "drop-body"), 12), {}, "ok"),
    ("parts always fail", lambda p: p.fail("503", 10**6, is_part), {"WALG_S3_MAX_RETRIES": "2"}, "fail"),
    ("complete always fails", lambda p: p.fail("500", 10**6, is_complete), {"WALG_S3_MAX_RETRIES": "1"}, "fail"),
    ("endpoint stalls", lambda p: p.fail("stall", 10**6), {"WALRUS_S3_TIMEOUT": "1", "WALG_S3_MAX_RETRIES": "1"},
     "fail"),
]


@pytest.mark.parametrize("name,faults,extra,expected", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_wal_push_is_whole_or_nothing(moto_server, s3_bucket, fault_proxy, tmp_path, segment,
                                      name, faults, extra, expected):
    faults(fault_proxy)
    settings = s3_settings(fault_proxy.endpoint, s3_bucket, **extra)
    proc, seconds = cli(["wal-push", str(segment)], settings, tmp_path)
    assert proc.returncode in (0, 1), proc.stderr
    if proc.returncode == 0:
        assert lz4.frame.decompress(moto_server.read(s3_bucket, KEY)) == segment.read_bytes()
    else:
        assert "ERROR:" in proc.stderr and "ERROR: internal error" not in proc.stderr, proc.stderr
        assert moto_server.keys(s3_bucket) == []
    assert moto_server.pending_uploads(s3_bucket) == []
    assert fault_proxy.applied, "the scenario injected no fault"  # faults that took effect, only
    assert seconds < 30
    assert proc.returncode == (0 if expected == "ok" else 1), proc.stderr


def test_wal_push_and_fetch_over_s3(moto_server, s3_bucket, tmp_path, segment):
    segment.write_bytes(os.urandom(600_000) + bytes((1 << 20) - 600_000))  # whole: wal-fetch checks the size
    settings = s3_settings(moto_server.endpoint, s3_bucket, WALG_PG_WAL_SIZE="1")
    proc, _ = cli(["wal-push", str(segment)], settings, tmp_path)
    assert proc.returncode == 0, proc.stderr
    again, _ = cli(["wal-push", str(segment)], settings, tmp_path)
    assert again.returncode == 0 and "already archived" in again.stderr
    dest = tmp_path / "RECOVERYXLOG"
    fetched, _ = cli(["wal-fetch", SEGMENT, str(dest)], settings, tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    assert dest.read_bytes() == segment.read_bytes()
    missing, _ = cli(["wal-fetch", "000000010000000000000099", str(dest)], settings, tmp_path)
    assert missing.returncode == 74
    no_bucket, _ = cli(["wal-fetch", SEGMENT, str(dest)], {**settings, "WALG_S3_PREFIX": "s3://absent-bucket/x"},
                       tmp_path)
    assert no_bucket.returncode == 1 and "does not exist" in no_bucket.stderr


def test_errors_never_print_secrets(s3_bucket, tmp_path, segment):
    from tests.pgcluster import free_port

    settings = s3_settings(f"http://127.0.0.1:{free_port()}", s3_bucket, WALG_S3_MAX_RETRIES="0",
                           AWS_SESSION_TOKEN="token-that-must-not-leak")
    proc, _ = cli(["wal-push", str(segment)], settings, tmp_path)
    assert proc.returncode == 1 and "AWS_ENDPOINT" in proc.stderr
    for secret in (SECRET_KEY, settings["AWS_ACCESS_KEY_ID"], "token-that-must-not-leak"):
        assert secret not in proc.stderr


def test_no_credentials_is_a_clear_error(s3_bucket, moto_server, tmp_path, segment):
    settings = s3_settings(moto_server.endpoint, s3_bucket)
    del settings["AWS_ACCESS_KEY_ID"], settings["AWS_SECRET_ACCESS_KEY"]
    proc, seconds = cli(["wal-push", str(segment)], settings, tmp_path)
    assert proc.returncode == 1 and "no usable S3 credentials" in proc.stderr
    assert "AWS_ACCESS_KEY_ID" in proc.stderr and seconds < 20


def test_invalid_sse_settings_are_refused(s3_bucket, moto_server, tmp_path, segment):
    settings = s3_settings(moto_server.endpoint, s3_bucket, WALG_S3_SSE="aws:kms")
    proc, _ = cli(["wal-push", str(segment)], settings, tmp_path)
    assert proc.returncode == 1 and "WALG_S3_SSE_KMS_ID" in proc.stderr


def test_sse_and_storage_class_reach_s3(moto_server, s3_bucket, tmp_path):
    storage = s3_storage(moto_server.endpoint, s3_bucket, tmp_path, WALG_S3_SSE="AES256",
                          WALG_S3_STORAGE_CLASS="STANDARD_IA")
    run(storage, storage.put("small", chunks(b"x" * 10)))
    run(storage, storage.put("large", chunks(os.urandom(2 * PART + 1))))
    for key in ("walrus/small", "walrus/large"):
        head = moto_server.client.head_object(Bucket=s3_bucket, Key=key)
        assert head["ServerSideEncryption"] == "AES256" and head["StorageClass"] == "STANDARD_IA"


def test_file_storage_never_imports_the_s3_stack(tmp_path, segment):
    code = ("import sys\nfrom walrus.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint(' '.join(sorted(sys.modules)))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "AWS_"))}
    env.update(HOME=str(tmp_path), WALG_FILE_PREFIX=str(tmp_path / "store"))
    proc = subprocess.run([sys.executable, "-c", code, "wal-push", str(segment)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    assert "walrus.storage.fs" in loaded
    assert not loaded & {"walrus.storage.s3", "walrus.storage.retry", "aiobotocore", "botocore", "aiohttp"}


def test_a_request_the_endpoint_does_not_implement_fails_at_once(moto_server, s3_bucket, tmp_path):
    """501 outside a conditional write is no transient trouble: one request, no retries, and an
    error that says the endpoint lacks it (delete then goes by folders alone, tests/unit/test_delete.py)."""
    proxy = FaultProxy(moto_server.port)
    proxy.fail("501", count=100, when=lambda r: "uploads" in r.path and r.method == "GET")
    try:
        storage = open_storage(load_settings({**s3_settings(proxy.endpoint, s3_bucket), "HOME": str(tmp_path)}))
        with pytest.raises(StorageError) as failure:
            asyncio.run(_closing(storage, storage.abandoned_uploads("basebackups_005", datetime.now(timezone.utc))))
        assert not isinstance(failure.value, TransientError)
        assert "does not implement" in failure.value.message and "NotImplemented" in failure.value.detail
        assert sum("uploads" in r.path for r in proxy.log) == 1
    finally:
        proxy.stop()


async def _closing(storage, coro):
    try:
        return await coro
    finally:
        await storage.close()
