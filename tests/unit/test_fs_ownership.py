"""File storage ownership: root may not write into the server user's repository, objects are group
readable whatever the umask, and a permission error says whether reading or writing was refused."""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pgcluster import as_user, make_workdir, run_user

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
SEGMENT = "000000010000000000000003"

pytestmark = pytest.mark.skipif(run_user() is None, reason="needs root and an unprivileged user to run walrus as")


def _walrus(args: list[str], prefix, *, as_root: bool, umask: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_", "WALRUS_"))}
    env.update(WALG_FILE_PREFIX=str(prefix), WALG_PG_WAL_SIZE="1", HOME="/nonexistent", LC_ALL="C.UTF-8")
    extra = {} if as_root else as_user()
    return subprocess.run([WALRUS, *args], env=env, capture_output=True, text=True, timeout=60, umask=umask or -1,
                          **extra)


@pytest.fixture
def user():
    return pwd.getpwnam(run_user())


@pytest.fixture
def area(user):
    """A folder the unprivileged user owns, holding a segment it may read."""
    base = Path(make_workdir("walrus-owner-"))
    os.chmod(base, 0o755)
    wal = base / "pg_wal"
    wal.mkdir()
    (wal / SEGMENT).write_bytes(os.urandom(4096) + bytes((1 << 20) - 4096))
    for p in (wal, wal / SEGMENT):
        os.chown(p, user.pw_uid, user.pw_gid)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_root_is_refused_a_repository_the_server_user_owns(area, user):
    store = area / "store"
    pushed = _walrus(["wal-push", str(area / "pg_wal" / SEGMENT)], store, as_root=False)
    assert pushed.returncode == 0, pushed.stderr
    other = area / "pg_wal" / "000000010000000000000004"
    shutil.copy(area / "pg_wal" / SEGMENT, other)

    refused = _walrus(["wal-push", str(other)], store, as_root=True)

    assert refused.returncode == 1
    assert "refusing to write to file storage" in refused.stderr and "as root" in refused.stderr
    assert f"sudo -u {user.pw_name} walrus" in refused.stderr
    assert sorted(p.name for p in (store / "wal_005").iterdir()) == [SEGMENT + ".lz4"]  # nothing written
    # reading stays allowed: root can read anything, and owns nothing by it
    fetched = _walrus(["wal-fetch", SEGMENT, str(area / "fetched")], store, as_root=True)
    assert fetched.returncode == 0, fetched.stderr


def test_root_is_refused_where_the_repository_would_be_made_in_the_users_folder(area):
    refused = _walrus(["wal-push", str(area / "pg_wal" / SEGMENT)], area / "not-yet" / "store", as_root=True)
    assert refused.returncode == 1 and "as root" in refused.stderr
    assert not (area / "not-yet").exists()


def test_objects_and_folders_are_group_readable_under_a_strict_umask(area, user):
    store = area / "store"
    store.mkdir()
    group = grp.getgrgid(user.pw_gid)
    os.chown(store, user.pw_uid, group.gr_gid)
    os.chmod(store, 0o2750)  # setgid: what an admin does to give the repository its group

    pushed = _walrus(["wal-push", str(area / "pg_wal" / SEGMENT)], store, as_root=False, umask=0o077)

    assert pushed.returncode == 0, pushed.stderr
    folder = os.stat(store / "wal_005")
    obj = os.stat(store / "wal_005" / (SEGMENT + ".lz4"))
    assert stat.S_IMODE(folder.st_mode) == 0o2750 and folder.st_gid == group.gr_gid
    assert stat.S_IMODE(obj.st_mode) == 0o640 and obj.st_gid == group.gr_gid


def test_a_read_refused_says_read_and_names_the_owner(area):
    store = area / "store"
    pushed = _walrus(["wal-push", str(area / "pg_wal" / SEGMENT)], store, as_root=False)
    assert pushed.returncode == 0, pushed.stderr
    obj = store / "wal_005" / (SEGMENT + ".lz4")
    os.chown(obj, 0, 0)  # as a backup taken with sudo left it
    os.chmod(obj, 0o600)

    fetched = _walrus(["wal-fetch", SEGMENT, str(area / "fetched")], store, as_root=False)

    assert fetched.returncode == 1, fetched.stderr  # refused, not "not archived" (74)
    assert "may not read it" in fetched.stderr and "root:root 0600" in fetched.stderr
    assert "writable" not in fetched.stderr
    assert not (area / "fetched").exists()


def test_a_write_refused_says_write(area):
    store = area / "rootstore"
    store.mkdir(mode=0o755)  # root's, and not writable by the user

    pushed = _walrus(["wal-push", str(area / "pg_wal" / SEGMENT)], store, as_root=False)

    assert pushed.returncode == 1
    assert "may not write there" in pushed.stderr and "root:root 0755" in pushed.stderr
    assert "may not read" not in pushed.stderr
