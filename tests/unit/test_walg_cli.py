"""WAL-G's command line parses in walrus: every command, flag, short flag and setting flag WAL-G has
(tests/fixtures/walg_cli.json, read from WAL-G's source), and the reference in WALG_COMPAT.md is the parser's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from walrus.cli import cli
from walrus.cli.walg import MISSING_COMMANDS, flag_table, settings_table, split_global_flags
from walrus.config import KNOWN_NAMES, load_settings, setting_flags

ROOT = Path(__file__).resolve().parents[2]
WALG = json.loads((ROOT / "tests" / "fixtures" / "walg_cli.json").read_text())
WALRUS = [sys.executable, "-m", "walrus"]


def parse(argv: list[str]) -> click.Context:
    """The parse walrus.cli.main does, without running the command: global flags out, then click, level by level."""
    args, flags = split_global_flags(argv)
    ctx = cli.make_context("walrus", args, obj=flags)
    while isinstance(ctx.command, click.Group):
        rest = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else ctx.protected_args + ctx.args
        if not rest:  # a group alone: its help, exit 0 (HelpGroup), as in WAL-G
            break
        name, command, rest = ctx.command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


REQUIRED = {"copy": {"from": "a.json", "to": "b.json"}}


def _argv(command: dict, flag: dict | None, short: bool = False) -> list[str]:
    argv = command["path"].split()
    if command["path"] == "completion":
        argv.append("bash")
    elif command["path"].startswith("delete "):
        argv += {"retain": ["5"], "before": ["base_000000010000000000000002"], "target": ["base_x"]}.get(
            argv[1], [])
    else:
        argv += ["arg"] * command["min_args"]
    for required, value in REQUIRED.get(command["path"], {}).items():  # WAL-G marks these required too
        if flag is None or flag["long"] != required:
            argv += [f"--{required}", value]
    if flag is not None:
        argv.append(f"-{flag['short']}" if short else f"--{flag['long']}")
        if flag["type"] != "bool":
            argv.append({"uint64": "1", "uint32": "1", "int": "1", "uint": "1", "duration": "1s"}.get(flag["type"], "v"))
    return argv


CASES = [(c["path"], _argv(c, f, short)) for c in WALG["commands"]
         for f, short in [(None, False)] + [(f, False) for f in c["flags"]] + [(f, True) for f in c["flags"] if f["short"]]]


@pytest.mark.parametrize("argv", [argv for _, argv in CASES], ids=[" ".join(argv) for _, argv in CASES])
def test_every_walg_command_and_flag_parses(argv):
    parse(argv)  # a click.UsageError here is the outage this test exists for


def test_a_group_alone_prints_its_help_and_exits_0(tmp_path):
    for argv in ([], ["st"], ["st", "check"]):
        proc = run(argv, {}, tmp_path)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, (argv, proc.stderr)


def test_persistent_flags_anywhere_on_the_line():
    for argv in (["--turbo", "backup-list"], ["backup-list", "--turbo"], ["backup-list", "--config", "/x.json"],
                 ["--config=/x.json", "wal-push", "p"], ["wal-push", "p", "--walg-upload-concurrency", "4"],
                 ["--total-bg-uploaded-limit=1024", "wal-push", "p"], ["backup-push", "--s3-sse", "AES256"]):
        ctx = parse(argv)
        root = ctx.find_root().obj
        assert root.turbo or root.config_path or root.settings, argv
    _, flags = split_global_flags(["wal-push", "--walg-upload-concurrency", "4", "p", "--turbo=false"])
    assert flags.settings == {"WALG_UPLOAD_CONCURRENCY": "4"} and flags.turbo is False


def test_every_walg_setting_is_known_and_has_its_flag():
    assert sorted(set(WALG["settings"]) - KNOWN_NAMES) == []
    ours = setting_flags()
    assert sorted(f"--{flag}" for flag in WALG["setting_flags"] if f"--{flag}" not in ours) == []


def test_a_setting_flag_wins_over_environment_and_file(tmp_path):
    config = tmp_path / "walg.json"
    config.write_text(json.dumps({"WALG_UPLOAD_CONCURRENCY": "3", "WALG_DOWNLOAD_CONCURRENCY": "7"}))
    env = {"WALG_UPLOAD_CONCURRENCY": "5", "WALG_DOWNLOAD_CONCURRENCY": "6"}
    settings = load_settings(env, str(config), flags={"WALG_UPLOAD_CONCURRENCY": "9"})
    assert (settings.upload_concurrency, settings.download_concurrency) == (9, 6)
    assert settings.sources["upload_concurrency"].startswith("command line")


def test_turbo_lifts_the_rate_limits():
    env = {"WALG_NETWORK_RATE_LIMIT": "1000000", "WALG_DISK_RATE_LIMIT": "2000000"}
    assert (load_settings(env).network_rate_limit, load_settings(env).disk_rate_limit) == (1000000, 2000000)
    turbo = load_settings(env, turbo=True)
    assert (turbo.network_rate_limit, turbo.disk_rate_limit) == (None, None)


def test_unknown_ignored_refused_and_exported_settings(tmp_path):
    warnings: list[str] = []
    config = tmp_path / "walg.yaml"
    config.write_text("WALG_COMPRESION_METHOD: zstd\nPGSSLMODE: require\n")
    settings = load_settings({"WALG_UPLOAD_CONCURENCY": "2", "WALG_USE_WAL_DELTA": "true", "PGSSLROOTCERT": "/x"},
                             str(config), warn=warnings.append)
    assert any("WALG_UPLOAD_CONCURENCY" in w and "did you mean WALG_UPLOAD_CONCURRENCY" in w for w in warnings)
    assert any("WALG_COMPRESION_METHOD" in w and "WALG_COMPRESSION_METHOD" in w for w in warnings)
    assert any(w.startswith("WALG_USE_WAL_DELTA is set") for w in warnings)
    assert dict(settings.exports) == {"PGSSLMODE": "require"}  # the environment's own PGSSLROOTCERT stays as is
    quiet: list[str] = []
    load_settings({"WALG_USE_WAL_DELTA": "false", "WALG_DELTA_MAX_STEPS": "0", "GOMAXPROCS": "4"}, warn=quiet.append)
    assert quiet == []
    from walrus.errors import ConfigError

    for env in ({"WALG_SWIFT_PREFIX": "swift://b/p"}, {"WALG_PG_BLOCK_SIZE": "16384"}):
        with pytest.raises(ConfigError, match="walrus does not support it"):
            load_settings(env)
    assert load_settings({"WALG_PG_BLOCK_SIZE": "8192", "WALG_VERIFY_PAGE_CHECKSUMS": "true"}).verify_page_checksums


def test_wale_spellings_are_read():
    settings = load_settings({"WALE_AWS_REGION": "eu-west-1", "WALE_S3_STORAGE_CLASS": "STANDARD_IA"})
    assert (settings.aws_region, settings.s3_storage_class) == ("eu-west-1", "STANDARD_IA")


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "AWS_"))}
    full.update(env)
    return subprocess.run(WALRUS + argv, env=full, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", sorted(MISSING_COMMANDS))
def test_missing_commands_fail_clearly_not_as_usage_errors(name, tmp_path):
    proc = run([name, "--some-walg-flag", "x", "arg"], {"WALG_FILE_PREFIX": str(tmp_path)}, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"walrus does not implement WAL-G's {name} command yet" in proc.stderr and "HINT:" in proc.stderr


def test_refused_flags_exit_1_before_any_work(tmp_path):
    for argv in (["backup-push", "--verify", str(tmp_path)], ["backup-push", "--delta-from-name", "base_x"],
                 ["delete", "garbage", "--without-backup-check"], ["backup-list", "--target-storage", "other"]):
        proc = run(argv, {"WALG_FILE_PREFIX": str(tmp_path / "store")}, tmp_path)
        assert proc.returncode == 1 and "ERROR:" in proc.stderr and "HINT:" in proc.stderr, (argv, proc.stderr)
    assert not (tmp_path / "store").exists()


def test_flags_completion_and_help(tmp_path):
    listed = run(["flags"], {}, tmp_path).stdout
    for flag in ("--walg-file-prefix", "--walg-upload-concurrency", "--total-bg-uploaded-limit", "--s3-sse", "--turbo"):
        assert flag in listed
    for shell, marker in (("bash", "complete -o"), ("zsh", "compdef"), ("fish", "complete --no-files")):
        proc = run(["completion", shell], {}, tmp_path)
        assert proc.returncode == 0 and marker in proc.stdout, (shell, proc.stdout[:200])
    proc = subprocess.run(["bash", "-c", 'source <(walrus completion bash) && complete -p walrus'],
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "_walrus_completion" in proc.stdout, proc.stderr
    helped = run(["help", "backup-push"], {}, tmp_path)
    assert helped.returncode == 0 and "--add-user-data" in helped.stdout


def test_compat_reference_is_generated_from_the_parser():
    text = (ROOT / "docs" / "WALG_COMPAT.md").read_text()
    for marker, generated in (("command line", flag_table(cli)), ("settings", settings_table())):
        found = re.search(rf"<!-- BEGIN {marker} .*?-->\n(.*?)<!-- END {marker} -->", text, re.S)
        assert found, f"WALG_COMPAT.md lost its generated {marker} reference"
        assert found.group(1) == generated, f"run `python -m walrus.cli.walg` to regenerate the {marker} reference"


def test_every_command_is_in_the_man_page():
    import importlib.util

    spec = importlib.util.spec_from_file_location("walrus_manpage", ROOT / "packaging" / "manpage.py")
    manpage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(manpage)
    page = manpage.render()
    from walrus.cli.walg import walk_commands

    for path, _ in walk_commands(cli):
        assert f".SS {manpage.esc(path)}" in page, path
