"""What an operator's typo gets through the real `walrus` command: a storage prefix that does not exist
is an error for read commands (never an empty list that monitoring would take as fine), and a
misspelled setting in a config file is a WARNING that names the setting it probably meant."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")


def _walrus(args: list[str], env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_", "WALRUS_"))}
    return subprocess.run([WALRUS, *args], env={**base, "HOME": "/nonexistent", **env}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("args", [["backup-list"], ["backup-list", "--detail", "--json"], ["wal-show"],
                                  ["backup-fetch", "/tmp/never-made", "LATEST"], ["delete", "retain", "1"]])
def test_a_storage_prefix_that_does_not_exist_is_an_error(tmp_path, args):
    missing = tmp_path / "typo"
    proc = _walrus(args, {"WALG_FILE_PREFIX": str(missing)})
    assert proc.returncode == 1, proc
    assert f"file storage {missing} cannot be read" in proc.stderr
    assert "HINT: check WALG_FILE_PREFIX" in proc.stderr
    assert "No backups found" not in proc.stderr + proc.stdout
    assert not missing.exists() and not os.path.exists("/tmp/never-made")


def test_an_empty_storage_that_exists_lists_no_backups_and_succeeds(tmp_path):
    proc = _walrus(["backup-list"], {"WALG_FILE_PREFIX": str(tmp_path)})
    assert proc.returncode == 0 and "No backups found" in proc.stderr


@pytest.mark.parametrize("suffix, text", [(".yaml", "WALG_COMPRESION_METHOD: zstd\n"),
                                          (".json", '{"WALG_COMPRESION_METHOD": "zstd"}')])
def test_a_misspelled_setting_in_a_config_file_gets_a_suggestion(tmp_path, suffix, text):
    config = tmp_path / f"walg{suffix}"
    config.write_text(text)
    proc = _walrus(["--config", str(config), "backup-list"], {"WALG_FILE_PREFIX": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "WALG_COMPRESION_METHOD" in line]
    assert len(warning) == 1 and warning[0].startswith("WARNING: ")
    assert "did you mean WALG_COMPRESSION_METHOD?" in warning[0] and str(config) in warning[0]
