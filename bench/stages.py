"""Where backup and restore time goes per GiB of database: each stage alone, on one core, over real relation segments."""
from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from bench import readpath  # noqa: E402
from walrus import codec  # noqa: E402
from walrus.fileio import open_sink  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
CHUNK = MiB  # WALRUS_BUFFER_SIZE: what one encode call gets in a backup


def relation_segments(pgdata: str, want: int) -> list[str]:
    """The largest relation files under base/, biggest first, until `want` bytes."""
    found = []
    for root, _, files in os.walk(os.path.join(pgdata, "base")):
        for name in files:
            path = os.path.join(root, name)
            if name.split(".")[0].isdigit():
                found.append((os.path.getsize(path), path))
    found.sort(reverse=True)
    paths, total = [], 0
    for size, path in found:
        if total >= want:
            break
        paths.append(path)
        total += size
    if not paths:
        raise SystemExit(f"no relation files under {pgdata}/base")
    return paths


class Clock:
    """Wall and CPU (user + sys of the whole process) over a with-block."""

    def __enter__(self) -> "Clock":
        self._cpu = self._cpu_now()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = self._cpu_now() - self._cpu

    @staticmethod
    def _cpu_now() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def load(paths: list[str]) -> list[bytes]:
    """The files' bytes as CHUNK-sized pieces, read once (warm) so the compute stages see no I/O."""
    chunks = []
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while piece := f.read(CHUNK):
                chunks.append(piece)
    return chunks


class Row:
    def __init__(self, phase: str, stage: str, clock: Clock, gib: float, what: str):
        self.phase, self.stage, self.what = phase, stage, what
        self.wall, self.cpu = clock.wall / gib, clock.cpu / gib


def backup_stages(paths: list[str], chunks: list[bytes], method: str, key: bytes | None,
                  workdir: str, args) -> tuple[list[Row], str]:
    gib = sum(map(len, chunks)) / GiB
    rows = []
    for name in ("io_uring", "preadv"):
        r = readpath.run_once(name, paths, args)
        clock = Clock()
        clock.wall, clock.cpu = r["wall"], r["user"] + r["sys"]
        rows.append(Row("backup", f"read ({name})", clock, gib, "cold, O_DIRECT, 1 MiB requests, 8 MiB in flight"))
    compressor = codec.new_compressor(method)
    head = compressor.start()
    with Clock() as clock:
        encoded = [compressor.encode(c) for c in chunks]
    rows.append(Row("backup", f"compress ({method})", clock, gib, "1 MiB chunks, one core"))
    with Clock() as clock:
        for e in encoded:
            compressor.digest(e)
    rows.append(Row("backup", "checksum (seal)", clock, gib,
                    "XXH3-64 of the stored bytes" if method == "lz4" else "in the frames: counted in compress"))
    encoded = [head, *encoded, compressor.finish()]
    stored = sum(map(len, encoded))
    if key is not None:
        from walrus.crypto.libsodium import LibsodiumCrypter

        writer = LibsodiumCrypter(key).new_encryptor()
        with Clock() as clock:
            encoded = [writer.encrypt(e) for e in encoded] + [writer.finish()]
        rows.append(Row("backup", "encrypt (libsodium)", clock, gib, "secretstream, 8 KiB chunks"))
    out = os.path.join(workdir, "stored")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with Clock() as clock:
            for e in encoded:
                os.write(fd, e)
        rows.append(Row("backup", "write stored", clock, gib, f"{stored / MiB / gib:.0f} MiB stored per GiB"))
        with Clock() as clock:
            os.fsync(fd)
        rows.append(Row("backup", "fsync stored", clock, gib, "the part's one fsync"))
    finally:
        os.close(fd)
    return rows, out


def restore_stages(stored: str, chunks: list[bytes], method: str, key: bytes | None, workdir: str) -> list[Row]:
    total = sum(map(len, chunks))
    gib = total / GiB
    rows = []
    drop_caches()
    with Clock() as clock:
        with open(stored, "rb", buffering=0) as f:
            raw = f.read()
    rows.append(Row("restore", "read stored", clock, gib, "cold"))
    source = io.BytesIO(raw)
    if key is not None:
        from walrus.crypto.libsodium import LibsodiumCrypter

        with Clock() as clock:
            reader = LibsodiumCrypter(key).open_reader(source, "stored")
            plain = bytearray()
            while piece := reader.read(CHUNK):
                plain += piece
        rows.append(Row("restore", "decrypt (libsodium)", clock, gib, ""))
        source = io.BytesIO(plain)
    with Clock() as clock:
        # each piece dropped at once, as the restore hands it to the sink: memory is reused, where
        # keeping them would time the first touch of 1 GiB of fresh pages instead
        reader = codec.open_reader(codec.extension(method), source, name="stored")
        decoded = 0
        while piece := reader.read(CHUNK):
            decoded += len(piece)
    if decoded != total:
        raise SystemExit(f"{method}: decoded {decoded} bytes, expected {total}")
    rows.append(Row("restore", f"decompress ({method}) + seal", clock, gib, "1 MiB reads, one core"))
    out = os.path.join(workdir, "restored")
    sink = open_sink("preadv", direct_threshold=MiB, buffer_size=MiB, buffers=8)  # the pwrite queue
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    with Clock() as clock:
        sink.write(fd, _Chunks(chunks), total, True)  # the same bytes as decoded
        sink.finish()
    rows.append(Row("restore", "write files", clock, gib, "O_DIRECT, preallocated, 2 writes in flight"))
    fd = os.open(out, os.O_RDONLY)
    try:
        with Clock() as clock:
            os.fsync(fd)
        rows.append(Row("restore", "fsync files", clock, gib, "metadata: the bytes went direct"))
    finally:
        os.close(fd)
    return rows


class _Chunks:
    """The decoded chunks as a Payload (readinto)."""

    def __init__(self, chunks: list[bytes]):
        self._chunks = chunks
        self._i = 0
        self._pos = 0

    def readinto(self, view: memoryview) -> int:
        done = 0
        while done < len(view) and self._i < len(self._chunks):
            chunk = self._chunks[self._i]
            n = min(len(view) - done, len(chunk) - self._pos)
            view[done:done + n] = chunk[self._pos:self._pos + n]
            done += n
            self._pos += n
            if self._pos == len(chunk):
                self._i, self._pos = self._i + 1, 0
        return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pgdata", required=True, help="a (stopped or idle) cluster's data directory: its largest "
                                                     "relation files are the input")
    ap.add_argument("--size", type=readpath.parse_size, default=2 * GiB, help="bytes of relation files (default 2G)")
    ap.add_argument("--compression", default="lz4,zstd", help="comma separated methods (default lz4,zstd)")
    ap.add_argument("--libsodium", action="store_true", help="also encrypt and decrypt (a random key)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the stored and restored files go (its disk is measured)")
    args = ap.parse_args()
    paths = relation_segments(args.pgdata, args.size)
    # readpath.run_once's knobs: the backup's pool and read-ahead
    rp = argparse.Namespace(buffers=32, buffer_size=MiB, depth=16, piece=0, cold="all")
    work = tempfile.mkdtemp(prefix="walrus-stages-", dir=args.workdir)
    try:
        chunks = load(paths)
        total = sum(map(len, chunks))
        key = os.urandom(32) if args.libsodium else None
        print(f"# {len(paths)} relation files, {total / MiB:.0f} MiB; stages one at a time on one core "
              f"(reads: the readers' own threads); kernel {os.uname().release}")
        print(f"{'phase':<8} {'stage':<28} {'wall s/GiB':>10} {'CPU s/GiB':>9}  note")
        for method in [m.strip() for m in args.compression.split(",") if m.strip()]:
            rows, stored = backup_stages(paths, chunks, method, key, work, rp)
            rows += restore_stages(stored, chunks, method, key, work)
            for r in rows:
                print(f"{r.phase:<8} {r.stage:<28} {r.wall:>10.3f} {r.cpu:>9.3f}  {r.what}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
