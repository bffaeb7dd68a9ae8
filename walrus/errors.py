"""PostgreSQL-style errors (message, detail, hint) and the one table that maps them to exit codes."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_NOT_FOUND = 74  # EX_IOERR: what WAL-G returns for a WAL segment absent from the archive


class WalrusError(Exception):
    """A failure the user should read: what failed, why (detail), what to do (hint)."""

    exit_code = EXIT_FAILURE
    quiet = False  # quiet errors print one line, no DETAIL/HINT (wal-fetch of a missing segment)

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint

    def render(self) -> str:
        lines = [f"ERROR: {self.message}"]
        if not self.quiet:
            if self.detail:
                lines.append(f"DETAIL: {self.detail}")
            if self.hint:
                lines.append(f"HINT: {self.hint}")
        return "\n".join(lines)


class ConfigError(WalrusError):
    """A setting is missing, malformed or unusable; raised before any work starts."""


class StorageError(WalrusError):
    """The storage backend failed (I/O error, permission, network)."""


class ObjectNotFound(StorageError):
    """The storage answered that it has no object under the requested key (never a guess: a storage
    that cannot be reached or read raises a plain StorageError)."""

    def __init__(self, key: str):
        super().__init__(f"object {key!r} not found in storage")
        self.key = key


class StorageMissing(StorageError):
    """The storage itself is not there (a file storage's root folder): nothing can be read from it,
    and the first write creates it."""


class ObjectExists(StorageError):
    """An exclusive put found an object already under its key; nothing was replaced."""

    def __init__(self, key: str):
        super().__init__(f"object {key!r} already exists in storage")
        self.key = key


class ArchiveNotFound(WalrusError):
    """wal-fetch: no object under any extension; PostgreSQL reads the exit code as 'not archived'."""

    exit_code = EXIT_NOT_FOUND
    quiet = True


class CorruptObject(WalrusError):
    """An object's bytes are not what its name promises (bad framing, bad tar, hostile member)."""


class BackupError(WalrusError):
    """backup-push or backup-fetch cannot proceed (PostgreSQL refused, target not empty, ...)."""


class Stopped(WalrusError):
    """SIGTERM or SIGINT stopped the command; what was in progress was abandoned and cleaned up."""

    def __init__(self, signum: int, name: str):
        super().__init__(f"stopped by {name} before finishing",
                         detail="what was in progress was abandoned; nothing partial is left in storage",
                         hint="run the command again")
        self.signum = signum


class WalOverwriteError(WalrusError):
    """wal-push found different bytes already archived under the same name."""
