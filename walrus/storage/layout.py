"""Object keys of WAL-G's bucket layout (basebackups_005/, wal_005/, sentinels, tar parts)."""
from __future__ import annotations

import re

from walrus.storage.base import join_key

BASEBACKUPS = "basebackups_005"
WAL = "wal_005"
BLOCKMAP = "blockmap_005"  # walrus's WAL block maps, one per archived segment (WAL-G never looks here)
SENTINEL_SUFFIX = "_backup_stop_sentinel.json"
METADATA = "metadata.json"
FILES_METADATA = "files_metadata.json"
TAR_FOLDER = "tar_partitions"
PG_CONTROL_TAR = "pg_control.tar"
BACKUP_LABEL_TAR = "backup_label.tar"
# Parts extracted after all others, in WAL-G's "sequential" group.
LAST_PARTS_RE = re.compile(r"(pg_control|backup_label)\.tar(\..*)?$")
TAR_NAME_RE = re.compile(r"\.tar(?:\.([A-Za-z0-9]*))?$")


def with_extension(name: str, ext: str) -> str:
    """WAL-G's AddFileExtension: no dot at all for 'none' (v3.0.9 on)."""
    return f"{name}.{ext}" if ext else name


def sentinel_key(backup: str) -> str:
    return join_key(BASEBACKUPS, backup + SENTINEL_SUFFIX)


def backup_key(backup: str, *names: str) -> str:
    return join_key(BASEBACKUPS, backup, *names)


def part_key(backup: str, part_object: str) -> str:
    return join_key(BASEBACKUPS, backup, TAR_FOLDER, part_object)


def part_object_name(number: int, ext: str) -> str:
    return with_extension(f"part_{number:03d}.tar", ext)


def wal_key(name: str) -> str:
    return join_key(WAL, name)


# Extensions stripped from an archived WAL file's object name, whatever codecs the build has: WAL-G's,
# and the trailing dot of v3.0.8's uncompressed keys.
COMPRESSION_EXTENSIONS = (".br", ".gz", ".lz4", ".lzma", ".lzo", ".zst", ".")


def archived_name(object_name: str) -> str:
    """The WAL file name an object of wal_005/ holds: its name without a compression extension."""
    return next((object_name[:-len(e)] for e in COMPRESSION_EXTENSIONS if object_name.endswith(e)), object_name)


def blockmap_key(segment: str) -> str:
    return join_key(BLOCKMAP, segment + ".zst")


def backup_name_from_sentinel(object_name: str) -> str | None:
    if object_name.endswith(SENTINEL_SUFFIX) and "/" not in object_name:
        return object_name[: -len(SENTINEL_SUFFIX)]
    return None


def tar_extension(object_name: str) -> str | None:
    """'part_001.tar.lz4' -> 'lz4'; 'part_001.tar' and WAL-G 3.0.8's 'part_001.tar.' -> ''; not a tar -> None."""
    m = TAR_NAME_RE.search(object_name)
    if m is None:
        return None
    return m.group(1) or ""
