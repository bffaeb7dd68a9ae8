"""Process-wide tuning applied once at start-up, before any thread exists: it keeps VmPeak bounded."""
from __future__ import annotations

import ctypes
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
