"""Metrics: the Prometheus textfile (format, atomic replacement, concurrent writers, never failing a
command) and WAL-G's statsd datagrams, received on a real UDP socket from the real `walrus` command."""
from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from walrus import config, metrics
from walrus.config import load_settings
from walrus.errors import ConfigError

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
SEGMENT = "000000010000000000000001"
PUSHED = {"upload": 1000, "download": 0, "files": 1, "failed_files": 0, "segments": 1}


def walrus(args, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "WALRUS_", "PG", "AWS_"))}
    base["HOME"] = "/nonexistent"
    base.update(env)
    return subprocess.run([WALRUS, *args], env=base, capture_output=True, text=True, timeout=60)


def sample(series, name, **labels):
    return series.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def received(sock) -> list[str]:
    lines = sock.recvfrom(65536)[0].decode().splitlines()
    sock.settimeout(0.2)  # anything else sent by the same command arrives at once
    try:
        while True:
            lines += sock.recvfrom(65536)[0].decode().splitlines()
    except socket.timeout:
        pass
    sock.settimeout(5)
    return lines


def test_textfile_format_round_trips_with_help_and_type(tmp_path):
    series = {}
    metrics.apply_run(series, "wal-push", 0, 0.25, PUSHED, 1000.5)
    metrics.apply_run(series, "wal-push", 0, 0.5, PUSHED, 1010.0)
    metrics.apply_run(series, "wal-push", 1, 0.125, {**PUSHED, "upload": 0}, 1020.0)
    metrics.apply_run(series, "wal-fetch", 74, 0.01, PUSHED, 1030.0)
    metrics.apply_run(series, "backup-push", 0, 60.0,
                      {**PUSHED, "upload": 300, "compressed": 300, "uncompressed": 900}, 1040.0)
    metrics.apply_run(series, 'odd "name"\\x', 0, 1.0, PUSHED, 1050.0)
    text = metrics.render_textfile(series)
    assert metrics.parse_textfile(text) == series
    for name, (kind, _) in metrics.PROM.items():
        assert f"\n# TYPE {name} {kind}\n" in "\n" + text, name
        assert text.count(f"# HELP {name} ") == 1
    back = metrics.parse_textfile(text)
    assert sample(back, "walrus_command_runs_total", command="wal-push", result="success") == 2
    assert sample(back, "walrus_command_runs_total", command="wal-push", result="failure") == 1
    assert sample(back, "walrus_command_runs_total", command="wal-fetch", result="not_found") == 1
    assert sample(back, "walrus_command_runs_total", command="backup-push", result="failure") == 0  # there, for increase()
    assert sample(back, "walrus_last_success_timestamp_seconds", command="wal-push") == 1010.0
    assert sample(back, "walrus_last_failure_timestamp_seconds", command="wal-push") == 1020.0
    assert sample(back, "walrus_last_failure_timestamp_seconds", command="wal-fetch") is None  # not archived: no failure
    assert sample(back, "walrus_command_duration_seconds", command="wal-push") == 0.125
    assert sample(back, "walrus_bytes_total", command="wal-push", direction="upload") == 2000
    assert sample(back, "walrus_wal_pushed_segments_total") == 2
    assert sample(back, "walrus_backup_last_size_bytes", kind="uncompressed") == 900
    assert sample(back, "walrus_command_runs_total", command='odd "name"\\x', result="success") == 1
    assert 'walrus_command_runs_total{command="wal-push",result="success"} 2\n' in text
    assert metrics.parse_textfile("garbage\nother_metric 1\n" + text) == series  # only walrus's own are kept


def test_each_update_replaces_the_file_atomically(tmp_path):
    path = str(tmp_path / "walrus.prom")
    metrics.update_textfile(path, "wal-push", 0, 0.1, PUSHED)
    first = os.stat(path)
    with open(path) as old:  # a reader holding the old file keeps reading it whole
        metrics.update_textfile(path, "wal-push", 0, 0.1, PUSHED)
        assert sample(metrics.parse_textfile(old.read()), "walrus_wal_pushed_segments_total") == 1
    assert os.stat(path).st_ino != first.st_ino  # renamed over, never rewritten in place
    assert sample(metrics.parse_textfile(open(path).read()), "walrus_wal_pushed_segments_total") == 2
    assert sorted(os.listdir(tmp_path)) == ["walrus.prom", "walrus.prom.lock"]  # no temporary file left
    assert os.stat(path).st_mode & 0o044 == 0o044  # node_exporter, another user, reads it


def _writer(path: str, runs: int) -> None:
    for _ in range(runs):
        metrics.update_textfile(path, "wal-push", 0, 0.01, PUSHED)


def test_concurrent_writers_lose_no_count(tmp_path, monkeypatch):
    path = str(tmp_path / "walrus.prom")
    monkeypatch.setattr(metrics, "LOCK_WAIT", 30.0)  # the forked writers' too: a busy machine loses no count
    procs = [multiprocessing.get_context("fork").Process(target=_writer, args=(path, 25)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    series = metrics.parse_textfile(open(path).read())
    assert sample(series, "walrus_command_runs_total", command="wal-push", result="success") == 150
    assert sample(series, "walrus_wal_pushed_segments_total") == 150
    assert sample(series, "walrus_bytes_total", command="wal-push", direction="upload") == 150_000


def test_a_held_lock_is_waited_for_boundedly_then_warned(tmp_path, monkeypatch, log_lines):
    import fcntl

    path = str(tmp_path / "walrus.prom")
    monkeypatch.setattr(metrics, "LOCK_WAIT", 0.2)
    with open(path + ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        began = time.monotonic()
        metrics.update_textfile(path, "wal-push", 0, 0.1, PUSHED)
        assert time.monotonic() - began < 1.0
    assert not os.path.exists(path)
    assert len(log_lines) == 1 and "not updated" in log_lines[0] and path in log_lines[0]


def test_settings_are_validated_and_a_config_file_map_is_taken(tmp_path):
    with pytest.raises(ConfigError, match="WALG_STATSD_ADDRESS"):
        load_settings({"HOME": "/nonexistent", "WALG_STATSD_ADDRESS": "localhost"})
    with pytest.raises(ConfigError, match="WALG_STATSD_EXTRA_TAGS"):
        load_settings({"HOME": "/nonexistent", "WALG_STATSD_EXTRA_TAGS": "host=db1"})
    s = load_settings({"HOME": "/nonexistent", "WALG_STATSD_ADDRESS": "[::1]:8125",
                       "WALG_STATSD_EXTRA_TAGS": '{"host": "db1", "n": 2}'})
    assert s.statsd_address == "[::1]:8125" and s.statsd_extra_tags == {"host": "db1", "n": "2"}
    conf = tmp_path / "walg.json"
    conf.write_text('{"WALG_STATSD_ADDRESS": "127.0.0.1:9125", "WALG_STATSD_EXTRA_TAGS": {"host": "db2"}}')
    s = load_settings({"HOME": "/nonexistent"}, config_path=str(conf))
    assert s.statsd_address == "127.0.0.1:9125" and s.statsd_extra_tags == {"host": "db2"}
    assert "WALG_STATSD_ADDRESS" in config.settings_help() and "WALRUS_METRICS_FILE" in config.settings_help()


def test_statsd_to_an_unreachable_or_unknown_host_costs_nothing():
    began = time.monotonic()
    metrics.send_statsd("127.0.0.1:9", ["walg_x:1|c"])  # nothing listens: UDP does not care
    metrics.send_statsd("no-such-host.invalid:8125", ["walg_x:1|c"])
    metrics.send_statsd("not an address", ["walg_x:1|c"])
    assert time.monotonic() - began < 2 * metrics.STATSD_WAIT + 0.5


def test_wal_push_sends_walgs_statsd_metrics_and_counts_in_the_textfile(tmp_path, listener):
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    (wal / SEGMENT).write_bytes(os.urandom(1 << 20) + bytes(15 << 20))
    prom = tmp_path / "textfile" / "walrus.prom"
    prom.parent.mkdir()
    env = {"WALG_FILE_PREFIX": str(tmp_path / "store"), "WALRUS_METRICS_FILE": str(prom),
           "WALG_STATSD_ADDRESS": f"127.0.0.1:{listener.getsockname()[1]}",
           "WALG_STATSD_EXTRA_TAGS": '{"host": "db1", "cluster": "main"}'}
    proc = walrus(["wal-push", str(wal / SEGMENT)], env)
    assert proc.returncode == 0, proc.stderr
    lines = received(listener)
    by_name = {line.split(",", 1)[0]: line for line in lines}
    stored = (tmp_path / "store" / "wal_005" / (SEGMENT + ".lz4")).stat().st_size
    assert by_name["walg_uploader_uploaded_files_total"] == \
        "walg_uploader_uploaded_files_total,cluster=main,host=db1:1|c"
    assert by_name["walg_uploader_uploaded_files_failed_total"].endswith(":0|c")
    assert by_name["walg_s3_bytes_written"] == f"walg_s3_bytes_written,cluster=main,host=db1:{stored}|g"
    assert by_name["walg_s3_upload_time"].endswith("|ms")
    assert set(by_name) == {"walg_s3_bytes_read", "walg_s3_bytes_written", "walg_s3_upload_time",
                            "walg_uploader_uploaded_files_failed_total", "walg_uploader_uploaded_files_total"}

    # a failed push is counted too, and statsd hears of the failed upload
    proc = walrus(["wal-push", str(wal / "000000010000000000000002")], env)
    assert proc.returncode == 1
    assert "walg_uploader_uploaded_files_failed_total,cluster=main,host=db1:1|c" in received(listener)
    # a segment not archived is neither a success nor a failure; a usage error (no settings) is a failure
    assert walrus(["wal-fetch", "00000001000000000000000F", str(tmp_path / "x")], env).returncode == 74
    assert walrus(["wal-push"], {"WALRUS_METRICS_FILE": str(prom)}).returncode == 2

    series = metrics.parse_textfile(prom.read_text())
    assert sample(series, "walrus_command_runs_total", command="wal-push", result="success") == 1
    assert sample(series, "walrus_command_runs_total", command="wal-push", result="failure") == 2
    assert sample(series, "walrus_command_runs_total", command="wal-fetch", result="not_found") == 1
    assert sample(series, "walrus_wal_pushed_segments_total") == 1
    assert sample(series, "walrus_bytes_total", command="wal-push", direction="upload") == stored
    assert 0 < sample(series, "walrus_last_success_timestamp_seconds", command="wal-push") <= \
        sample(series, "walrus_last_failure_timestamp_seconds", command="wal-push") <= time.time()
    assert 0 < sample(series, "walrus_command_duration_seconds", command="wal-push") < 30


def test_an_unwritable_metrics_file_is_one_warning_and_the_command_succeeds(tmp_path):
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    (wal / SEGMENT).write_bytes(bytes(16 << 20))
    env = {"WALG_FILE_PREFIX": str(tmp_path / "store"), "WALRUS_METRICS_FILE": str(tmp_path / "no" / "dir.prom")}
    proc = walrus(["wal-push", str(wal / SEGMENT)], env)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "metrics file" in warnings[0] and "not updated" in warnings[0], proc.stderr
    assert (tmp_path / "store" / "wal_005" / (SEGMENT + ".lz4")).is_file()


def test_the_dashboard_and_the_docs_name_the_metrics_written():
    import json
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    dashboard = json.loads((docs / "grafana" / "walrus-dashboard.json").read_text())
    assert dashboard["schemaVersion"] >= 30 and dashboard["panels"]
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"walrus_\w+", target["expr"])}
    assert used == set(metrics.PROM)
    text = (docs / "METRICS.md").read_text()
    for name in [*metrics.PROM, "walg_uploader_uploaded_files_total", "walg_s3_upload_time", "WALG_STATSD_EXTRA_TAGS"]:
        assert name in text, name


def test_each_command_in_one_process_is_reported_once_and_apart(tmp_path):
    prom = tmp_path / "walrus.prom"
    (tmp_path / "store").mkdir()
    script = ("import sys\nfrom walrus.cli import main\n"
              "for argv in (['backup-list', '--json'], ['backup-list', '--no-such-flag'], ['--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit as e:\n        print('EXIT', e.code)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "WALRUS_", "PG", "AWS_"))}
    env.update(HOME="/nonexistent", WALRUS_METRICS_FILE=str(prom), WALG_FILE_PREFIX=str(tmp_path / "store"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert [line for line in proc.stdout.splitlines() if line.startswith("EXIT")] == ["EXIT 0", "EXIT 2", "EXIT 0"]
    series = metrics.parse_textfile(prom.read_text())
    assert sample(series, "walrus_command_runs_total", command="backup-list", result="success") == 1
    assert sample(series, "walrus_command_runs_total", command="backup-list", result="failure") == 1
    assert {labels for name, labels in series if name == "walrus_command_runs_total"} == {
        (("command", "backup-list"), ("result", "success")), (("command", "backup-list"), ("result", "failure"))}
