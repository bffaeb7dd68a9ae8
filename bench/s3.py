"""An S3 endpoint on loopback for the bench: s3rver from the npm registry, which stores objects on disk
and speaks TLS (pgBackRest requires it). moto keeps everything in memory and serves ranged GETs slowly,
so it is for the tests' correctness only."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from tests.pgcluster import free_port

S3RVER = "s3rver@3.7.1"
BUCKET = "bench"
ACCESS_KEY = SECRET_KEY = "S3RVER"  # s3rver's fixed credentials
REGION = "us-east-1"
HOST = "localhost"  # pgBackRest 2.45 matches the certificate against DNS names only, not IP addresses
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "walrus-bench", S3RVER.replace("@", "-"))
OBJECT_SUFFIX = "._S3rver_object"  # s3rver's file for an object's bytes (metadata and md5 sit beside it)


class S3rver:
    """One s3rver process for the whole run: a bucket, a self-signed certificate for 127.0.0.1, and per
    repository a key prefix named after the repository directory."""

    def __init__(self, root: str) -> None:
        self.root = os.path.join(root, "s3")
        self.data = os.path.join(self.root, "data")
        self.ca_file = os.path.join(self.root, "cert.pem")
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def missing() -> str | None:
        for exe in ("node", "npm", "openssl"):
            if not shutil.which(exe):
                return f"{exe} is not installed (the S3 endpoint is s3rver on Node.js)"
        return None

    def version(self) -> str:
        return S3RVER

    @property
    def endpoint(self) -> str:
        return f"https://{HOST}:{self.port}"

    def start(self, log_path: str, *, silent: bool = False) -> None:
        """Start s3rver; `silent` drops its log line per request (and per key a DeleteObjects deletes),
        which costs the emulator's single thread time that S3 does not spend."""
        script = self._install()
        os.makedirs(self.data, exist_ok=True)
        key = os.path.join(self.root, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", key,
                        "-out", self.ca_file, "-subj", f"/CN={HOST}",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
        os.chmod(self.ca_file, 0o644)  # the tools run as the PostgreSQL user and verify against it
        os.chmod(self.root, 0o755)
        self.port = free_port()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["node", script, "-d", self.data, "-a", "127.0.0.1", "-p", str(self.port), "--key", key,
                 "--cert", self.ca_file, "--no-vhost-buckets", "--configure-bucket", BUCKET]
                + (["--silent"] if silent else []),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"s3rver did not start; see {log_path}") from None
                time.sleep(0.1)

    def _install(self) -> str:
        """npm install into a cache shared by runs; returns s3rver's CLI script."""
        script = os.path.join(CACHE, "node_modules", "s3rver", "bin", "s3rver.js")
        if not os.path.exists(script):
            os.makedirs(CACHE, exist_ok=True)
            subprocess.run(["npm", "install", "--prefix", CACHE, "--no-audit", "--no-fund", "--loglevel=error",
                            S3RVER], check=True, capture_output=True, timeout=600)
        return script

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    # -- one repository = one key prefix ---------------------------------------------------------
    @staticmethod
    def prefix(repo: str) -> str:
        return os.path.basename(repo.rstrip("/"))

    def prefix_dir(self, repo: str) -> str:
        return os.path.join(self.data, BUCKET, self.prefix(repo))

    def stored_bytes(self, repo: str) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.prefix_dir(repo)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files if f.endswith(OBJECT_SUFFIX))
        return total

    def remove(self, repo: str) -> None:
        shutil.rmtree(self.prefix_dir(repo), ignore_errors=True)

    def walg_env(self, repo: str) -> dict[str, str]:
        return {"WALG_S3_PREFIX": f"s3://{BUCKET}/{self.prefix(repo)}", "AWS_ENDPOINT": self.endpoint,
                "AWS_S3_FORCE_PATH_STYLE": "true", "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "WALG_S3_CA_CERT_FILE": self.ca_file}

    def pgbackrest_options(self, repo: str) -> list[str]:
        return ["repo1-type=s3", f"repo1-path=/{self.prefix(repo)}", f"repo1-s3-bucket={BUCKET}",
                f"repo1-s3-endpoint={HOST}", f"repo1-storage-port={self.port}", f"repo1-s3-region={REGION}",
                f"repo1-s3-key={ACCESS_KEY}", f"repo1-s3-key-secret={SECRET_KEY}", "repo1-s3-uri-style=path",
                f"repo1-storage-ca-file={self.ca_file}"]
