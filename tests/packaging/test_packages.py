"""The .deb and .rpm of packaging/build.py: contents and dependencies; the .deb installed, archiving WAL, upgraded, removed, purged."""
from __future__ import annotations

import contextlib
import grp
import gzip
import json
import os
import platform
import pwd
import re
import select
import shlex
import shutil
import socket
import stat
import subprocess
import sys
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
DAEMON_UNIT = "/usr/lib/systemd/system/walrus-daemon.service"
SOCKET_UNIT = "/usr/lib/systemd/system/walrus-daemon.socket"
SERVICES = ("walrus-daemon.service", "walrus-backup.service", "walrus-wal-receive.service")
CLIENT = "/usr/bin/walg-daemon-client"
DAEMON_SOCKET = "/run/walrus/walrus.sock"
# what the shipped configuration tells the admin to put in postgresql.conf
DAEMON_ARCHIVE_COMMAND = f"{CLIENT} {DAEMON_SOCKET} wal-push %p"
DAEMON_RESTORE_COMMAND = f"{CLIENT} {DAEMON_SOCKET} wal-fetch %f %p"
# the highest `systemd-analyze security` exposure a shipped service may have
MAX_EXPOSURE = 4.0
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
    # the io_uring module links the distribution's liburing; the virtualenv its python3.X; psycopg
    # loads the distribution's libpq
    assert {"liburing2", f"python{_python_version()}", "postgresql-common", "libc6", "libpq5"} <= names, depends
    assert _sh("dpkg-deb", "-f", str(deb), "Recommends").stdout.strip() == "logrotate"
    # xz: Debian 11's dpkg cannot unpack zstd
    assert _sh("ar", "t", str(deb)).stdout.split() == ["debian-binary", "control.tar.gz", "data.tar.xz"]
    conffiles = _sh("dpkg-deb", "--info", str(deb), "conffiles").stdout.split()
    assert sorted(conffiles) == ["/etc/logrotate.d/walrus", "/etc/walrus/walrus.env", CONFIG]

    listing = _sh("dpkg-deb", "-c", str(deb)).stdout
    for entry in ("./usr/bin/walrus -> /opt/walrus/bin/walrus", "./opt/walrus/pyvenv.cfg",
                  f".{DAEMON_UNIT}", f".{SOCKET_UNIT}", "./usr/lib/systemd/system/walrus-backup.timer",
                  "./usr/share/man/man1/walrus.1.gz", "./usr/share/man/man1/walg-daemon-client.1.gz",
                  "./usr/share/doc/walrus/changelog.Debian.gz", "./usr/share/bash-completion/completions/walrus",
                  "./usr/share/lintian/overrides/walrus", "/site-packages/walrus/_uring/_liburing.abi3.so",
                  "/site-packages/psycopg/"):
        assert entry in listing, entry
    # no bundled libpq and OpenSSL, no activate scripts or dependencies' console scripts, no test suites
    for absent in ("psycopg_binary", "/bin/activate", "/bin/Activate", "/bin/normalizer", "/tests/"):
        assert absent not in listing, absent
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
    assert {"logrotate", "libpq.so.5()(64bit)"} <= set(requires), requires
    assert _sh("rpm", "-qp", "--qf", "%{PAYLOADCOMPRESSOR}", str(rpm)).stdout == "xz"
    assert f"- {__version__}-1\n" in _sh("rpm", "-qp", "--changelog", str(rpm)).stdout
    docs = _sh("rpm", "-qpd", str(rpm)).stdout.split()
    assert {"/usr/share/man/man1/walrus.1.gz", "/usr/share/man/man1/walg-daemon-client.1.gz",
            "/usr/share/doc/walrus/README.md"} <= set(docs), docs
    assert _sh("rpm", "-qpL", str(rpm)).stdout.split() == ["/usr/share/licenses/walrus/copyright"]
    # the wheels' bundled libraries (auditwheel's libfoo-<hash>.so names) are the package's own
    assert not [r for r in requires if re.search(r"-[0-9a-f]{8}\.so", r)], requires

    query = "[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]"
    attrs = {line.split()[-1]: line for line in _sh("rpm", "-qp", "--qf", query, str(rpm)).stdout.splitlines()}
    assert attrs[CONFIG].split()[:3] == ["cn", "-rw-r-----", "root:postgres"]
    assert attrs["/var/lib/walrus"].split()[:2] == ["drwxr-x---", "postgres:postgres"]
    assert attrs[RETAIN].split() == ["-rwxr-xr-x", "root:root", RETAIN]  # no flags: not a config file
    assert "useradd" in _sh("rpm", "-qp", "--scripts", str(rpm)).stdout


# -- what distributions' checkers say ---------------------------------------------------------

def test_lintian_reports_nothing_not_overridden_with_a_reason(packages):
    lintian = _tool("lintian", "lintian")
    proc = _sh(lintian, "--tag-display-limit", "0", str(packages["deb"]), check=False)
    # errors and warnings (lintian's default), unused or mismatched overrides included
    hints = [line for line in proc.stdout.splitlines() if re.match(r"[EWX]: ", line)]
    assert not hints, "\n".join(hints[:50])
    assert proc.returncode == 0, proc.stderr
    overrides = (ROOT / "packaging/lintian-overrides").read_text().split("\n\n")
    for block in overrides[1:]:  # after the file's own header: each override has its reason above it
        lines = block.strip().splitlines()
        assert lines[0].startswith("# ") and not lines[-1].startswith("#"), block


def test_rpmlint_reports_nothing_not_filtered_with_a_reason(packages):
    rpm = _needs_rpm(packages)
    rpmlint = _tool("rpmlint", "rpmlint")
    config = ROOT / "packaging/rpmlint.toml"
    proc = _sh(rpmlint, "-c", str(config), str(rpm), check=False)
    hints = [line for line in proc.stdout.splitlines() if re.search(r": [EW]: ", line)]
    assert not hints, "\n".join(hints[:50])
    assert "0 errors, 0 warnings" in proc.stdout, proc.stdout[-2000:]
    # every filter has a comment above it
    lines = config.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("'"):
            assert lines[i - 1].strip().startswith(("#", "'")), line
            j = i - 1
            while lines[j].strip().startswith("'"):
                j -= 1
            assert lines[j].strip().startswith("#"), line


def test_shared_objects_are_stripped_and_modules_import(deb_tree):
    readelf = _tool("readelf", "binutils")
    objects = sorted(str(p) for p in (deb_tree / "opt/walrus").rglob("*.so*") if p.is_file())
    assert objects
    sections = _sh(readelf, "-S", "-W", *objects).stdout
    assert ".symtab" not in sections and ".debug_" not in sections


def test_gzip_files_carry_no_time_stamp(deb_tree):
    stamped = []
    for path in deb_tree.rglob("*.gz"):
        with open(path, "rb") as f:
            if f.read(8)[4:8] != b"\0\0\0\0":
                stamped.append(str(path.relative_to(deb_tree)))
    assert not stamped, stamped[:10]
    changelog = gzip.decompress((deb_tree / "usr/share/doc/walrus/changelog.Debian.gz").read_bytes()).decode()
    assert changelog.startswith(f"walrus ({__version__}-1) ")


@pytest.mark.parametrize("unit", SERVICES)
def test_services_are_sandboxed(deb_tree, unit):
    systemd_analyze = _tool("systemd-analyze", "systemd")
    path = deb_tree / "usr/lib/systemd/system" / unit
    proc = _sh(systemd_analyze, "security", "--offline=true", str(path), check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, proc.stdout
    settings = _unit_settings(path.read_text())
    # what must keep working: io_uring's system calls (in @system-service), its locked memory, the
    # storage and log directories, a bounded start
    assert settings["SystemCallFilter"][0] == "@system-service"
    assert settings["LimitMEMLOCK"] == ["64M"] and settings["TimeoutStartSec"]
    assert "/var/lib/walrus /var/log/walrus" in settings["ReadWritePaths"]
    # the units' own comments point archive_command at the daemon client
    assert "#   archive_command = '/usr/bin/walg-daemon-client /run/walrus/walrus.sock wal-push %p'" \
        in (deb_tree / DAEMON_UNIT.lstrip("/")).read_text()


def test_socket_unit_hands_the_daemon_its_socket(deb_tree):
    sock = _unit_settings((deb_tree / SOCKET_UNIT.lstrip("/")).read_text())
    assert sock["ListenStream"] == [DAEMON_SOCKET]
    assert (sock["SocketUser"], sock["SocketGroup"], sock["SocketMode"]) == (["postgres"], ["postgres"], ["0660"])
    assert sock["WantedBy"] == ["sockets.target"]
    service = _unit_settings((deb_tree / DAEMON_UNIT.lstrip("/")).read_text())
    assert service["ExecStart"] == [f"{WALRUS} --config {CONFIG} daemon {DAEMON_SOCKET}"]
    # the service's runtime directory holds the socket's file: kept when the daemon stops
    assert service["RuntimeDirectoryPreserve"] == ["yes"]


def test_completion_and_client_page(deb_tree):
    completion = (deb_tree / "usr/share/bash-completion/completions/walrus").read_text()
    assert "_WALRUS_COMPLETE" in completion and "complete " in completion
    page = gzip.decompress((deb_tree / "usr/share/man/man1/walg-daemon-client.1.gz").read_bytes()).decode()
    assert page.startswith(".TH WALG\\-DAEMON\\-CLIENT 1 ")
    for shipped in (deb_tree / "etc/walrus/walrus.yaml", ROOT / "packaging/walrus.env.rpm", deb_tree / "etc/walrus/walrus.env"):
        assert DAEMON_ARCHIVE_COMMAND in shipped.read_text(), shipped


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


# What systemd does for walrus-daemon.socket's service between fork and exec: the listening socket
# as descriptor 3, LISTEN_FDS=1, and LISTEN_PID naming the process that execs the daemon (setpriv
# then walrus keep that pid, where runuser would fork).
ACTIVATE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execv(sys.argv[2], sys.argv[2:])")


def _env_file(path: str) -> dict[str, str]:
    """An EnvironmentFile='s KEY=value lines (the shipped ones quote nothing that is set)."""
    pairs = (line.split("=", 1) for line in Path(path).read_text().splitlines() if line and not line.startswith("#"))
    return {k: v.strip('"') for k, v in pairs}


def _listen_as_the_socket_unit(unit: dict[str, list[str]]) -> socket.socket:
    """walrus-daemon.socket's socket, made as systemd makes it from the unit's settings."""
    (path,) = unit["ListenStream"]
    os.makedirs(os.path.dirname(path), mode=int(unit["DirectoryMode"][0], 8), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chown(path, pwd.getpwnam(unit["SocketUser"][0]).pw_uid, grp.getgrnam(unit["SocketGroup"][0]).gr_gid)
    os.chmod(path, int(unit["SocketMode"][0], 8))
    listener.listen(64)
    return listener


def _activate_service(unit: dict[str, list[str]], listener: socket.socket, pgdata: str) -> subprocess.Popen:
    """walrus-daemon.service as walrus-daemon.socket starts it: its ExecStart= as User=/Group=, with
    its EnvironmentFile= (PGDATA pointed at the test's cluster), the socket passed in."""
    (env_file,) = unit["EnvironmentFile"]
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", **_env_file(env_file), "PGDATA": pgdata}
    (user,), (group,) = unit["User"], unit["Group"]
    (command,) = unit["ExecStart"]
    argv = [sys.executable, "-c", ACTIVATE, str(listener.fileno()), shutil.which("setpriv"), f"--reuid={user}",
            f"--regid={group}", "--init-groups", "--", *shlex.split(command)]
    return subprocess.Popen(argv, env=env, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


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
        units = [f"/usr/lib/systemd/system/walrus-{u}" for u in ("daemon.service", "daemon.socket", "backup.service",
                                                                 "backup.timer")]
        # --man=no: verify would look Documentation= up with man(1), which a build host need not
        # have; that page is the file groff must render cleanly below
        verified = _sh(systemd_analyze, "verify", "--man=no", *units)
        assert not verified.stderr, verified.stderr  # warnings included: none expected
        for unit in units:
            assert re.search(r"^Documentation=man:walrus\(1\)( |$)", Path(unit).read_text(), re.M), unit
        for name in ("walrus", "walg-daemon-client"):
            page = gzip.decompress(Path(f"/usr/share/man/man1/{name}.1.gz").read_bytes())
            proc = subprocess.run([groff, "-man", "-ww", "-z", "-Tutf8"], input=page, capture_output=True)
            assert proc.returncode == 0 and not proc.stderr, (name, proc.stderr)

        # The new user's walkthrough, the README's steps in order (here in the README still)
        readme = (ROOT / "README.md").read_text()
        for step in ("apt install ./walrus_", f"editor {CONFIG}",
                     "systemctl enable --now walrus-daemon.socket walrus-backup.timer",
                     f"ALTER SYSTEM SET archive_command = '{DAEMON_ARCHIVE_COMMAND}'",
                     f"sudo -u postgres walrus --config {CONFIG} check"):
            assert step in readme, f"the README's walkthrough lost a step this test runs: {step}"
        # the one edit, the storage in /etc/walrus/walrus.yaml,
        # in place (keeps the file's owner and mode), and the compression the test reads back
        shipped = Path(CONFIG).read_text()
        assert "\nWALG_FILE_PREFIX: /var/lib/walrus/backups\n" in shipped
        with open(CONFIG, "w") as f:
            f.write("# edited by the test\n" + shipped.replace("\nWALG_FILE_PREFIX: /var/lib/walrus/backups\n",
                                                           f"\nWALG_FILE_PREFIX: {store}\n")
                    .replace("\nWALG_COMPRESSION_METHOD: lz4\n", "\nWALG_COMPRESSION_METHOD: zstd\n"))
        # the installed binary as archive_command
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

        # The walkthrough goes on: the socket and the timer enabled (offline when systemd is not PID 1
        # here, as in a container: the same symlinks), archive_command pointed at the daemon client
        _sh("systemctl", "enable", "walrus-daemon.socket", "walrus-backup.timer")
        for link in ("sockets.target.wants/walrus-daemon.socket", "timers.target.wants/walrus-backup.timer"):
            assert os.path.islink(f"/etc/systemd/system/{link}"), link
        # the client runs the distribution's python -IS: no shell, no virtualenv, no site-packages
        with open(CLIENT, "rb") as f:
            assert f.readline() == f"#!/usr/bin/python{_python_version()} -IS\n".encode()
        had_run_dir = os.path.exists(os.path.dirname(DAEMON_SOCKET))
        listener = _listen_as_the_socket_unit(_unit_settings(Path(SOCKET_UNIT).read_text()))
        daemon = None
        try:
            cluster.psql(f"ALTER SYSTEM SET archive_command = '{DAEMON_ARCHIVE_COMMAND}'")
            cluster.psql("SELECT pg_reload_conf()")
            cluster.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
            segment = cluster.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
            cluster.psql("SELECT pg_switch_wal()")
            # the archiver's first call connects: that is what starts the service
            assert select.select([listener], [], [], 60)[0], "archive_command never connected to the socket"
            daemon = _activate_service(_unit_settings(Path(DAEMON_UNIT).read_text()), listener, cluster.data)
            cluster.wait_until(f"SELECT coalesce(last_archived_wal, '') >= '{segment}' FROM pg_stat_archiver", "t", 60)
            assert os.path.exists(os.path.join(store, "wal_005", f"{segment}.zst"))
            # the walkthrough's check, as postgres, of the cluster this test runs (a real host's
            # default cluster needs no PG* settings)
            checked = as_postgres("env", f"PGDATA={cluster.data}", f"PGHOST={pgroot}", f"PGPORT={cluster.port}",
                                  WALRUS, "--config", CONFIG, "check", check=False)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert len(checked.stdout.strip().splitlines()) >= 3, checked.stdout
            # restore_command's half, through the same daemon
            via_daemon = os.path.join(pgroot, "via-daemon")
            as_postgres(CLIENT, DAEMON_SOCKET, "wal-fetch", segment, via_daemon)
            assert Path(via_daemon).read_bytes() == Path(cluster.data, "pg_wal", segment).read_bytes()
            absent = as_postgres(CLIENT, DAEMON_SOCKET, "wal-fetch", "0000000100000000000000FF", via_daemon + ".x",
                                 check=False)
            assert absent.returncode == 74, absent.stderr
        finally:
            if daemon is not None:
                daemon.terminate()
                log = daemon.communicate(timeout=60)[1].decode()
            left = os.path.exists(DAEMON_SOCKET)  # systemd's file: the daemon leaves it
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(DAEMON_SOCKET)
            if not had_run_dir:
                shutil.rmtree(os.path.dirname(DAEMON_SOCKET), ignore_errors=True)
        assert daemon.returncode == 0, log[-2000:]
        assert "(passed in by systemd)" in log, log[-2000:]
        assert left
        cluster.psql(f"ALTER SYSTEM SET archive_command = '{WALRUS} --config {CONFIG} wal-push %p'")
        cluster.psql("SELECT pg_reload_conf()")

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
        assert not list(Path("/etc/systemd/system").glob("*.wants/walrus-*"))  # the units the admin enabled
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
