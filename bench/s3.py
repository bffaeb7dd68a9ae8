"""An S3 endpoint on loopback for the bench: s3rver from the npm registry, which stores objects on disk
and speaks TLS (pgBackRest requires it). moto keeps everything in memory and serves ranged GETs slowly,
so it is for the tests' correctness only."""
from __future__ import annotations

import os
import shutil
import subprocess

from bench.objectstore import BUCKET, HOST, ObjectStore

S3RVER = "s3rver@3.7.1"
ACCESS_KEY = SECRET_KEY = "S3RVER"  # s3rver's fixed credentials
REGION = "us-east-1"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "walrus-bench", S3RVER.replace("@", "-"))
OBJECT_SUFFIX = "._S3rver_object"  # s3rver's file for an object's bytes (metadata and md5 sit beside it)


class S3rver(ObjectStore):
    """s3rver: the bucket made at start (--configure-bucket); objects in files, read directly here."""

    kind = "s3"
    title = ("S3 on loopback, s3rver (Node.js, objects in files, TLS with a self-signed certificate every tool "
             "verifies), path-style bucket")

    @staticmethod
    def missing() -> str | None:
        for exe in ("node", "npm", "openssl"):
            if not shutil.which(exe):
                return f"{exe} is not installed (the S3 endpoint is s3rver on Node.js)"
        return None

    def version(self) -> str:
        return S3RVER

    def start(self, log_path: str, *, silent: bool = False) -> None:
        """`silent` drops s3rver's log line per request (and per key a DeleteObjects deletes), which
        costs the emulator's single thread time that S3 does not spend."""
        super().start(log_path, silent=silent)
        with open(self.aws_config, "w") as f:
            f.write("[default]\ns3 =\n    addressing_style = path\n")  # boto3 would put the bucket in the host name
        os.chmod(self.aws_config, 0o644)

    @property
    def aws_config(self) -> str:
        return os.path.join(self.root, "aws-config")

    def command(self) -> list[str]:
        return (["node", self._install(), "-d", self.data, "-a", "127.0.0.1", "-p", str(self.port), "--key",
                 self.key_file, "--cert", self.ca_file, "--no-vhost-buckets", "--configure-bucket", BUCKET]
                + (["--silent"] if self.silent else []))

    def create_bucket(self) -> None:
        return None  # --configure-bucket made it

    def _install(self) -> str:
        """npm install into a cache shared by runs; returns s3rver's CLI script."""
        script = os.path.join(CACHE, "node_modules", "s3rver", "bin", "s3rver.js")
        if not os.path.exists(script):
            os.makedirs(CACHE, exist_ok=True)
            subprocess.run(["npm", "install", "--prefix", CACHE, "--no-audit", "--no-fund", "--loglevel=error",
                            S3RVER], check=True, capture_output=True, timeout=600)
        return script

    # -- one repository = one key prefix, read from s3rver's files ----------------------------------
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

    def barman_url(self, repo: str) -> str:
        return f"s3://{BUCKET}/{self.prefix(repo)}"

    def boto3_env(self) -> dict[str, str]:
        """What boto3 (Barman's client) reads: credentials, region, path-style addressing and the CA."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": self.aws_config, "AWS_CA_BUNDLE": self.ca_file}

    def pgbackrest_options(self, repo: str) -> list[str]:
        return ["repo1-type=s3", f"repo1-path=/{self.prefix(repo)}", f"repo1-s3-bucket={BUCKET}",
                f"repo1-s3-endpoint={HOST}", f"repo1-storage-port={self.port}", f"repo1-s3-region={REGION}",
                f"repo1-s3-key={ACCESS_KEY}", f"repo1-s3-key-secret={SECRET_KEY}", "repo1-s3-uri-style=path",
                f"repo1-storage-ca-file={self.ca_file}"]
