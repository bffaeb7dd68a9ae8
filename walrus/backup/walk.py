"""Walk a data directory the way WAL-G does: lexical order, its exclusions, tablespaces followed."""
from __future__ import annotations

import os
import stat as st
from dataclasses import dataclass, field
from typing import Iterator

from walrus.tar.write import Entry
from walrus.log import log

# WAL-G's ExcludedFilenames, matched on the basename anywhere in the tree. An excluded directory
# is still written as an (empty) directory member; an excluded file is dropped.
EXCLUDED_NAMES = frozenset({
    "log", "pg_log", "pg_xlog", "pg_wal",
    "pgsql_tmp", "postgresql.auto.conf.tmp", "postmaster.pid", "postmaster.opts", "recovery.conf",
    "pg_dynshmem", "pg_notify", "pg_replslot", "pg_serial", "pg_stat_tmp", "pg_snapshots",
    "pg_subtrans", "standby.signal",
})
PG_CONTROL = "pg_control"
PG_CONTROL_MEMBER = "/global/pg_control"


@dataclass
class WalkResult:
    """Filled in as the walk proceeds; complete once the entry iterator is exhausted."""

    tablespaces: dict[str, str] = field(default_factory=dict)  # oid -> real location
    pg_control: Entry | None = None
    data_catalog_size: int = 0  # sum of stat sizes of every walked entry, directories included
    skipped_links: list[str] = field(default_factory=list)


def _entry(path: str, name: str, s: os.stat_result) -> Entry:
    kind = "dir" if st.S_ISDIR(s.st_mode) else "file"
    return Entry(name=name, kind=kind, size=s.st_size if kind == "file" else 0, mode=st.S_IMODE(s.st_mode),
                 mtime_ns=s.st_mtime_ns, uid=s.st_uid, gid=s.st_gid, path=path)


def walk_data_directory(pgdata: str, result: WalkResult) -> Iterator[Entry]:
    """Yield tar entries of PGDATA in WAL-G's order; pg_control is held back in result.pg_control."""
    pgdata = os.path.realpath(pgdata)
    root = os.lstat(pgdata)
    result.data_catalog_size += root.st_size
    yield _entry(pgdata, "/", root)
    yield from _walk_dir(pgdata, "", result)


def _walk_dir(directory: str, rel: str, result: WalkResult) -> Iterator[Entry]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return  # a directory dropped during the backup (a database being dropped)
    for name in names:
        path = os.path.join(directory, name)
        member = f"{rel}/{name}"
        try:
            s = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.S_ISLNK(s.st_mode):
            if rel == "/pg_tblspc":
                yield from _walk_tablespace(path, name, member, result)
            else:
                result.skipped_links.append(member)
                log.warning(f"{path} is a symbolic link outside pg_tblspc; not backed up")
            continue
        if not (st.S_ISDIR(s.st_mode) or st.S_ISREG(s.st_mode)):
            continue  # sockets, fifos
        result.data_catalog_size += s.st_size
        if st.S_ISDIR(s.st_mode):
            yield _entry(path, member, s)
            if name not in EXCLUDED_NAMES:
                yield from _walk_dir(path, member, result)
        elif name == PG_CONTROL:
            control = _entry(path, PG_CONTROL_MEMBER, s)
            result.pg_control = control  # written last, in its own part (the last one seen wins)
        elif name not in EXCLUDED_NAMES:
            yield _entry(path, member, s)


def _walk_tablespace(link: str, oid: str, member: str, result: WalkResult) -> Iterator[Entry]:
    location = os.path.realpath(link)
    try:
        s = os.stat(location)
    except FileNotFoundError:
        log.warning(f"tablespace link {link} points to missing {location}; skipped")
        return
    if not st.S_ISDIR(s.st_mode):
        log.warning(f"tablespace link {link} does not point to a directory; skipped")
        return
    result.tablespaces[oid] = location
    result.data_catalog_size += s.st_size
    yield _entry(location, member, s)
    yield from _walk_dir(location, member, result)
