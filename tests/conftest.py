"""Shared fixtures: one moto S3 server per test session, a bucket per test, a fault-injecting proxy."""
from __future__ import annotations

import logging

import pytest

from tests.gcsserver import gcs_backend, gcs_bucket, gcs_fault_proxy, gcs_server  # noqa: F401 (fixtures)
from tests.azurite import azure_backend, azure_container, azure_fault_proxy, azurite  # noqa: F401 (fixtures)
from tests.s3server import FaultProxy, MotoServer, s3_storage
from tests.storage_helpers import Backend, emulator_fixtures
from walrus.log import log

moto_server, s3_bucket, fault_proxy = emulator_fixtures(
    "moto_server", "s3_bucket", "fault_proxy", MotoServer, MotoServer.new_bucket, lambda moto: FaultProxy(moto.port))


@pytest.fixture
def s3_backend(moto_server, s3_bucket, tmp_path) -> Backend:
    """S3 on moto for the storage contract tests (small parts and ranges: see s3_settings)."""
    def pending() -> list[str]:
        return moto_server.pending_uploads(s3_bucket)

    def atomic(request) -> Backend:
        # moto checks and writes in two steps; the fault proxy passes conditional writes on one at a time
        proxy = request.getfixturevalue("fault_proxy")
        return Backend(s3_storage(proxy.endpoint, s3_bucket, tmp_path), pending)

    return Backend(s3_storage(moto_server.endpoint, s3_bucket, tmp_path), pending, atomic)


def _collected(level: int):
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect(level)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(level)
    yield lines
    log.removeHandler(handler)
    log.setLevel(old_level)


@pytest.fixture
def log_lines():
    """The messages walrus logs at INFO and above while the test runs."""
    yield from _collected(logging.INFO)


@pytest.fixture
def devel_log_lines():
    """The messages walrus logs at DEVEL (debug) and above while the test runs: routine facts too."""
    yield from _collected(logging.DEBUG)
