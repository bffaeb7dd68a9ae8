"""Shared fixtures: one moto S3 server per test session, a bucket per test, a fault-injecting proxy."""
from __future__ import annotations

import logging

import pytest

from tests.s3server import FaultProxy, MotoServer
from walrus.log import log


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


@pytest.fixture
def log_lines():
    """The messages walrus logs at INFO and above while the test runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect(logging.INFO)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lines
    log.removeHandler(handler)
    log.setLevel(old_level)
