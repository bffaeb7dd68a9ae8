"""The process's limits: tuning applied once at start-up (before any thread exists, it keeps VmPeak
bounded), the descriptor limit, the cores this process may use."""
from __future__ import annotations

import ctypes
import os
import resource
import threading

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
MALLOC_ARENAS = 2  # each extra glibc arena reserves 64 MiB of address space per thread that mallocs
# Codecs allocate a fresh output of about a buffer's size per chunk (1 MiB by default). With glibc's
# adaptive thresholds, a freed chunk that large leaves the arena's top past the trim threshold (twice
# the chunk), so the arena gives its pages back and the next chunk faults them in again, zeroed:
# every byte compressed cost a page fault and a page clear. Fixed thresholds keep freed chunks in the
# arena for reuse; what an arena holds stays what the pipeline held at its peak.
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for it (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 64 << 20
THREAD_STACK = 2 << 20  # the default 8 MiB per thread is address space walrus's workers never use


def tune_process() -> None:
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols (ctypes.util.find_library runs ldconfig)
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
    threading.stack_size(THREAD_STACK)


def raise_nofile_limit() -> None:
    """Parts keep the files of their in-flight buffers open; lift the soft fd limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
