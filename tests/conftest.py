"""Shared fixtures: one moto S3 server per test session, a bucket per test, a fault-injecting proxy."""
from __future__ import annotations

import pytest

from tests.s3server import FaultProxy, MotoServer


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_server) -> str:
    return moto_server.new_bucket()


@pytest.fixture
def fault_proxy(moto_server):
    proxy = FaultProxy(moto_server.port)
    yield proxy
    proxy.stop()
