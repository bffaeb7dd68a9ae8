"""Cold O_DIRECT reads of relation segments through both FileReaders: wall time, CPU and syscalls per GiB."""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from walrus.config import DEFAULT_READ_INFLIGHT  # noqa: E402
from walrus.fileio import BufferPool, ReadRequest, open_reader  # noqa: E402
from walrus.fileio.direct import DIO_ALIGN, dio_length  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
READERS = ("preadv", "io_uring")
HEADER = 512  # a tar member's header before each file's bytes, as backup-push lays them


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": GiB}
    text = text.strip().lower().rstrip("ib")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def file_sizes(total: int, per_file: int) -> list[int]:
    sizes = [per_file] * (total // per_file)
    if total % per_file:
        sizes.append(total % per_file)
    return sizes


def make_files(folder: str, sizes: list[int]) -> list[str]:
    """The data files, reused when a file of the right size is already there (--dir)."""
    os.makedirs(folder, exist_ok=True)
    block = bytearray(os.urandom(MiB))
    paths = []
    for i, size in enumerate(sizes):
        path = os.path.join(folder, f"16384.{i}" if i else "16384")
        paths.append(path)
        if os.path.exists(path) and os.path.getsize(path) == size:
            continue
        with open(path, "wb") as f:
            written = 0
            while written < size:
                block[:8] = written.to_bytes(8, "little")  # no two MiB alike
                n = min(MiB, size - written)
                f.write(block[:n])
                written += n
            f.flush()
            os.fsync(f.fileno())
    return paths


def make_cold(paths: list[str], how: str) -> None:
    """Nothing of the files in the page cache: `all` drops every clean page of the machine (root),
    `files` only these files' (what a benchmark running beside this one would rather see)."""
    if how == "all":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    elif how == "files":
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


async def read_files(paths: list[str], pool: BufferPool, reader, depth: int, piece: int = 0) -> int:
    """The files' bytes through the pool as TarPartStream lays them (walrus/tar/write.py's _lay_range
    and _submit): a header, then the file as reads into the buffer being filled, each full buffer's
    reads one read_batch, up to `depth` buffers' batches in flight ahead of the consumer. `piece`:
    bytes per request at most (a delta backup's runs of changed pages), 0 for a buffer's worth."""
    flight: asyncio.Queue = asyncio.Queue(maxsize=depth)
    total = 0

    async def consume() -> None:
        nonlocal total
        while (item := await flight.get()) is not None:
            buf, lengths, reads = item
            counts = await reads
            total += sum(min(got, want) for got, want in zip(counts, lengths))
            buf.release()

    async def produce() -> None:
        buf, requests, lengths = None, [], []

        async def submit() -> None:
            nonlocal buf, requests, lengths
            if buf is not None:
                await flight.put((buf, lengths, asyncio.ensure_future(reader.read_batch(requests))))
            buf, requests, lengths = None, [], []

        async def lay_bytes(n: int) -> None:  # a header or padding: copied in, not read
            nonlocal buf
            while n:
                if buf is None:
                    buf = await pool.acquire()
                k = min(pool.size - buf.length, n)
                buf.view[buf.length:buf.length + k] = bytes(k)
                buf.length += k
                n -= k
                if buf.length == pool.size:
                    await submit()

        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            fds.append(fd)
            size, offset = os.path.getsize(path), 0
            await lay_bytes(HEADER)
            while offset < size:
                if buf is None:
                    buf = await pool.acquire()
                start = buf.length
                n = min(pool.size - start, size - offset, piece or pool.size)
                # whole blocks for O_DIRECT: the fill stays block aligned, so the extra fits
                requests.append(ReadRequest(fd, offset, buf.view[start:start + dio_length(n, True)]))
                lengths.append(n)
                buf.length += n
                offset += n
                if buf.length == pool.size:
                    await submit()
            await lay_bytes(-size % DIO_ALIGN)
        await submit()
        await flight.put(None)

    fds: list[int] = []
    try:
        await asyncio.gather(produce(), consume())
    finally:
        for fd in fds:
            os.close(fd)
    return total


def run_once(name: str, paths: list[str], args: argparse.Namespace, *, read: bool = True) -> dict:
    """One reader over all the files, cold: wall time and the process's CPU time of the reads alone."""
    pool = BufferPool(args.buffers, args.buffer_size)  # per run: its queue binds to one event loop
    reader = open_reader(name)
    try:
        registered = bool(reader.register(pool)) if name == "io_uring" else False
        make_cold(paths, args.cold)
        before, began = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        got = asyncio.run(read_files(paths if read else [], pool, reader, args.depth, args.piece))
        wall = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_SELF)  # before close: the reader's threads are alive
    finally:
        reader.close()
        pool.close()
    expected = sum(os.path.getsize(p) for p in paths) if read else 0
    if got != expected:
        raise SystemExit(f"{name}: read {got} bytes, expected {expected}")
    # CPU time and context switches of every thread of the process (getrusage sums them, as the
    # utime and stime of /proc/self/stat do)
    return {"reader": name, "bytes": got, "wall": wall, "user": after.ru_utime - before.ru_utime,
            "sys": after.ru_stime - before.ru_stime, "registered": registered,
            "switches": after.ru_nvcsw + after.ru_nivcsw - before.ru_nvcsw - before.ru_nivcsw}


def parse_strace(path: str) -> dict[str, int]:
    """Calls per syscall from `strace -c`'s summary (its `total` line left out)."""
    calls: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5 or not fields[0][0].isdigit() or fields[-1] == "total":
                continue
            calls[fields[-1]] = calls.get(fields[-1], 0) + int(fields[3])
    return calls


def strace_counts(name: str, paths: list[str], args: argparse.Namespace, out: str, run: int) -> dict[str, int]:
    """Syscalls of the reads alone: a child reading under `strace -c -f`, less a child that sets up
    the same and reads nothing (interpreter start, imports, pool, reader)."""
    counts = []
    for read in (True, False):
        make_cold(paths, args.cold)
        trace = os.path.join(out, f"strace-{name}-{'read' if read else 'base'}-{run}.txt")
        cmd = ["strace", "-c", "-f", "-o", trace, sys.executable, os.path.abspath(__file__), "--child", name,
               "--dir", args.dir, "--size", str(args.size), "--file-size", str(args.file_size),
               "--buffer-size", str(args.buffer_size), "--buffers", str(args.buffers), "--depth", str(args.depth),
               "--piece", str(args.piece),
               "--cold", "none"] + ([] if read else ["--baseline"])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        counts.append(parse_strace(trace))
    full, base = counts
    return {k: full.get(k, 0) - base.get(k, 0) for k in full}


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=parse_size, default=2 * GiB, help="bytes of data files in all (default 2G)")
    ap.add_argument("--file-size", type=parse_size, default=GiB,
                    help="bytes per file (default 1G, a relation segment)")
    ap.add_argument("--dir", help="folder of the data files (kept; files of the right size are reused); "
                                  "default a temporary folder under /var/tmp, removed at the end")
    ap.add_argument("--readers", default=",".join(READERS), help="comma separated: preadv, io_uring")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--buffer-size", type=parse_size, default=MiB, help="pool buffer (WALRUS_BUFFER_SIZE)")
    ap.add_argument("--buffers", type=int, default=32,
                    help="pool buffers (32 MiB: WALRUS_MEMORY_BUDGET's default)")
    ap.add_argument("--depth", type=int, default=16, help="buffers' batches in flight ahead of the consumer")
    ap.add_argument("--piece", type=parse_size, default=0,
                    help="bytes per read request at most, a multiple of 512 (8K: a delta's scattered pages); "
                         "default a buffer's worth, as a full backup reads")
    ap.add_argument("--cold", choices=("all", "files", "none"), default="all",
                    help="before each run: drop the whole page cache (all, needs root), only the files' pages "
                         "(files: kinder to other benchmarks on the machine), or nothing")
    ap.add_argument("--strace", action="store_true", help="also count syscalls per GiB under strace -c -f")
    ap.add_argument("--strace-runs", type=int, default=1, help="traced runs per reader (their medians)")
    ap.add_argument("--child", choices=READERS, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.buffer_size % 4096 or args.buffers < 1 or args.depth < 1 or args.piece % DIO_ALIGN:
        ap.error("--buffer-size must be a multiple of 4096, --piece of 512, --buffers and --depth at least 1")

    temporary = args.dir is None
    if temporary:
        args.dir = tempfile.mkdtemp(prefix="walrus-readpath-", dir="/var/tmp")
    try:
        paths = make_files(args.dir, file_sizes(args.size, args.file_size))
        if args.child:
            print(json.dumps(run_once(args.child, paths, args, read=not args.baseline)))
            return
        readers = [r.strip() for r in args.readers.split(",") if r.strip()]
        print(f"# {len(paths)} files, {args.size / MiB:.0f} MiB; "
              f"pool {args.buffers} x {args.buffer_size >> 10} KiB, {args.depth} batches in flight; requests of {(args.piece or args.buffer_size) >> 10} KiB; "
              f"io_uring inflight {DEFAULT_READ_INFLIGHT >> 20} MiB; O_DIRECT; cold: {args.cold}; "
              f"kernel {os.uname().release}")
        results = collections.defaultdict(list)
        print(f"{'reader':<9} {'run':>3} {'wall s':>7} {'MiB/s':>7} {'CPU s':>6} {'user':>6} {'sys':>6} "
              f"{'CPU s/GiB':>9} {'csw/GiB':>8}")
        for run in range(1, args.repeat + 1):
            for name in readers:
                r = run_once(name, paths, args)
                results[name].append(r)
                cpu = r["user"] + r["sys"]
                print(f"{name:<9} {run:>3} {r['wall']:>7.2f} {r['bytes'] / MiB / r['wall']:>7.0f} {cpu:>6.2f} "
                      f"{r['user']:>6.2f} {r['sys']:>6.2f} {cpu / (r['bytes'] / GiB):>9.3f} "
                      f"{r['switches'] / (r['bytes'] / GiB):>8.0f}", flush=True)
        if args.repeat > 1:
            for name in readers:
                rs = results[name]
                wall, gib = median([r["wall"] for r in rs]), rs[0]["bytes"] / GiB
                cpu = median([r["user"] + r["sys"] for r in rs])
                print(f"{name:<9} {'med':>3} {wall:>7.2f} {gib * 1024 / wall:>7.0f} {cpu:>6.2f} "
                      f"{median([r['user'] for r in rs]):>6.2f} {median([r['sys'] for r in rs]):>6.2f} "
                      f"{cpu / gib:>9.3f} {median([r['switches'] for r in rs]) / gib:>8.0f}")
        if results.get("io_uring") and not results["io_uring"][0]["registered"]:
            print("# io_uring: the pool was not registered (fixed buffers refused)")
        if args.strace:
            if shutil.which("strace") is None:
                raise SystemExit("--strace: strace is not installed")
            gib = args.size / GiB
            traces = tempfile.mkdtemp(prefix="walrus-readpath-strace-")
            print(f"\nsyscalls per GiB (strace -c -f, the reads alone; summaries in {traces})")
            # futex counts (GIL handoffs, executor wake-ups) swing from run to run: medians of the runs
            runs = {name: [strace_counts(name, paths, args, traces, run) for run in range(args.strace_runs)]
                    for name in readers}
            traced = {name: {k: median([c.get(k, 0) for c in rs]) for k in {k for c in rs for k in c}}
                      for name, rs in runs.items()}
            print(f"({args.strace_runs} runs each, medians)")
            top = sorted({k for c in traced.values() for k, v in c.items() if v / gib >= 1},
                         key=lambda k: -max(c.get(k, 0) for c in traced.values()))
            print(f"{'syscall':<18}" + "".join(f"{name:>10}" for name in readers))
            print(f"{'total':<18}" + "".join(f"{sum(traced[n].values()) / gib:>10.0f}" for n in readers))
            for k in top[:12]:
                print(f"{k:<18}" + "".join(f"{traced[n].get(k, 0) / gib:>10.0f}" for n in readers))
    finally:
        if temporary:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
