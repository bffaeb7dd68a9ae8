"""Which backup a delta builds on (WAL-G's rules), when backup-push takes a full backup instead, and the fatal cases."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.unit.test_delta_fetch import D1, D2, FULL, SYSID, build_chain
from walrus.backup.delta import DeltaBase, check_base, choose_base, delta_name
from walrus.config import load_settings
from walrus.errors import BackupError, ConfigError
from walrus.storage.fs import FsStorage


def settings(**env: str):
    return load_settings(env={"WALG_FILE_PREFIX": "/unused", **env}, config_path=None)


def choose(store: Path, permanent: bool = False, **kwargs):
    env = {k: v for k, v in kwargs.items() if k.startswith("WALG_")}
    args = {k: v for k, v in kwargs.items() if not k.startswith("WALG_")}
    return asyncio.run(choose_base(settings(**env), FsStorage(str(store)), permanent=permanent, **args))


def set_permanent(store: Path, name: str) -> None:
    path = store / "basebackups_005" / name / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "is_permanent": True}))


@pytest.fixture
def store(tmp_path) -> Path:
    build_chain(tmp_path)
    for name in (FULL, D1, D2):
        path = tmp_path / "basebackups_005" / name / "metadata.json"
        path.write_text(json.dumps({"is_permanent": False, "start_time": "2026-01-01T00:00:00Z",
                                    "finish_time": "2026-01-01T00:00:00Z", "hostname": "", "data_dir": "",
                                    "pg_version": 150000, "start_lsn": 1, "finish_lsn": 2,
                                    "uncompressed_size": 0, "compressed_size": 0}))
    return tmp_path


def test_without_max_steps_every_backup_is_full(store):
    assert choose(store).base is None
    assert "WALG_DELTA_MAX_STEPS is 0" in choose(store).reason
    assert choose(store, WALG_DELTA_MAX_STEPS="5", full=True).reason == "--full was given"


def test_latest_is_the_base_and_the_count_grows(store):
    choice = choose(store, WALG_DELTA_MAX_STEPS="5")
    assert (choice.base.name, choice.base.count, choice.base.full_name, choice.base.lsn) == (D2, 3, FULL, 0x6000028)


def test_the_chain_stops_at_max_steps(store):
    choice = choose(store, WALG_DELTA_MAX_STEPS="2")  # D2 is step 2
    assert choice.base is None and "WALG_DELTA_MAX_STEPS is 2" in choice.reason


def test_latest_full_builds_on_the_chains_full_backup_and_counts_from_latest(store):
    choice = choose(store, WALG_DELTA_MAX_STEPS="5", WALG_DELTA_ORIGIN="LATEST_FULL")
    assert (choice.base.name, choice.base.count) == (FULL, 3)


def test_a_named_base(store):
    choice = choose(store, WALG_DELTA_MAX_STEPS="5", from_name=D1)
    assert (choice.base.name, choice.base.count) == (D1, 2)
    assert choose(store, WALG_DELTA_MAX_STEPS="5", WALG_DELTA_FROM_NAME=FULL).base.name == FULL


def test_a_named_base_that_does_not_exist_is_an_error(store):
    with pytest.raises(BackupError, match="not found"):
        choose(store, WALG_DELTA_MAX_STEPS="5", from_name="base_000000010000000000000099")


def test_a_permanent_base_takes_a_full_backup_unless_this_one_is_permanent(store):
    set_permanent(store, D2)
    assert "is permanent" in choose(store, WALG_DELTA_MAX_STEPS="5").reason
    assert choose(store, True, WALG_DELTA_MAX_STEPS="5").base.name == D2


def test_a_base_without_metadata_takes_a_full_backup(store):
    (store / "basebackups_005" / D2 / "metadata.json").unlink()
    assert "cannot be read" in choose(store, WALG_DELTA_MAX_STEPS="5").reason


def test_no_backup_at_all(tmp_path):
    assert "no backup" in choose(tmp_path, WALG_DELTA_MAX_STEPS="5").reason


@pytest.mark.parametrize("env", [{"WALG_DELTA_ORIGIN": "latest"}, {"WALG_DELTA_MAX_STEPS": "-1"},
                                 {"WALG_DELTA_FROM_USER_DATA": "{not json"}])
def test_bad_delta_settings_fail_at_start(env):
    with pytest.raises(ConfigError):
        settings(**env)


def _base(store: Path, name: str) -> DeltaBase:
    choice = choose(store, WALG_DELTA_MAX_STEPS="5", from_name=name)
    assert choice.base is not None
    return choice.base


def test_a_base_from_the_future_or_another_cluster_is_fatal(store):
    base = _base(store, D2)
    check_base(base, 0x7000000, SYSID)
    with pytest.raises(BackupError, match="from the future"):
        check_base(base, 0x6000000, SYSID)
    with pytest.raises(BackupError, match="another cluster"):
        check_base(base, 0x7000000, SYSID + 1)


def test_delta_names_follow_walg(store):
    assert delta_name("base_000000010000000000000008", _base(store, D2)) == \
        "base_000000010000000000000008_D_000000010000000000000006"
