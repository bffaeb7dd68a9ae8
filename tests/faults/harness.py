"""Helpers: bounded processes as the server's OS user, a signal at a chosen time, clean errors, digests, tmpfs."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass

import pytest

from tests.faults.figures import Outcome
from tests.pgcluster import WALRUS, as_user, chown_to_user, run_user

# WAL-G's temporary names in file storage; listings and fetches must never see them.
TMP_RE = re.compile(r"\.tmp\.\d{8}T\d{6}Z-[0-9a-f]{8}$")


def user_env(extra: dict | None = None) -> dict:
    """The environment of a command run as the server's OS user: none of ours leaks in (WALG_*, PG*, AWS_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "WALRUS_", "PG", "AWS_"))}
    user = run_user()
    if user:
        pw = pwd.getpwnam(user)
        env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
    env.update(LC_ALL="C.UTF-8", AWS_EC2_METADATA_DISABLED="true")
    env.update(extra or {})
    return env


@dataclass
class Result:
    args: list[str]
    rc: int | None  # None: still running at its bound (a hang), then killed by the harness
    stdout: str
    stderr: str
    seconds: float  # from start to exit
    signalled: float | None  # when the fault signal went out (seconds from start); None: it had exited
    after_signal: float | None  # seconds from the fault signal to the exit

    @property
    def hung(self) -> bool:
        return self.rc is None

    def describe(self) -> str:
        tail = " | ".join(line for line in self.stderr.strip().splitlines()[-4:])
        return f"{' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(self.args))} -> rc {self.rc} " \
               f"after {self.seconds:.2f}s: {tail[:400]}"


def spawn(args: list[str], env: dict | None = None, cwd: str | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(args, env=user_env(env), cwd=cwd, **as_user(), **kw)


def run(args: list[str], env: dict | None = None, *, timeout: float = 60.0, fault_at: float | None = None,
        sig: int = signal.SIGKILL, grace: float = 10.0, cwd: str | None = None) -> Result:
    """Run a command as the server's OS user. With fault_at, send `sig` that many seconds after the
    start unless it has exited; it must then exit within `grace` seconds. Without, it must exit within
    `timeout`. Past its bound it is a hang: killed, rc None. Output goes to files, never to a pipe
    that could fill and stall it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        began = time.monotonic()
        proc = spawn(args, env, cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        signalled = None
        try:
            deadline = timeout
            if fault_at is not None:
                try:
                    proc.wait(timeout=max(0.0, fault_at - (time.monotonic() - began)))
                except subprocess.TimeoutExpired:
                    proc.send_signal(sig)  # a no-op if it exited meanwhile
                    signalled = time.monotonic() - began
                    deadline = signalled + grace
            try:
                rc = proc.wait(timeout=max(0.0, deadline - (time.monotonic() - began)))
            except subprocess.TimeoutExpired:
                rc = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        seconds = time.monotonic() - began
        out.seek(0)
        err.seek(0)
        return Result(args, rc, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                      seconds, signalled, None if signalled is None else seconds - signalled)


def walrus(args: list[str], env: dict, **kw) -> Result:
    return run([WALRUS, *args], env, **kw)


def unclean_reason(stderr: str) -> str | None:
    """Why a failure's message is not a clear one (None if it is): a clear failure has a line that
    starts with ERROR:, and is neither an internal error nor a Python traceback."""
    if "Traceback (most recent call last)" in stderr:
        return "a Python traceback"
    if "ERROR: internal error" in stderr:
        return "ERROR: internal error"
    if not any(line.startswith("ERROR:") for line in stderr.splitlines()):
        return "no line starting with ERROR:"
    return None


_PACKAGE_FRAME = re.compile(r'File "([^"]*/walrus/[^"]*\.py)", line \d+, in (\S+)')
# the executable's own import, before main() runs: nothing of walrus's can take the signal yet
_ENTRY_IMPORT = {("walrus/__init__.py", "<module>"), ("walrus/entry.py", "<module>")}


def before_walrus(stderr: str) -> bool:
    """Output of an interpreter stopped while still starting, before any of walrus's code ran:
    nothing, or Python's own KeyboardInterrupt traceback through no file of the walrus package but
    the import of the executable's entry module (CPython reports a SIGINT during its own start-up as
    "Fatal Python error: init_...", naming the start-up step it stopped: init_import_site,
    init_sys_streams)."""
    if not stderr.strip():
        return True
    frames = {("/".join(path.rsplit("/", 2)[-2:]), where) for path, where in _PACKAGE_FRAME.findall(stderr)}
    return stderr.rstrip().endswith("KeyboardInterrupt") and frames <= _ENTRY_IMPORT


def judge_exit(result: Result, outcome: Outcome, *, sig: int | None = None) -> bool:
    """Fold a command's own exit into outcome: a hang; or a failure that is not clearly reported.
    True if it exited 0.

    Under SIGTERM or SIGINT walrus cleans up, says "ERROR: stopped by SIG...", and then dies by that
    same signal, as PostgreSQL expects of the commands it runs (a signal means stop, where an exit
    status means "not available"). Dying of the signal is therefore clean with that message, or
    with what an interpreter still starting leaves (before_walrus): the signal came before walrus
    could take it, and nothing had begun. Dying of it otherwise is unclean."""
    if result.hung:
        outcome.worse("hang", f"still running {result.seconds:.1f}s after start"
                      + (f" ({result.seconds - result.signalled:.1f}s after the signal)" if result.signalled else "")
                      + f": {result.describe()}")
        return False
    if result.rc == 0:
        return True
    if sig == signal.SIGKILL and result.signalled is not None:
        return False  # killed: nothing to say
    why = unclean_reason(result.stderr)
    if sig == signal.SIGINT and result.rc == 1 and "Fatal Python error: init_" in result.stderr \
            and before_walrus(result.stderr):
        why = None  # see before_walrus
    elif result.rc is not None and result.rc < 0:
        stopped = sig is not None and result.rc == -sig and (
            f"ERROR: stopped by {signal.Signals(sig).name}" in result.stderr and "Traceback" not in result.stderr
            or before_walrus(result.stderr))
        why = None if stopped else f"terminated by {signal.Signals(-result.rc).name} without a message"
    if why:
        when = f" (the signal went out {result.signalled:.2f}s after the start)" if result.signalled is not None else ""
        outcome.worse("unclean", f"{why}{when}: {result.describe()}")
    elif outcome.kind == "success":
        outcome.kind = "clean"
        outcome.seconds = result.after_signal if result.signalled is not None else result.seconds
    return False


# -- files -------------------------------------------------------------------------------------

def mkdir(path: str) -> str:
    """A directory the server's OS user owns, as every directory this creates on the way (the harness
    runs as root)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        mkdir(parent)
    os.makedirs(path, exist_ok=True)
    chown_to_user(path)
    return path


def write_file(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    chown_to_user(path)
    return path


def workdir(prefix: str, scratch: str | None = None) -> str:
    """A fresh directory under `scratch` (default: the temp dir) owned by the server's OS user, 0700."""
    path = tempfile.mkdtemp(prefix=prefix, dir=scratch)
    chown_to_user(path)
    os.chmod(path, 0o700)
    return path


def chown_tree(root: str) -> None:
    """Hand a file, or a directory and everything in it, to the server's OS user."""
    chown_to_user(root)
    for dirpath, dirnames, filenames in os.walk(root):
        chown_to_user(dirpath)
        for n in filenames:
            chown_to_user(os.path.join(dirpath, n))


def link_copy(src: str, dst: str) -> None:
    """A copy of a storage tree made of hard links: cheap, and safe because walrus never writes a
    stored object in place (it renames a new file over it) and damage is written the same way."""
    shutil.copytree(src, dst, copy_function=os.link)
    chown_tree(dst)


def replace_file(path: str, data: bytes) -> None:
    """Give `path` new contents through a new inode (hard-linked copies keep the original)."""
    tmp = path + ".damage"
    write_file(tmp, data)
    os.rename(tmp, path)


def read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def segment_bytes(rnd, size: int) -> bytes:
    """Synthetic WAL: a random half (incompressible) and a zero half (as a segment's unused tail)."""
    half = size // 2
    return rnd.randbytes(half) + bytes(size - half)


def wal_name(n: int, timeline: int = 1) -> str:
    """The n-th segment's file name (valid for 16 MiB segments, and for smaller ones while n < 256)."""
    return f"{timeline:08X}{n // 256:08X}{n % 256:08X}"


def tree_digest(root: str) -> dict[str, str]:
    """relpath -> sha256 of every regular file, and 'symlink:<target>' of every link; directories
    (and their mtimes) are not compared."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "symlink:" + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    out[rel] = hashlib.file_digest(f, "sha256").hexdigest()
            elif not stat.S_ISDIR(st.st_mode):
                out[rel] = f"special:{stat.S_IFMT(st.st_mode):o}"
    return out


def digest_diff(got: dict[str, str], want: dict[str, str], limit: int = 4) -> str | None:
    """None if equal, else a short description of how `got` differs from `want`."""
    if got == want:
        return None
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    parts = []
    for label, keys in (("missing", missing), ("extra", extra), ("different", changed)):
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:limit])}{', ...' if len(keys) > limit else ''})")
    return "restored tree differs from the reference: " + "; ".join(parts)


def tar_digest(tar_bytes: bytes) -> dict[str, str]:
    """The relpath -> sha256 (or symlink target) of a tar's regular files and links, names normalised
    as a restore writes them (no leading / or ./)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for m in tar:
            rel = m.name.lstrip("/")
            rel = rel[2:] if rel.startswith("./") else rel
            if m.isreg():
                out[rel] = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
            elif m.issym():
                out[rel] = "symlink:" + m.linkname
    return out


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- decoding stored objects independently of walrus --------------------------------------------

def decompress(data: bytes, method: str) -> bytes:
    """An unencrypted stored object's bytes, decoded with the reference libraries (raises if damaged)."""
    if method == "lz4":
        import lz4.frame
        return lz4.frame.decompress(data)
    if method == "zstd":
        import zstandard
        return b"".join(zstandard.ZstdDecompressor().read_to_iter(io.BytesIO(data)))
    if method == "brotli":
        import brotli
        return brotli.decompress(data)
    if method == "lzma":
        import lzma
        return lzma.decompress(data, format=lzma.FORMAT_ALONE)
    assert method == "none"
    return data


def same_object(data: bytes | None, original: bytes, method: str = "lz4") -> str | None:
    """None if a stored object decodes to exactly `original`, else why not (data None: absent)."""
    if data is None:
        return "absent"
    try:
        got = decompress(data, method)
    except Exception as e:  # any decoder's error: the object is damaged or partial
        return f"does not decode ({type(e).__name__}: {e})"
    if got != original:
        return f"decodes to {len(got)} bytes that differ from the original {len(original)}"
    return None


# -- tmpfs ------------------------------------------------------------------------------------

@contextlib.contextmanager
def scratch_space():
    """Where the suite works: as root, a tmpfs of its own (unmounted at the end), unless
    WALRUS_FAULTS_DISK=1. A kill or a signal leaves a process's files in the page cache whatever the
    filesystem, so what the invariants see is the same; what a tmpfs saves is the disk's time (each
    restore's syncfs flushed the writes of every trial before it, 1-3 s a trial here)."""
    if os.geteuid() != 0 or os.environ.get("WALRUS_FAULTS_DISK"):
        yield None
        return
    path = tempfile.mkdtemp(prefix="walrus-faults-scratch-")
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    size = max(1 << 30, min(6 << 30, avail // 2))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path], check=True,
                   capture_output=True, timeout=30)
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=60)
        os.rmdir(path)


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{why} needs root (mount -t tmpfs); run the suite as root")


@contextlib.contextmanager
def tmpfs(path: str, size: int):
    """A tmpfs of `size` bytes at `path`, owned by the server's OS user; always unmounted."""
    require_root("a small filesystem that fills up")
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], check=True,
                   capture_output=True, timeout=30)
    try:
        chown_to_user(path)
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


def resize_tmpfs(path: str, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True, capture_output=True, timeout=30)


def fill(directory: str, leave: int = 0) -> str:
    """Fill the filesystem holding `directory` with one file until `leave` bytes or fewer are free."""
    path = os.path.join(directory, "filler")
    with open(path, "wb") as f:
        chunk = bytes(1 << 20)
        while True:
            free = shutil.disk_usage(directory).free
            if free <= leave:
                break
            try:
                f.write(chunk[:min(len(chunk), free - leave)] if free - leave < len(chunk) else chunk)
                f.flush()
            except OSError:
                break
    return path
