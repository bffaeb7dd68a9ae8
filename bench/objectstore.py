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
        self.proc: subprocess.Popen | None = None
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
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.version()} did not start; see {log_path}") from None
                time.sleep(0.1)
        self.create_bucket()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)
        self.proc = None

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
