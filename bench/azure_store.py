"""An Azure Blob Storage endpoint on loopback for the bench: Azurite from the npm registry (the tests'
copy, tests/azurite.py), objects in files, TLS. (Not bench/azure.py: that would shadow the `azure` package.)"""
from __future__ import annotations

import shutil

from bench.objectstore import BUCKET, HOST, ObjectStore
from tests.azurite import ACCOUNT, ACCOUNT_KEY, AZURITE_VERSION, azurite_script


class AzuriteStore(ObjectStore):
    kind = "azure"
    title = "Azure Blob Storage on loopback, Azurite (Node.js, objects in files, TLS with a self-signed certificate every tool verifies)"

    @staticmethod
    def missing() -> str | None:
        for exe in ("node", "npm", "openssl"):
            if not shutil.which(exe):
                return f"{exe} is not installed (Azurite runs on Node.js)"
        return None

    def version(self) -> str:
        return f"azurite@{AZURITE_VERSION}"

    def command(self) -> list[str]:
        return ["node", azurite_script(), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--cert",
                self.ca_file, "--key", self.key_file, "--location", self.data, "--loose", "--skipApiVersionCheck",
                "--silent"]

    def _client(self):
        from azure.storage.blob import ContainerClient

        return ContainerClient(f"{self.endpoint}/{ACCOUNT}", BUCKET,
                               credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY},
                               connection_verify=self.ca_file)

    def create_bucket(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        with self._client() as container:
            try:
                container.create_container()
            except ResourceExistsError:  # a store kept from an earlier start
                pass

    def sizes(self, prefix: str) -> dict[str, int]:
        with self._client() as container:
            return {b.name: b.size for b in container.list_blobs(name_starts_with=prefix + "/")}

    def delete(self, keys: list[str]) -> None:
        with self._client() as container:
            for i in range(0, len(keys), 256):
                container.delete_blobs(*keys[i:i + 256])

    def walg_env(self, repo: str) -> dict[str, str]:
        return {"WALG_AZ_PREFIX": f"azure://{BUCKET}/{self.prefix(repo)}", "AZURE_STORAGE_ACCOUNT": ACCOUNT,
                "AZURE_STORAGE_ACCESS_KEY": ACCOUNT_KEY, "WALRUS_AZURE_ENDPOINT": f"{self.endpoint}/{ACCOUNT}",
                "SSL_CERT_FILE": self.ca_file}

    def pgbackrest_options(self, repo: str) -> list[str]:
        return ["repo1-type=azure", f"repo1-path=/{self.prefix(repo)}", f"repo1-azure-account={ACCOUNT}",
                f"repo1-azure-key={ACCOUNT_KEY}", f"repo1-azure-container={BUCKET}", f"repo1-azure-endpoint={HOST}",
                f"repo1-storage-port={self.port}", "repo1-azure-uri-style=path", f"repo1-storage-ca-file={self.ca_file}"]
