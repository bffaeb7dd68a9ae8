"""Timed steps: cold page cache, wall and CPU time of a process tree, and its memory sampled from /proc."""
from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

SAMPLE_INTERVAL_S = 0.05  # 20 Hz: the brief asks for 10 Hz or finer
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_KIB = 1024  # /proc/<pid>/status reports kB


@dataclass(frozen=True)
class Sample:
    """Sums over the live processes of the tree at one instant (bytes)."""

    t: float
    rss: int
    vmsize: int
    vmpeak: int
    procs: int


@dataclass
class StepMetrics:
    wall_s: float
    cpu_s: float
    server_cpu_s: float | None
    peak_rss: int
    peak_vmpeak: int
    peak_procs: int
    returncode: int
    cold_cache: bool
    left_running: int
    background_cpu_s: float
    samples: list[Sample] = field(default_factory=list)


def drop_caches() -> bool:
    """sync, then drop the page cache, dentries and inodes; False if the kernel refuses (not root, container)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def children(pid: int) -> list[int]:
    """Direct children of pid (each thread keeps its own list, so read every task's)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def descendants(root: int) -> list[int]:
    """root and every process below it, as of now."""
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children(pid))
    return seen


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmSize, VmPeak of one process in bytes ({} if it is gone or a zombie)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmSize", "VmPeak"):
                    out[key] = int(rest.split()[0]) * _KIB
    except (OSError, ValueError):
        return {}
    return out


def _cpu_key(pid: int) -> tuple[tuple[int, int], int] | None:
    """((pid, start time), utime+stime in clock ticks) of one process; the start time tells pid reuse apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "(comm)", which may hold spaces
    return (pid, int(fields[19])), int(fields[11]) + int(fields[12])


class TreeSampler(threading.Thread):
    """Samples the memory of root's process tree and, optionally, the CPU of the PostgreSQL server's tree.

    Memory is summed over the processes alive at each sample. Server CPU is the growth of utime+stime of
    every process under the postmaster between the first and the last sample it was seen in; processes
    that live and die between two samples are missed, so it is a lower bound.
    """

    def __init__(self, root: int, server_pid: int | None) -> None:
        super().__init__(daemon=True)
        self.root, self.server_pid = root, server_pid
        self.samples: list[Sample] = []
        self.seen: set[tuple[int, int]] = set()
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()
        self._server_first: dict[tuple[int, int], int] = {}
        self._server_last: dict[tuple[int, int], int] = {}
        self._sample_server(initial=True)

    def _sample_server(self, initial: bool = False) -> None:
        if self.server_pid is None:
            return
        for pid in descendants(self.server_pid):
            got = _cpu_key(pid)
            if got is None:
                continue
            key, ticks = got
            # a process first seen after the step began did all its work within the step
            self._server_first.setdefault(key, ticks if initial else 0)
            self._server_last[key] = ticks

    def _sample(self) -> None:
        rss = vmsize = vmpeak = procs = 0
        for pid in descendants(self.root):
            st = _status(pid)
            if not st:
                continue
            got = _cpu_key(pid)
            if got is not None:
                self.seen.add(got[0])
            procs += 1
            rss += st.get("VmRSS", 0)
            vmsize += st.get("VmSize", 0)
            vmpeak += st.get("VmPeak", 0)
        self.samples.append(Sample(time.monotonic() - self._t0, rss, vmsize, vmpeak, procs))
        self._sample_server()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._sample()
            self._stop_event.wait(SAMPLE_INTERVAL_S)

    def finish(self) -> None:
        self._stop_event.set()
        self.join()

    def server_cpu_s(self) -> float | None:
        if self.server_pid is None:
            return None
        ticks = sum(last - self._server_first[key] for key, last in self._server_last.items())
        return ticks / _CLK_TCK

    def still_running(self) -> int:
        """Processes of the tree still alive after the root was reaped: a tool that daemonizes."""
        alive = 0
        for pid, start in self.seen:
            got = _cpu_key(pid)
            if got is not None and got[0] == (pid, start):
                alive += 1
        return alive


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq) since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / _CLK_TCK


def run_timed(cmd: list[str], *, user: str | None, env: dict, cwd: str, log_path: str, flush_dir: str,
              server_pid: int | None, cold: bool, timeout: float = 7200) -> StepMetrics:
    """Run cmd to completion, then `sync -f flush_dir`, timing both, from a cold cache if asked (and allowed).

    CPU is the RUSAGE_CHILDREN delta around the blocking waits: every descendant that its parent
    waited for is included (tool processes, pipelines, the final sync). Background CPU is what the
    rest of the machine used meanwhile: busy time from /proc/stat minus the tool, this process (the
    sampler) and, when sampled, the PostgreSQL server.
    """
    is_cold = drop_caches() if cold else False
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        cpu0, self0, machine0, t0 = _cpu_children(), _cpu_self(), machine_busy_s(), time.monotonic()
        proc = subprocess.Popen(cmd, user=user, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        sampler = TreeSampler(proc.pid, server_pid)
        sampler.start()
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            sampler.finish()
        subprocess.run(["sync", "-f", flush_dir], check=True)
        wall, cpu = time.monotonic() - t0, _cpu_children() - cpu0
        machine, own = machine_busy_s() - machine0, _cpu_self() - self0
    samples = sampler.samples
    server = sampler.server_cpu_s()
    return StepMetrics(
        wall_s=wall, cpu_s=cpu, server_cpu_s=server,
        peak_rss=max((s.rss for s in samples), default=0),
        peak_vmpeak=max((s.vmpeak for s in samples), default=0),
        peak_procs=max((s.procs for s in samples), default=0),
        returncode=returncode, cold_cache=is_cold, left_running=sampler.still_running(),
        background_cpu_s=max(0.0, machine - cpu - own - (server or 0.0)), samples=samples)


def tree_bytes(path: str) -> int:
    """Apparent size of every regular file under path (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def largest_file(path: str) -> str:
    """The biggest regular file under path."""
    best, size = "", -1
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_size > size:
                best, size = full, st.st_size
    return best


def cold_read_mib_s(path: str) -> float | None:
    """Sequential read speed of one file right after dropping the page cache.

    None if it cannot be dropped, or the file is too small (under 64 MiB) for the figure to mean much.
    """
    if not path or os.path.getsize(path) < 64 << 20 or not drop_caches():
        return None
    buf = bytearray(1 << 20)
    total, t0 = 0, time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / (1 << 20) / (time.monotonic() - t0)


def seq_write_mib_s(directory: str, size: int = 1 << 30) -> float | None:
    """Durable sequential write speed of `directory`'s file system, written as a restore writes: `size`
    bytes preallocated, written through the page cache in 1 MiB writes of random bytes (a virtual disk
    may elide zeros), then one fsync, into a file removed afterwards; None where the file cannot be
    made or the disk is short of room. The fsync counts: a VM's disk may take writes into the host's
    cache at twice its speed and pay at the flush, as a restore's final sync does. O_DIRECT writes
    issued one at a time would measure the disk's latency too, which a restore's writeback does not
    wait on write by write."""
    from walrus.fsutil import write_all  # the bench runs with the repository on sys.path

    path = os.path.join(directory, f".bench-write-{os.getpid()}")
    chunk = os.urandom(1 << 20)
    os.sync()  # no earlier step's writeback in the figure
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, size)  # as walrus's restore preallocates
        os.fsync(fd)
        t0 = time.monotonic()
        for _ in range(size // len(chunk)):
            write_all(fd, chunk)
        os.fsync(fd)
        return size / (1 << 20) / (time.monotonic() - t0)
    except OSError:
        return None
    finally:
        os.close(fd)
        os.unlink(path)


def replay_reads_s(reads: list[tuple[str, int, int]], depth: int = 64, most: int = 1 << 20) -> float | None:
    """Seconds the disk takes to give exactly `reads` ((path, offset, length), page aligned), read by fio
    in that order from a cold page cache: O_DIRECT through io_uring with `depth` reads of at most `most`
    bytes in flight, no tool's work beside the reads. None without fio, where the cache cannot be
    dropped, for a path fio's log format cannot carry (whitespace), or if fio fails, takes over 10
    minutes or reads other than those bytes."""
    fio = shutil.which("fio")
    paths = sorted({path for path, _, _ in reads})
    if fio is None or not reads or any(p.split() != [p] for p in paths):
        return None
    # fio's version 2 I/O log: the files, then each read, replayed with no waits between them
    with tempfile.NamedTemporaryFile("w", prefix="bench-reads-", suffix=".log") as log:
        log.write("fio version 2 iolog\n")
        log.writelines(f"{p} add\n{p} open\n" for p in paths)
        chunks = [(path, at, min(most, offset + length - at))
                  for path, offset, length in reads for at in range(offset, offset + length, most)]
        log.writelines(f"{path} read {at} {length}\n" for path, at, length in chunks)
        log.writelines(f"{p} close\n" for p in paths)
        log.flush()
        if not drop_caches():
            return None
        try:
            done = subprocess.run([fio, "--name=reads", f"--read_iolog={log.name}", "--replay_no_stall=1",
                                   "--direct=1", "--ioengine=io_uring", f"--iodepth={depth}", "--readonly",
                                   "--output-format=json"], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:  # killed by run(): a hung disk is no figure
            return None
    if done.returncode != 0:
        return None
    try:
        job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]
        read = job["read"]
    except (ValueError, KeyError, IndexError):
        return None
    # the count of reads, not io_bytes: fio 3.33's io_bytes of a replay fell short with every read done
    if job.get("error") or read["total_ios"] != len(chunks) or read["short_ios"]:
        return None
    return read["runtime"] / 1000  # fio reports whole milliseconds: 0 for reads done within one
