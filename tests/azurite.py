"""Azure Blob Storage for tests: Azurite on 127.0.0.1 (real HTTP), its fixtures, and the fault proxy speaking Azure."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.pgcluster import free_port
from tests.s3server import FaultProxy, Request
from tests.storage_helpers import Backend, Emulator, emulator_fixtures, settings_at
from walrus.storage import open_storage
from walrus.storage.base import Storage
from walrus.storage.retry import RetryingStorage

AZURITE_VERSION = "3.37.0"
# Azurite's well-known development account (documented with Azurite; no secret)
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
BLOCK = 256 << 10  # the block and range size of azure_settings: a few hundred KiB go in several blocks


def azurite_script() -> str:
    """Azurite's blob server script, installed with npm under ~/.cache/walrus-tests/azurite-<version>
    the first time (one installer at a time: a lock file serialises concurrent test runs)."""
    root = os.path.expanduser(f"~/.cache/walrus-tests/azurite-{AZURITE_VERSION}")
    script = os.path.join(root, "node_modules", "azurite", "dist", "src", "blob", "main.js")
    if os.path.isfile(script):
        return script
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"Azurite {AZURITE_VERSION} is not installed in {root} and npm is not on PATH: install "
                           "Node.js 18 or later with npm, or run .ci/setup")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(script):
            done = subprocess.run([npm, "install", "--prefix", root, "--no-audit", "--no-fund",
                                   f"azurite@{AZURITE_VERSION}"], capture_output=True, timeout=900)
            if done.returncode != 0 or not os.path.isfile(script):
                raise RuntimeError(f"npm install azurite@{AZURITE_VERSION} failed ({done.returncode}): "
                                   f"{done.stderr.decode(errors='replace')[-2000:]}")
    return script


class AzuriteServer(Emulator):
    """Azurite's blob service as a subprocess on a free port, in memory; containers are made per test."""

    def __init__(self) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not on PATH: Azurite needs Node.js 18 or later")
        script = azurite_script()
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="walrus-azurite-")
        self._service = None
        # strict (no --loose): a header or parameter Azurite does not know is refused, not ignored;
        # any API version: the client library may be newer than the emulator
        self.launch([node, script, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence",
                     "--skipApiVersionCheck", "--silent", "--disableTelemetry"],
                    self.port, "Azurite", timeout=60, cwd=self.workdir)

    @property
    def endpoint(self) -> str:
        """The server's address; the account's blob endpoint is this plus /devstoreaccount1."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def service(self):
        """A plain synchronous client straight to Azurite, to set up and check what walrus did."""
        if self._service is None:
            from azure.storage.blob import BlobServiceClient

            self._service = BlobServiceClient(f"{self.endpoint}/{ACCOUNT}",
                                              credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY})
        return self._service

    def new_container(self) -> str:
        name = f"walrus-{uuid.uuid4().hex[:16]}"
        self.service.create_container(name)
        return name

    def keys(self, container: str, prefix: str = "") -> list[str]:
        return [b.name for b in self.service.get_container_client(container).list_blobs(name_starts_with=prefix)]

    def read(self, container: str, key: str) -> bytes:
        return self.service.get_blob_client(container, key).download_blob().readall()

    def pending(self, container: str, prefix: str = "") -> list[str]:
        """Blobs never committed that hold uncommitted blocks (a failed upload's): invisible to readers
        and listings, and beyond any request's reach until a commit of the key, or a week, drops them."""
        client = self.service.get_container_client(container)
        every = {b.name for b in client.list_blobs(name_starts_with=prefix, include=["uncommittedblobs"])}
        return sorted(every - set(self.keys(container, prefix)))

    def uncommitted_blocks(self, container: str, key: str) -> int:
        """Blocks staged on `key` and not committed (on a committed blob too)."""
        _, uncommitted = self.service.get_blob_client(container, key).get_block_list("uncommitted")
        return len(uncommitted)


def azure_settings(endpoint: str, container: str, prefix: str = "walrus", **extra: str) -> dict[str, str]:
    """walrus settings for a test container behind `endpoint` (Azurite's or a proxy's address): the
    development account's key, blocks and ranges of BLOCK bytes, the shortest try timeout (a
    minute: tests that need shorter ones use azure_storage)."""
    settings = {
        "WALG_AZ_PREFIX": f"azure://{container}/{prefix}", "AZURE_STORAGE_ACCOUNT": ACCOUNT,
        "AZURE_STORAGE_ACCESS_KEY": ACCOUNT_KEY, "WALRUS_AZURE_ENDPOINT": f"{endpoint}/{ACCOUNT}",
        "WALG_AZURE_BUFFER_SIZE": str(BLOCK), "WALG_AZURE_MAX_BUFFERS": "4", "WALG_UPLOAD_CONCURRENCY": "4",
        "WALG_DOWNLOAD_CONCURRENCY": "4", "AZURE_TRY_TIMEOUT": "1",
    }
    settings.update(extra)
    return settings


def azure_storage(endpoint: str, container: str, home, *, timeout: float | None = None,
                  attempts: int | None = None, **extra: str) -> Storage:
    """The storage open_storage makes of azure_settings, or the same with a try timeout in seconds or
    a number of tries of the test's choosing (AZURE_TRY_TIMEOUT counts whole minutes; Azure has no
    retry setting)."""
    from walrus.storage.azure import AzureConfig, AzureStorage

    settings = settings_at(azure_settings(endpoint, container, **extra), home)
    if timeout is None and attempts is None:
        return open_storage(settings)
    config = AzureConfig.from_settings(settings)
    if timeout is not None:
        config = replace(config, timeout=timeout)
    if attempts is not None:
        config = replace(config, attempts=attempts)
    policy = config.policy()
    return RetryingStorage(AzureStorage(config, policy), policy)


# -- the fault proxy, speaking Azure

def classify(request: Request) -> str:
    """Request.kind for Blob service requests: "part" (Put Block), "commit" (Put Block List), "put"
    (Put Blob), "get" (Get Blob), "list", "blocklist", "batch", else the method."""
    query = parse_qs(urlsplit(request.path).query)
    comp, restype = query.get("comp", [""])[0], query.get("restype", [""])[0]
    if request.method == "PUT" and not restype:
        return {"block": "part", "blocklist": "commit", "": "put"}.get(comp, "PUT")
    if request.method == "GET":
        return {"list": "list", "blocklist": "blocklist"}.get(comp, "get" if not comp and not restype else "GET")
    if request.method == "POST" and comp == "batch":
        return "batch"
    return request.method


AZURE_ERRORS = {500: ("InternalError", "Server encountered an internal error. Please try again after some time."),
                503: ("ServerBusy", "The server is currently unable to receive requests. Please retry your request."),
                501: ("NotImplemented", "The requested operation is not implemented.")}


def error_body(status: int) -> tuple[str, bytes]:
    code, message = AZURE_ERRORS[status]
    return "application/xml", (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()


def azure_proxy(server: AzuriteServer, **options) -> FaultProxy:
    return FaultProxy(server.port, classify=classify, error_body=error_body, **options)


# -- fixtures (registered in tests/conftest.py)

azurite, azure_container, azure_fault_proxy = emulator_fixtures(
    "azurite", "azure_container", "azure_fault_proxy", AzuriteServer, AzuriteServer.new_container, azure_proxy)


@pytest.fixture
def azure_backend(azurite, azure_container, tmp_path) -> Backend:
    """Azure on Azurite for the storage contract tests (blocks and ranges of BLOCK bytes).

    `pending` reports nothing, by definition rather than by luck. S3's pending uploads are what a
    client must abort or be billed for until a lifecycle rule acts: the contract checks walrus
    aborts them. Azure has no counterpart: a failed or refused upload leaves uncommitted blocks,
    which no request can remove from a blob never committed (the key's next commit drops them, and
    Azure itself after a week). Listing them would fail every failed-upload test whatever walrus
    did. What the contract cares about, that nothing of a failed upload is visible, its key listings
    check; tests/unit/test_azure.py checks what stays behind (AzuriteServer.pending) where it can.

    `atomic` is the backend itself: Azurite checks and writes a conditional Put Blob or Put Block
    List in one step, as Azure does (no two winners in 60 races of 6 writers of each, unproxied).
    """
    return Backend(azure_storage(azurite.endpoint, azure_container, tmp_path), list)
