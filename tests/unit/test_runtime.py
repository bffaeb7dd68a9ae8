"""The process tuning applied at start-up: what it changes for the data path, measured in a child process."""
from __future__ import annotations

import subprocess
import sys

import pytest

# Chunks compressed on worker threads and freed on the calling thread, a few in flight, as the
# upload pipeline does; the data halves compress (each output touches about 64 pages of fresh memory).
_PIPELINE = r"""
import os, resource, sys
from concurrent.futures import ThreadPoolExecutor
import ctypes
import lz4.block
from walrus.runtime import M_ARENA_MAX, MALLOC_ARENAS, tune_process
if sys.argv[1] == "tuned":
    tune_process()
else:
    ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)  # the same arenas, glibc's adaptive thresholds
data = memoryview(b"".join(os.urandom(512) + bytes(512) for _ in range(1024)))
executor = ThreadPoolExecutor(4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
pending = []
for _ in range(CHUNKS):
    pending.append(executor.submit(lz4.block.compress, data, store_size=False))
    if len(pending) > 4:
        pending.pop(0).result()
for job in pending:
    job.result()
pending = None
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
CHUNKS = 256


def _faults(mode: str) -> int:
    script = _PIPELINE.replace("CHUNKS", str(CHUNKS))
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_tuned_process_reuses_freed_codec_outputs_instead_of_faulting_them_in_again():
    adaptive, tuned = _faults("adaptive"), _faults("tuned")
    # adaptive thresholds: the arena gives back each freed output and the next one faults its
    # pages in again (measured about 90 faults a chunk); tuned: the freed memory is reused
    assert adaptive > CHUNKS * 32, adaptive  # the cost the tuning exists to remove is real here
    assert tuned < CHUNKS * 16, (tuned, adaptive)
