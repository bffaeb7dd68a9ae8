"""One io_uring instance: setup, fixed-buffer registration, SQE preparation and CQE reaping."""
from __future__ import annotations

import errno
import os
import time

from walrus._uring._liburing import ffi, lib

# Largest byte count the kernel moves in one read(2)-style request (MAX_RW_COUNT); longer requests
# would come back short anyway, and sqe->len is only 32 bits.
MAX_IO = 0x7FFFF000
STALL_POLL = 1.0  # seconds per timed wait
STALL_LIMIT = 120.0  # seconds without any completion before a wait gives up


def _os_error(rc: int, what: str) -> OSError:
    return OSError(-rc, f"{what}: {os.strerror(-rc)}")


class Ring:
    """A submission/completion queue pair of `entries` slots.

    Not thread safe: one thread at a time prepares, submits and reaps. The caller keeps at most
    `entries` requests in flight, which keeps both the SQ (entries) and the CQ (2 * entries, the
    kernel's default) from ever filling.
    """

    def __init__(self, entries: int):
        if entries < 1:
            raise ValueError("an io_uring needs at least one entry")
        self._ring = ffi.new("struct io_uring *")
        rc = lib.io_uring_queue_init(entries, self._ring, 0)
        if rc < 0:
            raise _os_error(rc, "io_uring_queue_init")
        self.entries = entries
        self._cqes = ffi.new("struct io_uring_cqe *[]", 2 * entries)
        self._cqe_ptr = ffi.new("struct io_uring_cqe **")
        self._ts = ffi.new("struct __kernel_timespec *")
        self._open = True
        self.completions = 0  # CQEs reaped over the ring's life

    def supports(self, *opcodes: int) -> bool:
        """Whether the running kernel implements every opcode (IORING_OP_READ came with 5.6)."""
        probe = lib.io_uring_get_probe_ring(self._ring)
        if probe == ffi.NULL:
            return False
        try:
            return all(lib.io_uring_opcode_supported(probe, op) for op in opcodes)
        finally:
            lib.io_uring_free_probe(probe)

    def register_buffers(self, base: int, size: int, count: int) -> None:
        """Pins `count` consecutive buffers of `size` bytes at address `base` as fixed buffers 0..count-1."""
        iovecs = ffi.new("struct iovec[]", count)
        for i in range(count):
            iovecs[i].iov_base = ffi.cast("void *", base + i * size)
            iovecs[i].iov_len = size
        rc = lib.io_uring_register_buffers(self._ring, iovecs, count)
        if rc < 0:
            raise _os_error(rc, "io_uring_register_buffers")

    def unregister_buffers(self) -> None:
        rc = lib.io_uring_unregister_buffers(self._ring)
        if rc < 0 and rc != -errno.ENXIO:  # ENXIO: nothing was registered
            raise _os_error(rc, "io_uring_unregister_buffers")

    def _sqe(self):
        sqe = lib.io_uring_get_sqe(self._ring)
        if sqe == ffi.NULL:
            raise RuntimeError("io_uring submission queue full: more requests than entries in flight")
        return sqe

    def prep_read(self, user_data: int, fd: int, buf, nbytes: int, offset: int, buf_index: int = -1) -> None:
        """Queues a read of `nbytes` at `offset` into `buf` (a char* cdata); READ_FIXED if buf_index >= 0."""
        sqe = self._sqe()
        if buf_index >= 0:
            lib.io_uring_prep_read_fixed(sqe, fd, buf, nbytes, offset, buf_index)
        else:
            lib.io_uring_prep_read(sqe, fd, buf, nbytes, offset)
        sqe.user_data = user_data

    def prep_write(self, user_data: int, fd: int, buf, nbytes: int, offset: int, buf_index: int = -1) -> None:
        """Queues a write of `nbytes` from `buf` (a char* cdata) at `offset`; WRITE_FIXED if buf_index >= 0."""
        sqe = self._sqe()
        if buf_index >= 0:
            lib.io_uring_prep_write_fixed(sqe, fd, buf, nbytes, offset, buf_index)
        else:
            lib.io_uring_prep_write(sqe, fd, buf, nbytes, offset)
        sqe.user_data = user_data

    def submit_and_wait(self, wait_nr: int, stall_limit: float = STALL_LIMIT) -> None:
        """Hands every queued SQE to the kernel and waits until `wait_nr` completions are ready (0: none).

        A wait never lasts forever: if no completion arrives for `stall_limit` seconds, raise
        TimeoutError, so a stuck device or a lost completion becomes an error the command reports
        (archive_command fails and PostgreSQL retries) instead of a hung process.
        """
        if wait_nr == 0:
            self._submit_only()
            return
        deadline = time.monotonic() + stall_limit
        while True:
            self._ts.tv_sec = int(STALL_POLL)
            self._ts.tv_nsec = int(STALL_POLL % 1 * 1e9)
            self._cqe_ptr[0] = ffi.NULL
            rc = lib.io_uring_submit_and_wait_timeout(self._ring, self._cqe_ptr, wait_nr, self._ts, ffi.NULL)
            if rc >= 0 and self._cqe_ptr[0] != ffi.NULL:
                return
            if rc >= 0 or rc == -errno.ETIME:  # liburing reports a timed-out wait that submitted as success
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, f"io_uring: no completion for {stall_limit:.0f} s")
                continue
            if rc == -errno.EINTR:
                continue
            raise _os_error(rc, "io_uring_enter")

    def _submit_only(self) -> None:
        while True:
            rc = lib.io_uring_submit_and_wait(self._ring, 0)
            if rc >= 0:
                return
            # EINTR: a signal cut the wait short. liburing leaves SQEs the kernel did not consume in the
            # queue, so the retry submits exactly the rest.
            if rc == -errno.EINTR:
                continue
            raise _os_error(rc, "io_uring_enter")

    def reap(self) -> list[tuple[int, int]]:
        """Every completion ready now, as (user_data, res) pairs; res < 0 is -errno."""
        n = lib.io_uring_peek_batch_cqe(self._ring, self._cqes, len(self._cqes))
        done = [(self._cqes[i].user_data, self._cqes[i].res) for i in range(n)]
        if n:
            lib.io_uring_cq_advance(self._ring, n)
            self.completions += n
        return done

    @property
    def closed(self) -> bool:
        return not self._open

    def close(self) -> None:
        if self._open:
            self._open = False
            lib.io_uring_queue_exit(self._ring)

