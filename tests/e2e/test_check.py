"""walrus check on a real PostgreSQL 15: a working setup passes every check (a forced WAL switch arrives in
storage); each broken part fails its own check, with a hint, and exits 1."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.pgcluster import WALRUS, Cluster, _user_env, make_workdir, remove_tree, run_user, walrus, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setup():
    root = make_workdir("walrus-e2e-check-")
    storage = os.path.join(root, "storage")
    config = write_config(os.path.join(root, "walg.json"), {"WALG_FILE_PREFIX": storage})
    cluster = Cluster.init(root)
    cluster.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p",
                      archive_timeout=0)
    cluster.start()
    try:
        yield root, storage, config, cluster
    finally:
        cluster.stop()
        remove_tree(root)


def _check(config: str, cluster: Cluster, *extra: str, env: dict | None = None):
    proc = walrus(["check", "--json", *extra], config=config, env={**cluster.env, **(env or {})}, check=False)
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    return proc.returncode, checks, proc.stderr.decode()


def _set_archive_command(cluster: Cluster, command: str) -> None:
    cluster.psql(f"ALTER SYSTEM SET archive_command = '{command}'")
    cluster.psql("SELECT pg_reload_conf()")
    cluster.wait_until("SHOW archive_command", command)


def test_a_working_setup_passes_every_check(setup):
    root, storage, config, cluster = setup
    rc, checks, stderr = _check(config, cluster, "--timeout", "60")
    assert rc == 0, (checks, stderr)
    assert [c["status"] for c in checks.values()] == ["ok"] * 7, checks
    switched = checks["wal switch"]["detail"].split()[0]
    assert os.path.exists(os.path.join(storage, "wal_005", switched + ".lz4"))
    assert not os.path.exists(os.path.join(storage, "walrus-check"))  # the probe is gone, and its folder

    text = walrus(["check"], config=config, env=cluster.env)  # the text rendering: one line per check
    lines = text.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == ["settings", "storage", "ownership", "storage", "postgresql",
                                                   "archiving", "wal"]
    assert all(" ok " in line for line in lines)


def test_archive_command_that_is_not_walrus_fails(setup):
    root, storage, config, cluster = setup
    _set_archive_command(cluster, "cp %p /nonexistent/%f")
    try:
        rc, checks, stderr = _check(config, cluster, "--timeout", "2")
    finally:
        _set_archive_command(cluster, f"{WALRUS} --config {config} wal-push %p")
    assert rc == 1
    assert checks["archiving"]["status"] == "failed" and "does not run walrus" in checks["archiving"]["detail"]
    assert checks["wal switch"]["status"] == "skipped"
    assert "1 of 7 checks failed: archiving" in stderr


def test_archive_command_reading_another_config_fails(setup):
    root, storage, config, cluster = setup
    other = write_config(os.path.join(root, "other.json"), {"WALG_FILE_PREFIX": os.path.join(root, "elsewhere")})
    rc, checks, _ = _check(other, cluster, "--timeout", "2")
    assert rc == 1
    assert checks["archiving"]["status"] == "failed" and config in checks["archiving"]["detail"]


def test_wal_that_does_not_arrive_in_this_storage_fails_the_switch(setup):
    root, storage, config, cluster = setup
    # the same config file, but this check looks in another storage (the environment overrides it)
    rc, checks, _ = _check(config, cluster, "--timeout", "2",
                           env={"WALG_FILE_PREFIX": os.path.join(root, "not-the-archive")})
    assert rc == 1
    assert checks["archiving"]["status"] == "ok"
    assert checks["wal switch"]["status"] == "failed" and "did not arrive" in checks["wal switch"]["detail"]


def test_unreachable_postgresql_and_unwritable_storage_fail(setup):
    root, storage, config, cluster = setup
    blocked = os.path.join(root, "blocked")
    os.makedirs(blocked, mode=0o500, exist_ok=True)  # root's, not writable by the test user
    rc, checks, _ = _check(config, cluster, env={"WALG_FILE_PREFIX": os.path.join(blocked, "store"),
                                                 "PGPORT": "1"})
    assert rc == 1
    assert checks["storage"]["status"] == "failed" and "may not write there" in checks["storage"]["hint"]
    assert checks["postgresql"]["status"] == "failed"
    assert checks["archiving"]["status"] == checks["wal switch"]["status"] == "skipped"


def test_settings_that_do_not_load_fail_alone(setup):
    root, storage, config, cluster = setup
    rc, checks, _ = _check(config, cluster, env={"WALG_COMPRESSION_METHOD": "lz5"})
    assert rc == 1 and list(checks) == ["settings"]
    assert "WALG_COMPRESSION_METHOD" in checks["settings"]["detail"]


@pytest.mark.skipif(run_user() is None, reason="needs root and the unprivileged user the cluster runs as")
def test_backup_push_as_root_into_the_servers_repository_is_refused(setup):
    """`sudo walrus backup-push`: refused before anything is stored, as the objects would be root's and
    the server's user (which archives and restores) could not read them; walrus check says so too."""
    root, storage, config, cluster = setup
    walrus(["check", "--timeout", "60"], config=config, env=cluster.env)  # the storage exists, the user's
    before = sorted(os.listdir(storage))

    # PGUSER: the server's role, as a real `sudo walrus backup-push` would reach it (PGPASSWORD, .pgpass)
    env = _user_env({**cluster.env, "PGUSER": run_user()})
    as_root = subprocess.run([WALRUS, "--config", config, "backup-push", cluster.data], env=env,
                             capture_output=True, text=True, timeout=120)

    assert as_root.returncode == 1, as_root.stderr
    assert "refusing to write to file storage" in as_root.stderr and "as root" in as_root.stderr
    assert f"sudo -u {run_user()} walrus" in as_root.stderr
    assert not os.path.exists(os.path.join(storage, "basebackups_005"))
    assert sorted(os.listdir(storage)) == before
    assert "connect" not in as_root.stderr  # refused before the server was asked for anything
    checked = subprocess.run([WALRUS, "--config", config, "check", "--json"], env=env, capture_output=True,
                             text=True, timeout=120)
    checks = {c["name"]: c for c in json.loads(checked.stdout)["checks"]}
    assert checked.returncode == 1
    assert checks["storage"]["status"] == "failed" and "as root" in checks["storage"]["detail"]
