"""WAL prefetch in WAL-G's layout (pg_wal/.wal-g/prefetch/): taking prefetched files, starting the prefetcher.

Nothing here imports asyncio, a storage or the settings table: a restore_command whose segment was
prefetched needs only this module (take_unresolved). The downloads are prefetcher.py's.
"""
from __future__ import annotations

import fcntl
import os
import struct

from walrus.configfile import default_config_path
from walrus.pg.segname import MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, is_segment_name, parse_wal_file_name

TYPE_CHECKING = False  # typing's, without importing typing (see take_unresolved)
if TYPE_CHECKING:
    from typing import Mapping

    from walrus.config import Settings

PREFETCH = os.path.join(".wal-g", "prefetch")
RUNNING = "running"
LOCK = ".prefetcher.lock"
CURSOR = ".prefetcher.cursor"  # the segment recovery asked for last (advance(), cursor())
SOCKET = ".prefetcher.sock"  # the running prefetcher answers fetches of what it has not prefetched (ask())
ASK_TIMEOUT = 300.0  # seconds for the prefetcher's answer: a download of one segment, with its retries
ASK_SLICE = 0.2  # seconds between looks at a held SIGTERM/SIGINT while waiting for it
# A prefetcher that holds the lock but has no socket yet is starting (imports, storage client): a call
# waits up to this long for it, polling, rather than pay the same start-up itself in a full command
ASK_START_WAIT = 3.0
ASK_START_POLL = 0.005
WAL_MAGIC_MIN = 0xD061  # the oldest WAL page magic PostgreSQL 9.x wrote; anything lower is not WAL
WAIT_POLL = 0.002
WAIT_GIVE_UP = 100  # polls without growth of a running download (WAL-G waits the same ~200 ms)
# A segment's first page: XLogLongPageHeaderData (magic, info, timeline, page address, remaining
# length, padding, system identifier, segment size, block size)
LONG_PAGE_HEAD = struct.Struct("<HHIQI4xQII")
XLP_LONG_HEADER = 0x0002


def location(settings: Settings, destination: str) -> str:
    """P = <dir of DEST or WALG_PREFETCH_DIR>/.wal-g/prefetch; downloads in progress go to P/running."""
    base = settings.prefetch_dir or os.path.dirname(os.path.realpath(destination))
    return os.path.join(base, PREFETCH)


def wanted(name: str, settings: Settings) -> bool:
    return is_segment_name(name) and settings.download_concurrency > 1


async def take(location: str, name: str, destination: str, segment_size: int) -> int | None:
    """take_ready(), after waiting for a download of `name` in progress while it keeps growing."""
    import asyncio  # here, not at the top: a wal-fetch of a prefetched segment never needs asyncio

    running = os.path.join(location, RUNNING, name)
    if not os.path.exists(os.path.join(location, name)):
        last, idle = -1, 0
        while idle < WAIT_GIVE_UP:  # a prefetch is writing it: wait while it keeps growing
            try:
                size = os.stat(running).st_size
            except FileNotFoundError:
                break
            idle = idle + 1 if size == last else 0
            last = size
            await asyncio.sleep(WAIT_POLL)
    return take_ready(location, name, destination, segment_size)


def take_ready(location: str, name: str, destination: str, segment_size: int) -> int | None:
    """Move a prefetched `name` to DEST if it is whole and looks like WAL; None to download it instead."""
    ready = os.path.join(location, name)
    try:
        with open(ready, "rb") as f:
            head = f.read(4)
            st = os.fstat(f.fileno())
    except FileNotFoundError:
        return None
    if st.st_mtime < _boot_time():
        # written without fsync before a crash or reboot: its bytes may be torn, so never trust it
        from walrus.log import log

        log.info(f"prefetched {name} dates from before the last boot; downloading it again")
        _unlink(ready)
        return None
    size = st.st_size
    if size != segment_size or len(head) < 4 or struct.unpack("<I", head)[0] < WAL_MAGIC_MIN:
        from walrus.log import log

        log.warning(f"prefetched {name} is not a whole WAL segment; downloading it again")
        _unlink(ready)
        return None
    try:
        os.rename(ready, destination)
    except FileNotFoundError:
        return None
    return size


def take_unresolved(name: str, destination: str, config_path: str | None, env: Mapping[str, str]) -> str | None:
    """wal-fetch's quickest answer, for restore_command while the prefetcher keeps ahead of recovery:
    a prefetched `name` moved to DEST (its prefetch folder returned, for advance() and spawn()),
    without resolving the settings (a call costs little more than the interpreter's start, and replay
    waits for every call). The file must be a whole segment by its own first page. Anything else is
    None with nothing changed, and the full command (or the prefetcher, ask()) decides."""
    where = unresolved_location(destination, config_path, env)
    if where is None or not is_segment_name(name):
        return None
    return where if take_whole(where, name, destination) else None


def unresolved_location(destination: str, config_path: str | None, env: Mapping[str, str]) -> str | None:
    """The prefetch folder, where the settings have no say in it: WALG_PREFETCH_DIR from the
    environment (which wins over any file), else beside DEST when the config file does not name that
    setting. None otherwise: the full command resolves the settings (and reports them in error, which a
    prefetcher started by an earlier call resolved)."""
    base = env.get("WALG_PREFETCH_DIR")
    if not base:
        path = config_path or default_config_path(env)
        if path:
            try:
                with open(path, "rb") as f:
                    if b"prefetch_dir" in f.read().lower():
                        return None
            except OSError:
                return None
        base = os.path.dirname(os.path.realpath(destination))
    return os.path.join(base, PREFETCH)


def take_whole(where: str, name: str, destination: str) -> bool:
    """Move prefetched `name` from `where` to DEST if it is whole by its long page header and was
    written since the last boot."""
    ready = os.path.join(where, name)
    try:
        with open(ready, "rb") as f:
            head = f.read(LONG_PAGE_HEAD.size)
            st = os.fstat(f.fileno())
    except OSError:
        return False
    if not _whole_segment(name, head, st.st_size) or st.st_mtime < _boot_time():
        return False
    try:
        os.rename(ready, destination)
    except OSError:
        return False
    return True


def settings_fingerprint(config_path: str | None) -> str:
    """What a process's settings are resolved from, as a digest: its initial environment (less the
    interpreter's PYTHON* variables), and the config file's path and identity (inode, size, mtime).
    The prefetcher answers only a call whose fingerprint is its own: a call configured otherwise (another
    storage, another key) must not be served from the prefetcher's storage. /proc/self/environ is the
    environment the process started with, whatever it changed since."""
    from _blake2 import blake2b  # the C module: hashlib's import costs more than the digest

    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        raw = b""
    kept = sorted(v for v in raw.split(b"\0") if v and not v.startswith(b"PYTHON"))
    path = config_path or default_config_path(os.environ)
    identity = None
    if path:
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    return blake2b(b"\0".join(kept) + b"\0\0" + repr((path, identity)).encode(), digest_size=16).hexdigest()


def ask(where: str, name: str, destination: str, config_path: str | None,
        timeout: float = ASK_TIMEOUT) -> int | None:
    """Have the running prefetcher fetch `name` (a segment it has not prefetched, a .history file, one
    past the end of the archive) with its storage client, already open: a new process would first pay
    the storage's imports and set-up, on S3 most of a second. 0: restored to DEST; 74: the storage
    answered that the archive has no such file. None when there is no prefetcher to ask, or it could not
    fetch it (the full command then does, and reports why).

    The request is NAME, DEST (absolute) and the caller's settings_fingerprint(), each ended by a NUL,
    which none can hold; the answer one byte, as the daemon's: O, N, or E (also for a call configured
    otherwise than the prefetcher). A SIGTERM or SIGINT held meanwhile closes the connection, which
    cancels the prefetcher's fetch, and ends this process by that signal.
    """
    import _socket  # not `socket`: its enum and selectors imports would cost every call

    try:
        folder = os.open(os.path.join(where, RUNNING), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(ASK_SLICE)
        try:
            _connect(sock, folder)
            sock.sendall(b"".join(part.encode() + b"\0" for part in
                                  (name, os.path.abspath(destination), settings_fingerprint(config_path))))
        except OSError:
            return None  # no prefetcher (or one closing): nothing was asked
        reply = _answer(sock, timeout)
    finally:
        sock.close()
        os.close(folder)
    return {b"O": 0, b"N": 74}.get(reply)


def _connect(sock, folder: int) -> None:
    """Connect to the prefetcher's socket; while it has none but holds the lock, it is starting: wait
    for it (bounded). OSError when there is no prefetcher to ask."""
    import time

    deadline = None
    while True:
        try:
            sock.connect(socket_address(folder))
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if deadline is None:
                deadline = time.monotonic() + ASK_START_WAIT
            if time.monotonic() > deadline or not _locked(folder):
                raise
            _stop_if_signalled(None)
            time.sleep(ASK_START_POLL)


def _locked(folder: int) -> bool:
    """A prefetcher holds the folder's lock (spawn() took it for the child, which keeps it until exit)."""
    try:
        fd = os.open(LOCK, os.O_RDONLY | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops a shared lock just taken
    return False


def _stop_if_signalled(sock) -> None:
    """A SIGTERM or SIGINT held while waiting on the prefetcher: leave (closing the connection, which
    cancels its fetch) and end by that signal."""
    import _signal

    from walrus import interrupts

    held = _signal.sigpending() & interrupts.SIGNALS
    if held:
        if sock is not None:
            sock.close()
        interrupts.die_by(min(held))


def socket_address(folder: int) -> str:
    """The socket's address through an O_PATH descriptor of its folder: a data directory's path can
    exceed the 107 bytes a socket address holds, /proc/self/fd/N/... never does."""
    return f"/proc/self/fd/{folder}/{SOCKET}"


def _answer(sock, timeout: float) -> bytes:
    """The prefetcher's one-byte answer; b"" if it closed without one or gave none within `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _stop_if_signalled(sock)
        try:
            return sock.recv(1)
        except TimeoutError:
            continue
        except OSError:
            return b""
    return b""


def _whole_segment(name: str, head: bytes, size: int) -> bool:
    """The file is segment `name` in full, by its long page header: a WAL magic, the segment size it
    states (a power of two PostgreSQL allows) equal to the file's, and the page address of the
    segment's start."""
    if len(head) < LONG_PAGE_HEAD.size:
        return False
    magic, info, _tli, pageaddr, _rem, _sysid, seg_size, _blcksz = LONG_PAGE_HEAD.unpack(head)
    if magic < WAL_MAGIC_MIN or not info & XLP_LONG_HEADER or size != seg_size:
        return False
    if not MIN_SEGMENT_SIZE <= seg_size <= MAX_SEGMENT_SIZE or seg_size & (seg_size - 1):
        return False
    try:
        _timeline, segno = parse_wal_file_name(name, seg_size)
    except ValueError:  # a name that does not fit the size
        return False
    return pageaddr == segno * seg_size


def advance(location: str, name: str) -> None:
    """Record `name` as the segment recovery asked for last: the running prefetcher follows it."""
    try:
        os.makedirs(os.path.join(location, RUNNING), 0o700, exist_ok=True)
        fd = os.open(os.path.join(location, RUNNING, CURSOR), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, name.encode(), 0)  # names have one length: one small write, never seen torn
        finally:
            os.close(fd)
    except OSError:
        pass


def cursor(location: str) -> str | None:
    """The segment advance() recorded last, or None."""
    try:
        with open(os.path.join(location, RUNNING, CURSOR), "rb") as f:
            text = f.read(64).decode("ascii", "replace")
    except OSError:
        return None
    return text if is_segment_name(text) else None


def present(location: str, segment: str) -> bool:
    return os.path.exists(os.path.join(location, segment)) or os.path.exists(os.path.join(location, RUNNING, segment))


def _boot_time() -> float:
    """When this system booted (seconds since the epoch), from /proc/stat's btime; 0 if unknown."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def clean(location: str, name: str, segment_size: int) -> None:
    """Remove prefetched files older than `name`: recovery has moved past them."""
    timeline, segno = parse_wal_file_name(name, segment_size)
    for folder in (location, os.path.join(location, RUNNING)):
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if parse_wal_file_name(entry, segment_size) < (timeline, segno):
                    os.unlink(os.path.join(folder, entry))
            except (ValueError, FileNotFoundError, IsADirectoryError):
                continue


def spawn(name: str, destination: str, location: str, config_path: str | None) -> None:
    """Start `walrus wal-prefetch` detached, so restore_command returns while the next segments come.

    At most one prefetcher runs per location: this process takes an exclusive flock and hands the
    locked file to the child, which holds it until it exits. Recovery calls restore_command once per
    segment; without the lock each call would start another interpreter competing for the CPU
    that replay needs.
    """
    try:
        os.makedirs(os.path.join(location, RUNNING), 0o700, exist_ok=True)
        lock = os.open(os.path.join(location, RUNNING, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)  # a prefetcher is already at work
        return
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "walrus"] + (["--config", config_path] if config_path else [])
    cmd += ["wal-prefetch", name, os.path.dirname(os.path.abspath(destination))]
    try:
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, pass_fds=(lock,))
    except OSError:
        pass
    os.close(lock)  # the child's copy keeps the lock (flock belongs to the shared open file)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
