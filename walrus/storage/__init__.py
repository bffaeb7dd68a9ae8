"""Storage backends, and the one function that opens the configured one."""
from __future__ import annotations

import importlib
from typing import NamedTuple

from walrus.config import Settings
from walrus.errors import ConfigError
from walrus.storage.base import ObjectInfo, Storage, join_key

__all__ = ["BACKENDS", "ObjectInfo", "Storage", "join_key", "open_storage"]


class Backend(NamedTuple):
    setting: str  # the settings attribute (a WALG_*_PREFIX) whose value selects the backend
    variable: str  # that setting's name, for messages
    module: str  # walrus.storage.<module>, imported only when chosen (each cloud's client only for its users)
    opener: str  # its open_<name>(settings) -> Storage


# The first configured prefix wins, in WAL-G's order of precedence (S3, FILE, GS, AZ).
BACKENDS: tuple[Backend, ...] = (
    Backend("s3_prefix", "WALG_S3_PREFIX", "s3", "open_s3"),
    Backend("file_prefix", "WALG_FILE_PREFIX", "fs", "open_fs"),
    Backend("gs_prefix", "WALG_GS_PREFIX", "gcs", "open_gcs"),
    Backend("az_prefix", "WALG_AZ_PREFIX", "azure", "open_azure"),
)


def open_storage(settings: Settings) -> Storage:
    """The configured backend, paced by WALG_NETWORK_RATE_LIMIT when it is set (one bucket for all
    of the command's transfers)."""
    for backend in BACKENDS:
        if getattr(settings, backend.setting):
            module = importlib.import_module(f"walrus.storage.{backend.module}")
            storage = getattr(module, backend.opener)(settings)
            if settings.network_rate_limit is not None:
                from walrus.ratelimit import RateLimiter  # here: asyncio stays out of a wal-fetch that needs no loop
                from walrus.storage.limited import LimitedStorage

                storage = LimitedStorage(storage, RateLimiter(settings.network_rate_limit))
            return storage
    names = ["WALG_FILE_PREFIX"] + [b.variable for b in BACKENDS if b.variable != "WALG_FILE_PREFIX"]
    variables = ", ".join(names[:-1]) + " or " + names[-1]
    raise ConfigError("no storage is configured",
                      hint=f"set {variables} in the environment or the config file (--config, WALG_CONFIG_PATH, "
                           "~/.walg.json)")
