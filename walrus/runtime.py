"""The process's limits: tuning applied once at start-up (before any thread exists, it keeps VmPeak
bounded), the descriptor limit, the cores this process may use."""
from __future__ import annotations

import ctypes
import os
import resource
import threading

M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 2  # each extra glibc arena reserves 64 MiB of address space per thread that mallocs
THREAD_STACK = 2 << 20  # the default 8 MiB per thread is address space walrus's workers never use


def tune_process() -> None:
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols (ctypes.util.find_library runs ldconfig)
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
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
