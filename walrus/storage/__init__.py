"""Storage backends and the one function that opens the configured one."""
from __future__ import annotations

import os
from urllib.parse import urlparse

from walrus.config import Settings
from walrus.errors import ConfigError
from walrus.storage.base import ObjectInfo, Storage, join_key

__all__ = ["ObjectInfo", "Storage", "join_key", "open_storage"]

STORAGE_VARIABLES = "WALG_FILE_PREFIX or WALG_S3_PREFIX"


def _file_root(prefix: str) -> str:
    if prefix.startswith("file://"):
        url = urlparse(prefix)
        if url.netloc not in ("", "localhost"):
            raise ConfigError(f"WALG_FILE_PREFIX {prefix!r} names a remote host",
                              hint="use a local path or file://localhost/path")
        return url.path
    return prefix


def open_storage(settings: Settings) -> Storage:
    """The first configured prefix wins, in WAL-G's order (S3 before FILE)."""
    sub = settings.storage_prefix or ""
    if settings.s3_prefix:
        from walrus.storage.s3 import open_s3  # aiobotocore is imported only by S3 users

        return open_s3(settings)
    if settings.file_prefix:
        from walrus.storage.fs import FsStorage

        root = _file_root(settings.file_prefix)
        if not root.strip("/") and root != "/":
            raise ConfigError("WALG_FILE_PREFIX is empty", hint="set it to a directory such as /var/lib/walrus/backups")
        return FsStorage(os.path.join(root, join_key(sub)) if sub else root)
    raise ConfigError("no storage is configured",
                      hint=f"set {STORAGE_VARIABLES} in the environment or the config file (--config, WALG_CONFIG_PATH, ~/.walg.json)")
