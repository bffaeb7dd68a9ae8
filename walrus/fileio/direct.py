"""How walrus opens the files it backs up: O_DIRECT and O_NOATIME where allowed, and the read lengths O_DIRECT needs."""
from __future__ import annotations

import errno
import os

from walrus.errors import BackupError

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


DIO_ALIGN = 512  # logical block size O_DIRECT needs for offsets and lengths (tar keeps its offsets to it)


def open_for_backup(path: str, direct: bool) -> tuple[int, bool] | None:
    """Open a data file, with O_DIRECT if asked and allowed; None when it vanished since the walk.

    O_NOATIME needs ownership of the file and O_DIRECT a filesystem that supports it (tmpfs does
    not): each is dropped when refused. A file that vanished is normal under a running PostgreSQL.
    """
    attempts = [(_OPEN_FLAGS | os.O_NOATIME | os.O_DIRECT, True), (_OPEN_FLAGS | os.O_DIRECT, True)] if direct else []
    attempts += [(_OPEN_FLAGS | os.O_NOATIME, False), (_OPEN_FLAGS, False)]
    for flags, is_direct in attempts:
        try:
            return os.open(path, flags), is_direct
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EINVAL):
                raise BackupError(f"could not open {path} for the backup", detail=e.strerror,
                                  hint="run walrus as the PostgreSQL server's OS user") from None
    raise BackupError(f"could not open {path} for the backup", detail="permission denied",
                      hint="run walrus as the PostgreSQL server's OS user")


def dio_length(n: int, direct: bool) -> int:
    """Length to ask for: O_DIRECT reads whole blocks; the extra lands in tar padding or buffer slack."""
    return n if not direct else n + (-n % DIO_ALIGN)
