"""Both FileReader implementations (preadv, io_uring) against the same contract, and the reader choice."""
from __future__ import annotations

import asyncio
import errno
import os
import random
import sys
import time

import pytest

from walrus._uring import probe
from walrus._uring import support as probe_module
from walrus.config import DEFAULT_READ_INFLIGHT
from walrus.fileio import BufferPool, PreadReader, ReadRequest

UNAVAILABLE = probe()
needs_uring = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"io_uring unavailable: {UNAVAILABLE}")

BUF = 64 << 10
DEPTH = 8  # small ring, so ordinary batches already exceed it


def run(coro):
    return asyncio.run(coro)


def make_file(path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


@pytest.fixture
def pool():
    p = BufferPool(4, BUF)
    yield p
    p.close()


def _uring_reader():
    from walrus._uring.reader import UringReader

    return UringReader(DEPTH, DEFAULT_READ_INFLIGHT)


@pytest.fixture(params=["preadv", "io_uring", "io_uring+fixed"])
def reader(request, pool):
    if request.param == "preadv":
        r = PreadReader()
    else:
        if UNAVAILABLE is not None:
            pytest.skip(f"io_uring unavailable: {UNAVAILABLE}")
        r = _uring_reader()
        if request.param == "io_uring+fixed":
            assert r.register(pool)
    yield r
    r.close()


@pytest.fixture
def opened():
    fds = []

    def open_ro(path) -> int:
        fds.append(os.open(path, os.O_RDONLY))
        return fds[-1]

    yield open_ro
    for fd in fds:
        os.close(fd)


def test_batch_across_many_files_lands_exact_bytes(reader, pool, tmp_path, opened):
    files = [make_file(tmp_path / f"f{i}", random.Random(i).randrange(1, 3 * BUF), seed=i) for i in range(24)]
    requests, expected = [], []
    # six slices per pool buffer, each from a different file and offset
    for n, data in enumerate(files):
        buf = pool.buffers[n % pool.count].view
        slot = (n // pool.count) * (BUF // 6)
        offset = len(data) // 3
        want = BUF // 6
        requests.append(ReadRequest(opened(tmp_path / f"f{n}"), offset, buf[slot:slot + want]))
        expected.append(data[offset:offset + want])
    counts = run(reader.read_batch(requests))
    assert counts == [len(e) for e in expected]
    for r, e in zip(requests, expected):
        assert bytes(r.view[:len(e)]) == e


def test_file_larger_than_pool_reads_in_several_batches(reader, pool, tmp_path, opened):
    data = make_file(tmp_path / "big", 5 * pool.count * BUF + 123)
    fd = opened(tmp_path / "big")

    async def read_all() -> bytes:
        out, offset, batches = bytearray(), 0, 0
        while True:
            requests = [ReadRequest(fd, offset + i * BUF, b.view) for i, b in enumerate(pool.buffers)]
            counts = await reader.read_batch(requests)
            batches += 1
            for r, n in zip(requests, counts):
                out += r.view[:n]
            offset += sum(counts)
            if sum(counts) < pool.count * BUF:
                return bytes(out), batches

    out, batches = run(read_all())
    assert batches == 6
    assert out == data


def test_end_of_file_gives_short_counts(reader, pool, tmp_path, opened):
    data = make_file(tmp_path / "small", 1000)
    fd = opened(tmp_path / "small")
    view = pool.buffers[0].view
    requests = [ReadRequest(fd, 0, view[0:4096]), ReadRequest(fd, 900, view[4096:8192]),
                ReadRequest(fd, 5000, view[8192:12288]), ReadRequest(fd, 0, view[12288:12288])]
    assert run(reader.read_batch(requests)) == [1000, 100, 0, 0]
    assert bytes(view[0:1000]) == data
    assert bytes(view[4096:4196]) == data[900:]


def test_file_truncated_between_batches(reader, pool, tmp_path, opened):
    data = make_file(tmp_path / "shrinks", 3 * BUF)
    fd = opened(tmp_path / "shrinks")
    first = ReadRequest(fd, 0, pool.buffers[0].view)
    assert run(reader.read_batch([first])) == [BUF]
    os.truncate(tmp_path / "shrinks", BUF + 10)
    later = [ReadRequest(fd, BUF, pool.buffers[1].view), ReadRequest(fd, 2 * BUF, pool.buffers[2].view)]
    assert run(reader.read_batch(later)) == [10, 0]
    assert bytes(pool.buffers[1].view[:10]) == data[BUF:BUF + 10]


def test_deleted_but_open_file_still_reads(reader, pool, tmp_path, opened):
    data = make_file(tmp_path / "gone", BUF // 2)
    fd = opened(tmp_path / "gone")
    os.unlink(tmp_path / "gone")
    assert run(reader.read_batch([ReadRequest(fd, 0, pool.buffers[3].view)])) == [len(data)]
    assert bytes(pool.buffers[3].view[:len(data)]) == data


def test_more_requests_than_queue_depth_in_one_batch(reader, pool, tmp_path, opened):
    piece = 512
    files = [make_file(tmp_path / f"m{i}", 64 * piece, seed=100 + i) for i in range(5)]
    fds = [opened(tmp_path / f"m{i}") for i in range(5)]
    requests, expected = [], []
    whole = pool.count * BUF // piece  # 512 slices: far more than DEPTH or the default 64
    for n in range(whole):
        k, off = n % 5, (n * 37 % 64) * piece
        buf = pool.buffers[n * piece // BUF].view
        start = n * piece % BUF
        requests.append(ReadRequest(fds[k], off, buf[start:start + piece]))
        expected.append(files[k][off:off + piece])
    assert run(reader.read_batch(requests)) == [piece] * whole
    assert [bytes(r.view) for r in requests] == expected


def test_bad_fd_raises_oserror(reader, pool, tmp_path, opened):
    make_file(tmp_path / "ok", 100)
    good = opened(tmp_path / "ok")
    bad = 1 << 30  # never open: a closed fd's number is soon reused (asyncio.run opens a socketpair)
    requests = [ReadRequest(good, 0, pool.buffers[0].view), ReadRequest(bad, 0, pool.buffers[1].view)]
    with pytest.raises(OSError) as caught:
        run(reader.read_batch(requests))
    assert caught.value.errno == errno.EBADF


def test_negative_offset_raises_oserror(reader, pool, tmp_path, opened):
    make_file(tmp_path / "ok", 100)
    with pytest.raises(OSError) as caught:
        run(reader.read_batch([ReadRequest(opened(tmp_path / "ok"), -5, pool.buffers[0].view)]))
    assert caught.value.errno == errno.EINVAL


def test_concurrent_batches_each_get_their_own_bytes(reader, pool, tmp_path, opened):
    piece = 4096
    files = [make_file(tmp_path / f"c{k}", BUF, seed=200 + k) for k in range(pool.count)]
    fds = [opened(tmp_path / f"c{k}") for k in range(pool.count)]

    async def one(k: int, p: int) -> int:
        view = pool.buffers[k].view[p * piece:(p + 1) * piece]
        (n,) = await reader.read_batch([ReadRequest(fds[k], p * piece, view)])
        return n

    async def main() -> list[int]:
        return await asyncio.gather(*[one(k, p) for p in range(BUF // piece) for k in range(pool.count)])

    assert run(main()) == [piece] * (pool.count * BUF // piece)
    assert [bytes(b.view) for b in pool.buffers] == files


def test_a_failing_batch_does_not_fail_a_concurrent_one(reader, pool, tmp_path, opened):
    data = make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")

    async def main():
        return await asyncio.gather(reader.read_batch([ReadRequest(1 << 30, 0, pool.buffers[0].view)]),
                                    reader.read_batch([ReadRequest(fd, 0, pool.buffers[1].view)]),
                                    return_exceptions=True)

    bad, good = run(main())
    assert isinstance(bad, OSError) and bad.errno == errno.EBADF
    assert good == [BUF] and bytes(pool.buffers[1].view) == data


def test_a_bad_fd_fails_only_its_batch_among_concurrent_many_request_ones(reader, pool, tmp_path, opened):
    piece = 1024
    data = make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")
    slices = BUF // piece

    def batch(k: int, bad_at: int | None = None):
        view = pool.buffers[k].view
        return [ReadRequest(1 << 30 if i == bad_at else fd, i * piece, view[i * piece:(i + 1) * piece])
                for i in range(slices)]

    async def main():
        return await asyncio.gather(reader.read_batch(batch(0)), reader.read_batch(batch(1, bad_at=3)),
                                    reader.read_batch(batch(2)), return_exceptions=True)

    first, bad, last = run(main())
    assert isinstance(bad, OSError) and bad.errno == errno.EBADF
    assert first == last == [piece] * slices
    assert bytes(pool.buffers[0].view) == bytes(pool.buffers[2].view) == data


def test_many_concurrent_batches_larger_than_the_ring(reader, pool, tmp_path, opened):
    piece = 1024
    files = [make_file(tmp_path / f"r{k}", 16 * piece, seed=400 + k) for k in range(6)]
    fds = [opened(tmp_path / f"r{k}") for k in range(6)]
    per_batch = 12  # each batch alone more than DEPTH reads

    def batch(b: int) -> tuple[list[ReadRequest], list[bytes]]:
        requests, expected = [], []
        for i in range(per_batch):
            n = b * per_batch + i
            k, off = n % 6, (n * 7 % 16) * piece
            start = n * piece
            view = pool.buffers[start // BUF].view[start % BUF:start % BUF + piece]
            requests.append(ReadRequest(fds[k], off, view))
            expected.append(files[k][off:off + piece])
        return requests, expected

    batches = [batch(b) for b in range(pool.count * BUF // piece // per_batch)]  # 21 batches, 252 reads

    async def main():
        return await asyncio.gather(*[reader.read_batch(requests) for requests, _ in batches])

    assert run(main()) == [[piece] * per_batch] * len(batches)
    for requests, expected in batches:
        assert [bytes(r.view) for r in requests] == expected


def test_a_batch_of_empty_views_reads_nothing(reader, pool, tmp_path, opened):
    make_file(tmp_path / "f", 100)
    fd = opened(tmp_path / "f")
    view = pool.buffers[0].view
    assert run(reader.read_batch([ReadRequest(fd, 0, view[:0]), ReadRequest(fd, 50, view[10:10])])) == [0, 0]


@pytest.mark.parametrize("size", [3 * 4096 + 100, 2 * 4096, 700])
def test_o_direct_file_ending_inside_a_request(reader, pool, tmp_path, size):
    data = make_file(tmp_path / "d", size)
    try:
        fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECT)
    except OSError as e:  # tmpfs and some others refuse O_DIRECT
        pytest.skip(f"no O_DIRECT in {tmp_path}: {e.strerror}")
    try:
        # aligned pool memory, whole blocks asked: the read comes back short at the file's end, and
        # what is asked next starts off a block (EINVAL) or at the end (0)
        counts = run(reader.read_batch([ReadRequest(fd, 0, pool.buffers[1].view),
                                        ReadRequest(fd, 4096, pool.buffers[2].view[:8192])]))
        assert counts == [size, min(max(size - 4096, 0), 8192)]
        assert bytes(pool.buffers[1].view[:size]) == data
        assert bytes(pool.buffers[2].view[:counts[1]]) == data[4096:4096 + counts[1]]
    finally:
        os.close(fd)


def test_a_cancelled_batch_leaves_the_reader_usable(reader, pool, tmp_path, opened):
    data = make_file(tmp_path / "f", pool.count * BUF)
    fd = opened(tmp_path / "f")

    async def main() -> list[int]:
        first = asyncio.create_task(
            reader.read_batch([ReadRequest(fd, i * BUF, b.view) for i, b in enumerate(pool.buffers)]))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        # the same bytes the cancelled batch may still be writing into this buffer
        return await reader.read_batch([ReadRequest(fd, BUF, pool.buffers[1].view)])

    assert run(main()) == [BUF]
    assert bytes(pool.buffers[1].view) == data[BUF:2 * BUF]


def test_event_loop_keeps_running_during_a_large_batch(reader, tmp_path, opened):
    size = 1 << 20
    big = BufferPool(16, size)
    data = make_file(tmp_path / "large", 16 * size)
    fd = opened(tmp_path / "large")
    if getattr(reader, "registered", False):
        reader.register(big)

    async def main() -> tuple[list[int], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        started = ticks
        counts = []
        for _ in range(8):  # 128 MiB through a 16 MiB pool
            batch = [ReadRequest(fd, i * size, b.view) for i, b in enumerate(big.buffers)]
            counts += await reader.read_batch(batch)
        stop.set()
        await task
        return counts, ticks - started

    try:
        counts, ticks = run(main())
        assert counts == [size] * 128
        assert bytes(big.buffers[7].view) == data[7 * size:8 * size]
        # the ticker ran throughout the batches, not just once between them
        assert ticks >= 4 * 8
    finally:
        big.close()


# --- io_uring specifics ---


@needs_uring
def test_reads_go_through_the_ring(pool, tmp_path, opened):
    data = make_file(tmp_path / "f", 2 * BUF)
    fd = opened(tmp_path / "f")
    r = _uring_reader()
    try:
        before = r.completions
        counts = run(r.read_batch([ReadRequest(fd, i * BUF, b.view) for i, b in enumerate(pool.buffers)]))
        assert counts == [BUF, BUF, 0, 0]
        assert r.completions - before == 4
        assert r.fixed_reads == 0
        assert bytes(pool.buffers[1].view) == data[BUF:]
    finally:
        r.close()


@needs_uring
def test_short_and_retryable_completions_are_resubmitted(pool, tmp_path, opened):
    data = make_file(tmp_path / "f", BUF + 5000)
    fd = opened(tmp_path / "f")
    r = _uring_reader()
    engine = r._engine
    engine.max_chunk = 4096  # reads of 4 KiB at most: each 4 KiB completion is a short read of the request
    engine.fault_cqe, engine.fault_res = 1, -errno.EAGAIN  # the first completion reports EAGAIN instead
    try:
        counts = run(r.read_batch([ReadRequest(fd, 0, pool.buffers[0].view),
                                   ReadRequest(fd, BUF, pool.buffers[1].view)]))
        assert counts == [BUF, 5000]
        assert bytes(pool.buffers[0].view) == data[:BUF]
        assert bytes(pool.buffers[1].view[:5000]) == data[BUF:]
        # 16 reads, then 4096 + 904 + the 0 of end of file, +1: the EAGAIN one, whose bytes were read again
        assert r.completions == BUF // 4096 + 3 + 1
    finally:
        r.close()


@needs_uring
def test_eintr_is_retried_and_an_error_after_progress_names_its_offset(pool, tmp_path, opened):
    data = make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")
    r = _uring_reader()
    engine = r._engine
    engine.max_chunk = 4096
    try:
        engine.fault_cqe, engine.fault_res = 2, -errno.EINTR
        assert run(r.read_batch([ReadRequest(fd, 0, pool.buffers[0].view)])) == [BUF]
        assert bytes(pool.buffers[0].view) == data
        engine.fault_cqe, engine.fault_res = r.completions + 3, -errno.EIO  # after 8 KiB of the next batch
        with pytest.raises(OSError) as caught:
            run(r.read_batch([ReadRequest(fd, 0, pool.buffers[1].view)]))
        assert caught.value.errno == errno.EIO and "at offset 8192" in str(caught.value)
    finally:
        r.close()


@needs_uring
def test_end_of_file_inside_a_request_read_in_pieces(pool, tmp_path, opened):
    data = make_file(tmp_path / "f", 10000)
    fd = opened(tmp_path / "f")
    r = _uring_reader()
    r._engine.max_chunk = 4096  # 4096, 4096, then 1808 of 4096 asked (short), then 0: end of file
    try:
        view = pool.buffers[0].view
        counts = run(r.read_batch([ReadRequest(fd, 0, view[:BUF // 2]), ReadRequest(fd, 9000, view[BUF // 2:])]))
        assert counts == [10000, 1000]
        assert bytes(view[:10000]) == data and bytes(view[BUF // 2:BUF // 2 + 1000]) == data[9000:]
        assert r.completions == 4 + 2
    finally:
        r.close()


@needs_uring
@pytest.mark.parametrize("cap, most", [(2 * BUF, 2), (BUF // 2, 1)])
def test_large_reads_in_flight_stay_under_the_byte_cap(pool, tmp_path, opened, cap, most):
    from walrus._uring.reader import UringReader

    data = make_file(tmp_path / "f", 4 * BUF)
    fd = opened(tmp_path / "f")
    r = UringReader(DEPTH, inflight=cap)
    try:
        counts = run(r.read_batch([ReadRequest(fd, i * BUF, b.view) for i, b in enumerate(pool.buffers)]))
        assert counts == [BUF] * 4
        assert b"".join(bytes(b.view) for b in pool.buffers) == data
        assert r._engine.peak_reads == most  # a cap under one read still lets one through at a time
        assert r._engine.peak_bytes == most * BUF
    finally:
        r.close()


@needs_uring
def test_small_reads_fill_the_ring_under_the_byte_cap(pool, tmp_path, opened):
    from walrus._uring.reader import UringReader

    piece = 512
    data = make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")
    r = UringReader(DEPTH, inflight=2 * BUF)
    try:
        view = pool.buffers[0].view
        requests = [ReadRequest(fd, off, view[off:off + piece]) for off in range(0, BUF, piece)]
        assert run(r.read_batch(requests)) == [piece] * len(requests)
        assert bytes(view) == data
        # the ring, not the cap, bounds them
        assert r._engine.peak_reads == DEPTH and r._engine.peak_bytes == DEPTH * piece
    finally:
        r.close()


@needs_uring
def test_concurrent_batches_share_the_byte_cap(pool, tmp_path, opened):
    from walrus._uring.reader import UringReader

    piece = 12 << 10
    cap = 3 * piece + 100
    files = [make_file(tmp_path / f"s{k}", BUF, seed=300 + k) for k in range(pool.count)]
    fds = [opened(tmp_path / f"s{k}") for k in range(pool.count)]
    r = UringReader(DEPTH, inflight=cap)

    async def main():
        return await asyncio.gather(*[
            r.read_batch([ReadRequest(fds[k], off, pool.buffers[k].view[off:off + piece])
                          for off in range(0, BUF - piece + 1, piece)])
            for k in range(pool.count)])

    try:
        assert run(main()) == [[piece] * (BUF // piece)] * pool.count
        for k, data in enumerate(files):
            assert bytes(pool.buffers[k].view[:BUF // piece * piece]) == data[:BUF // piece * piece]
        # issued only while under the cap: at most one read past it
        assert r._engine.peak_reads == 4 and r._engine.peak_bytes == 4 * piece
        assert r._engine.inflight == 0 and r._engine.inflight_bytes == 0 and r._engine.pending == 0
    finally:
        r.close()


@needs_uring
def test_registered_pool_uses_read_fixed_and_other_memory_does_not(pool, tmp_path, opened):
    data = make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")
    outside = bytearray(BUF)
    r = _uring_reader()
    try:
        assert r.register(pool) and r.registered
        with memoryview(pool.mapping) as whole:
            # a slice straddling two pool buffers fits no single fixed buffer: plain READ
            straddle = whole[BUF - 100:BUF + 100]
            counts = run(r.read_batch([ReadRequest(fd, 0, pool.buffers[2].view[10:5000]),
                                       ReadRequest(fd, 7, memoryview(outside)),
                                       ReadRequest(fd, 3, straddle)]))
            assert bytes(straddle) == data[3:203]
            straddle.release()
        assert counts == [4990, BUF - 7, 200]
        assert r.fixed_reads == 1
        assert bytes(pool.buffers[2].view[10:5000]) == data[:4990]
        assert bytes(outside[:BUF - 7]) == data[7:]
    finally:
        r.close()


@needs_uring
def test_a_failed_batch_issues_no_more_reads(pool, tmp_path, opened):
    make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")
    r = _uring_reader()
    views = [pool.buffers[0].view[k * 1024:(k + 1) * 1024] for k in range(5 * DEPTH)]
    batch = [ReadRequest(1 << 30, 0, views[0])] + [ReadRequest(fd, 0, v) for v in views[1:]]
    try:
        with pytest.raises(OSError):
            run(r.read_batch(batch))
        assert r.completions <= DEPTH  # only the first ring-full went out
    finally:
        r.close()


@needs_uring
def test_a_failing_ring_fails_batches_instead_of_hanging(pool, tmp_path, opened):
    make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")
    r = _uring_reader()
    # the ring's descriptor now names /dev/null: io_uring_enter fails (EOPNOTSUPP), as a broken ring would
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, r._ring._ring.ring_fd)
    os.close(null)
    try:
        with pytest.raises(OSError) as caught:
            run(r.read_batch([ReadRequest(fd, 0, pool.buffers[0].view)]))
        assert caught.value.errno == errno.EOPNOTSUPP
        with pytest.raises(RuntimeError):
            run(r.read_batch([ReadRequest(fd, 0, pool.buffers[0].view)]))
    finally:
        r.close()


@needs_uring
def test_a_read_that_never_completes_raises_timeout(pool, monkeypatch):
    from walrus._uring import ring as ring_module

    monkeypatch.setattr(ring_module, "STALL_POLL", 0.2)
    monkeypatch.setattr(ring_module, "STALL_LIMIT", 0.5)
    rd, wr = os.pipe()  # a read from an idle pipe waits for a writer
    r = _uring_reader()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            run(r.read_batch([ReadRequest(rd, 0, pool.buffers[0].view[:16])]))
        assert 0.4 < time.monotonic() - started < 10
        with pytest.raises(RuntimeError):
            run(r.read_batch([ReadRequest(rd, 0, pool.buffers[0].view[:16])]))
    finally:
        os.close(wr)  # end of file completes the read before the ring goes
        r.close()
        os.close(rd)


@needs_uring
def test_more_finished_batches_than_one_wake_up_reports(pool):
    r = _uring_reader()
    view = pool.buffers[0].view

    async def main():
        return await asyncio.gather(*[r.read_batch([ReadRequest(0, 0, view[:0])] * 3) for _ in range(300)])

    try:
        assert run(main()) == [[0, 0, 0]] * 300
        assert r.completions == 0
    finally:
        r.close()


@needs_uring
def test_closed_pool_is_unregistered_and_a_new_pool_reads_plainly(tmp_path, opened):
    data = make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")
    r = _uring_reader()
    first = BufferPool(2, BUF)
    try:
        assert r.register(first)
        first.close()  # the reader holds no export that would make this fail
        second = BufferPool(2, BUF)
        assert run(r.read_batch([ReadRequest(fd, 0, second.buffers[0].view)])) == [BUF]
        assert bytes(second.buffers[0].view) == data
        assert not r.registered and r.fixed_reads == 0
        second.close()
    finally:
        r.close()


@needs_uring
def test_refused_registration_falls_back_with_one_log_line(pool, tmp_path, opened, devel_log_lines):
    data = make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")
    r = _uring_reader()

    def refuse(*_):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    r._ring.register_buffers = refuse
    try:
        assert r.register(pool) is False
        assert len(devel_log_lines) == 1 and "using unregistered reads" in devel_log_lines[0]
        assert run(r.read_batch([ReadRequest(fd, 0, pool.buffers[0].view)])) == [BUF]
        assert bytes(pool.buffers[0].view) == data and r.fixed_reads == 0
    finally:
        r.close()


@needs_uring
def test_a_pool_over_the_memlock_limit_registers_the_buffers_that_fit(pool, tmp_path, opened, devel_log_lines):
    data = make_file(tmp_path / "f", BUF)
    fd = opened(tmp_path / "f")
    r = _uring_reader()
    real = r._ring.register_buffers
    asked = []

    def limit_to_three(base, size, count):  # as the kernel does over RLIMIT_MEMLOCK
        asked.append(count)
        if count > 3:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        real(base, size, count)

    r._ring.register_buffers = limit_to_three
    try:
        assert r.register(pool) and r.registered
        assert asked[0] == pool.count and asked[-1] == 3
        assert len(devel_log_lines) == 1 and f"registered 3 of {pool.count} pool buffers" in devel_log_lines[0]
        last = pool.buffers[pool.count - 1]
        counts = run(r.read_batch([ReadRequest(fd, 0, pool.buffers[2].view), ReadRequest(fd, 0, last.view)]))
        assert counts == [BUF, BUF] and r.fixed_reads == 1  # buffer 2 is fixed, the last one is not
        assert bytes(pool.buffers[2].view) == data and bytes(last.view) == data
    finally:
        r.close()


def test_probe_explains_permission_refusals(monkeypatch):
    lines = {"/proc/sys/kernel/io_uring_disabled": "2", "/proc/self/status": "Seccomp:\t0"}
    monkeypatch.setattr(probe_module, "_proc_line", lambda path, prefix="": lines[path])
    assert probe_module._explain(errno.EPERM) == "EPERM: kernel.io_uring_disabled=2"
    lines["/proc/sys/kernel/io_uring_disabled"] = "0"
    lines["/proc/self/status"] = "Seccomp:\t2"
    assert "seccomp" in probe_module._explain(errno.EPERM)
    assert "seccomp" in probe_module._explain(errno.ENOSYS)


def test_probe_reports_a_module_that_was_not_built(monkeypatch):
    monkeypatch.setitem(sys.modules, "walrus._uring._liburing", None)  # import now raises ImportError
    monkeypatch.delitem(sys.modules, "walrus._uring.ring", raising=False)
    assert probe_module.probe.__wrapped__().startswith("module not built")


def test_ring_wait_gives_up_instead_of_hanging():
    """A request that never completes (a read from an idle pipe) ends in TimeoutError, not a hang."""
    from walrus._uring import probe

    if probe() is not None:
        pytest.skip(f"io_uring unavailable: {probe()}")
    from walrus._uring._liburing import ffi
    from walrus._uring.ring import Ring

    r, w = os.pipe()
    ring = Ring(4)
    buf = ffi.new("char[]", 16)
    try:
        ring.prep_read(1, r, buf, 16, 0)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            ring.submit_and_wait(1, stall_limit=1.5)
        assert 1.4 < time.monotonic() - started < 10
    finally:
        os.close(w)  # EOF completes the read, so the ring can be torn down cleanly
        ring.submit_and_wait(1, stall_limit=5)
        ring.close()
        os.close(r)
