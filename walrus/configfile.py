"""Where the config file is, by WAL-G's rules, known without loading the settings table."""
from __future__ import annotations

import os

TYPE_CHECKING = False  # typing's, without importing typing: wal-fetch's quickest answer reads this module
if TYPE_CHECKING:
    from typing import Mapping

# The config file types WAL-G's viper reads, by extension, in the order ~/.walg.<ext> is looked for.
CONFIG_TYPES = ("json", "toml", "yaml", "yml", "properties", "props", "prop", "env", "dotenv", "ini")


def default_config_path(env: Mapping[str, str]) -> str | None:
    """$WALG_CONFIG_PATH, else the first ~/.walg.<ext> that exists, else None."""
    if env.get("WALG_CONFIG_PATH"):
        return env["WALG_CONFIG_PATH"]
    home = env.get("HOME") or os.path.expanduser("~")
    for ext in CONFIG_TYPES:
        candidate = os.path.join(home, f".walg.{ext}")
        if os.path.exists(candidate):
            return candidate
    return None
