"""Per-tool WAL adapters: archive_command, restore_command, daemons and repositories of each archiver."""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from bench.objectstore import ObjectStore
from bench.tools import (BARMAN_SERVER, PGBACKREST, STANZA, barman_compression, barman_missing, first_line,
                         pgbackrest_argv, pgbackrest_etc, pgbackrest_stanza, user_dir)
from tests.pgcluster import WALRUS, Cluster, chown_to_user

# walrus's daemon client as the packages run it: /usr/bin/walg-daemon-client's shebang is
# `/opt/walrus/bin/python3 -IS`, one exec; the venv's copy keeps the sh prelude a wheel needs
WALRUS_CLIENT = [os.path.join(os.path.dirname(WALRUS), "python3"), "-IS",
                 os.path.join(os.path.dirname(WALRUS), "walg-daemon-client")]
# WALG_DOWNLOAD_CONCURRENCY's default in WAL-G and walrus: the prefetch window every tool gets in replay
PREFETCH_WINDOW = 10


@dataclass(frozen=True)
class WalSetup:
    """What every WAL tool shares in one bench run."""

    source: Cluster  # the archiving cluster (pgBackRest's stanza is created against it)
    root: str
    compression: str  # lz4 | zstd
    workers: int
    segment_mib: int
    store: ObjectStore | None = None  # --storage s3: repositories are key prefixes in the S3 endpoint


def env_words(env: dict[str, str]) -> list[str]:
    """`env K=V ...`: settings for one command of an archive_command or restore_command."""
    return ["env", *(f"{k}={v}" for k, v in env.items())] if env else []


class WalTool:
    """One archiver: how it pushes a segment, fetches one, and which daemon (if any) runs beside the server.

    Tools of one family read one repository in replay (the walrus variants share walrus's, for instance),
    so family_repo() names it and new_repo() prepares it, the same for every member.
    """

    name: str  # as given to --wal-tools
    label: str  # archiving tables
    replay_label: str  # replay table
    family: str
    binary: str
    ops: tuple[str, ...]  # of archive, drain, replay
    storages: tuple[str, ...] = ("file", "s3")  # where its repository can be

    def missing(self) -> str | None:
        return None

    def storage_missing(self, storage: str) -> str | None:
        """Why the tool cannot keep its repository on `storage` (file or s3), or None."""
        return None if storage in self.storages else f"runs here on {' or '.join(self.storages)} storage only"

    def version(self) -> str:
        raise NotImplementedError

    def new_repo(self, s: WalSetup, repo: str) -> None:
        user_dir(repo)

    def push_command(self, s: WalSetup, repo: str, daemon_socket: str | None, solo: bool = False) -> str:
        """archive_command (without the cgroup prefix). solo: push only %p, no look-ahead (replay's setup
        archives every family with one composite command, so nobody may mark other segments .done)."""
        raise NotImplementedError

    def fetch_command(self, s: WalSetup, repo: str, pgdata: str, daemon_socket: str | None, scratch: str) -> str:
        """restore_command (without the cgroup prefix); scratch is an empty directory of this run."""
        raise NotImplementedError

    def daemon(self, s: WalSetup, repo: str, socket_path: str) -> list[str] | None:
        """argv of a long-running process serving the commands on socket_path (it is given PGDATA), or None."""
        return None

    def missing_segments(self, repo: str, names: list[str]) -> list[str]:
        """The WAL file names that are not stored in repo (a directory; on S3, s3rver's folder of the prefix,
        which holds each object as a file named after its key plus a suffix)."""
        raise NotImplementedError


class WalgFamily(WalTool):
    """walrus and WAL-G: `wal-push %p` per segment, or a daemon on a socket and a small client."""

    def __init__(self, name: str, label: str, replay_label: str, family: str, binary: str, *, daemon: bool,
                 ops: tuple[str, ...], client: list[str] | None = None, download_concurrency: int | None = None,
                 settings: dict[str, str] | None = None):
        self.name, self.label, self.replay_label, self.family = name, label, replay_label, family
        self.binary, self.ops, self.uses_daemon = binary, ops, daemon
        # A daemon marks the segments it stored ahead of the archiver .done (WAL-G's PG_READY_RENAME,
        # off by default in both), as WAL-E does and as pgBackRest's async mode is likewise opted into.
        self.settings = {"PG_READY_RENAME": "true"} if daemon else {}
        self.settings.update(settings or {})  # over the run's defaults (WALG_UPLOAD_CONCURRENCY = --workers)
        self.client = client or WALRUS_CLIENT
        self.download_concurrency = download_concurrency

    def missing(self) -> str | None:
        for exe in (self.binary, self.client[0], self.client[-1]):
            if not os.access(exe, os.X_OK):
                return f"{exe} is not an executable file"
        return None

    def version(self) -> str:
        return first_line([self.binary, "--version"])

    @staticmethod
    def config(repo: str) -> str:
        return repo + ".json"

    def new_repo(self, s: WalSetup, repo: str) -> None:
        if not os.path.isdir(repo):
            user_dir(repo)
        path = self.config(repo)
        storage = s.store.walg_env(repo) if s.store else {"WALG_FILE_PREFIX": repo}
        with open(path, "w") as f:
            json.dump({**storage, "WALG_COMPRESSION_METHOD": s.compression,
                       "WALG_UPLOAD_CONCURRENCY": str(s.workers), "WALG_PG_WAL_SIZE": str(s.segment_mib),
                       **self.settings}, f)
        chown_to_user(path)

    def _cli(self, repo: str, *args: str, env: dict[str, str] | None = None) -> str:
        words = [*env_words(env or {}), self.binary, "--config", self.config(repo), *args]
        return "exec " + " ".join(shlex.quote(w) if "%" not in w else w for w in words)

    def push_command(self, s: WalSetup, repo: str, daemon_socket: str | None, solo: bool = False) -> str:
        if self.uses_daemon and not solo:
            return "exec " + " ".join(map(shlex.quote, [*self.client, daemon_socket])) + " wal-push %f"
        # WAL-G's wal-push uploads other .ready segments ahead when WALG_UPLOAD_CONCURRENCY > 1
        return self._cli(repo, "wal-push", "%p", env={"WALG_UPLOAD_CONCURRENCY": "1"} if solo else None)

    def fetch_command(self, s: WalSetup, repo: str, pgdata: str, daemon_socket: str | None, scratch: str) -> str:
        if self.uses_daemon:
            return "exec " + " ".join(map(shlex.quote, [*self.client, daemon_socket])) + " wal-fetch %f %p"
        env = {"WALG_DOWNLOAD_CONCURRENCY": str(self.download_concurrency)} if self.download_concurrency else None
        return self._cli(repo, "wal-fetch", "%f", "%p", env=env)

    def daemon(self, s: WalSetup, repo: str, socket_path: str) -> list[str] | None:
        return [self.binary, "--config", self.config(repo), "daemon", socket_path] if self.uses_daemon else None

    def missing_segments(self, repo: str, names: list[str]) -> list[str]:
        stored = {n.split(".")[0] for n in os.listdir(os.path.join(repo, "wal_005"))} \
            if os.path.isdir(os.path.join(repo, "wal_005")) else set()
        return [n for n in names if n not in stored]


def walrus_tools() -> list[WalgFamily]:
    return [
        WalgFamily("walrus-daemon", "walrus daemon", "walrus daemon", "walrus", WALRUS, daemon=True,
                   ops=("archive", "drain", "replay")),
        WalgFamily("walrus", "walrus wal-push", "walrus wal-fetch (prefetch)", "walrus", WALRUS, daemon=False,
                   ops=("archive", "drain", "replay")),
        WalgFamily("walrus-noprefetch", "walrus wal-fetch (no prefetch)", "walrus wal-fetch (no prefetch)",
                   "walrus", WALRUS, daemon=False, ops=("replay",), download_concurrency=1),
        # WAL-G's background uploader: each call also stores up to TOTAL_BG_UPLOADED_LIMIT - 1 further
        # .ready segments, 3 beside the asked one; PostgreSQL's later calls for them find markers, or
        # (PG_READY_RENAME) never come
        WalgFamily("walrus-bg4", "walrus wal-push, 4 uploads (background)", "", "walrus", WALRUS, daemon=False,
                   ops=("archive", "drain"), settings={"WALG_UPLOAD_CONCURRENCY": "4"}),
        WalgFamily("walrus-bg4-rename", "walrus wal-push, 4 uploads, PG_READY_RENAME", "", "walrus", WALRUS,
                   daemon=False, ops=("archive", "drain"),
                   settings={"WALG_UPLOAD_CONCURRENCY": "4", "PG_READY_RENAME": "true"}),
    ]


def walg_tools(binary: str, client: str | None) -> list[WalgFamily]:
    """WAL-G's daemon is driven by walg-daemon-client when given, else by walrus's client (same protocol)."""
    argv = [client] if client else WALRUS_CLIENT
    return [
        WalgFamily("wal-g-daemon", "WAL-G daemon", "WAL-G daemon", "wal-g", binary, daemon=True,
                   ops=("archive", "drain", "replay"), client=argv),
        WalgFamily("wal-g", "WAL-G wal-push", "WAL-G wal-fetch (prefetch)", "wal-g", binary, daemon=False,
                   ops=("archive", "drain", "replay")),
    ]


class PgBackRestWal(WalTool):
    """pgBackRest archive-push / archive-get, synchronous or with --archive-async (spool, process-max=workers)."""

    family = "pgbackrest"

    def __init__(self, asynchronous: bool) -> None:
        self.asynchronous = asynchronous
        self.name = "pgbackrest-async" if asynchronous else "pgbackrest"
        self.label = "pgBackRest async" if asynchronous else "pgBackRest"
        self.replay_label = "pgBackRest archive-get async" if asynchronous else "pgBackRest archive-get"
        self.ops = ("archive", "drain", "replay") if asynchronous else ("archive", "drain")
        self.binary = PGBACKREST

    def missing(self) -> str | None:
        return None if shutil.which("pgbackrest") else "pgbackrest is not installed (apt-get install pgbackrest)"

    def version(self) -> str:
        return first_line([self.binary, "version"])

    def new_repo(self, s: WalSetup, repo: str) -> None:
        if os.path.isdir(repo):
            return  # the family's repository exists: the stanza is there
        user_dir(repo)
        compress = {"lz4": "lz4", "zstd": "zst"}[s.compression]
        storage = s.store.pgbackrest_options(repo) if s.store else [f"repo1-path={repo}", "repo1-type=posix"]
        pgbackrest_stanza(repo, s.source, s.root, [
            *storage, f"compress-type={compress}", f"process-max={s.workers}",
            f"spool-path={pgbackrest_etc(repo)}/spool",
            # the same window as walrus's prefetch: PREFETCH_WINDOW segments
            f"archive-get-queue-max={PREFETCH_WINDOW * s.segment_mib}MiB"], dirs=("spool",))

    def _async_flag(self, solo: bool) -> str:
        return "--archive-async" if self.asynchronous and not solo else "--no-archive-async"

    def push_command(self, s: WalSetup, repo: str, daemon_socket: str | None, solo: bool = False) -> str:
        words = pgbackrest_argv(repo, self._async_flag(solo), "archive-push")
        return "exec " + " ".join(map(shlex.quote, words)) + " %p"

    def fetch_command(self, s: WalSetup, repo: str, pgdata: str, daemon_socket: str | None, scratch: str) -> str:
        words = pgbackrest_argv(repo, self._async_flag(False), f"--pg1-path={pgdata}", f"--spool-path={scratch}",
                            "archive-get")
        return "exec " + " ".join(map(shlex.quote, words)) + " %f %p"

    def missing_segments(self, repo: str, names: list[str]) -> list[str]:
        return [n for n in names if not glob.glob(os.path.join(repo, "archive", STANZA, "*", n[:16], n + "-*"))]


class WalE(WalTool):
    """WAL-E 1.x from PyPI in its own venv: `wal-push --pool-size N` pushes up to N .ready segments per call.

    WAL-E compresses with lzop only (its sole method), through the lzop program. Its prefetch does not run on
    Python 3: each prefetch child dies in its bundled pep3143daemon, whose parent_is_inet() calls
    socket.fromfd() on stdin, which raises OSError (ENOTSOCK) for a non-socket since Python 3.7, after it
    marked the segment as being prefetched; wal-fetch then waits on that marker. So replay runs WAL-E
    with --prefetch 0, the way it works there.
    """

    name, label, replay_label, family = "wal-e", "WAL-E", "WAL-E wal-fetch (no prefetch)", "wal-e"
    ops = ("archive", "drain", "replay")
    storages = ("file",)  # not set up for the S3 emulator here (WAL-E's S3 client is boto 2)

    def __init__(self, venv: str) -> None:
        self.venv = venv
        self.binary = os.path.join(venv, "bin", "wal-e")
        self.install_error: str | None = None

    def install(self) -> None:
        """python3 -m venv + pip install wal-e, with Debian's python3 so the run user can execute it."""
        if not shutil.which("lzop"):
            self.install_error = "lzop is not installed (apt-get install lzop); WAL-E compresses with it"
            return
        python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else "python3"
        steps = [[python, "-m", "venv", self.venv],
                 [os.path.join(self.venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", "wal-e"],
                 [self.binary, "version"]]
        for argv in steps:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                self.install_error = f"`{' '.join(argv[:3])}` failed: {' / '.join(tail)}"
                return
        subprocess.run(["chmod", "-R", "a+rX", self.venv], check=True)

    def missing(self) -> str | None:
        return self.install_error

    def version(self) -> str:
        return "WAL-E " + first_line([self.binary, "version"])

    def _words(self, repo: str, *args: str) -> str:
        words = ["env", "WALE_LOG_DESTINATION=stderr", self.binary, "--terse", "--file-prefix", f"file://localhost{repo}"]
        return "exec " + " ".join(map(shlex.quote, words)) + " " + " ".join(args)

    def push_command(self, s: WalSetup, repo: str, daemon_socket: str | None, solo: bool = False) -> str:
        return self._words(repo, "wal-push", "--pool-size", "1" if solo else str(s.workers), "%p")

    def fetch_command(self, s: WalSetup, repo: str, pgdata: str, daemon_socket: str | None, scratch: str) -> str:
        return self._words(repo, "wal-fetch", "--prefetch", "0", "%f", "%p")

    def missing_segments(self, repo: str, names: list[str]) -> list[str]:
        return [n for n in names if not os.path.exists(os.path.join(repo, "wal_005", n + ".lzo"))]


class BarmanWal(WalTool):
    """Barman's cloud scripts: barman-cloud-wal-archive %p (one process and one upload per segment, nothing
    ahead) and barman-cloud-wal-restore %f %p (one process per segment: it lists the segment's folder, downloads
    and decompresses; 3.4 has no prefetch). S3 only."""

    name, label, replay_label, family = "barman", "Barman cloud", "Barman cloud wal-restore (no prefetch)", "barman"
    binary = "barman-cloud-wal-archive"
    ops = ("archive", "drain", "replay")
    storages = ("s3",)

    def missing(self) -> str | None:
        return barman_missing()

    def version(self) -> str:
        return f"{first_line([self.binary, '--version'])} (--{barman_compression()})"

    def _words(self, s: WalSetup, repo: str, exe: str, *args: str) -> str:
        words = [*env_words(s.store.boto3_env()), exe, "--endpoint-url", s.store.endpoint, *args,
                 s.store.barman_url(repo), BARMAN_SERVER]
        return "exec " + " ".join(map(shlex.quote, words))

    def push_command(self, s: WalSetup, repo: str, daemon_socket: str | None, solo: bool = False) -> str:
        return self._words(s, repo, self.binary, f"--{barman_compression()}") + " %p"

    def fetch_command(self, s: WalSetup, repo: str, pgdata: str, daemon_socket: str | None, scratch: str) -> str:
        return self._words(s, repo, "barman-cloud-wal-restore") + " %f %p"

    def missing_segments(self, repo: str, names: list[str]) -> list[str]:
        return [n for n in names if not glob.glob(os.path.join(repo, BARMAN_SERVER, "wals", n[:16], n + "*"))]
