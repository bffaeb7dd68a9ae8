"""An object-storage emulator on loopback for the bench: TLS with a self-signed certificate that every
tool verifies, one bucket, and per repository a key prefix named after the repository directory."""
from __future__ import annotations

import os
import socket
import subprocess
import time

from tests.pgcluster import free_port, stop_process

HOST = "localhost"  # pgBackRest matches the certificate against DNS names only, not IP addresses
BUCKET = "bench"


class ObjectStore:
    """What bench/run.py needs of an emulator; subclasses say how to install, start and read it."""

    kind = ""  # the --storage value
    title = ""  # for the tables' notes

    def __init__(self, root: str) -> None:
        self.root = os.path.join(root, self.kind)
        self.data = os.path.join(self.root, "data")  # where objects land: `sync -f` makes a backup durable
        self.ca_file = os.path.join(self.root, "cert.pem")
        self.key_file = os.path.join(self.root, "key.pem")
        self.port = 0
        self.procs: list[subprocess.Popen] = []
        self.silent = True  # start()'s: no log line per request, where the emulator writes them

    @staticmethod
    def missing() -> str | None:
        return None

    def version(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        """The emulator's command line (serving TLS on self.port from self.data)."""
        raise NotImplementedError

    def create_bucket(self) -> None:
        raise NotImplementedError

    def launch(self) -> list[tuple[list[str], int]]:
        """The processes to start, in order, each with the port that tells it is up; the last serves
        self.port. Default: the emulator alone."""
        return [(self.command(), self.port)]

    def start(self, log_path: str, *, silent: bool = True) -> None:
        """Start the emulator (`silent`: without a log line per request, where it has them)."""
        self.silent = silent
        os.makedirs(self.data, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
                        self.key_file, "-out", self.ca_file, "-subj", f"/CN={HOST}",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
        os.chmod(self.ca_file, 0o644)  # the tools run as the PostgreSQL user and verify against it
        os.chmod(self.root, 0o755)
        self.port = free_port()
        for command, port in self.launch():
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.procs.append(proc)
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"{self.version()}: {command[0]} did not start; see {log_path}") from None
                    time.sleep(0.1)
        self.create_bucket()

    @property
    def proc(self) -> subprocess.Popen | None:
        """The process serving self.port."""
        return self.procs[-1] if self.procs else None

    def stop(self) -> None:
        while self.procs:
            stop_process(self.procs.pop(), grace=30)

    @property
    def endpoint(self) -> str:
        return f"https://{HOST}:{self.port}"

    @staticmethod
    def prefix(repo: str) -> str:
        return os.path.basename(repo.rstrip("/"))

    def sizes(self, prefix: str) -> dict[str, int]:
        """Key -> size of every object under prefix/, through the emulator's API."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def stored_bytes(self, repo: str) -> int:
        return sum(self.sizes(self.prefix(repo)).values())

    def remove(self, repo: str) -> None:
        if self.proc is not None:
            self.delete(list(self.sizes(self.prefix(repo))))

    def walg_env(self, repo: str) -> dict[str, str]:
        raise NotImplementedError

    def pgbackrest_options(self, repo: str) -> list[str]:
        raise NotImplementedError
