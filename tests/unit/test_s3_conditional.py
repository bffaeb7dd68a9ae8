"""S3's conditional writes for exclusive puts: honoured, answered 501, ignored; and a lost answer."""
from __future__ import annotations

import logging
import os

import pytest

from tests.s3server import FaultProxy, Request, s3_storage
from tests.storage_helpers import chunks, run
from walrus.errors import ObjectExists

PART = 256 << 10  # s3_settings' part size: 3 * PART is a multipart upload


def conditional_writes(proxy: FaultProxy) -> list[str]:
    return [r.method for r in proxy.log if r.method in ("PUT", "POST") and "partNumber" not in r.path]


@pytest.mark.parametrize("size", [1000, 3 * PART], ids=["single", "multipart"])
def test_an_endpoint_without_conditional_writes_gets_check_and_verify(moto_server, s3_bucket, tmp_path, caplog,
                                                                      size):
    """501 to If-None-Match: the put is sent again without it, after a check that the key is free;
    the second exclusive put is refused by that check, and the object keeps the first bytes."""
    proxy = FaultProxy(moto_server.port, conditional="refuse")
    try:
        storage = s3_storage(proxy.endpoint, s3_bucket, tmp_path)
        first, second = os.urandom(size), os.urandom(size)

        async def both():
            await storage.put("wal_005/x", chunks(first), exclusive=True)
            with pytest.raises(ObjectExists):
                await storage.put("wal_005/x", chunks(second), exclusive=True)

        with caplog.at_level(logging.WARNING, logger="walrus"):
            run(storage, both())
        assert moto_server.read(s3_bucket, "walrus/wal_005/x") == first
        assert moto_server.pending_uploads(s3_bucket) == []
        assert sum("does not implement conditional writes" in r.getMessage() for r in caplog.records) == 1
    finally:
        proxy.stop()


def test_verification_finds_bytes_replaced_after_the_upload(moto_server, s3_bucket, tmp_path):
    """Where the endpoint ignores the header (WALRUS_S3_CONDITIONAL_PUT=false): another writer's
    bytes landing between our upload and our verification make our put fail, never succeed."""
    other = os.urandom(500)

    def overwrite(request: Request) -> None:
        if request.method == "PUT" and request.path.endswith("/walrus/wal_005/x"):
            moto_server.client.put_object(Bucket=s3_bucket, Key="walrus/wal_005/x", Body=other)

    proxy = FaultProxy(moto_server.port, conditional="ignore", on_forwarded=overwrite)
    try:
        storage = s3_storage(proxy.endpoint, s3_bucket, tmp_path, WALRUS_S3_CONDITIONAL_PUT="false")
        with pytest.raises(ObjectExists):
            run(storage, storage.put("wal_005/x", chunks(os.urandom(1000)), exclusive=True))
        assert moto_server.read(s3_bucket, "walrus/wal_005/x") == other
        assert "If-None-Match" not in str(proxy.log)  # nothing conditional was asked of this endpoint
    finally:
        proxy.stop()


@pytest.mark.parametrize("size", [1000, 3 * PART], ids=["single", "multipart"])
def test_a_lost_answer_to_our_own_conditional_write_is_success(moto_server, s3_bucket, fault_proxy, tmp_path, size):
    """S3 stored the object but the answer was lost: the retry meets 412 (or, multipart, an upload
    already completed), and the object's ETag shows the bytes are ours."""
    storage = s3_storage(fault_proxy.endpoint, s3_bucket, tmp_path)
    fault_proxy.fail("lose", 1, lambda r: r.method in ("PUT", "POST") and "partNumber" not in r.path
                     and not r.path.endswith("?uploads"))
    data = os.urandom(size)
    assert run(storage, storage.put("wal_005/x", chunks(data), exclusive=True)) == size
    assert [a for a, _ in fault_proxy.applied] == ["lose"]
    assert len(conditional_writes(fault_proxy)) >= 2  # the write, lost, and its retry
    assert moto_server.read(s3_bucket, "walrus/wal_005/x") == data
    assert moto_server.pending_uploads(s3_bucket) == []


def test_a_plain_put_still_replaces(moto_server, s3_bucket, tmp_path):
    """Only exclusive puts are conditional: backups' parts and documents are written as before."""
    storage = s3_storage(moto_server.endpoint, s3_bucket, tmp_path)
    run(storage, storage.put_bytes("k", b"one"))
    run(storage, storage.put_bytes("k", b"two"))
    assert moto_server.read(s3_bucket, "walrus/k") == b"two"

