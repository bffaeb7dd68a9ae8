"""Small durable-file helpers shared by the file storage, wal-fetch and backup-fetch."""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data) -> int:
    """os.write until every byte is written (it may write less on pipes, signals, full disks)."""
    view = memoryview(data)
    total = len(view)
    while view:
        view = view[os.write(fd, view):]
    return total
