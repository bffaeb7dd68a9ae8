"""wal-push's background uploads (WAL-G's bguploader) on a fake pg_wal and file storage."""
from __future__ import annotations

import asyncio
import json
import lzma
import os
import signal
import subprocess
import sys
import time

import lz4.frame
import pytest

WALRUS = os.path.join(os.path.dirname(sys.executable), "walrus")
MARKERS = os.path.join("walg_data", "walg_archive_status")


def seg(n: int) -> str:
    return f"0000000100000000000000{n:02X}"


@pytest.fixture
def pg_wal(tmp_path):
    (tmp_path / "pgdata" / "pg_wal" / "archive_status").mkdir(parents=True)
    return tmp_path / "pgdata" / "pg_wal"


def write_segments(pg_wal, numbers, size=1 << 20, ready=True) -> dict[str, bytes]:
    """Finished segments (random bytes, so each differs) with their .ready status, as PostgreSQL leaves them."""
    data = {}
    for n in numbers:
        data[seg(n)] = os.urandom(size)
        (pg_wal / seg(n)).write_bytes(data[seg(n)])
        if ready:
            (pg_wal / "archive_status" / f"{seg(n)}.ready").write_bytes(b"")
    return data


def env_for(tmp_path, **settings) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALG_", "WALE_", "PG", "AWS_"))}
    env.update({"HOME": "/nonexistent", "WALG_FILE_PREFIX": str(tmp_path / "store"), "WALG_PG_WAL_SIZE": "1",
                "WALG_UPLOAD_CONCURRENCY": "4", **settings})
    return env


def push(tmp_path, name, cwd=None, **settings) -> tuple[dict, str]:
    """`walrus wal-push pg_wal/NAME --json` from the data directory, as archive_command runs it."""
    proc = subprocess.run([WALRUS, "wal-push", f"pg_wal/{name}", "--json"], env=env_for(tmp_path, **settings),
                          cwd=cwd or tmp_path / "pgdata", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def stored(tmp_path) -> list[str]:
    folder = tmp_path / "store" / "wal_005"
    return sorted(p.name.split(".")[0] for p in folder.iterdir()) if folder.exists() else []


def markers(pg_wal) -> list[str]:
    folder = pg_wal / MARKERS
    return sorted(os.listdir(folder)) if folder.exists() else []


def statuses(pg_wal, suffix) -> list[str]:
    return sorted(f[:-len(suffix)] for f in os.listdir(pg_wal / "archive_status") if f.endswith(suffix))


def test_one_call_stores_the_backlog_and_a_later_call_takes_the_marker(tmp_path, pg_wal):
    data = write_segments(pg_wal, range(1, 7))
    # timeline files are PostgreSQL's to ask for (WAL-G would push them too); only segments are taken
    for other in ("00000002.history", f"{seg(9)}.partial", f"{seg(1)}.00000028.backup"):
        (pg_wal / other).write_bytes(b"x")
        (pg_wal / "archive_status" / f"{other}.ready").write_bytes(b"")
    result, _ = push(tmp_path, seg(1))
    names = sorted(data)
    assert result["status"] == "uploaded" and result["background"] == names[1:]
    assert stored(tmp_path) == names
    for name in names:
        raw = (tmp_path / "store" / "wal_005" / f"{name}.lz4").read_bytes()
        assert lz4.frame.decompress(raw) == data[name]
    assert markers(pg_wal) == names[1:]  # not the asked one: PostgreSQL marks it .done itself
    assert len(statuses(pg_wal, ".ready")) == 9 and statuses(pg_wal, ".done") == []  # PostgreSQL's alone

    # PostgreSQL asks for a marked segment: answered without an upload (the object, removed here, stays
    # absent), and the marker is taken
    os.unlink(tmp_path / "store" / "wal_005" / f"{names[1]}.lz4")
    result, err = push(tmp_path, names[1])
    assert result["status"] == "archived in background" and result["stored_bytes"] == 0
    assert names[1] not in stored(tmp_path) and names[1] not in markers(pg_wal)
    assert "archived by an earlier wal-push in the background" in err


def test_the_plain_archive_command_takes_a_marker_without_the_full_command(tmp_path, pg_wal):
    """`walrus wal-push %p`, as archive_command runs it, for a marked segment: answered before the
    command line, settings and storage are set up (walrus.entry), silently as WAL-G answers it (the
    full command logs that it took the marker); a stale marker still pushes."""
    data = write_segments(pg_wal, range(1, 4))
    push(tmp_path, seg(1))
    names = sorted(data)
    os.unlink(tmp_path / "store" / "wal_005" / f"{names[1]}.lz4")
    env = env_for(tmp_path, WALG_LOG_LEVEL="DEVEL")
    proc = subprocess.run([WALRUS, "wal-push", f"pg_wal/{names[1]}"], env=env, cwd=tmp_path / "pgdata",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""  # silent: the full command did not run
    assert names[1] not in stored(tmp_path) and names[1] not in markers(pg_wal)
    stale = pg_wal / "walg_data" / "walg_archive_status" / names[2]
    os.utime(stale, (time.time() - 60,) * 2)  # older than the segment: vouches for nothing
    os.unlink(tmp_path / "store" / "wal_005" / f"{names[2]}.lz4")
    proc = subprocess.run([WALRUS, "wal-push", f"pg_wal/{names[2]}"], env=env, cwd=tmp_path / "pgdata",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and names[2] in stored(tmp_path) and not stale.exists(), proc.stderr


def test_total_bg_uploaded_limit_and_markers_steer_the_next_call(tmp_path, pg_wal):
    write_segments(pg_wal, range(1, 11))
    result, _ = push(tmp_path, seg(1), TOTAL_BG_UPLOADED_LIMIT="4")  # the asked one and 3 more
    assert result["background"] == [seg(2), seg(3), seg(4)]
    assert stored(tmp_path) == [seg(n) for n in range(1, 5)]
    status = pg_wal / "archive_status"
    os.rename(status / f"{seg(1)}.ready", status / f"{seg(1)}.done")  # as PostgreSQL does once it succeeded
    # a call for an unmarked segment passes over the marked ones (stored already), lowest names first
    result, _ = push(tmp_path, seg(6), TOTAL_BG_UPLOADED_LIMIT="4")
    assert result["background"] == [seg(5), seg(7), seg(8)]
    assert markers(pg_wal) == [seg(n) for n in (2, 3, 4, 5, 7, 8)]
    result, _ = push(tmp_path, seg(9), TOTAL_BG_UPLOADED_LIMIT="1")  # below 2: off
    assert result["background"] == [] and seg(10) not in stored(tmp_path)


def test_upload_concurrency_1_does_nothing_in_the_background(tmp_path, pg_wal):
    write_segments(pg_wal, range(1, 5))
    result, _ = push(tmp_path, seg(1), WALG_UPLOAD_CONCURRENCY="1")
    assert result["background"] == [] and stored(tmp_path) == [seg(1)]
    assert not (pg_wal / "walg_data").exists()


def test_pg_ready_rename_marks_stored_segments_done(tmp_path, pg_wal):
    write_segments(pg_wal, range(1, 6))
    blocker = pg_wal / "archive_status" / f"{seg(3)}.done"  # rename(2) onto a non-empty directory fails, even for root
    blocker.mkdir()
    (blocker / "keep").write_bytes(b"")
    result, err = push(tmp_path, seg(1), PG_READY_RENAME="true")
    assert result["background"] == [seg(n) for n in range(2, 6)] and len(stored(tmp_path)) == 5
    # .done: PostgreSQL never calls for them, so they need no marker (WAL-G would leave one for good);
    # the one whose rename failed stays .ready and gets a marker, so its call returns at once
    assert statuses(pg_wal, ".ready") == [seg(1), seg(3)]
    assert markers(pg_wal) == [seg(3)]
    assert f"cannot mark {seg(3)} archived" in err
    result, _ = push(tmp_path, seg(3), PG_READY_RENAME="true")
    assert result["status"] == "archived in background" and markers(pg_wal) == []


def test_a_marker_older_than_the_segment_vouches_for_nothing(tmp_path, pg_wal):
    """A marker left for an earlier file of the same name (a recycled or rewritten segment): the
    file is pushed as usual, in the foreground and in the background alike."""
    data = write_segments(pg_wal, range(1, 3))
    (pg_wal / MARKERS).mkdir(parents=True)
    for name in data:
        (pg_wal / MARKERS / name).write_bytes(b"")
        old = os.stat(pg_wal / name).st_mtime - 60
        os.utime(pg_wal / MARKERS / name, (old, old))
    result, _ = push(tmp_path, seg(2))
    assert result["status"] == "uploaded" and result["background"] == [seg(1)]
    assert stored(tmp_path) == [seg(1), seg(2)]
    assert markers(pg_wal) == [seg(1)]  # taken for the asked one, renewed for the background one
    assert os.stat(pg_wal / MARKERS / seg(1)).st_mtime_ns >= os.stat(pg_wal / seg(1)).st_mtime_ns
    result, _ = push(tmp_path, seg(1))
    assert result["status"] == "archived in background"


def test_a_background_failure_does_not_fail_the_command(tmp_path, pg_wal):
    data = write_segments(pg_wal, range(1, 5))
    os.unlink(pg_wal / seg(2))  # .ready without its file: the push cannot open it
    other = tmp_path / "other" / "pg_wal"  # a different copy of seg(3) archived first: never replaced
    other.mkdir(parents=True)
    (other / seg(3)).write_bytes(os.urandom(1 << 20))
    push(tmp_path, seg(3), cwd=other.parent)
    result, err = push(tmp_path, seg(1))
    assert result["status"] == "uploaded" and result["background"] == [seg(4)]
    assert f"background upload of {seg(2)} failed" in err
    assert f"background upload of {seg(3)} failed" in err and "different contents" in err
    assert markers(pg_wal) == [seg(4)]  # no marker for what failed: PostgreSQL archives it as usual
    assert statuses(pg_wal, ".ready") == sorted(data)
    assert lz4.frame.decompress((tmp_path / "store" / "wal_005" / f"{seg(3)}.lz4").read_bytes()) \
        == (other / seg(3)).read_bytes()


@pytest.mark.parametrize("env,slots", [({"WALG_UPLOAD_CONCURRENCY": "3"}, 3),
                                       ({"WALG_UPLOAD_CONCURRENCY": "16", "WALRUS_MEMORY_BUDGET": "24MiB"}, 6),
                                       ({"WALG_UPLOAD_CONCURRENCY": "16", "budget holds one push": ""}, 1)])
def test_uploads_at_once_are_bounded_by_concurrency_and_memory(tmp_path, pg_wal, monkeypatch, env, slots):
    """WALG_UPLOAD_CONCURRENCY pushes at once, the asked one included (WAL-G's N - 1 background
    workers), fewer if WALRUS_MEMORY_BUDGET holds fewer (24 MiB: six pushes of a 1 MiB segment; where
    it holds one, as cloud storage's part buffers leave by default, the backlog is stored all the
    same, one push after the other)."""
    from walrus.config import load_settings
    from walrus.wal import push as push_module

    env = dict(env)
    if env.pop("budget holds one push", None) is not None:
        monkeypatch.setattr(push_module.WalPusher, "slots_for", classmethod(lambda cls, settings, storage: 1))

    data = write_segments(pg_wal, range(1, 13))
    settings = load_settings(env={"HOME": "/nonexistent", "WALG_FILE_PREFIX": str(tmp_path / "store"),
                                  "WALG_PG_WAL_SIZE": "1", **env})
    plain = push_module.WalPusher.push
    running, most = set(), [0]

    async def slow_push(self, storage, path):
        running.add(path)
        most[0] = max(most[0], len(running))
        try:
            await asyncio.sleep(0.05)  # long enough for every worker to be under way at once
            return await plain(self, storage, path)
        finally:
            running.discard(path)

    monkeypatch.setattr(push_module.WalPusher, "push", slow_push)

    result = push_in_process(settings, pg_wal / seg(1))
    assert most[0] == slots
    assert result.background == sorted(data)[1:] and stored(tmp_path) == sorted(data)


@pytest.mark.parametrize("asked_fails", [False, True], ids=["grace runs out", "asked file fails"])
def test_background_uploads_are_stopped_not_awaited(tmp_path, pg_wal, monkeypatch, asked_fails):
    """Background uploads still running BACKGROUND_GRACE after the asked file was stored, or when it
    failed, are cancelled: the call ends, and what was cancelled is neither stored nor marked."""
    from walrus.config import load_settings
    from walrus.errors import WalrusError
    from walrus.wal import push as push_module

    write_segments(pg_wal, range(1, 5))
    if asked_fails:
        os.unlink(pg_wal / seg(1))
    settings = load_settings(env={"HOME": "/nonexistent", "WALG_FILE_PREFIX": str(tmp_path / "store"),
                                  "WALG_PG_WAL_SIZE": "1", "WALG_UPLOAD_CONCURRENCY": "4"})
    plain = push_module.WalPusher.push

    async def stalled_background(self, storage, path):
        if not path.endswith(seg(1)):
            await asyncio.sleep(30)  # a stalled upload
        return await plain(self, storage, path)

    monkeypatch.setattr(push_module.WalPusher, "push", stalled_background)
    monkeypatch.setattr(push_module, "BACKGROUND_GRACE", 0.3)

    began = time.monotonic()
    if asked_fails:
        with pytest.raises(WalrusError, match="cannot open WAL file"):
            push_in_process(settings, pg_wal / seg(1))
    else:
        assert push_in_process(settings, pg_wal / seg(1)).background == []
    assert time.monotonic() - began < 5
    assert stored(tmp_path) == ([] if asked_fails else [seg(1)]) and markers(pg_wal) == []


def test_sigterm_stops_background_uploads_cleanly(tmp_path, pg_wal):
    """Stopped mid-backlog: gone promptly, by the signal; every object stored is whole, every marker
    names one, nothing partial is left (lzma: slow enough that the signal lands mid-upload)."""
    data = write_segments(pg_wal, range(1, 11), size=2 << 20)
    env = env_for(tmp_path, WALG_PG_WAL_SIZE="2", WALG_COMPRESSION_METHOD="lzma", WALG_UPLOAD_CONCURRENCY="3")
    proc = subprocess.Popen([WALRUS, "wal-push", f"pg_wal/{seg(1)}"], env=env, cwd=tmp_path / "pgdata",
                            stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "store" / "wal_005"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (folder.exists() and any(".tmp." not in p for p in os.listdir(folder))):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    err = proc.communicate(timeout=20)[1]
    assert time.monotonic() - stopped < 10
    assert proc.returncode == -signal.SIGTERM, err
    assert "Traceback" not in err
    objects = os.listdir(folder)
    assert not [p for p in objects if ".tmp." in p]
    names = sorted(p.split(".")[0] for p in objects)
    assert 1 <= len(names) < len(data)  # it was stopped half way
    for name in names:
        assert lzma.decompress((folder / f"{name}.lzma").read_bytes()) == data[name]
    assert set(markers(pg_wal)) <= set(names) - {seg(1)}


def push_in_process(settings, path):
    """wal_push in this process (so a test can patch it), with the storage opened and closed around it."""
    from walrus.storage import open_storage
    from walrus.wal import push as push_module

    async def main():
        storage = open_storage(settings)
        try:
            return await push_module.wal_push(settings, storage, str(path))
        finally:
            await storage.close()

    return asyncio.run(main())
