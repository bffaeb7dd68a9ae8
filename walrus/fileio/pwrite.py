"""The write queue of restores where io_uring is refused: pwrite(2) on a few threads, in io_uring's shape."""
from __future__ import annotations

import errno
import queue
import threading
import time
from collections import deque

from walrus.fsutil import pwrite_from as _pwrite

STALL_POLL = 1.0  # seconds per timed wait
STALL_LIMIT = 120.0  # seconds without any completion before a wait gives up, as the ring's
DEFAULT_THREADS = 2  # writes in flight per sink: a direct write blocks until the device has it
DEFAULT_ENTRIES = 16  # writes queued or in flight per sink


class PwriteQueue:
    """Writes from raw addresses on `threads` threads, completed in any order and reaped as
    (user_data, bytes written or -errno), as io_uring's ring reports them, so one sink serves both.

    A result is the single pwrite's, short writes and EINTR included: the sink resubmits what is
    left, as it does for the ring. The threads stop at close(); a thread still blocked in a write
    (a hung NFS server) is a daemon and does not keep the process alive.
    """

    name = "pwrite"

    def __init__(self, threads: int = DEFAULT_THREADS, entries: int = DEFAULT_ENTRIES):
        if threads < 1 or entries < 1:
            raise ValueError("a pwrite queue needs at least one thread and one entry")
        self.entries = entries
        self.completions = 0
        self.closed = False
        self._prepared: list[tuple[int, int, int, int, int]] = []
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: deque[tuple[int, int]] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._threads = [threading.Thread(target=self._work, name=f"walrus-pwrite-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def register_buffers(self, base: int, size: int, count: int) -> bool:
        return False  # pwrite copies from any memory alike

    def unregister_buffers(self) -> None:
        return None

    def prep_write(self, user_data: int, fd: int, address: int, nbytes: int, offset: int,
                   buf_index: int = -1) -> None:
        self._prepared.append((user_data, fd, address, nbytes, offset))

    def submit_and_wait(self, wait_nr: int, stall_limit: float = STALL_LIMIT) -> None:
        """Hands the prepared writes to the threads; then waits until `wait_nr` results are ready,
        raising TimeoutError after `stall_limit` seconds without one (a stuck device)."""
        for job in self._prepared:
            self._jobs.put(job)
        self._prepared.clear()
        if not wait_nr:
            return
        deadline = time.monotonic() + stall_limit
        with self._ready:
            while len(self._results) < wait_nr:
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, f"pwrite: no completion for {stall_limit:.0f} s")
                self._ready.wait(STALL_POLL)

    def reap(self) -> list[tuple[int, int]]:
        with self._ready:
            done = list(self._results)
            self._results.clear()
        self.completions += len(done)
        return done

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            user_data, fd, address, nbytes, offset = job
            res = _pwrite(fd, address, nbytes, offset)
            with self._ready:
                self._results.append((user_data, res))
                self._ready.notify()

    def close(self) -> None:
        """Stops the threads once the writes handed to them are done (the sink waits for those first)."""
        if self.closed:
            return
        self.closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(STALL_LIMIT)
