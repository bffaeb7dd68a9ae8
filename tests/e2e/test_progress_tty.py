"""backup-push and backup-fetch of a small real PostgreSQL 15 with standard error a pseudo-terminal: the status line
is drawn (bytes of the total, percent, rate, parts), log records keep lines of their own, and stdout's JSON is untouched."""
from __future__ import annotations

import json
import os
import re

import pytest

from tests.pgcluster import WALRUS, Cluster, _user_env, as_user, make_workdir, remove_tree, write_config
from tests.terminal import run_on_tty
from walrus.progress import CLEAR

pytestmark = pytest.mark.e2e


def _on_tty(args: list[str], env: dict, bound: float = 180) -> tuple[int, str, str]:
    """Run as the test user with standard error a 160-column pseudo-terminal: (exit code, stdout, terminal)."""
    return run_on_tty(args, _user_env({**env, "TERM": "xterm"}), bound=bound, **as_user())


def _status_lines(tty: str, label: str) -> list[str]:
    return [drawn for line in tty.split("\n") for drawn in line.split(CLEAR) if drawn.startswith(label + "  ")]


def test_progress_line_of_push_and_fetch() -> None:
    root = make_workdir("walrus-e2e-progress-")
    storage = os.path.join(root, "storage")
    # the disk rate limit stretches the push of ~40 MiB over a couple of seconds: several redraws
    config = write_config(os.path.join(root, "walg.json"), {
        "WALG_FILE_PREFIX": storage, "WALG_TAR_SIZE_THRESHOLD": str(8 << 20), "WALG_DISK_RATE_LIMIT": str(20 << 20),
        "WALG_UPLOAD_DISK_CONCURRENCY": "2"})
    cluster = Cluster.init(root)
    try:
        cluster.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p")
        cluster.start()
        cluster.psql("CREATE TABLE notes AS SELECT g AS id, repeat(md5(g::text), 8) AS body "
                     "FROM generate_series(1, 60000) g")

        rc, out, tty = _on_tty([WALRUS, "--config", config, "backup-push", cluster.data, "--json"], cluster.env)
        assert rc == 0, tty
        result = json.loads(out)  # stdout is the JSON's alone
        drawn = _status_lines(tty, "backup-push")
        assert len(drawn) >= 3, tty
        summary = drawn[-1]
        parts = len(result["parts"])
        assert re.fullmatch(rf"backup-push  \S+ \S+ in \d+:\d\d  \S+ \S+/s  parts {parts}", summary), tty
        # while it ran: bytes of the walk's total, a percent, a rate, an ETA
        running = [line for line in drawn[:-1] if " of " in line]
        assert running, tty
        assert all(re.match(r"backup-push  \S+ \S+ of \S+ \S+  \d+%", line) for line in running), running
        assert any("/s  ETA " in line for line in running), running
        assert all(int(re.search(r"  (\d+)%", line).group(1)) <= 100 for line in running)
        # each log record on a line of its own
        for line in tty.split("\n"):
            if "INFO:" in line:
                assert line.rsplit(CLEAR, 1)[-1].startswith("INFO: "), repr(line)
        assert f"Wrote backup with name {result['backup_name']}" in tty.split("\n")[-2]

        target = os.path.join(root, "restore")
        rc, out, tty = _on_tty([WALRUS, "--config", config, "backup-fetch", target, "LATEST", "--json"], {})
        assert rc == 0, tty
        assert json.loads(out)["backup_name"] == result["backup_name"]
        summary = _status_lines(tty, "backup-fetch")[-1]
        assert re.fullmatch(rf"backup-fetch  \S+ \S+ in \d+:\d\d  \S+ \S+/s  parts {parts}/{parts}", summary), tty

        # --no-progress: the same command, no status line
        rc, _, tty = _on_tty([WALRUS, "--config", config, "backup-push", cluster.data, "--no-progress"], cluster.env)
        assert rc == 0, tty
        assert CLEAR not in tty and "backup-push  " not in tty
    finally:
        cluster.stop()
        remove_tree(root)
