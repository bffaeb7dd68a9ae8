"""The status line of backup-push and backup-fetch: its rendering, its log hook, and a real backup-fetch on a pseudo-terminal."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import time

import pytest

from tests.terminal import run_on_tty
from tests.unit.test_backup_fetch import NAME, WALRUS, build_backup, tree
from walrus.log import _StderrHandler, _WalgFormatter
from walrus.progress import CLEAR, Progress, format_clock, format_size, wanted
from walrus.stream.stages import metered

GiB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("n, shown", [(0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                      (1536, "1.5 KiB"), (812 << 20, "812 MiB"), (int(1.2 * GiB), "1.2 GiB"),
                                      (3 * GiB, "3.0 GiB"), (15 * GiB, "15 GiB"), ((1 << 30) - 1, "1.0 GiB"),
                                      (int(9.96 * GiB), "10 GiB"), (5 << 40, "5.0 TiB")])
def test_sizes_in_binary_units(n, shown):
    assert format_size(n) == shown


@pytest.mark.parametrize("seconds, shown", [(0, "0:00"), (2.4, "0:02"), (59.6, "1:00"), (754, "12:34"),
                                            (3723, "1:02:03"), (-5, "0:00")])
def test_clock(seconds, shown):
    assert format_clock(seconds) == shown


def test_line_with_total_rate_eta_and_parts():
    clock = Clock()
    p = Progress("backup-push", io.StringIO(), clock=clock, width=200)
    assert p.line() == "backup-push  0 B  parts 0"  # no total yet, no rate before half a second
    p.set_total(3 * GiB, parts=9)
    clock.now += 1.5
    p.add(3 * GiB * 2 // 5 + 1)  # 40%: the percent is floored, never 100 before the end
    for _ in range(3):
        p.part_done()
    assert p.line() == "backup-push  1.2 GiB of 3.0 GiB  40%  819 MiB/s  ETA 0:02  parts 3/9"


def test_line_labels_its_total_and_never_claims_more_than_done():
    clock = Clock()
    p = Progress("backup-fetch", io.StringIO(), clock=clock, width=200)
    p.set_total(100 << 20, parts=2, note="compressed")
    clock.now += 1
    p.add(120 << 20)  # more than the estimate: the total follows, no ETA
    p.part_done(), p.part_done(), p.part_done()
    assert p.line() == "backup-fetch  120 MiB of 120 MiB compressed  100%  120 MiB/s  parts 3/3"


def test_rate_follows_the_last_seconds():
    clock = Clock()
    p = Progress("backup-push", io.StringIO(), clock=clock, width=200)
    for _ in range(40):  # 10 s at 100 MiB/s, drawn four times a second
        clock.now += 0.25
        p.add(25 << 20)
        p.line()
    for _ in range(40):  # then 10 s at 10 MiB/s
        clock.now += 0.25
        p.add(int(2.5 * (1 << 20)))
        p.line()
    assert "10 MiB/s" in p.line()


def test_summary_and_stopped():
    clock = Clock()
    out = io.StringIO()
    p = Progress("backup-push", out, clock=clock, width=200)
    clock.now += 4
    p.add(3 * GiB)
    p.part_done()
    p.finish(ok=True)
    assert out.getvalue() == CLEAR + "backup-push  3.0 GiB in 0:04  768 MiB/s  parts 1\n"
    p.finish(ok=False)  # once only
    assert out.getvalue().count("\n") == 1
    out = io.StringIO()
    p = Progress("backup-fetch", out, clock=clock, width=200)
    p.finish(ok=False)
    assert out.getvalue() == ""  # failed before its first redraw: nothing to end
    p = Progress("backup-fetch", out, clock=clock, width=200)
    p.draw()
    p.finish(ok=False)
    assert out.getvalue() == CLEAR + "backup-fetch  0 B  parts 0" + CLEAR + "backup-fetch  0 B  parts 0  stopped\n"


def test_line_is_cut_to_the_terminal_width():
    out = io.StringIO()
    p = Progress("backup-push", out, width=12)
    p.draw()
    assert out.getvalue() == CLEAR + "backup-push"  # 11 columns: the last one is never written
    p.finish()


def test_ticker_redraws_at_most_four_times_a_second():
    out = io.StringIO()
    with Progress("backup-push", out, width=200) as p:
        for _ in range(100):
            p.add(1 << 20)
            time.sleep(0.01)
    draws = out.getvalue().count(CLEAR)
    assert 2 <= draws <= 6, out.getvalue()  # ~1 s: about four redraws and the summary
    assert out.getvalue().endswith("\n")


def test_log_records_step_around_the_line():
    out = io.StringIO()
    handler = _StderrHandler(out)
    handler.setFormatter(_WalgFormatter())
    record = logging.LogRecord("walrus", logging.INFO, __file__, 1, "uploaded part_001.tar.lz4", None, None)
    p = Progress("backup-push", out, width=200, interval=3600)
    handler.handle(record)  # no line drawn yet: a plain record
    p.start()
    try:
        p.draw()
        before = out.getvalue()
        handler.handle(record)
        after = out.getvalue()[len(before):]
    finally:
        p.finish()
    assert after.startswith(CLEAR + "INFO: ")
    assert after.endswith("uploaded part_001.tar.lz4\nbackup-push  0 B  parts 0")
    assert out.getvalue().count("INFO: ") == 2


def test_metered_counts_each_item_once_and_closes_its_upstream():
    import asyncio

    closed = []

    async def source():
        try:
            for n in (65536, 1 << 20, 3):
                yield b"x" * n
        finally:
            closed.append(True)

    async def main() -> list[int]:
        counted: list[int] = []
        stream = metered(source(), counted.append)
        first = await stream.__anext__()
        await stream.aclose()
        assert len(first) == 65536
        async for _ in metered(source(), counted.append):
            pass
        return counted

    assert asyncio.run(main()) == [65536, 65536, 1 << 20, 3]
    assert closed == [True, True]


def test_wanted_only_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    master, slave = os.openpty()
    r, w = os.pipe()
    try:
        assert wanted(None, fd=slave)
        assert wanted("stderr", fd=slave)
        assert not wanted(None, fd=w)  # a pipe
        assert not wanted("/var/log/walrus.log", fd=slave)  # the log goes to a file
        assert not wanted(None, off=True, fd=slave)  # --no-progress
        monkeypatch.setenv("TERM", "dumb")
        assert not wanted(None, fd=slave)
    finally:
        for fd in (master, slave, r, w):
            os.close(fd)


# -- a real backup-fetch, its standard error a pseudo-terminal or a pipe ------------------------------

def _env(store) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_"))}
    env.update(HOME="/nonexistent", WALG_FILE_PREFIX=str(store), WALG_DOWNLOAD_CONCURRENCY="2", TERM="xterm")
    return env




@pytest.fixture(scope="module")
def backup(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return store, build_backup(store, big=48 << 20)


def test_backup_fetch_draws_its_line_on_a_terminal(backup, tmp_path):
    store, contents = backup
    rc, out, tty = run_on_tty([WALRUS, "backup-fetch", str(tmp_path / "restore"), "LATEST", "--json"], _env(store))
    assert rc == 0, tty
    assert json.loads(out)["backup_name"] == NAME  # stdout is the JSON's alone
    assert tree(tmp_path / "restore") == contents
    assert CLEAR in tty
    stored = sum(p.stat().st_size for p in (store / "basebackups_005" / NAME / "tar_partitions").iterdir())
    lines = tty.split("\n")
    # the summary, before the command's last record: every byte stored, every part
    summary = [line.rsplit(CLEAR, 1)[-1] for line in lines if "backup-fetch  " in line]
    assert len(summary) == 1 and lines[-2].startswith("INFO: ") and "restored " + NAME in lines[-2], tty
    assert summary[0].startswith(f"backup-fetch  {format_size(stored)} in "), tty
    assert summary[0].endswith("/s  parts 5/5"), tty
    # each log record on a line of its own, never after the status line's text
    for line in lines:
        shown = line.rsplit(CLEAR, 1)[-1] if CLEAR in line else line
        if "INFO:" in line or "WARNING:" in line:
            assert shown.startswith(("INFO: ", "WARNING: ")), repr(line)
    assert sum("INFO: " in line and "restored part_" in line for line in lines) == 3
    assert all(len(shown) < 160 for shown in summary)


def test_no_progress_on_a_terminal(backup, tmp_path):
    store, _ = backup
    rc, _, tty = run_on_tty([WALRUS, "backup-fetch", "--no-progress", str(tmp_path / "restore"), "LATEST"],
                            _env(store))
    assert rc == 0, tty
    assert "\r" not in tty.replace("\r\n", "\n") and "backup-fetch  " not in tty
    assert "restored part_001" in tty


def test_no_line_when_stderr_is_a_pipe(backup, tmp_path):
    store, _ = backup
    proc = subprocess.run([WALRUS, "backup-fetch", str(tmp_path / "restore"), "LATEST"], env=_env(store),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    assert "backup-fetch  " not in proc.stderr and "restored part_001" in proc.stderr


def test_log_file_destination_draws_no_line(backup, tmp_path):
    store, _ = backup
    env = _env(store) | {"WALG_LOG_DESTINATION": str(tmp_path / "walrus.log")}
    rc, _, tty = run_on_tty([WALRUS, "backup-fetch", str(tmp_path / "restore"), "LATEST"], env)
    assert rc == 0, tty
    assert CLEAR not in tty
    assert "restored part_001" in (tmp_path / "walrus.log").read_text()


def test_a_failure_ends_the_line_before_the_error(backup, tmp_path):
    store, _ = backup
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep-me").write_text("")
    rc, _, tty = run_on_tty([WALRUS, "backup-fetch", str(occupied), "LATEST"], _env(store))
    assert rc == 1
    assert tty.startswith("ERROR: ") and "not empty" in tty and CLEAR not in tty  # failed before any redraw
