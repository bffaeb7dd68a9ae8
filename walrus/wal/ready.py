"""pg_wal's archive status: the .ready segments, marking them .done, and WAL-G's background-upload markers."""
from __future__ import annotations

import os

from walrus.log import log
from walrus.pg.segname import is_segment_name

READY, DONE = ".ready", ".done"
# WAL-G's marker folder under pg_wal: an empty file per segment its background uploader stored
# durably that PostgreSQL has not asked for yet (WAL-G's walg_data/walg_archive_status).
MARKER_DIR = os.path.join("walg_data", "walg_archive_status")


def status_dir(wal_dir: str) -> str:
    return os.path.join(wal_dir, "archive_status")


def ready_segments(status: str) -> list[str]:
    """The WAL segments PostgreSQL has marked .ready, lowest name first (the order its archiver asks
    in). Segment names only: .history, .backup and .partial files are left to PostgreSQL."""
    try:
        with os.scandir(status) as entries:
            names = [e.name[:-len(READY)] for e in entries if e.name.endswith(READY)]
    except FileNotFoundError:  # a file pushed from outside a pg_wal: nothing beside it is ready
        return []
    except OSError as e:
        log.warning(f"cannot list {status}: {e.strerror or e}")
        return []
    return sorted(n for n in names if is_segment_name(n))


def mark_done(status: str, name: str, who: str) -> bool:
    """Rename `name`'s .ready to .done, as PostgreSQL does after archive_command succeeds, so its
    archiver skips the segment (it checks that the .ready is still there before each call).

    Invariant: only for a segment that is durably stored, while PostgreSQL's archiver cannot be
    archiving it itself. Returns True if PostgreSQL will not ask for it now (renamed, or its .ready
    gone already); a failure is a warning: it stays .ready and PostgreSQL asks for it as usual."""
    path = os.path.join(status, name)
    try:
        os.rename(path + READY, path + DONE)
    except FileNotFoundError:  # PostgreSQL archived it meanwhile (a retry), or it is gone
        return True
    except OSError as e:
        log.warning(f"{who}: cannot mark {name} archived in {status}: {e.strerror or e}")
        return False
    log.debug(f"{who}: marked {name} archived (.done)")
    return True


def marker(wal_dir: str, name: str) -> str:
    return os.path.join(wal_dir, MARKER_DIR, name)


def is_marked(wal_dir: str, name: str) -> bool:
    """Whether a marker vouches for the segment file as it is now: the marker is at least as new as
    the file's last write. An older one was left for an earlier file of that name (a recycled or
    rewritten segment) and vouches for nothing. Anything unreadable vouches for nothing either, so
    the worst a bad marker costs is a push, which finds identical bytes archived."""
    try:
        return os.stat(marker(wal_dir, name)).st_mtime_ns >= os.stat(os.path.join(wal_dir, name)).st_mtime_ns
    except OSError:
        return False


def mark_uploaded(wal_dir: str, name: str) -> None:
    """Leave WAL-G's marker for a segment just stored durably, so PostgreSQL's call for it returns at
    once. Not fsynced: a marker lost in a crash costs one push, which finds identical bytes archived."""
    path = marker(wal_dir, name)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.utime(fd)  # a marker left over from an older file of this name must vouch for this one
        finally:
            os.close(fd)
    except OSError as e:
        log.warning(f"cannot mark {name} as uploaded in {os.path.dirname(path)}: {e.strerror or e}; "
                    "PostgreSQL's wal-push for it compares it with the archived copy instead")


def take_marker(wal_dir: str, name: str) -> bool:
    """Remove `name`'s marker, if any (PostgreSQL is asking for the segment now, as WAL-G unmarks);
    returns whether it vouched for the file (see is_marked)."""
    vouched = is_marked(wal_dir, name)
    try:
        os.unlink(marker(wal_dir, name))
    except FileNotFoundError:
        return False  # none (the common case), or taken meanwhile: the file is pushed, which is always safe
    except OSError as e:
        log.warning(f"cannot remove the marker of {name} in {os.path.join(wal_dir, MARKER_DIR)}: {e.strerror or e}")
    if not vouched:
        log.info(f"the marker of {name} is older than the file (left for an earlier file of that name); "
                 "pushing it as usual")
    return vouched
