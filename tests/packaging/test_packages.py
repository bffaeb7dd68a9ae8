"""The .deb and .rpm of packaging/build.py: contents and dependencies; the .deb installed, archiving WAL, upgraded, removed, purged."""
from __future__ import annotations

import grp
import gzip
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.pgcluster import Cluster, make_workdir, remove_tree
from walrus import __version__

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]
DISTRO_PYTHON = "/usr/bin/python3"
CONFIG = "/etc/walrus/walrus.yaml"
WALRUS = "/usr/bin/walrus"
ELFDEPS = "/usr/lib/rpm/elfdeps"
BACKUP_UNIT = "/usr/lib/systemd/system/walrus-backup.service"
RETAIN = "/usr/libexec/walrus/retain"
# walrus-backup.service's retention step, after backup-push (ExecStartPost=)
RETAIN_STEP = f"{RETAIN} {WALRUS} --config {CONFIG}"
# [FULL|FIND_FULL] N is all WALRUS_RETAIN may be: these delete nothing, and fail the unit
MALFORMED_RETAIN = ["full 7", "FULL", "FULL 0", "FULL 07", "FULL -1", "FULL 7 x", "FULL x7", "FULLL 7", "7 FULL",
                    "FULL 7;rm -rf /", "FULL *", "* 7", "FULL --after 2020-01-01T00:00:00Z", "everything FORCE", "0"]


def _python_version() -> str:
    out = subprocess.run([DISTRO_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def build(out: Path, *args: str) -> dict[str, Path]:
    """Runs the one packaging command; returns the packages it made, by format."""
    proc = subprocess.run([DISTRO_PYTHON, str(ROOT / "packaging/build.py"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"packaging/build.py failed:\n{proc.stderr}\n{proc.stdout}"
    return {path.suffix.lstrip("."): path for path in out.iterdir()}


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    if not os.access(DISTRO_PYTHON, os.X_OK) or shutil.which("dpkg-shlibdeps") is None:
        pytest.skip("not a Debian build host (needs /usr/bin/python3 and dpkg-dev)")
    formats = "deb,rpm" if os.access(ELFDEPS, os.X_OK) else "deb"
    return build(tmp_path_factory.mktemp("packages"), "--formats", formats)


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    # without the caller's walrus and libpq settings, which would override the config under test
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "WALRUS_", "PG", "AWS_"))}
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**env, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"})
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}\n{proc.stdout}"
    return proc


def _tool(name: str, package: str) -> str:
    """The path of a program the test cannot do without; fails, naming its Debian package, when it is absent."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {package} (.ci/setup installs it)")
    return path


def _needs_rpm(packages: dict[str, Path]) -> Path:
    if "rpm" not in packages or shutil.which("rpm") is None:
        pytest.skip("rpm is not installed (apt-get install rpm)")
    return packages["rpm"]


# -- what the packages hold and declare --------------------------------------------------------

def test_deb_declares_its_dependencies_and_conffiles(packages):
    deb = packages["deb"]
    arch = _sh("dpkg", "--print-architecture").stdout.strip()
    assert deb.name == f"walrus_{__version__}-1_{arch}.deb"
    depends = [d.strip() for d in _sh("dpkg-deb", "-f", str(deb), "Depends").stdout.split(",")]
    names = {d.split()[0] for d in depends}
    # the io_uring module links the distribution's liburing; the virtualenv its python3.X
    assert {"liburing2", f"python{_python_version()}", "postgresql-common", "libc6"} <= names, depends
    conffiles = _sh("dpkg-deb", "--info", str(deb), "conffiles").stdout.split()
    assert sorted(conffiles) == ["/etc/logrotate.d/walrus", "/etc/walrus/walrus.env", CONFIG]

    listing = _sh("dpkg-deb", "-c", str(deb)).stdout
    for entry in ("./usr/bin/walrus -> /opt/walrus/bin/walrus", "./opt/walrus/pyvenv.cfg",
                  "./usr/lib/systemd/system/walrus-daemon.service", "./usr/lib/systemd/system/walrus-backup.timer",
                  "./usr/share/man/man1/walrus.1.gz", "/site-packages/walrus/_uring/_liburing.abi3.so"):
        assert entry in listing, entry
    assert re.search(rf"^-rwxr-xr-x root/root .* \.{RETAIN}$", listing, re.M), listing[-2000:]
    assert "./etc/systemd/" not in listing  # units ship disabled: no .wants symlinks
    assert "/bin/pip" not in listing


def test_rpm_declares_its_requirements_and_config(packages):
    rpm = _needs_rpm(packages)
    assert rpm.name == f"walrus-{__version__}-1.{platform.machine()}.rpm"
    files = _sh("rpm", "-qpl", str(rpm)).stdout.split()
    for path in (WALRUS, "/opt/walrus/bin/walrus", CONFIG, BACKUP_UNIT, RETAIN, "/usr/libexec/walrus",
                 "/etc/logrotate.d/walrus", "/usr/share/man/man1/walrus.1.gz"):
        assert path in files, path
    # the distribution's directories
    assert not {"/usr/bin", "/usr/lib/systemd/system", "/usr/libexec"} & set(files), files
    requires = _sh("rpm", "-qp", "--requires", str(rpm)).stdout.split("\n")
    assert "liburing.so.2()(64bit)" in requires and f"/usr/bin/python{_python_version()}" in requires, requires
    # the wheels' bundled libraries (auditwheel's libfoo-<hash>.so names) are the package's own
    assert not [r for r in requires if re.search(r"-[0-9a-f]{8}\.so", r)], requires

    query = "[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]"
    attrs = {line.split()[-1]: line for line in _sh("rpm", "-qp", "--qf", query, str(rpm)).stdout.splitlines()}
    assert attrs[CONFIG].split()[:3] == ["cn", "-rw-r-----", "root:postgres"]
    assert attrs["/var/lib/walrus"].split()[:2] == ["drwxr-x---", "postgres:postgres"]
    assert attrs[RETAIN].split() == ["-rwxr-xr-x", "root:root", RETAIN]  # no flags: not a config file
    assert "useradd" in _sh("rpm", "-qp", "--scripts", str(rpm)).stdout


# -- walrus-backup.service's retention (WALRUS_RETAIN) -----------------------------------------

def _unit_settings(text: str) -> dict[str, list[str]]:
    """A unit file's KEY=value lines, comments and sections left out: each key's values in order."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _fake_walrus(path: Path, *, status: int = 0) -> Path:
    """A walrus that records its arguments, one a line, in ARGS beside it, and exits STATUS."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = path.parent / "ARGS"
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {shlex.quote(str(record))}\nexit {status}\n")
    path.chmod(0o755)
    return record


def _run_retain(script: Path, command: list[str], retain: str | None, shell: str | None = None
                ) -> subprocess.CompletedProcess:
    """The retention step as systemd starts it: the script, with the unit's walrus command, in a bare environment."""
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    if retain is not None:
        env["WALRUS_RETAIN"] = retain
    argv = [str(script), *command] if shell is None else [shell, str(script), *command]
    return subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)


@pytest.fixture(scope="module")
def deb_tree(packages, tmp_path_factory) -> Path:
    """The .deb's files, unpacked without installing."""
    tree = tmp_path_factory.mktemp("deb-tree")
    _sh("dpkg-deb", "-x", str(packages["deb"]), str(tree))
    return tree


def test_backup_service_runs_the_retention_only_after_a_backup(deb_tree):
    unit = _unit_settings((deb_tree / BACKUP_UNIT.lstrip("/")).read_text())
    # a oneshot starts ExecStartPost= only once ExecStart= exited 0; a failed one fails the unit
    assert unit["Type"] == ["oneshot"]
    assert unit["ExecStart"] == [f"{WALRUS} --config {CONFIG} backup-push ${{PGDATA}}"]
    # systemd itself never sees WALRUS_RETAIN: unset, $WALRUS_RETAIN on an Exec line would vanish
    # and leave `delete retain --confirm`; the script reads it from its environment
    assert unit["ExecStartPost"] == [RETAIN_STEP]
    assert unit["EnvironmentFile"] == ["/etc/walrus/walrus.env"]
    assert unit["User"] == ["postgres"]
    script = deb_tree / RETAIN.lstrip("/")
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert script.read_text().startswith("#!/bin/sh\n")


def test_env_files_document_the_retention_off_by_default(deb_tree):
    shipped = {"deb": (deb_tree / "etc/walrus/walrus.env").read_text(),
               "rpm": (ROOT / "packaging/walrus.env.rpm").read_text()}
    for fmt, text in shipped.items():
        assert '\n#WALRUS_RETAIN="FULL 7"\n' in text, fmt
        assert not re.search(r"^\s*WALRUS_RETAIN", text, re.M), fmt  # off unless the admin sets it
        assert "delete retain $WALRUS_RETAIN --confirm" in text, fmt


@pytest.mark.parametrize("shell", [None, "bash"], ids=["shebang", "bash"])  # RPM distributions' sh is bash
def test_retain_script_runs_walrus_delete_retain_with_the_configured_value(deb_tree, tmp_path, shell):
    if shell is not None and shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    script = deb_tree / RETAIN.lstrip("/")
    fake = tmp_path / "bin/walrus"
    record = _fake_walrus(fake)
    # the unit's own step, with the fake in place of /usr/bin/walrus
    step = shlex.split(RETAIN_STEP)
    assert step[:2] == [RETAIN, WALRUS]
    command = [str(fake), *step[2:]]

    for retain, words in [("FULL 7", ["FULL", "7"]), ("FIND_FULL 3", ["FIND_FULL", "3"]), ("7", ["7"]),
                          ("  FULL \t 12 ", ["FULL", "12"])]:
        record.unlink(missing_ok=True)
        proc = _run_retain(script, command, retain, shell)
        assert proc.returncode == 0, proc.stderr
        assert record.read_text().splitlines() == ["--config", CONFIG, "delete", "retain", *words, "--confirm"]
        assert f"backup-push succeeded; retention: delete retain {' '.join(words)} --confirm" in proc.stderr

    # off: unset, empty or blank runs nothing and says nothing
    for retain in (None, "", "   "):
        record.unlink(missing_ok=True)
        proc = _run_retain(script, command, retain, shell)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), retain
        assert not record.exists(), retain

    # a malformed value deletes nothing and fails loudly (EX_CONFIG, which systemd shows as status=78/CONFIG)
    for retain in MALFORMED_RETAIN:
        proc = _run_retain(script, command, retain, shell)
        assert proc.returncode == 78, (retain, proc.stderr)
        assert f'WALRUS_RETAIN="{retain}"' in proc.stderr and "nothing deleted" in proc.stderr, proc.stderr
        assert not record.exists(), retain

    # walrus failing fails the step with its status, and the log says the backup itself succeeded
    _fake_walrus(fake, status=3)
    proc = _run_retain(script, command, "FULL 7", shell)
    assert proc.returncode == 3
    assert "the backup succeeded, but its retention (delete retain FULL 7 --confirm) failed with exit status 3" \
        in proc.stderr
    assert record.read_text().splitlines()[-3:] == ["FULL", "7", "--confirm"]

    # without a walrus command to run, a usage error rather than running `delete` as a program
    proc = _run_retain(script, [], "FULL 7", shell)
    assert proc.returncode == 64 and "usage:" in proc.stderr


# -- installed ---------------------------------------------------------------------------------

def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("installing packages needs root")


def test_rpm_installs_into_a_scratch_root_and_keeps_an_edited_config(packages, tmp_path):
    rpm = _needs_rpm(packages)
    _root_only()
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    # rpm resolves the header's owner names in the target's own user database
    pg = pwd.getpwnam("postgres")
    (root / "etc/passwd").write_text(f"root:x:0:0::/root:/bin/sh\npostgres:x:{pg.pw_uid}:{pg.pw_gid}::/var/lib/pgsql:/bin/sh\n")
    (root / "etc/group").write_text(f"root:x:0:\npostgres:x:{pg.pw_gid}:\n")
    _sh("rpm", "--root", str(root), "--initdb")
    _sh("rpm", "--root", str(root), "-i", "--nodeps", "--noscripts", str(rpm))

    assert _sh("rpm", "--root", str(root), "-q", "walrus").stdout.startswith("walrus-")
    assert os.readlink(root / "usr/bin/walrus") == "/opt/walrus/bin/walrus"
    st = (root / "etc/walrus/walrus.yaml").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, pg.pw_gid)
    st = (root / "var/lib/walrus").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o750, pg.pw_uid)
    assert stat.S_IMODE((root / RETAIN.lstrip("/")).stat().st_mode) == 0o755
    env = (root / "etc/walrus/walrus.env").read_text()
    assert "\nPGDATA=/var/lib/pgsql/data\n" in env and '\n#WALRUS_RETAIN="FULL 7"\n' in env

    with open(root / "etc/walrus/walrus.yaml", "a") as f:
        f.write("WALG_COMPRESSION_METHOD: zstd\n")
    _sh("rpm", "--root", str(root), "-e", "--nodeps", "--noscripts", "walrus")
    assert not (root / "opt/walrus/bin/walrus").exists()
    assert "zstd" in (root / "etc/walrus/walrus.yaml.rpmsave").read_text()
    assert not (root / "etc/walrus/walrus.env").exists()  # unedited: removed with the package


def as_postgres(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """As an operator or a service runs it: runuser sets postgres's groups too, which the config's mode relies on."""
    return _sh("runuser", "-u", "postgres", "--", *cmd, check=check)


def _dpkg_status() -> str:
    """walrus's dpkg status, or "" when dpkg has no trace of it."""
    status = _sh("dpkg-query", "-W", "-f", "${Status}", "walrus", check=False).stdout
    return "" if status.endswith("not-installed") else status


def _archived(cluster: Cluster) -> str:
    """Switches to a new WAL segment and waits until archive_command stored the one it closed."""
    segment = cluster.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    cluster.psql("SELECT pg_switch_wal()")
    cluster.wait_until(f"SELECT coalesce(last_archived_wal, '') >= '{segment}' FROM pg_stat_archiver", "t", 60)
    assert cluster.psql("SELECT failed_count FROM pg_stat_archiver") == "0", cluster.log()[-4000:]
    return segment


def _assert_config_owned_by_postgres() -> None:
    st = os.stat(CONFIG)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, grp.getgrnam("postgres").gr_gid)


def test_deb_install_archive_upgrade_remove_purge(packages, tmp_path):
    _root_only()
    if _dpkg_status():
        pytest.skip(f"a walrus package is already on this machine ({_dpkg_status()}); the test would replace it")
    systemd_analyze, groff = _tool("systemd-analyze", "systemd"), _tool("groff", "groff-base")
    upgrade = build(tmp_path / "v2", "--formats", "deb", "--release", "2")["deb"]
    had_state_dir = os.path.exists("/var/lib/walrus")
    store, pgroot = make_workdir("walrus-pkg-store-"), make_workdir("walrus-pkg-pg-")
    cluster = None
    try:
        _sh("dpkg", "-i", str(packages["deb"]))
        assert _dpkg_status() == "install ok installed"
        assert as_postgres(WALRUS, "--version").stdout.strip() == f"walrus, version {__version__}"
        _assert_config_owned_by_postgres()
        for path in ("/var/lib/walrus", "/var/log/walrus"):
            st = os.stat(path)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o750, pwd.getpwnam("postgres").pw_uid), path
        assert not list(Path("/etc/systemd/system").glob("*.wants/walrus-*"))  # shipped, not enabled
        module = f"/opt/walrus/lib/python{_python_version()}/site-packages/walrus/_uring/_liburing.abi3.so"
        ldd = _sh("ldd", module).stdout
        assert "liburing.so.2 => /" in ldd
        as_postgres("/opt/walrus/bin/python", "-c", "import nacl.bindings, cryptography")  # the crypto extra
        units = [f"/usr/lib/systemd/system/walrus-{u}" for u in ("daemon.service", "backup.service", "backup.timer")]
        # --man=no: verify would look Documentation= up with man(1), which a build host need not
        # have; that page is the file groff must render cleanly below
        verified = _sh(systemd_analyze, "verify", "--man=no", *units)
        assert not verified.stderr, verified.stderr  # warnings included: none expected
        for unit in units:
            assert "\nDocumentation=man:walrus(1)\n" in Path(unit).read_text(), unit
        page = gzip.decompress(Path("/usr/share/man/man1/walrus.1.gz").read_bytes())
        proc = subprocess.run([groff, "-man", "-ww", "-z", "-Tutf8"], input=page, capture_output=True)
        assert proc.returncode == 0 and not proc.stderr, proc.stderr

        # the installed binary as archive_command, with the installed config edited by the admin
        with open(CONFIG, "w") as f:  # in place: keeps the file's owner and mode
            f.write(f"# edited by the test\nWALG_FILE_PREFIX: {store}\nWALG_COMPRESSION_METHOD: zstd\n")
        cluster = Cluster.init(pgroot)
        cluster.configure(archive_mode="on", archive_command=f"{WALRUS} --config {CONFIG} wal-push %p",
                          wal_keep_size="512MB")
        # started by runuser, with postgres's groups, as the distribution's service starts it
        as_postgres(os.path.join(cluster.bindir, "pg_ctl"), "-D", cluster.data, "-l", f"{pgroot}/log-{cluster.port}",
                    "-w", "-t", "120", "start")
        cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g")
        segment = _archived(cluster)
        assert os.path.exists(os.path.join(store, "wal_005", f"{segment}.zst"))
        fetched = os.path.join(pgroot, "fetched")
        as_postgres(WALRUS, "--config", CONFIG, "wal-fetch", segment, fetched)
        assert Path(fetched).read_bytes() == Path(cluster.data, "pg_wal", segment).read_bytes()
        missing = as_postgres(WALRUS, "--config", CONFIG, "wal-fetch", "0000000100000000000000FF", fetched + ".x",
                              check=False)
        assert missing.returncode == 74, missing.stderr

        # the daemon and /usr/bin/walg-daemon-client, which runs the package's python -IS without a shell
        with open("/usr/bin/walg-daemon-client", "rb") as f:
            assert f.readline() == b"#!/opt/walrus/bin/python3 -IS\n"
        sock = os.path.join(pgroot, "walrus.sock")
        daemon = subprocess.Popen(["runuser", "-u", "postgres", "--", "env", f"PGDATA={cluster.data}", WALRUS,
                                   "--config", CONFIG, "daemon", sock], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock) and daemon.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            via_daemon = os.path.join(pgroot, "via-daemon")
            as_postgres("/usr/bin/walg-daemon-client", sock, "wal-fetch", segment, via_daemon)
            assert Path(via_daemon).read_bytes() == Path(fetched).read_bytes()
            absent = as_postgres("/usr/bin/walg-daemon-client", sock, "wal-fetch", "0000000100000000000000FF",
                                 via_daemon + ".x", check=False)
            assert absent.returncode == 74, absent.stderr
        finally:
            daemon.terminate()  # runuser passes SIGTERM on and then ends by it
            daemon.wait(30)
        assert not os.path.exists(sock), daemon.stderr.read().decode()[-2000:]  # the daemon stopped cleanly

        # walrus-backup.service's steps, as systemd runs them with WALRUS_RETAIN="FULL 1" in its
        # EnvironmentFile=: ExecStart=, then ExecStartPost= once that exited 0. Twice: the second
        # retention deletes the first backup, with the installed walrus and the admin's config.
        unit = _unit_settings(Path(BACKUP_UNIT).read_text())
        service_env = [f"PGDATA={cluster.data}", f"PGHOST={pgroot}", f"PGPORT={cluster.port}"]
        (backup_step,) = unit["ExecStart"]
        (retain_step,) = unit["ExecStartPost"]
        backup_step = backup_step.replace("${PGDATA}", cluster.data)
        for _ in range(2):
            as_postgres("env", *service_env, *shlex.split(backup_step))
            retained = as_postgres("env", *service_env, "WALRUS_RETAIN=FULL 1", *shlex.split(retain_step))
        assert "delete retain FULL 1 --confirm" in retained.stderr
        assert "backups deleted: 1 " in retained.stdout, retained.stdout
        kept = json.loads(as_postgres(WALRUS, "--config", CONFIG, "backup-list", "--json").stdout)
        assert len(kept) == 1, kept
        # a malformed value deletes nothing; unset, the step is a no-op
        refused = as_postgres("env", *service_env, "WALRUS_RETAIN=FULL 0", *shlex.split(retain_step), check=False)
        assert refused.returncode == 78, refused.stderr
        assert as_postgres("env", *service_env, *shlex.split(retain_step)).stderr == ""
        assert json.loads(as_postgres(WALRUS, "--config", CONFIG, "backup-list", "--json").stdout) == kept

        # upgrade under a running archiver: the edited config and its ownership stay
        _sh("dpkg", "-i", str(upgrade))
        assert _sh("dpkg-query", "-W", "-f", "${Version}", "walrus").stdout == f"{__version__}-2"
        assert Path(CONFIG).read_text().startswith("# edited by the test")
        assert not list(Path("/etc/walrus").glob("*.dpkg-*"))
        _assert_config_owned_by_postgres()
        _archived(cluster)
        cluster.stop()
        cluster = None

        # remove: the program goes, the configuration stays
        Path("/var/lib/walrus/backups").mkdir(exist_ok=True)
        Path("/var/lib/walrus/backups/keep").write_text("a backup")
        _sh("dpkg", "-r", "walrus")
        assert _dpkg_status() == "deinstall ok config-files"
        assert not os.path.lexists(WALRUS) and not os.path.exists("/opt/walrus")
        assert not os.path.exists("/usr/libexec/walrus")
        assert Path(CONFIG).read_text().startswith("# edited by the test")
        _assert_config_owned_by_postgres()

        # purge: configuration, logs and ownership overrides go; backups never do
        _sh("dpkg", "-P", "walrus")
        assert _dpkg_status() == ""
        assert not os.path.exists("/etc/walrus") and not os.path.exists("/var/log/walrus")
        assert "walrus" not in _sh("dpkg-statoverride", "--list").stdout
        assert Path("/var/lib/walrus/backups/keep").read_text() == "a backup"
    finally:
        if cluster is not None:
            cluster.stop("immediate")
        if _dpkg_status():
            _sh("dpkg", "-P", "walrus", check=False)
        if not had_state_dir:
            shutil.rmtree("/var/lib/walrus", ignore_errors=True)
        remove_tree(store)
        remove_tree(pgroot)
