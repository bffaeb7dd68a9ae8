"""Writing restored files: the sink interface and its plain os.write implementation."""
from __future__ import annotations

import os
from typing import Protocol

from walrus.pull import Payload


class FileSink(Protocol):
    """Where restored files' payloads go: SlabSink (fileio.slabsink) for restores, PlainSink here for
    small extractions.

    `write` takes ownership of `fd` (opened for writing, empty) and closes it, at once or once its
    writes complete; `finish` waits for everything and raises the first error. `close` releases
    whatever the sink still holds without raising: its owner calls it once the extraction is over,
    failed or not, since extract_tar calls `finish` only when every member was read. Durability is
    the caller's: backup-fetch syncs each restored filesystem once at the end.
    """

    name: str  # what backup-fetch reports it wrote with
    direct_threshold: int  # payloads this large are opened with O_DIRECT (0: never)

    def write(self, fd: int, data: Payload, size: int, direct: bool) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class PlainSink:
    """os.write through one reused buffer: memory does not grow with file size."""

    name = "pwrite"
    direct_threshold = 0

    def __init__(self, buffer_size: int = 1 << 20):
        self.buffer = memoryview(bytearray(buffer_size))

    def write(self, fd: int, data: Payload, size: int, direct: bool) -> None:
        try:
            while n := data.readinto(self.buffer):
                view = self.buffer[:n]
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def finish(self) -> None:
        return None

    def close(self) -> None:
        return None
