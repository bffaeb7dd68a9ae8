"""Azure specifics: settings, credentials, exclusive puts, lost answers, damaged and stalled requests, on Azurite."""
from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from tests.azurite import ACCOUNT, ACCOUNT_KEY, BLOCK, azure_proxy, azure_storage
from tests.pgcluster import free_port
from tests.s3server import Request
from tests.storage_helpers import chunks, pulled_while_held, run
from walrus.config import load_settings
from walrus.errors import ConfigError, ObjectExists, ObjectNotFound, StorageError
from walrus.storage import open_storage
from walrus.storage.azure import AzureConfig, parse_prefix
from walrus.storage.chunked import transfer_share
from walrus.storage.retry import TransientError


def config_for(**env: str) -> AzureConfig:
    base = {"WALG_AZ_PREFIX": "azure://backups/pg/main", "AZURE_STORAGE_ACCOUNT": "acct", "HOME": "/nonexistent"}
    return AzureConfig.from_settings(load_settings(env={**base, **env}))


def block_ids(proxy) -> list[str]:
    """The block ids of the Put Block requests the proxy saw, decoded from base64 as the service reads them."""
    import base64

    return [base64.b64decode(unquote(parse_qs(urlsplit(r.path).query)["blockid"][0])).decode()
            for r in proxy.log if r.kind == "part"]


# -- settings

def test_prefix_and_storage_prefix():
    assert parse_prefix("azure://backups/pg/main/") == ("backups", "pg/main")
    assert parse_prefix("azure://backups") == ("backups", "")
    config = config_for(WALG_STORAGE_PREFIX="/cluster-7/")
    assert (config.container, config.root) == ("backups", "pg/main/cluster-7")
    for bad in ("s3://backups/x", "azure:///x", "backups/x"):
        with pytest.raises(ConfigError) as caught:
            parse_prefix(bad)
        assert "azure://container/path" in caught.value.hint
    for bad in ("Backups", "ab", "a--b", "-ab", "has_underscore"):
        with pytest.raises(ConfigError) as caught:
            parse_prefix(f"azure://{bad}/x")
        assert "not a valid container name" in caught.value.message


def test_the_account_is_required():
    with pytest.raises(ConfigError) as caught:
        config_for(AZURE_STORAGE_ACCOUNT="  ")
    assert caught.value.message == "AZURE_STORAGE_ACCOUNT is not set" and "AZURE_STORAGE_ACCOUNT" in caught.value.hint


def test_environment_chooses_the_endpoint_suffix(log_lines):
    for name, suffix in (("AzurePublicCloud", "core.windows.net"), ("AzureUSGovernmentCloud", "core.usgovcloudapi.net"),
                         ("AzureChinaCloud", "core.chinacloudapi.cn"), ("AzureGermanCloud", "core.cloudapi.de")):
        assert config_for(AZURE_ENVIRONMENT_NAME=name).endpoint == f"https://acct.blob.{suffix}"
    assert log_lines == []
    # an unknown name is the public cloud, as in WAL-G, but said out loud
    assert config_for(AZURE_ENVIRONMENT_NAME="AzureMoonCloud").endpoint == "https://acct.blob.core.windows.net"
    assert len(log_lines) == 1 and "'AzureMoonCloud'" in log_lines[0] and "AzurePublicCloud" in log_lines[0]
    # the suffix, when set, wins over the environment; the whole endpoint over both
    assert config_for(AZURE_ENVIRONMENT_NAME="AzureChinaCloud",
                      AZURE_ENDPOINT_SUFFIX="core.example.net").endpoint == "https://acct.blob.core.example.net"
    assert config_for(WALRUS_AZURE_ENDPOINT="blob.local:10000/acct/").endpoint == "https://blob.local:10000/acct"
    storage = open_storage(load_settings(env={"WALG_AZ_PREFIX": "azure://backups/pg", "AZURE_STORAGE_ACCOUNT": "acct",
                                              "AZURE_STORAGE_ACCESS_KEY": "a2V5", "HOME": "/nonexistent"}))
    assert storage.describe() == "Azure storage azure://backups/pg (account acct at https://acct.blob.core.windows.net)"


def test_credentials_in_wal_g_order_and_sas_token_normalised():
    key, sas = "a2V5", "sv=2024-11-04&sp=racwdl&sig=abc%3D"
    assert config_for(AZURE_STORAGE_ACCESS_KEY=key, AZURE_STORAGE_SAS_TOKEN=sas).auth == "key"
    with_mark, without = config_for(AZURE_STORAGE_SAS_TOKEN="?" + sas), config_for(AZURE_STORAGE_SAS_TOKEN=sas)
    assert with_mark.auth == without.auth == "sas" and with_mark.sas_token == without.sas_token == sas
    assert config_for().auth == "chain"
    with pytest.raises(ConfigError) as caught:  # bearer tokens are never sent over plain HTTP
        config_for(WALRUS_AZURE_ENDPOINT="http://127.0.0.1:10000/acct")
    assert "AZURE_STORAGE_ACCESS_KEY" in caught.value.hint
    assert "c2VjcmV0" not in repr(config_for(AZURE_STORAGE_ACCESS_KEY="c2VjcmV0"))
    with pytest.raises(ConfigError) as caught:
        config_for(AZURE_STORAGE_ACCESS_KEY="not a key!")
    assert "AZURE_STORAGE_ACCESS_KEY" in caught.value.message


def test_an_api_version_the_client_cannot_speak_is_a_config_error(azure_container, tmp_path):
    storage = azure_storage("http://127.0.0.1:1", azure_container, tmp_path, AZURE_BLOB_STORE_API_VERSION="1999-01-01")
    with pytest.raises(ConfigError) as caught:
        run(storage, storage.stat("k"))
    assert "AZURE_BLOB_STORE_API_VERSION" in caught.value.message and "2021-08-06" in caught.value.detail


def test_blocks_and_ranges_fit_the_memory_budget():
    default = config_for()
    assert default.block_buffers * default.block_size <= transfer_share(32 << 20)
    assert default.range_size * default.download_concurrency <= transfer_share(32 << 20)
    assert default.upload_concurrency == min(4, default.block_buffers)
    roomy = config_for(WALRUS_MEMORY_BUDGET=str(256 << 20))  # WAL-G's 4 buffers of 8 MiB fit whole
    assert (roomy.block_size, roomy.block_buffers, roomy.upload_concurrency) == (8 << 20, 4, 4)
    lanes = config_for(WALRUS_MEMORY_BUDGET=str(256 << 20), WALG_UPLOAD_DISK_CONCURRENCY="3")
    assert lanes.block_buffers == 12 and lanes.block_buffers * lanes.block_size <= transfer_share(256 << 20)
    assert config_for(WALG_AZURE_BUFFER_SIZE="100").block_size == 1024  # WAL-G's floor
    with pytest.raises(ConfigError):
        config_for(WALG_AZURE_BUFFER_SIZE=str(5000 << 20))


def test_the_default_credential_chain_without_an_identity_says_what_to_set(tmp_path):
    env = {"WALG_AZ_PREFIX": "azure://backups/pg", "AZURE_STORAGE_ACCOUNT": "acct", "HOME": str(tmp_path),
           "WALRUS_AZURE_ENDPOINT": f"https://127.0.0.1:{free_port()}/acct"}
    storage = open_storage(load_settings(env=env))
    with pytest.raises(StorageError) as caught:
        run(storage, storage.stat("x"))
    assert not isinstance(caught.value, TransientError)
    assert "no usable Azure credentials" in caught.value.message
    assert "AZURE_CLIENT_ID" in caught.value.hint and "AZURE_STORAGE_ACCESS_KEY" in caught.value.hint


def test_a_sas_token_works_with_or_without_its_question_mark(azurite, azure_container, tmp_path):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    token = generate_container_sas(ACCOUNT, azure_container, account_key=ACCOUNT_KEY,
                                   permission=ContainerSasPermissions(read=True, add=True, create=True, write=True,
                                                                      delete=True, list=True),
                                   expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    data = os.urandom(3 * BLOCK + 5)
    for mark in ("?", ""):
        storage = azure_storage(azurite.endpoint, azure_container, tmp_path, AZURE_STORAGE_ACCESS_KEY="",
                              AZURE_STORAGE_SAS_TOKEN=mark + token)
        key = f"sas{mark and '-q'}/obj"

        async def round_trip():
            await storage.put(key, chunks(data), exclusive=True)
            listed = [o.key async for o in storage.list("", recursive=True)]
            body = await storage.get_bytes(key)
            await storage.delete([key])
            return listed, body

        listed, body = run(storage, round_trip())
        assert key in listed and body == data
    assert azurite.keys(azure_container) == []


def test_a_refused_credential_is_not_retried_and_says_which(azurite, azure_container, tmp_path):
    proxy = azure_proxy(azurite)
    try:
        for setting, value in (("AZURE_STORAGE_ACCESS_KEY", "A" + ACCOUNT_KEY[1:]),
                               ("AZURE_STORAGE_SAS_TOKEN", "?sv=2024-11-04&sr=c&sp=rl&se=2099-01-01&sig=bm90LWl0")):
            extra = {"AZURE_STORAGE_ACCESS_KEY": "", setting: value}
            storage = azure_storage(proxy.endpoint, azure_container, tmp_path, **extra)
            before = len(proxy.log)
            with pytest.raises(StorageError) as caught:
                run(storage, storage.put_bytes("k", b"data"))
            assert not isinstance(caught.value, TransientError)
            assert "access denied" in caught.value.message and "403" not in caught.value.message
            assert "Azure error Authorization" in caught.value.detail or "Authentication" in caught.value.detail
            assert setting in caught.value.hint
            assert len(proxy.log) - before == 1  # refused once, asked once
    finally:
        proxy.stop()
    assert azurite.keys(azure_container) == []


def test_a_missing_container_is_not_a_missing_object(azurite, tmp_path):
    storage = azure_storage(azurite.endpoint, "no-such-container", tmp_path)
    for call in (lambda: storage.get("wal_005/x.lz4"), lambda: storage.stat("wal_005/x.lz4"),
                 lambda: storage.put_bytes("x", b"1"), lambda: storage.list("wal_005").__anext__()):
        with pytest.raises(StorageError) as caught:
            run(storage, call())
        assert not isinstance(caught.value, (ObjectNotFound, TransientError))
        assert "'no-such-container' does not exist" in caught.value.message
        assert "WALG_AZ_PREFIX" in caught.value.hint


def test_an_unreachable_endpoint_says_so(azure_container, tmp_path):
    storage = azure_storage(f"http://127.0.0.1:{free_port()}", azure_container, tmp_path, attempts=2)
    with pytest.raises(StorageError) as caught:
        run(storage, storage.get("obj"))
    assert "after 2 attempts" in caught.value.message
    assert "AZURE_STORAGE_ACCOUNT" in caught.value.hint and "WALRUS_AZURE_ENDPOINT" in caught.value.hint


# -- writes

def test_blocks_are_staged_with_ids_of_one_length_and_committed_once(azurite, azure_container, azure_fault_proxy,
                                                                     tmp_path):
    storage = azure_storage(azure_fault_proxy.endpoint, azure_container, tmp_path)
    data = os.urandom(5 * BLOCK + 1)
    assert run(storage, storage.put("obj", chunks(data))) == len(data)
    ids = block_ids(azure_fault_proxy)
    assert len(ids) == 6 and len(set(ids)) == 6
    assert {len(i) for i in ids} == {64}  # 88 in base64, as the Go SDK's (WAL-G's) ids
    assert len({i[:32] for i in ids}) == 1  # one nonce per upload
    assert azure_fault_proxy.count("commit") == 1 and azure_fault_proxy.count("put") == 0
    assert azurite.read(azure_container, "walrus/obj") == data
    run(storage, storage.put("obj", chunks(data)))  # a second upload: its own nonce
    assert len({i[:32] for i in block_ids(azure_fault_proxy)}) == 2


@pytest.mark.parametrize("size", [1000, 3 * BLOCK], ids=["single", "blocks"])
def test_exclusive_put_never_replaces(azurite, azure_container, tmp_path, size):
    storage = azure_storage(azurite.endpoint, azure_container, tmp_path)
    first = os.urandom(size)
    run(storage, storage.put("wal_005/x", chunks(first), exclusive=True))
    with pytest.raises(ObjectExists):
        run(storage, storage.put("wal_005/x", chunks(os.urandom(size)), exclusive=True))
    assert azurite.read(azure_container, "walrus/wal_005/x") == first
    run(storage, storage.put("wal_005/x", chunks(b"replaced")))  # only exclusive puts are conditional
    assert azurite.read(azure_container, "walrus/wal_005/x") == b"replaced"


@pytest.mark.parametrize("size,kind", [(1000, "put"), (3 * BLOCK, "commit")], ids=["single", "blocks"])
@pytest.mark.parametrize("exclusive", [True, False], ids=["exclusive", "plain"])
def test_a_lost_answer_to_our_own_write_is_success(azurite, azure_container, azure_fault_proxy, tmp_path, size,
                                                   kind, exclusive):
    """Azure stored the blob but the answer was lost: the retry meets the blob (409 when exclusive),
    and its MD5 or its committed block list shows it is ours."""
    storage = azure_storage(azure_fault_proxy.endpoint, azure_container, tmp_path)
    azure_fault_proxy.fail("lose", 1, lambda r: r.kind == kind)
    data = os.urandom(size)
    assert run(storage, storage.put("wal_005/x", chunks(data), exclusive=exclusive)) == size
    assert [a for a, _ in azure_fault_proxy.applied] == ["lose"]
    assert azure_fault_proxy.count(kind) == 2  # the write, lost, and its retry
    assert azurite.read(azure_container, "walrus/wal_005/x") == data


@pytest.mark.parametrize("exclusive", [True, False], ids=["exclusive", "plain"])
def test_another_writers_commit_before_ours_wins(azurite, azure_container, tmp_path, exclusive):
    """A commit drops every other uncommitted block of the blob: a writer that committed first leaves
    ours gone. Exclusive: refused (ObjectExists); plain: a clear error, and their blob stays."""
    theirs = os.urandom(777)
    landed = []

    def after(request: Request) -> None:
        if request.kind == "part" and len([r for r in proxy.log if r.kind == "part"]) == 3 and not landed:
            from azure.storage.blob import BlobBlock

            blob = azurite.service.get_blob_client(azure_container, "walrus/k")
            blob.stage_block("t" * 64, theirs)  # another writer's whole upload, of the same id length
            blob.commit_block_list([BlobBlock("t" * 64)])
            landed.append(True)

    proxy = azure_proxy(azurite, on_forwarded=after)
    try:
        storage = azure_storage(proxy.endpoint, azure_container, tmp_path)
        with pytest.raises(StorageError) as caught:
            run(storage, storage.put("k", chunks(os.urandom(3 * BLOCK)), exclusive=exclusive))
        if exclusive:
            assert isinstance(caught.value, ObjectExists)
        else:
            assert "blocks were dropped" in caught.value.message and not isinstance(caught.value, TransientError)
        assert landed and azurite.read(azure_container, "walrus/k") == theirs
    finally:
        proxy.stop()


def test_a_failed_upload_leaves_invisible_blocks_that_the_next_commit_drops(azurite, azure_container, tmp_path):
    storage = azure_storage(azurite.endpoint, azure_container, tmp_path)

    async def breaks():
        yield os.urandom(3 * BLOCK + 100)
        await asyncio.sleep(0.5)  # the three whole blocks are staged meanwhile
        raise RuntimeError("disk read failed")

    with pytest.raises(RuntimeError):
        run(storage, storage.put("k", breaks()))
    assert azurite.keys(azure_container) == []  # nothing visible, not even empty
    assert run(storage, storage.stat("k")) is None
    # what Azure keeps, and no request can remove: the staged blocks of a blob never committed
    assert azurite.pending(azure_container) == ["walrus/k"]
    assert azurite.uncommitted_blocks(azure_container, "walrus/k") == 3
    data = os.urandom(2 * BLOCK + 3)
    run(storage, storage.put("k", chunks(data)))
    assert azurite.pending(azure_container) == [] and azurite.uncommitted_blocks(azure_container, "walrus/k") == 0
    assert azurite.read(azure_container, "walrus/k") == data


def test_a_damaged_block_is_refused_and_sent_again_from_its_buffer(azurite, azure_container, tmp_path, monkeypatch):
    """Each block carries its MD5: a body damaged on the way is refused (Md5Mismatch) and the block
    is sent again from the buffer it still holds."""
    from azure.storage.blob.aio import BlobClient

    stage_block = BlobClient.stage_block
    damaged = []

    async def damaging(self, block_id, data, length=None, **kwargs):
        if block_id.endswith(f"{2:032d}") and not damaged:
            damaged.append(block_id)
            body = b"".join([bytes(piece) async for piece in data])  # the body walrus hands the SDK, in slices
            data = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]  # a bit flipped on the way
        return await stage_block(self, block_id, data, length=length, **kwargs)

    monkeypatch.setattr(BlobClient, "stage_block", damaging)
    storage = azure_storage(azurite.endpoint, azure_container, tmp_path)
    data = os.urandom(4 * BLOCK)
    run(storage, storage.put("obj", chunks(data)))
    assert damaged
    assert azurite.read(azure_container, "walrus/obj") == data


def test_transient_failures_are_retried(azurite, azure_container, azure_fault_proxy, tmp_path):
    storage = azure_storage(azure_fault_proxy.endpoint, azure_container, tmp_path)
    azure_fault_proxy.fail("503", 2, lambda r: r.kind == "part")
    azure_fault_proxy.fail("500", 1, lambda r: r.kind == "commit")
    azure_fault_proxy.fail("drop", 1, lambda r: r.kind == "part")
    azure_fault_proxy.fail("drop-body", 1, lambda r: r.kind == "get")  # the head range breaks mid-body
    azure_fault_proxy.fail("503", 1, lambda r: r.kind == "get")
    azure_fault_proxy.fail("500", 1, lambda r: r.kind == "list")
    data = os.urandom(5 * BLOCK + 7)
    assert run(storage, storage.put("obj", chunks(data))) == len(data)
    assert run(storage, storage.get_bytes("obj")) == data
    assert run(storage, storage.keys_with_prefix("ob")) == {"obj"}
    assert len(azure_fault_proxy.applied) == 7
    assert azurite.pending(azure_container) == []


def test_exhausted_retries_fail_cleanly_and_publish_nothing(azurite, azure_container, azure_fault_proxy, tmp_path):
    storage = azure_storage(azure_fault_proxy.endpoint, azure_container, tmp_path, attempts=3)
    azure_fault_proxy.fail("503", 10 ** 6, lambda r: r.kind == "part")
    with pytest.raises(StorageError) as caught:
        run(storage, storage.put("obj", chunks(os.urandom(3 * BLOCK))))
    assert "after 3 attempts" in caught.value.message and "ServerBusy" in caught.value.detail
    assert not isinstance(caught.value, TransientError)
    assert azure_fault_proxy.count("commit") == 0
    assert azurite.keys(azure_container) == []


def test_a_stalled_request_is_abandoned_and_retried(azurite, azure_container, tmp_path):
    proxy = azure_proxy(azurite, stall_seconds=2.5)
    try:
        storage = azure_storage(proxy.endpoint, azure_container, tmp_path, timeout=1)
        proxy.fail("stall", 1, lambda r: r.kind == "part")
        proxy.fail("stall", 1, lambda r: r.kind == "commit")
        proxy.fail("stall", 1, lambda r: r.kind == "get")
        data = os.urandom(2 * BLOCK + 5)
        began = time.monotonic()
        run(storage, storage.put("obj", chunks(data)))
        assert run(storage, storage.get_bytes("obj")) == data
        assert time.monotonic() - began < 15
        assert [a for a, _ in proxy.applied] == ["stall"] * 3
    finally:
        proxy.stop()


def test_upload_memory_is_bounded_by_the_block_pool(azurite, azure_container, tmp_path):
    """With the first blocks held by the endpoint, the upload stops pulling from its source once the
    storage's block buffers are all taken."""
    proxy = azure_proxy(azurite, stall_seconds=1.5)
    try:
        storage = azure_storage(proxy.endpoint, azure_container, tmp_path, WALG_AZURE_MAX_BUFFERS="2")
        assert storage.inner.config.block_buffers == 2
        proxy.fail("stall", 2, lambda r: r.kind == "part")
        assert pulled_while_held(storage) <= 2 * BLOCK + (16 << 10)  # of ten blocks, in pieces of 16 KiB
        assert proxy.peak["part"] <= 2
    finally:
        proxy.stop()


# -- reads, listings, deletes

def test_a_blob_replaced_mid_read_fails_the_read(azurite, azure_container, tmp_path):
    storage = azure_storage(azurite.endpoint, azure_container, tmp_path, WALG_DOWNLOAD_CONCURRENCY="1")
    run(storage, storage.put("obj", chunks(os.urandom(4 * BLOCK))))

    async def read_while_replaced():
        stream = await storage.get("obj")
        first = await anext(stream)
        azurite.service.get_blob_client(azure_container, "walrus/obj").upload_blob(os.urandom(4 * BLOCK),
                                                                                  overwrite=True)
        async for _ in stream:
            pass
        return first

    with pytest.raises(StorageError) as caught:
        run(storage, read_while_replaced())
    assert "changed while it was being read" in caught.value.message


def test_listing_pages_and_start_after(azurite, azure_container, azure_fault_proxy, tmp_path, monkeypatch):
    """Page after page in key order; start_after skips by startFrom where the service version has it,
    and by comparing names where it may not (an older AZURE_BLOB_STORE_API_VERSION): same keys."""
    monkeypatch.setattr("walrus.storage.azure.LIST_PAGE", 4)
    names = [f"wal_005/{i:024X}" for i in range(11)] + ["wal_005/sub/x"]
    storage = azure_storage(azure_fault_proxy.endpoint, azure_container, tmp_path)

    async def put_all():
        await asyncio.gather(*(storage.put_bytes(n, b"x") for n in names))

    run(storage, put_all())
    for version, asks_from in ((None, True), ("2025-11-05", False)):
        extra = {"AZURE_BLOB_STORE_API_VERSION": version} if version else {}
        storage = azure_storage(azure_fault_proxy.endpoint, azure_container, tmp_path, **extra)

        async def listed(after, recursive=False):
            return [o.key async for o in storage.list("wal_005", recursive=recursive, start_after=after)]

        before = len(azure_fault_proxy.log)
        assert run(storage, listed(None)) == names[:-1]
        assert run(storage, listed(names[6])) == names[7:-1]
        assert run(storage, listed(names[6], recursive=True)) == names[7:]
        assert run(storage, listed("wal_005/Z")) == []
        assert run(storage, listed("wal_004/z")) == names[:-1]
        assert run(storage, listed("wal_006")) == []
        asked = [r.path for r in azure_fault_proxy.log[before:] if r.kind == "list"]
        assert any("startFrom=" in p for p in asked) == asks_from
        assert len(asked) > 6  # several pages


def test_deletes_go_in_batches_of_256(azurite, azure_container, azure_fault_proxy, tmp_path):
    storage = azure_storage(azure_fault_proxy.endpoint, azure_container, tmp_path)
    names = [f"wal_005/{i:024X}" for i in range(300)]

    async def put_all():
        gate = asyncio.Semaphore(32)

        async def one(n):
            async with gate:
                await storage.put_bytes(n, b"x")

        await asyncio.gather(*(one(n) for n in names))

    run(storage, put_all())
    azure_fault_proxy.fail("503", 1, lambda r: r.kind == "batch")
    run(storage, storage.delete(names + [f"wal_005/absent-{i}" for i in range(300)]))
    assert azure_fault_proxy.count("batch") == 3 + 1  # 600 keys in three batches, one sent twice
    assert azurite.keys(azure_container) == []
