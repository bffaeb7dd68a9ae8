"""Per-tool adapters: how each tool backs up and restores the bench cluster, with equal compression and workers."""
from __future__ import annotations

import functools
import os
import pwd
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from bench.objectstore import ObjectStore
from tests.pgcluster import WALRUS, Cluster, chown_to_user, pg_bindir, run, run_user

STANZA = "bench"


@dataclass(frozen=True)
class Setup:
    """What every tool shares in one bench run."""

    cluster: Cluster
    root: str  # work directory (owned by the run user)
    compression: str  # lz4 | zstd
    workers: int
    store: ObjectStore | None = None  # S3, GCS or Azure: repositories are key prefixes there, not directories


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]


def user_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment a tool runs with: ours minus any WAL-G/libpq/AWS settings, as the run user, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "WALRUS_", "PG", "AWS_"))}
    user = run_user()
    if user:
        pw = pwd.getpwnam(user)
        env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
    env["LC_ALL"] = "C.UTF-8"
    env.update(extra)
    return env


def user_dir(path: str) -> str:
    """An empty 0700 directory owned by the run user (PostgreSQL refuses a data directory open to others)."""
    os.makedirs(path)
    chown_to_user(path)
    os.chmod(path, 0o700)
    return path


def first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=60)
    except OSError as e:
        return f"unknown ({e.strerror})"
    text = (proc.stdout or proc.stderr).decode(errors="replace").strip()
    return text.splitlines()[0].strip("* ") if text else "unknown"


PGBACKREST = shutil.which("pgbackrest") or "pgbackrest"


def pgbackrest_etc(repo: str) -> str:
    return repo + "-etc"  # pgBackRest's config, logs and locks live beside the repository, not in it


def pgbackrest_argv(repo: str, *args: str) -> list[str]:
    etc = pgbackrest_etc(repo)
    return [PGBACKREST, f"--config={etc}/pgbackrest.conf", f"--config-include-path={etc}/conf.d",
            f"--stanza={STANZA}", *args]


def pgbackrest_stanza(repo: str, cluster: Cluster, root: str, options: list[str], dirs: tuple[str, ...] = ()) -> None:
    """pgBackRest's configuration for `repo`: its [global] `options` (repository, compression...),
    logs and locks in the -etc directory (with `dirs` made there too), the bench stanza on `cluster`;
    then stanza-create."""
    etc = user_dir(pgbackrest_etc(repo))
    for sub in ("log", "lock", "conf.d", *dirs):
        user_dir(os.path.join(etc, sub))
    conf = "\n".join([
        "[global]", *options,
        f"log-path={etc}/log", f"lock-path={etc}/lock", "log-level-console=warn", "log-level-file=off",
        f"[{STANZA}]",
        f"pg1-path={cluster.data}", f"pg1-port={cluster.port}", f"pg1-socket-path={cluster.sockdir}",
    ]) + "\n"
    path = os.path.join(etc, "pgbackrest.conf")
    with open(path, "w") as f:
        f.write(conf)
    chown_to_user(path)
    run(pgbackrest_argv(repo, "stanza-create"), cwd=root)


class Tool:
    """One contender. Subclasses say how to back up into a repository and restore from it."""

    name: str  # as given to --tools
    label: str  # as shown in the tables
    binary: str  # the executable run for backups
    object_store: bool = True  # whether it can keep its repository in S3, GCS and Azure

    def missing(self) -> str | None:
        """Why the tool cannot run here, or None."""
        return None

    def storage_missing(self, storage: str) -> str | None:
        """Why the tool cannot keep its repository on `storage` (a --storage value), or None."""
        return None if self.object_store or storage == "file" else f"no {storage} storage"

    def version(self) -> str:
        raise NotImplementedError

    def new_repo(self, s: Setup, repo: str) -> None:
        """Create an empty repository (untimed)."""
        user_dir(repo)

    def backup(self, s: Setup, repo: str) -> Command:
        raise NotImplementedError

    def restore(self, s: Setup, repo: str, target: str) -> Command:
        raise NotImplementedError


class WalgLike(Tool):
    """walrus, WAL-G or WAL-RUS: the same command line and WALG_* settings, file storage in the repository."""

    def __init__(self, name: str, label: str, binary: str, extra_env: dict[str, str] | None = None) -> None:
        self.name, self.label, self.binary = name, label, binary
        self.extra_env = extra_env or {}

    def missing(self) -> str | None:
        return None if os.access(self.binary, os.X_OK) else f"{self.binary} is not an executable file"

    def version(self) -> str:
        return first_line([self.binary, "--version"])

    def _env(self, s: Setup, repo: str) -> dict[str, str]:
        storage = s.store.walg_env(repo) if s.store else {"WALG_FILE_PREFIX": repo}
        return {**s.cluster.env, **storage, "WALG_COMPRESSION_METHOD": s.compression,
                "WALG_UPLOAD_DISK_CONCURRENCY": str(s.workers), "WALG_DOWNLOAD_CONCURRENCY": str(s.workers),
                **self.extra_env}

    def backup(self, s: Setup, repo: str) -> Command:
        return Command([self.binary, "backup-push", s.cluster.data], self._env(s, repo))

    def restore(self, s: Setup, repo: str, target: str) -> Command:
        return Command([self.binary, "backup-fetch", target, "LATEST"], self._env(s, repo))


def walrus_tool(io_method: str) -> WalgLike:
    name = "walrus" if io_method == "io_uring" else f"walrus-{io_method}"
    return WalgLike(name, f"walrus ({io_method})", WALRUS, {"WALRUS_IO_METHOD": io_method})


class WalrusRemote(WalgLike):
    """walrus backup-push without a data directory: the server streams it (BASE_BACKUP over a
    replication connection, WAL-G's remote mode), as pg_basebackup does; restored as the others."""

    def __init__(self) -> None:
        super().__init__("walrus-remote", "walrus (remote, BASE_BACKUP)", WALRUS)

    def storage_missing(self, storage: str) -> str | None:
        return None if storage == "file" else "file storage only here (its WAL check reads the run's file archive)"

    def new_repo(self, s: Setup, repo: str) -> None:
        """The repository's wal_005 is the run's archive (a symlink): a remote backup finishes once its WAL
        is in its storage, and on a real host the archiver and the backups share it. (The local tools
        store the WAL they need themselves, from pg_wal, which a remote backup cannot read.)"""
        super().new_repo(s, repo)
        archive = os.path.join(s.root, "archive", "wal_005")
        os.makedirs(archive, exist_ok=True)
        os.symlink(archive, os.path.join(repo, "wal_005"))

    def backup(self, s: Setup, repo: str) -> Command:
        return Command([self.binary, "backup-push"], {k: v for k, v in self._env(s, repo).items() if k != "PGDATA"})


class PgBackRest(Tool):
    """pgBackRest with a posix repository; WAL stays with walrus's archive_command, so archive-check=n."""

    name, label = "pgbackrest", "pgBackRest"
    binary = PGBACKREST

    def missing(self) -> str | None:
        return None if shutil.which("pgbackrest") else "pgbackrest is not installed (apt-get install pgbackrest)"

    def version(self) -> str:
        return first_line([self.binary, "version"])

    def new_repo(self, s: Setup, repo: str) -> None:
        user_dir(repo)
        storage = s.store.pgbackrest_options(repo) if s.store else [f"repo1-path={repo}", "repo1-type=posix"]
        compress = {"lz4": "lz4", "zstd": "zst"}[s.compression]
        pgbackrest_stanza(repo, s.cluster, s.root, [
            *storage, "repo1-retention-full=1", f"compress-type={compress}", f"process-max={s.workers}",
            "start-fast=y", "archive-check=n"])

    def backup(self, s: Setup, repo: str) -> Command:
        return Command(pgbackrest_argv(repo, "--type=full", "backup"), {})

    def restore(self, s: Setup, repo: str, target: str) -> Command:
        # restore into an empty directory: no --delta, no --force
        return Command(pgbackrest_argv(repo, f"--pg1-path={target}", "restore"), {})


class PgBaseBackup(Tool):
    """The floor: pg_basebackup -Ft with client-side compression, WAL left to the archive (-X none).

    Restore is the decompressor piped into tar.
    """

    name, label = "pg_basebackup", "pg_basebackup"
    object_store = False  # writes local tar files only

    def __init__(self) -> None:
        self.binary = os.path.join(pg_bindir(), "pg_basebackup")

    def missing(self) -> str | None:
        for exe in ("lz4", "zstd", "tar", "bash"):
            if not shutil.which(exe):
                return f"{exe} is not installed"
        return None if os.access(self.binary, os.X_OK) else f"{self.binary} not found"

    def version(self) -> str:
        return "; ".join([first_line([self.binary, "--version"]), first_line(["lz4", "-V"]),
                          first_line(["zstd", "-V"]), first_line(["tar", "--version"])])

    def backup(self, s: Setup, repo: str) -> Command:
        c = s.cluster
        return Command([self.binary, "-D", repo, "-Ft", "-X", "none", "--checkpoint=fast",
                        f"--compress=client-{s.compression}", "-h", c.sockdir, "-p", str(c.port)], {})

    def restore(self, s: Setup, repo: str, target: str) -> Command:
        ext = {"lz4": "lz4", "zstd": "zst"}[s.compression]
        tar = os.path.join(repo, f"base.tar.{ext}")
        script = (f"set -o pipefail; {s.compression} -dcq {shlex.quote(tar)} | "
                  f"tar -xf - -C {shlex.quote(target)}")
        return Command(["bash", "-c", script], {})


BARMAN_BINARIES = ("barman-cloud-backup", "barman-cloud-restore", "barman-cloud-wal-archive",
                   "barman-cloud-wal-restore")
BARMAN_SERVER = "bench"  # barman-cloud's server name: the folder under the repository's URL
BARMAN_BACKUP_NAME = "bench"  # 3.4's restore takes a backup ID or name, not "latest"; each repository holds one


def barman_missing() -> str | None:
    for exe in BARMAN_BINARIES:
        if not shutil.which(exe):
            return f"{exe} is not installed (apt-get install barman-cli-cloud)"
    return None


def barman_storage_missing(storage: str) -> str | None:
    return None if storage == "s3" else "runs here on s3 storage only"


@functools.cache
def barman_compression() -> str:
    """Barman 3.4 compresses with gzip, bzip2 or snappy only: snappy, the fast one, stands for lz4 and zstd
    when python-snappy's stream compressor works in the Python its scripts run on; else gzip (level 9, Python's
    tarfile and GzipFile default). Debian 12's python3-snappy 0.5.3 imports but fails on Python 3.11
    (SystemError: PY_SSIZE_T_CLEAN), hence a test chunk, not an import."""
    with open(shutil.which("barman-cloud-backup"), "rb") as f:
        shebang = f.readline().decode(errors="replace")
    python = shebang[2:].split()[0] if shebang.startswith("#!") else "python3"
    test = "import snappy; snappy.StreamCompressor().add_chunk(b'walrus')"
    return "snappy" if subprocess.run([python, "-c", test], capture_output=True).returncode == 0 else "gzip"


class Barman(Tool):
    """Barman's cloud scripts: barman-cloud-backup (its own tar streams over a libpq connection, --jobs upload
    processes) and barman-cloud-restore (one download at a time); WAL stays with walrus's archive_command."""

    name, label = "barman", "Barman cloud"
    binary = "barman-cloud-backup"

    def missing(self) -> str | None:
        return barman_missing()

    def storage_missing(self, storage: str) -> str | None:
        return barman_storage_missing(storage)

    def version(self) -> str:
        return f"{first_line([self.binary, '--version'])} (--{barman_compression()})"

    def _env(self, s: Setup) -> dict[str, str]:
        return {**s.cluster.env, **s.store.boto3_env()}

    def backup(self, s: Setup, repo: str) -> Command:
        c = s.cluster
        return Command([self.binary, "--endpoint-url", s.store.endpoint, f"--{barman_compression()}",
                        f"--jobs={s.workers}", "--immediate-checkpoint", f"--host={c.sockdir}", f"--port={c.port}",
                        "--dbname=postgres", f"--name={BARMAN_BACKUP_NAME}", s.store.barman_url(repo), BARMAN_SERVER],
                       self._env(s))

    def restore(self, s: Setup, repo: str, target: str) -> Command:
        return Command(["barman-cloud-restore", "--endpoint-url", s.store.endpoint, s.store.barman_url(repo),
                        BARMAN_SERVER, BARMAN_BACKUP_NAME, target], self._env(s))
