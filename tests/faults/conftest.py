"""Fault suite fixtures (the shared PG cluster and backup) and the figures table printed at the end of the run."""
from __future__ import annotations

import os

import pytest

from tests.faults import figures, harness, pgenv


@pytest.fixture(scope="session")
def scratch():
    """The directory every fault test works under (a tmpfs when run as root; see harness.scratch_space)."""
    with harness.scratch_space() as path:
        yield path


@pytest.fixture(scope="session")
def pg_env(scratch):
    env = pgenv.build(scratch)
    yield env
    pgenv.destroy(env)


@pytest.fixture
def workdir(scratch):
    """A per-test directory the server's OS user owns."""
    path = harness.workdir("walrus-faults-", scratch)
    yield path
    if not os.environ.get("WALRUS_KEEP_TEST_DIRS"):
        harness.remove(path)


def pytest_report_header(config):
    return f"walrus faults: mode {figures.MODE}, WALRUS_FAULTS_SEED={figures.SEED}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not figures.REGISTRY:
        return
    tr = terminalreporter
    tr.section("walrus fault injection figures")
    tr.write_line(f"mode {figures.MODE} (WALRUS_FAULTS=long for the long one), seed {figures.SEED} "
                  f"(WALRUS_FAULTS_SEED={figures.SEED} repeats these choices)")
    for line in figures.table():
        tr.write_line(line)
    noted = [s for s in figures.REGISTRY.values() if s.notes]
    if noted:
        tr.write_line("")
        for s in noted:
            tr.write_line(f"{s.name}: " + ", ".join(f"{k} {v}" for k, v in s.notes.items()))
    troubled = [s for s in figures.REGISTRY.values() if s.problems]
    if troubled:
        tr.write_line("")
        tr.write_line("first problems per scenario:")
        for s in troubled:
            for p in s.problems[:3]:
                tr.write_line(f"  {s.name}: {p[:300]}")
            if len(s.problems) > 3:
                tr.write_line(f"  {s.name}: ... {len(s.problems) - 3} more")
    path = os.environ.get("WALRUS_FAULTS_REPORT")
    if path:
        figures.write_report(path)
        tr.write_line(f"figures written to {path}")
