"""The FileSinks of restores (the slab sink over io_uring and over pwrite threads, plain writes) against
the same contract."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import io
import os
import random
import tarfile
import threading
import time

import pytest

from walrus._uring import probe
from walrus._uring import writer as writer_module
from walrus._uring.ring import Ring
from walrus._uring.writer import WriteRing
from walrus.tar.read import extract_tar
from walrus.errors import CorruptObject
from walrus.fileio import PlainSink
from walrus.fileio import slabsink as slabsink_module
from walrus.fileio.pwrite import PwriteQueue
from walrus.fileio.slabsink import ALIGN, SlabSink

UNAVAILABLE = probe()
needs_uring = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"io_uring unavailable: {UNAVAILABLE}")

BUF = 64 << 10
BUFFERS = 4  # the whole io_uring pool is 256 KiB
DEPTH = 8  # a small queue, so ordinary tests already keep it full
FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def open_fds(under=None) -> int:
    """Descriptors open in this process; with `under`, only those of that file or of files below it."""
    if under is None:
        return len(os.listdir("/proc/self/fd"))
    top = os.path.realpath(under)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            count += target == top or target.startswith(top + os.sep)
        except OSError:  # the descriptor listdir itself used
            pass
    return count


def assert_released(sink) -> None:
    """Nothing of a finished sink is left: no queue (ring or threads), no mapping."""
    if isinstance(sink, SlabSink):
        assert sink._queue.closed and sink._map.closed
        if isinstance(sink._queue, PwriteQueue):
            assert not any(t.is_alive() for t in sink._queue._threads)


@pytest.fixture(autouse=True)
def fresh_log_once(monkeypatch):
    monkeypatch.setattr(writer_module, "_logged", set())


def _uring_sink(buffers: int = BUFFERS, depth: int = DEPTH) -> SlabSink:
    if UNAVAILABLE is not None:
        pytest.skip(f"io_uring unavailable: {UNAVAILABLE}")
    return SlabSink(WriteRing(depth), direct_threshold=2 * ALIGN, buffer_size=BUF, buffers=buffers)


def _pwrite_sink(buffers: int = BUFFERS, depth: int = DEPTH) -> SlabSink:
    return SlabSink(PwriteQueue(entries=depth), direct_threshold=2 * ALIGN, buffer_size=BUF, buffers=buffers)


SLAB_SINKS = {"io_uring": _uring_sink, "pwrite": _pwrite_sink}


@pytest.fixture(params=["plain", "io_uring", "io_uring+unregistered", "pwrite"])
def sink(request, monkeypatch):
    if request.param == "plain":
        s = PlainSink(BUF)
    elif request.param == "pwrite":
        s = _pwrite_sink()
    else:
        if request.param == "io_uring+unregistered":
            def refuse(*_):
                raise OSError(errno.ENOMEM, "Cannot allocate memory")

            monkeypatch.setattr(Ring, "register_buffers", refuse)
        s = _uring_sink()
        assert not (s.registered and request.param == "io_uring+unregistered")
    yield s
    s.close()


@pytest.fixture(params=list(SLAB_SINKS))
def make_slab_sink(request):
    """The slab sink's constructor, over each write queue."""
    made = []

    def make(buffers: int = BUFFERS, depth: int = DEPTH) -> SlabSink:
        made.append(SLAB_SINKS[request.param](buffers, depth))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def slab_sink(make_slab_sink):
    return make_slab_sink()


@pytest.fixture
def uring_sink():
    s = _uring_sink()
    yield s
    s.close()


@pytest.fixture
def direct_dir(tmp_path):
    """tmp_path, when its filesystem takes O_DIRECT (tmpfs does not)."""
    try:
        os.close(os.open(tmp_path / "probe", FLAGS | os.O_DIRECT, 0o600))
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip(f"{tmp_path} does not support O_DIRECT")
        raise
    return tmp_path


def write_files(sink, directory, sizes: list[int], direct: bool = False) -> dict[str, bytes]:
    """Writes one file per size through the sink (O_DIRECT when asked) and finishes it."""
    expected = {}
    for i, size in enumerate(sizes):
        path = os.path.join(directory, f"f{i}")
        expected[path] = payload(size, seed=i)
        fd = os.open(path, FLAGS | (os.O_DIRECT if direct else 0), 0o600)
        sink.write(fd, io.BytesIO(expected[path]), size, direct)
    sink.finish()
    return expected


def assert_files(expected: dict[str, bytes]) -> None:
    for path, data in expected.items():
        assert os.path.getsize(path) == len(data), path
        with open(path, "rb") as f:
            assert f.read() == data, path


# --- the contract, for every sink ---


def test_many_small_files_land_exact_bytes(sink, tmp_path):
    sizes = [random.Random(i).randrange(0, 3 * ALIGN) for i in range(300)]
    assert_files(write_files(sink, tmp_path, sizes))
    assert open_fds(tmp_path) == 0
    assert_released(sink)


def test_file_larger_than_the_whole_pool(sink, tmp_path):
    assert_files(write_files(sink, tmp_path, [BUFFERS * BUF * 3 + 12345, 10, BUFFERS * BUF]))


def test_zero_size_file(sink, tmp_path):
    assert_files(write_files(sink, tmp_path, [0, 7, 0]))
    assert open_fds(tmp_path) == 0


def test_payload_shorter_than_size_gives_a_file_as_long_as_the_payload(sink, tmp_path):
    fd = os.open(tmp_path / "f", FLAGS, 0o600)
    sink.write(fd, io.BytesIO(b"x" * 5000), 9000, False)
    sink.finish()
    assert (tmp_path / "f").read_bytes() == b"x" * 5000


def test_read_only_fd_fails_with_ebadf_and_leaks_no_fd(sink, tmp_path):
    (tmp_path / "ro").write_bytes(b"")
    with pytest.raises(OSError) as caught:
        sink.write(os.open(tmp_path / "ro", os.O_RDONLY), io.BytesIO(b"a" * 100), 100, False)
        for i in range(2 * DEPTH):  # the error surfaces from one of these writes or from finish
            sink.write(os.open(tmp_path / f"ok{i}", FLAGS, 0o600), io.BytesIO(b"b" * 10), 10, False)
        sink.finish()
    assert caught.value.errno == errno.EBADF
    assert open_fds(tmp_path) == 0
    assert_released(sink)


def test_full_disk_surfaces_enospc_naming_the_file(sink):
    with pytest.raises(OSError) as caught:
        sink.write(os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC), io.BytesIO(b"a" * 5000), 5000, False)
        sink.finish()
    assert caught.value.errno == errno.ENOSPC
    if isinstance(sink, SlabSink):
        assert caught.value.filename == "/dev/full"
        assert "No space left on device" in str(caught.value)
    assert open_fds("/dev/full") == 0
    assert_released(sink)


# --- O_DIRECT (the slab sink's: plain writes are not aligned) ---


@pytest.mark.parametrize("size", [1, ALIGN - 1, ALIGN, ALIGN + 1, BUF - 1, BUF + 1, 3 * BUF * BUFFERS + 555])
def test_direct_files_of_unaligned_sizes_are_cut_to_size(slab_sink, direct_dir, size):
    assert_files(write_files(slab_sink, direct_dir, [size, size + 3, size], direct=True))
    assert open_fds(direct_dir) == 0


def test_direct_padding_is_zeros_not_stale_buffer_bytes(slab_sink, direct_dir, monkeypatch):
    tails: dict[str, bytes] = {}  # file name -> its bytes past the payload; files close in completion order
    real_ftruncate = os.ftruncate

    def spy(fd, length):  # what the padding put past the end, just before it is cut
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            f.seek(length)
            tails[os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))] = f.read()
        real_ftruncate(fd, length)

    monkeypatch.setattr(os, "ftruncate", spy)
    # every buffer first holds random bytes; the small files then land in reused buffers
    sizes = [BUF] * 2 * BUFFERS + [100, 5000]
    assert_files(write_files(slab_sink, direct_dir, sizes, direct=True))
    assert {name: len(t) for name, t in tails.items()} == {f"f{len(sizes) - 2}": ALIGN - 100,
                                                           f"f{len(sizes) - 1}": 2 * ALIGN - 5000}
    assert all(t.count(0) == len(t) for t in tails.values())


def test_direct_payload_shorter_than_size_is_cut_to_the_payload(slab_sink, direct_dir):
    fd = os.open(direct_dir / "f", FLAGS | os.O_DIRECT, 0o600)
    slab_sink.write(fd, io.BytesIO(b"x" * BUF), 3 * BUF, True)  # preallocated for 3 * BUF, no padding
    slab_sink.finish()
    assert (direct_dir / "f").read_bytes() == b"x" * BUF


def fake_fallocate(err: int):
    def fallocate(fd, length):
        return err

    return fallocate


def test_direct_files_without_fallocate_support_are_written_all_the_same(slab_sink, direct_dir,
                                                                          monkeypatch):
    monkeypatch.setattr(slabsink_module, "_fallocate", fake_fallocate(errno.EOPNOTSUPP))
    assert_files(write_files(slab_sink, direct_dir, [3 * BUF + 1, BUF], direct=True))


def test_no_space_to_preallocate_fails_that_write(slab_sink, direct_dir, monkeypatch):
    monkeypatch.setattr(slabsink_module, "_fallocate", fake_fallocate(errno.ENOSPC))
    slab_sink.write(os.open(direct_dir / "small", FLAGS, 0o600), io.BytesIO(b"s"), 1, False)
    with pytest.raises(OSError) as caught:
        slab_sink.write(os.open(direct_dir / "big", FLAGS | os.O_DIRECT, 0o600), io.BytesIO(b"b" * BUF),
                         BUF, True)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == os.path.realpath(direct_dir / "big")
    assert open_fds(direct_dir) == 0
    assert_released(slab_sink)
    assert (direct_dir / "small").read_bytes() == b"s"


def test_direct_and_buffered_files_interleave(slab_sink, direct_dir):
    expected = {}
    for i in range(60):
        size = random.Random(i).randrange(0, 2 * BUF)
        direct = i % 2 == 0
        path = str(direct_dir / f"f{i}")
        expected[path] = payload(size, seed=i)
        fd = os.open(path, FLAGS | (os.O_DIRECT if direct else 0), 0o600)
        slab_sink.write(fd, io.BytesIO(expected[path]), size, direct)
    slab_sink.finish()
    assert_files(expected)


def test_single_buffer_single_entry_still_writes_large_files(make_slab_sink, direct_dir):
    sink = make_slab_sink(buffers=1, depth=1)
    assert_files(write_files(sink, direct_dir, [5 * BUF + 17, 3], direct=True))


# --- the queues' internals: writes really go through them, retries and fallbacks ---


@needs_uring
def test_writes_go_through_the_ring_with_fixed_buffers(uring_sink, tmp_path):
    if not uring_sink.registered:
        pytest.skip("RLIMIT_MEMLOCK leaves no room for 256 KiB of fixed buffers")
    write_files(uring_sink, tmp_path, [BUF * 2, 10, 20])
    assert uring_sink.completions == 4 and uring_sink.fixed_writes == 4


def test_short_writes_are_resubmitted(slab_sink, direct_dir):
    queue = slab_sink._queue
    prep = queue.prep_write

    def prep_4k(user_data, fd, buf, nbytes, offset, buf_index=-1):  # the kernel then writes short
        prep(user_data, fd, buf, min(nbytes, ALIGN), offset, buf_index)

    queue.prep_write = prep_4k
    assert_files(write_files(slab_sink, direct_dir, [BUF + 5000], direct=True))
    assert slab_sink.completions == (BUF + 5000 + ALIGN - 1) // ALIGN


def test_eagain_and_eintr_completions_are_retried(slab_sink, tmp_path):
    queue = slab_sink._queue
    reap = queue.reap
    faked: list[int] = []

    def reap_retryable():  # the first two completions report EAGAIN and EINTR: written again
        done = reap()
        for k, (user_data, _) in enumerate(done):
            if len(faked) < 2:
                faked.append(user_data)
                done[k] = (user_data, -(errno.EAGAIN, errno.EINTR)[len(faked) - 1])
        return done

    queue.reap = reap_retryable
    expected = write_files(slab_sink, tmp_path, [3 * BUF, 100])
    assert_files(expected)
    assert len(faked) == 2 and slab_sink.completions == 4 + 2


def test_unaligned_short_direct_write_finishes_with_pwrite_without_o_direct(slab_sink, direct_dir,
                                                                            monkeypatch):
    queue = slab_sink._queue
    reap = queue.reap
    calls: list[tuple[int, bool]] = []
    real_pwrite = os.pwrite

    def reap_short_once():  # the kernel wrote it all, but this says 1000: the rest is written again
        done = reap()
        if done and not calls:
            done[0] = (done[0][0], 1000)
        return done

    def spy(fd, data, offset):
        calls.append((offset, bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        return real_pwrite(fd, data, offset)

    queue.reap = reap_short_once
    monkeypatch.setattr(os, "pwrite", spy)
    assert_files(write_files(slab_sink, direct_dir, [2 * ALIGN + 10], direct=True))  # one write
    assert calls and calls[0] == (1000, False)


def test_injected_enospc_stops_the_sink_and_closes_every_fd(slab_sink, tmp_path):
    queue = slab_sink._queue
    reap = queue.reap

    def reap_enospc():
        return [(user_data, -errno.ENOSPC) for user_data, _ in reap()]

    queue.reap = reap_enospc
    with pytest.raises(OSError) as caught:
        for i in range(50):
            slab_sink.write(os.open(tmp_path / f"f{i}", FLAGS, 0o600), io.BytesIO(b"z" * BUF), BUF, False)
        slab_sink.finish()
    assert caught.value.errno == errno.ENOSPC
    # the first failed write reaped names its file; writes in flight may complete in any order
    assert caught.value.filename in {os.path.realpath(tmp_path / f"f{i}") for i in range(50)}
    assert open_fds(tmp_path) == 0
    assert_released(slab_sink)
    with pytest.raises(RuntimeError):
        slab_sink.write(os.open(tmp_path / "late", FLAGS, 0o600), io.BytesIO(b"z"), 1, False)
    assert open_fds(tmp_path) == 0  # the write refused on a closed sink still closed its fd


def test_a_failing_payload_releases_everything(make_slab_sink, tmp_path):
    class Failing:
        def readinto(self, view):
            raise CorruptObject("tar archive 'x' is truncated")

    before = open_fds()
    sink = make_slab_sink()
    for i in range(5):
        sink.write(os.open(tmp_path / f"f{i}", FLAGS, 0o600), io.BytesIO(b"a" * BUF), BUF, False)
    with pytest.raises(CorruptObject):
        sink.write(os.open(tmp_path / "bad", FLAGS, 0o600), Failing(), 10, False)
    assert open_fds() == before
    assert all((tmp_path / f"f{i}").read_bytes() == b"a" * BUF for i in range(5))
    sink.close()


def test_close_without_finish_waits_for_writes_and_closes_fds(make_slab_sink, tmp_path):
    before = open_fds()
    sink = make_slab_sink()
    for i in range(20):
        sink.write(os.open(tmp_path / f"f{i}", FLAGS, 0o600), io.BytesIO(b"c" * 1000), 1000, False)
    sink.close()
    sink.close()
    assert open_fds() == before
    assert_released(sink)
    assert all((tmp_path / f"f{i}").read_bytes() == b"c" * 1000 for i in range(20))


@needs_uring
def test_refused_registration_is_logged_once_per_process(monkeypatch, tmp_path, devel_log_lines):
    def refuse(*_):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(Ring, "register_buffers", refuse)
    sinks = [_uring_sink(), _uring_sink()]
    for k, s in enumerate(sinks):
        assert not s.registered
        (tmp_path / str(k)).mkdir()
        assert_files(write_files(s, tmp_path / str(k), [BUF + 1, 2]))
        assert s.fixed_writes == 0 and s.completions == 3
    assert len(devel_log_lines) == 1 and "using unregistered writes" in devel_log_lines[0]


# --- extract_tar end to end ---


def make_tar(path, members: int = 300) -> None:
    rnd = random.Random(42)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for d in ("base", "base/1", "base/2", "global"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for i in range(members):
            size = rnd.choice([0, 1, 511, ALIGN, 8192, 8193, 50_000, BUF * BUFFERS * 2 + 7])
            info = tarfile.TarInfo(f"{rnd.choice(['base/1', 'base/2', 'global'])}/{i}")
            info.size, info.mode = size, rnd.choice([0o600, 0o640])
            tar.addfile(info, io.BytesIO(payload(size, seed=i)))
        info = tarfile.TarInfo("base/1/target")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("global/hard")
        link.type, link.linkname = tarfile.LNKTYPE, "base/1/target"
        tar.addfile(link)
        sym = tarfile.TarInfo("base/sym")
        sym.type, sym.linkname = tarfile.SYMTYPE, "1/target"
        tar.addfile(sym)


def tree(root) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", st.st_mode)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", st.st_mode, f.read())
    return out


def test_extract_tar_through_the_slab_sink_matches_plain_writes(make_slab_sink, tmp_path):
    make_tar(tmp_path / "part.tar")
    for name in ("plain", "slab"):
        (tmp_path / name).mkdir()
    with open(tmp_path / "part.tar", "rb") as f:
        plain = extract_tar(f, str(tmp_path / "plain"), name="part.tar", sink=PlainSink(BUF))
    before = open_fds()
    sink = make_slab_sink()
    with open(tmp_path / "part.tar", "rb") as f:
        slab = extract_tar(f, str(tmp_path / "slab"), name="part.tar", sink=sink)
    sink.close()
    assert open_fds() == before
    assert plain == slab and plain.files > 300
    assert sink.completions > plain.files // 2
    expected, got = tree(tmp_path / "plain"), tree(tmp_path / "slab")
    assert got == expected and len(expected) > 300


def test_extraction_failing_outside_the_sink_leaks_nothing_once_closed(make_slab_sink, tmp_path):
    make_tar(tmp_path / "part.tar", members=60)
    blob = (tmp_path / "part.tar").read_bytes() + b"junk"  # fails after the last member, so no finish()
    (tmp_path / "out").mkdir()
    before = open_fds()
    sink = make_slab_sink()
    with pytest.raises(CorruptObject):
        extract_tar(io.BytesIO(blob), str(tmp_path / "out"), name="part.tar", sink=sink)
    sink.close()
    assert open_fds() == before
    assert_released(sink)
    assert (tmp_path / "out" / "base" / "1" / "target").read_bytes() == b"abc"


# --- the pwrite queue alone ---


def test_pwrite_queue_wait_is_bounded_when_a_write_never_returns(monkeypatch, tmp_path):
    from walrus.fileio import pwrite as pwrite_module

    stuck = threading.Event()
    monkeypatch.setattr(pwrite_module, "_pwrite", lambda *args: stuck.wait(30) and 0)  # a hung device
    queue = PwriteQueue(threads=1, entries=2)
    try:
        queue.prep_write(7, 0, 0, 10, 0)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            queue.submit_and_wait(1, stall_limit=0.3)
        assert time.monotonic() - started < 5
    finally:
        stuck.set()
        queue.close()
    assert queue.reap() == [(7, 0)] and not queue._threads[0].is_alive()


def test_pwrite_queue_reports_errno_as_a_negative_result(tmp_path):
    queue = PwriteQueue(threads=2, entries=4)
    try:
        fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
        data = ctypes.create_string_buffer(b"abc")
        queue.prep_write(1, fd, ctypes.addressof(data), 3, 0)
        queue.prep_write(2, -1, ctypes.addressof(data), 3, 0)
        queue.submit_and_wait(2)
        assert sorted(queue.reap()) == [(1, -errno.EBADF), (2, -errno.EBADF)]
        os.close(fd)
    finally:
        queue.close()
