"""wal-fetch prefetch in WAL-G's layout: next segments downloaded ahead, taken when whole, old ones cleaned."""
from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time

from walrus.wal import prefetch, prefetcher

BIN = os.path.dirname(sys.executable)
SEGSIZE = 1 << 20


def seg(n: int) -> str:
    return f"0000000100000000000000{n:02X}"


def wal_bytes(n: int) -> bytes:
    return struct.pack("<HH", 0xD110, 0) + bytes([n]) * (SEGSIZE - 4)  # PostgreSQL 15's page magic


def env_for(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "PG"))}
    env.update(WALG_FILE_PREFIX=str(tmp_path / "store"), WALG_PG_WAL_SIZE="1", WALG_DOWNLOAD_CONCURRENCY="3",
               HOME=str(tmp_path))
    env.update(extra)
    return env


def test_fetch_prefetches_next_segments_and_uses_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in range(1, 6):
        (src / seg(n)).write_bytes(wal_bytes(n))
        subprocess.run([f"{BIN}/walrus", "wal-push", str(src / seg(n))], env=env_for(tmp_path), check=True)
    pg_wal = tmp_path / "pgdata" / "pg_wal"
    pg_wal.mkdir(parents=True)
    dest = pg_wal / "RECOVERYXLOG"
    subprocess.run([f"{BIN}/walrus", "wal-fetch", seg(1), str(dest)], env=env_for(tmp_path), check=True)
    assert dest.read_bytes() == wal_bytes(1)
    ready = pg_wal / ".wal-g" / "prefetch"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all((ready / seg(n)).exists() for n in (2, 3, 4)):
        time.sleep(0.05)
    assert sorted(p.name for p in ready.iterdir() if p.is_file()) == [seg(2), seg(3), seg(4)]
    # the archive is gone: the next fetch must come from the prefetched copy
    os.rename(tmp_path / "store", tmp_path / "store-away")
    out = subprocess.run([f"{BIN}/walrus", "wal-fetch", seg(2), str(dest), "--json"],
                         env=env_for(tmp_path, WALG_DOWNLOAD_CONCURRENCY="1"), check=True, capture_output=True)
    assert b'"key": "prefetched"' in out.stdout
    assert dest.read_bytes() == wal_bytes(2)
    assert not (ready / seg(2)).exists()


def test_take_refuses_partial_or_foreign_files(tmp_path):
    location = tmp_path / "prefetch"
    (location / "running").mkdir(parents=True)
    (location / seg(7)).write_bytes(wal_bytes(7)[:1000])  # wrong size
    (location / seg(8)).write_bytes(bytes(SEGSIZE))  # not WAL
    (location / seg(9)).write_bytes(wal_bytes(9))
    dest = tmp_path / "dest"
    assert asyncio.run(prefetch.take(str(location), seg(7), str(dest), SEGSIZE)) is None
    assert asyncio.run(prefetch.take(str(location), seg(8), str(dest), SEGSIZE)) is None
    assert not (location / seg(7)).exists() and not (location / seg(8)).exists()
    assert not dest.exists()
    assert asyncio.run(prefetch.take(str(location), seg(9), str(dest), SEGSIZE)) == SEGSIZE
    assert dest.read_bytes() == wal_bytes(9)


def test_clean_removes_segments_recovery_has_passed(tmp_path):
    location = tmp_path / "prefetch"
    (location / "running").mkdir(parents=True)
    for n in (1, 2, 5):
        (location / seg(n)).write_bytes(b"x")
    (location / "running" / seg(3)).write_bytes(b"x")
    prefetch.clean(str(location), seg(4), SEGSIZE)
    assert sorted(p.name for p in location.iterdir() if p.is_file()) == [seg(5)]
    assert list((location / "running").iterdir()) == []


def test_full_prefetch_window_of_large_segments_does_not_starve(tmp_path):
    """Ten 16 MiB downloads at once (the default window) once deadlocked the loop's default
    executor: each decompressing thread waited for reads that needed a thread of that same pool."""
    from walrus.config import load_settings
    from walrus.storage import open_storage

    big = 16 << 20
    store = tmp_path / "store" / "wal_005"
    store.mkdir(parents=True)
    for n in range(2, 12):  # compression 'none' objects: the bare name
        (store / seg(n)).write_bytes(struct.pack("<HH", 0xD110, 0) + bytes([n]) * (big - 4))
    settings = load_settings(env={"WALG_FILE_PREFIX": str(tmp_path / "store"), "WALG_DOWNLOAD_CONCURRENCY": "10",
                                  "HOME": str(tmp_path)})
    location = str(tmp_path / "pg_wal" / ".wal-g" / "prefetch")

    async def main():
        storage = open_storage(settings)
        window = prefetcher.Window(settings, storage)
        done = await asyncio.wait_for(asyncio.gather(*window.fill(seg(1), location)), 60)
        return [s for s in done if s]

    assert sorted(asyncio.run(main())) == [seg(n) for n in range(2, 12)]
    assert all(os.path.getsize(os.path.join(location, seg(n))) == big for n in range(2, 12))


def test_take_refuses_a_prefetched_file_from_before_the_last_boot(tmp_path):
    """Prefetched files are not fsynced: one written before a crash may be torn, so it is never used."""
    location = tmp_path / "prefetch"
    location.mkdir()
    (location / seg(5)).write_bytes(wal_bytes(5))
    before_boot = prefetch._boot_time() - 60
    os.utime(location / seg(5), (before_boot, before_boot))
    dest = tmp_path / "dest"
    assert prefetch.take_ready(str(location), seg(5), str(dest), SEGSIZE) is None
    assert not (location / seg(5)).exists() and not dest.exists()


def test_prefetcher_follows_the_cursor_and_exits_when_recovery_stops(tmp_path, monkeypatch):
    from walrus.config import load_settings
    from walrus.storage import open_storage

    store = tmp_path / "store" / "wal_005"
    store.mkdir(parents=True)
    for n in range(2, 12):  # compression 'none' objects: the bare name
        (store / seg(n)).write_bytes(wal_bytes(n))
    settings = load_settings(env={"WALG_FILE_PREFIX": str(tmp_path / "store"), "WALG_DOWNLOAD_CONCURRENCY": "3",
                                  "WALG_PG_WAL_SIZE": "1", "HOME": str(tmp_path)})
    location = str(tmp_path / "pg_wal" / ".wal-g" / "prefetch")
    monkeypatch.setattr(prefetcher, "FOLLOW_LINGER", 0.5)

    def here() -> list[str]:
        return sorted(n for n in os.listdir(location) if not n.startswith("."))[:-1]  # less running/

    async def main():
        storage = open_storage(settings)
        follower = asyncio.create_task(prefetcher.follow(settings, storage, seg(1), location))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if here() == [seg(2), seg(3), seg(4)]:
                break
        assert here() == [seg(2), seg(3), seg(4)]
        for n in (2, 3):  # recovery takes two of them and asks on
            assert prefetch.take_ready(location, seg(n), str(tmp_path / "RECOVERYXLOG"), SEGSIZE) == SEGSIZE
            prefetch.advance(location, seg(n))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if here() == [seg(4), seg(5), seg(6)]:
                break
        assert here() == [seg(4), seg(5), seg(6)]
        return await asyncio.wait_for(follower, 10)  # nothing new asked: it ends after FOLLOW_LINGER

    assert asyncio.run(main()) == 5
    assert prefetch.cursor(location) == seg(3)


# -- the quickest answer: a prefetched segment taken without the settings -------------------------

def long_header_wal(name: str, size: int = SEGSIZE, **changes) -> bytes:
    """A segment whose first page carries PostgreSQL's long header, as a real one does."""
    _tli, segno = prefetch.parse_wal_file_name(name, size)
    fields = {"magic": 0xD110, "info": prefetch.XLP_LONG_HEADER, "pageaddr": segno * size, "seg_size": size}
    fields.update(changes)
    head = prefetch.LONG_PAGE_HEAD.pack(fields["magic"], fields["info"], 1, fields["pageaddr"], 0, 7,
                                        fields["seg_size"], 8192)
    return head + b"\x5a" * (size - len(head))


def pg_wal_with(tmp_path, name: str, data: bytes):
    pg_wal = tmp_path / "pg_wal"
    location = pg_wal / ".wal-g" / "prefetch"
    (location / "running").mkdir(parents=True)
    (location / name).write_bytes(data)
    return pg_wal, location


def test_quickest_answer_takes_a_whole_segment_by_its_own_header(tmp_path):
    pg_wal, location = pg_wal_with(tmp_path, seg(0x25), long_header_wal(seg(0x25)))
    dest = pg_wal / "RECOVERYXLOG"
    where = prefetch.take_unresolved(seg(0x25), str(dest), None, {"HOME": str(tmp_path)})
    assert where == str(location)
    assert dest.read_bytes() == long_header_wal(seg(0x25))
    assert not (location / seg(0x25)).exists()


def test_quickest_answer_leaves_anything_not_plainly_whole_to_the_full_command(tmp_path):
    name = seg(0x25)
    cases = {
        "another segment's page address": long_header_wal(name, pageaddr=0x24 * SEGSIZE),
        "a size its header does not state": long_header_wal(name)[:-8192],
        "no long header": long_header_wal(name, info=0),
        "not WAL": long_header_wal(name, magic=0x1234),
        "a segment size PostgreSQL does not allow": long_header_wal(name, size=SEGSIZE + 8192),
        "shorter than a header": b"\x10\xd1",
    }
    for why, data in cases.items():
        pg_wal, location = pg_wal_with(tmp_path / why.replace(" ", "-"), name, data)
        dest = pg_wal / "RECOVERYXLOG"
        assert prefetch.take_unresolved(name, str(dest), None, {"HOME": str(tmp_path)}) is None, why
        assert (location / name).read_bytes() == data and not dest.exists(), why
    # a name that is not a segment's
    pg_wal, location = pg_wal_with(tmp_path / "history", "00000002.history", b"1\t0/0\tno reason\n")
    assert prefetch.take_unresolved("00000002.history", str(pg_wal / "RECOVERYHISTORY"), None, {}) is None


def test_quickest_answer_defers_to_the_settings_where_they_move_the_folder(tmp_path):
    name = seg(0x25)
    pg_wal, location = pg_wal_with(tmp_path, name, long_header_wal(name))
    dest = pg_wal / "RECOVERYXLOG"
    config = tmp_path / "walg.yaml"
    config.write_text("WALG_FILE_PREFIX: /somewhere\nwalg_prefetch_dir: /elsewhere\n")
    assert prefetch.take_unresolved(name, str(dest), str(config), {"HOME": str(tmp_path)}) is None
    # the same file found through $WALG_CONFIG_PATH, and an unreadable one: the full command decides
    assert prefetch.take_unresolved(name, str(dest), None, {"WALG_CONFIG_PATH": str(config)}) is None
    assert prefetch.take_unresolved(name, str(dest), str(tmp_path / "absent.yaml"), {}) is None
    assert (location / name).exists() and not dest.exists()
    # the environment wins over any file: its folder is the one taken from
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / ".wal-g" / "prefetch").mkdir(parents=True)
    os.rename(location / name, elsewhere / ".wal-g" / "prefetch" / name)
    where = prefetch.take_unresolved(name, str(dest), str(config), {"WALG_PREFETCH_DIR": str(elsewhere)})
    assert where == str(elsewhere / ".wal-g" / "prefetch") and dest.read_bytes() == long_header_wal(name)
    # a config file that does not name it: the default folder beside DEST
    config.write_text("WALG_FILE_PREFIX: /somewhere\n")
    (location / name).write_bytes(long_header_wal(name))
    dest.unlink()
    assert prefetch.take_unresolved(name, str(dest), str(config), {}) == str(location)


def test_quickest_answer_refuses_a_file_from_before_the_last_boot(tmp_path):
    name = seg(0x25)
    pg_wal, location = pg_wal_with(tmp_path, name, long_header_wal(name))
    before_boot = prefetch._boot_time() - 60
    os.utime(location / name, (before_boot, before_boot))
    assert prefetch.take_unresolved(name, str(pg_wal / "RECOVERYXLOG"), None, {"HOME": str(tmp_path)}) is None
    assert (location / name).exists()


HEAVY = ("walrus.config", "click", "asyncio", "re", "logging", "walrus.storage")


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_executable_answers_a_prefetched_segment_without_the_heavy_imports(tmp_path):
    """restore_command's call while the prefetcher runs (it holds the lock): the segment moved, the
    cursor advanced, and nothing imported that the answer does not need (replay waits for each call)."""
    import fcntl

    name = seg(0x25)
    pg_wal, location = pg_wal_with(tmp_path, name, long_header_wal(name))
    config = tmp_path / "walg.json"
    config.write_text('{"WALG_FILE_PREFIX": "%s", "WALG_PG_WAL_SIZE": "1"}' % (tmp_path / "store"))
    dest = pg_wal / "RECOVERYXLOG"
    with open(location / "running" / prefetch.LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a prefetcher at work: none is started
        proc = subprocess.run([f"{BIN}/walrus", "--config", str(config), "wal-fetch", name, str(dest)],
                              env={**env_for(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert dest.read_bytes() == long_header_wal(name)
    assert prefetch.cursor(str(location)) == name
    modules = imported(proc.stderr)
    assert "walrus.wal.prefetch" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    # the same call where the config file moves the prefetch folder: the full command, same answer
    (location / name).write_bytes(long_header_wal(name))
    dest.unlink()
    config.write_text('{"WALG_FILE_PREFIX": "%s", "WALG_PG_WAL_SIZE": "1", "WALG_PREFETCH_DIR": "%s"}'
                      % (tmp_path / "store", pg_wal))
    with open(location / "running" / prefetch.LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run([f"{BIN}/walrus", "--config", str(config), "wal-fetch", name, str(dest)],
                              env={**env_for(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert dest.read_bytes() == long_header_wal(name)
    assert "walrus.config" in imported(proc.stderr)


# -- the running prefetcher answers what it has not prefetched ---------------------------------------

def at_socket(location, how: str):
    """A socket bound or connected at the prefetcher's address (pytest's paths are too long for a
    plain socket address, as a data directory's may be)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    folder = os.open(os.path.join(location, "running"), os.O_PATH | os.O_DIRECTORY)
    try:
        getattr(sock, how)(prefetch.socket_address(folder))
    finally:
        os.close(folder)
    return sock


def test_prefetcher_answers_fetches_it_has_not_prefetched(tmp_path, monkeypatch):
    """What recovery asks for past the window (a .history file, a segment past the end of the archive)
    is fetched by the running prefetcher over its socket: 0 with the file in DEST, 74 where the storage
    has no such file, nothing for a malformed request; the socket is gone once it exits."""
    import threading

    from walrus.config import load_settings
    from walrus.storage import open_storage

    store = tmp_path / "store" / "wal_005"
    store.mkdir(parents=True)
    for n in range(2, 5):
        (store / seg(n)).write_bytes(wal_bytes(n))
    (store / "00000002.history").write_bytes(b"1\t0/5000000\tno recovery target specified\n")
    settings = load_settings(env={"WALG_FILE_PREFIX": str(tmp_path / "store"), "WALG_DOWNLOAD_CONCURRENCY": "2",
                                  "WALG_PG_WAL_SIZE": "1", "HOME": str(tmp_path)})
    pg_wal = tmp_path / "pg_wal"
    location = str(pg_wal / ".wal-g" / "prefetch")
    sock = os.path.join(location, "running", prefetch.SOCKET)
    monkeypatch.setattr(prefetcher, "FOLLOW_LINGER", 1.0)
    answers = {}

    def client() -> None:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.01)
        answers["history"] = prefetch.ask(location, "00000002.history", str(pg_wal / "RECOVERYHISTORY"), None)
        answers["absent"] = prefetch.ask(location, seg(5), str(pg_wal / "RECOVERYXLOG"), None)
        answers["in window"] = prefetch.ask(location, seg(2), str(pg_wal / "RECOVERYXLOG"), None)
        # a call configured otherwise (here: another config file) is not the prefetcher's to serve
        other = tmp_path / "other.json"
        other.write_text("{}")
        answers["configured otherwise"] = prefetch.ask(location, seg(3), str(pg_wal / "ELSEWHERE"), str(other))
        with at_socket(location, "connect") as s:
            s.sendall(seg(3).encode() + b"\0pg_wal/RECOVERYXLOG\0" + prefetch.settings_fingerprint(None).encode()
                      + b"\0")  # a relative DEST: whose?
            answers["relative"] = s.recv(1)

    async def main():
        storage = open_storage(settings)
        follower = asyncio.create_task(prefetcher.follow(settings, storage, seg(1), location))
        thread = threading.Thread(target=client)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        return await asyncio.wait_for(follower, 10)

    asyncio.run(main())
    assert answers["history"] == 0
    assert (pg_wal / "RECOVERYHISTORY").read_bytes() == b"1\t0/5000000\tno recovery target specified\n"
    assert answers["absent"] == 74
    assert answers["in window"] == 0 and (pg_wal / "RECOVERYXLOG").read_bytes() == wal_bytes(2)
    assert prefetch.cursor(location) == seg(2)  # a segment it fetched moves its window on
    assert answers["relative"] == b"E"
    assert answers["configured otherwise"] is None and not (pg_wal / "ELSEWHERE").exists()
    assert not os.path.exists(sock)
    assert prefetch.ask(location, seg(3), str(pg_wal / "RECOVERYXLOG"), None) is None  # nobody to ask: quickly


def test_executable_asks_the_prefetcher_without_the_heavy_imports(tmp_path):
    """A call the running prefetcher answers costs a process start and a socket: no settings, click,
    asyncio or storage imported; its 74 is quiet but for the full command's one line."""
    import fcntl
    import threading

    pg_wal = tmp_path / "pgdata" / "pg_wal"
    location = pg_wal / ".wal-g" / "prefetch"
    (location / "running").mkdir(parents=True)
    server = at_socket(location, "bind")
    server.listen(4)
    asked = []

    def serve() -> None:  # a stand-in prefetcher: the archive has nothing
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                request = b""
                while request.count(b"\0") < 3:
                    request += conn.recv(4096)
                asked.append(request)
                conn.sendall(b"N")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    env = {**env_for(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}
    with open(location / "running" / prefetch.LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in (seg(0x30), "00000002.history"):
            proc = subprocess.run([f"{BIN}/walrus", "wal-fetch", name, "pg_wal/RECOVERYXLOG"],
                                  cwd=tmp_path / "pgdata", env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 74, proc.stderr[-2000:]
            assert f"ERROR: WAL file {name} is not in the archive" in proc.stderr
            assert not imported(proc.stderr) & set(HEAVY), sorted(imported(proc.stderr) & set(HEAVY))
    thread.join(10)
    # the destination travels absolute: the prefetcher's working directory is not the server's
    assert asked[0].startswith(f"{seg(0x30)}\0{pg_wal / 'RECOVERYXLOG'}\0".encode())


def test_a_signal_ends_a_call_waiting_for_the_prefetcher(tmp_path):
    """SIGTERM while the prefetcher has not answered: the call ends by that signal at once, and closes
    its connection (which cancels the prefetcher's fetch)."""
    import signal

    pg_wal = tmp_path / "pg_wal"
    location = pg_wal / ".wal-g" / "prefetch"
    (location / "running").mkdir(parents=True)
    server = at_socket(location, "bind")
    server.listen(1)
    proc = subprocess.Popen([f"{BIN}/walrus", "wal-fetch", seg(0x30), str(pg_wal / "RECOVERYXLOG")],
                            env=env_for(tmp_path), stderr=subprocess.PIPE)
    server.settimeout(30)
    conn, _ = server.accept()  # asked, and never answered
    conn.settimeout(30)
    assert conn.recv(4096).startswith(seg(0x30).encode() + b"\0")
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM
    assert time.monotonic() - began < 2
    conn.recv(4096)  # the rest of the request, if any
    assert conn.recv(1) == b""  # the client closed its end
    assert not (pg_wal / "RECOVERYXLOG").exists()


def test_first_ask_starts_the_prefetcher_and_a_retry_does_not(tmp_path):
    """A full wal-fetch of a segment recovery had not asked for starts the prefetcher before its own
    download, even when that segment turns out absent; a retry of the same segment starts none."""
    src = tmp_path / "src"
    src.mkdir()
    for n in (3, 4):
        (src / seg(n)).write_bytes(wal_bytes(n))
        subprocess.run([f"{BIN}/walrus", "wal-push", str(src / seg(n))], env=env_for(tmp_path), check=True)
    pg_wal = tmp_path / "pgdata" / "pg_wal"
    pg_wal.mkdir(parents=True)
    ready = pg_wal / ".wal-g" / "prefetch"
    proc = subprocess.run([f"{BIN}/walrus", "wal-fetch", seg(2), str(pg_wal / "RECOVERYXLOG")],
                          env=env_for(tmp_path), capture_output=True, timeout=60)
    assert proc.returncode == 74
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all((ready / seg(n)).exists() for n in (3, 4)):
        time.sleep(0.05)
    assert (ready / seg(3)).read_bytes() == wal_bytes(3) and (ready / seg(4)).read_bytes() == wal_bytes(4)
    assert prefetch.cursor(str(ready)) == seg(2)
    # wait for that prefetcher to leave, then retry: the cursor says seg(2) was asked already
    import fcntl
    with open(ready / "running" / prefetch.LOCK, "w") as lock:
        deadline = time.monotonic() + 30
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    for n in (3, 4):
        (ready / seg(n)).unlink()
    proc = subprocess.run([f"{BIN}/walrus", "wal-fetch", seg(2), str(pg_wal / "RECOVERYXLOG")],
                          env=env_for(tmp_path), capture_output=True, timeout=60)
    assert proc.returncode == 74
    time.sleep(1.0)
    assert not (ready / seg(3)).exists() and not (ready / "running" / prefetch.SOCKET).exists()


def test_recovery_first_history_call_starts_the_prefetcher_the_next_call_asks_it(tmp_path):
    """A recovery's first call, for a .history file, starts a prefetcher with nothing to prefetch yet;
    the call for the first segment then waits for it to listen and is answered by it, with none of the
    full command's imports, and its window follows from there."""
    src = tmp_path / "src"
    src.mkdir()
    for n in (3, 4, 5):
        (src / seg(n)).write_bytes(wal_bytes(n))
        subprocess.run([f"{BIN}/walrus", "wal-push", str(src / seg(n))], env=env_for(tmp_path), check=True)
    pg_wal = tmp_path / "pgdata" / "pg_wal"
    pg_wal.mkdir(parents=True)
    ready = pg_wal / ".wal-g" / "prefetch"
    proc = subprocess.run([f"{BIN}/walrus", "wal-fetch", "00000002.history", str(pg_wal / "RECOVERYHISTORY")],
                          env=env_for(tmp_path), capture_output=True, timeout=60)
    assert proc.returncode == 74
    proc = subprocess.run([f"{BIN}/walrus", "wal-fetch", seg(3), str(pg_wal / "RECOVERYXLOG")],
                          env={**env_for(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == wal_bytes(3)
    assert not imported(proc.stderr) & set(HEAVY), sorted(imported(proc.stderr) & set(HEAVY))
    assert prefetch.cursor(str(ready)) == seg(3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all((ready / seg(n)).exists() for n in (4, 5)):
        time.sleep(0.05)
    assert (ready / seg(4)).read_bytes() == wal_bytes(4) and (ready / seg(5)).read_bytes() == wal_bytes(5)
    # a call configured for another storage while that prefetcher runs: its own storage answers
    other = tmp_path / "other"
    (other / "wal_005").mkdir(parents=True)
    (other / "wal_005" / seg(6)).write_bytes(wal_bytes(6))
    proc = subprocess.run([f"{BIN}/walrus", "wal-fetch", seg(6), str(pg_wal / "RECOVERYXLOG")],
                          env=env_for(tmp_path, WALG_FILE_PREFIX=str(other)), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == wal_bytes(6)
