"""Running a command with its standard error a pseudo-terminal, as an operator's shell has it."""
from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time

import pytest


def run_on_tty(args: list[str], env: dict[str, str], columns: int = 160, bound: float = 120,
               **popen) -> tuple[int, str, str]:
    """Run with standard error a pseudo-terminal of `columns` columns: (exit code, stdout, what the terminal got).
    popen: more subprocess.Popen arguments (another user to run as)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    try:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                                **popen)
    finally:
        os.close(slave)
    got = bytearray()
    deadline = time.monotonic() + bound
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child's end is closed
                break
            if not data:
                break
            got += data
        else:
            proc.kill()
            pytest.fail(f"{' '.join(args[:4])} did not end within {bound} s")
        out = proc.stdout.read().decode()
        proc.wait(10)
    finally:
        os.close(master)
        proc.stdout.close()
    return proc.returncode, out, got.decode().replace("\r\n", "\n")  # the terminal's ONLCR
