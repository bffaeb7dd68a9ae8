"""Exact CPU of process groups (the server, each tool, the load) from a private cgroup v2 subtree."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

from tests.pgcluster import chown_to_user

_KIB = 1024


def _v2_mount() -> str | None:
    """Where a cgroup2 hierarchy is mounted: /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid)."""
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, where, fstype, *_ = line.split()
            if fstype == "cgroup2":
                mounts.append(where)
    return min(mounts, key=len) if mounts else None


def _own_group(mount: str) -> str:
    """The cgroup v2 group this process is in, as a directory under mount."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(mount, line.strip()[3:].lstrip("/"))
    return mount


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (0 if it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * _KIB
    except (OSError, ValueError):
        pass
    return 0


class Cgroups:
    """One child group per name under walrus-bench-<pid>.

    A group's cpu.stat counts every process that ever ran in it, including those that exited or detached
    (pgBackRest's async processes, wal-fetch's prefetchers, daemons), without sampling. Processes enter
    a group by inheritance (we fork them while inside it) or move themselves: an archive_command or
    restore_command starts with `echo $$ > <group>/cgroup.procs`, which the run user may do because it
    owns cgroup.procs of the group and of the common parent (cgroup v2's rule for moving a process).
    Without root or a cgroup2 mount the groups are unavailable and CPU figures are None.
    """

    def __init__(self) -> None:
        self.base: str | None = None
        self.reason: str | None = None
        self._home: str | None = None
        mount = _v2_mount() if os.geteuid() == 0 else None
        if os.geteuid() != 0:
            self.reason = "not root: cannot create cgroups"
        elif mount is None:
            self.reason = "no cgroup2 hierarchy is mounted"
        else:
            base = os.path.join(mount, f"walrus-bench-{os.getpid()}")
            try:
                os.mkdir(base)
                chown_to_user(os.path.join(base, "cgroup.procs"))
            except OSError as e:
                self.reason = f"cannot create {base}: {e.strerror}"
            else:
                self.base, self._home = base, _own_group(mount)

    @property
    def available(self) -> bool:
        return self.base is not None

    def group(self, name: str) -> str | None:
        """The directory of group name, created on first use (None without cgroups)."""
        if self.base is None:
            return None
        path = os.path.join(self.base, name)
        if not os.path.isdir(path):
            os.mkdir(path)
            chown_to_user(os.path.join(path, "cgroup.procs"))
        return path

    def shell_prefix(self, name: str) -> str:
        """Shell text that moves the shell (and what it execs) into group name; never fails the command."""
        path = self.group(name)
        return f"{{ echo $$ > {path}/cgroup.procs; }} 2>/dev/null; " if path else ""

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """Run the body with this process in group name, so every process it forks starts there."""
        path = self.group(name)
        if path is None:
            yield
            return
        _move_self(path)
        try:
            yield
        finally:
            _move_self(self._home)

    def cpu_s(self, name: str | None = None) -> float | None:
        """CPU seconds (user+system) used so far in group name, or in all groups when name is None."""
        if self.base is None:
            return None
        path = self.base if name is None else self.group(name)
        with open(os.path.join(path, "cpu.stat")) as f:
            for line in f:
                key, value = line.split()
                if key == "usage_usec":
                    return int(value) / 1e6
        return None

    def pids(self, name: str) -> list[int]:
        if self.base is None:
            return []
        try:
            with open(os.path.join(self.base, name, "cgroup.procs")) as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def rss(self, name: str) -> int:
        """Summed VmRSS of the processes in group name now."""
        return sum(rss_bytes(pid) for pid in self.pids(name))

    def wait_empty(self, name: str, timeout: float) -> int:
        """Wait until no process is left in group name (detached helpers finishing); returns how many remain."""
        deadline = time.monotonic() + timeout
        while (left := len(self.pids(name))) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def end_leftovers(self, name: str, grace: float) -> list[str]:
        """Processes still in group name after grace seconds (all started by the bench: a tool's helpers that
        outlived its step) get SIGTERM, then SIGKILL, each by pid; returns their command lines."""
        if not self.wait_empty(name, grace):
            return []
        ended = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids(name):
                if sig == signal.SIGTERM:
                    ended.append(_cmdline(pid))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if not self.wait_empty(name, 5):
                break
        return ended

    def close(self) -> list[str]:
        """End leftovers and remove the groups; returns a note per group that had leftovers."""
        if self.base is None:
            return []
        notes = []
        for name in os.listdir(self.base):
            path = os.path.join(self.base, name)
            if os.path.isdir(path):
                ended = self.end_leftovers(name, 10)
                if ended:
                    notes.append(f"{len(ended)} process(es) of group {name} still ran at the end and were ended: "
                                 + "; ".join(ended))
                with contextlib.suppress(OSError):
                    os.rmdir(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.base)
        return notes


def _move_self(group: str) -> None:
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"{pid}: (gone)"
