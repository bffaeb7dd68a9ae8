"""What both backup-push engines share (local files, a BASE_BACKUP stream): the result, server checks, the WAL."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from walrus.config import Settings
from walrus.errors import BackupError, ConfigError
from walrus.log import log
from walrus.pg.xlog import format_lsn, segment_of, wal_file_name


@dataclass
class BackupPushResult:
    name: str
    start_lsn: int
    finish_lsn: int
    uncompressed_size: int
    compressed_size: int
    parts: list[str]
    files: int
    seconds: float
    reader: str
    storage: str
    delta_from: str | None = None  # the base of a delta backup
    delta_method: str | None = None  # a delta's: "block map" or "page scan"
    corrupt_blocks: dict[str, list[int]] | None = None  # --verify: {file: blocks that failed}; None: not verified

    def as_json(self) -> dict[str, Any]:
        return {"backup_name": self.name, "start_lsn": format_lsn(self.start_lsn),
                "finish_lsn": format_lsn(self.finish_lsn), "uncompressed_size": self.uncompressed_size,
                "compressed_size": self.compressed_size, "parts": self.parts, "files": self.files,
                "seconds": round(self.seconds, 3), "reader": self.reader, "storage": self.storage,
                "delta_from": self.delta_from, "delta_method": self.delta_method,
                **({} if self.corrupt_blocks is None else {"corrupt_blocks": self.corrupt_blocks})}


def archiving_applies(info) -> bool:
    """When pg_backup_stop(wait_for_archive => true) would wait: archiving on for this server's role."""
    return info.archive_mode == "always" or (info.archive_mode == "on" and not info.in_recovery)


def backup_wal_files(timeline: int, start_lsn: int, stop_lsn: int, segment_size: int) -> list[str]:
    """The backup history file and the WAL segments a restore of this backup needs, first to last."""
    start_segment = wal_file_name(timeline, segment_of(start_lsn, segment_size), segment_size)
    history = f"{start_segment}.{start_lsn % segment_size:08X}.backup"
    return [history] + [wal_file_name(timeline, segno, segment_size)
                        for segno in range(segment_of(start_lsn, segment_size), segment_of(stop_lsn - 1, segment_size) + 1)]


def check_server_settings(info, settings: Settings, archive_check: bool) -> None:
    """What any backup of this server needs, local or streamed: its WAL segment size is the settings',
    and its WAL is archived (check_archiving)."""
    if info.segment_size != settings.segment_size:
        raise ConfigError("WAL segment size mismatch",
                          detail=f"the server uses {info.segment_size >> 20} MiB segments, "
                                 f"WALG_PG_WAL_SIZE is {settings.pg_wal_size}",
                          hint=f"set WALG_PG_WAL_SIZE={info.segment_size >> 20}")
    check_archiving(info, archive_check)


def check_archiving(info, archive_check: bool) -> None:
    """A backup is restorable only with the WAL written while it ran: refuse (without archive_check:
    warn) when a primary does not archive, or when the archiver's last attempt failed."""
    if info.archive_mode == "off" or not (info.archive_command.strip() or info.archive_library.strip()):
        if info.in_recovery:  # a standby's primary may archive the WAL: not this server's to tell
            return
        message = "WAL archiving is off: this backup could not be restored"
        detail = (f"archive_mode = {info.archive_mode}, archive_command = {info.archive_command!r}"
                  f"{', archive_library = ' + repr(info.archive_library) if info.archive_library else ''}")
        fix = "set archive_mode = on and archive_command = 'walrus wal-push %p' (archive_mode needs a restart)"
    elif info.archiver_failure and archiving_applies(info):
        message = "the WAL archiver is failing: this backup's WAL might never be archived"
        detail = f"pg_stat_archiver's last failure: {info.archiver_failure}, and no success since"
        fix = "the server log says why archive_command fails; fix it"
    else:
        return
    if archive_check:
        raise BackupError(message, detail=detail, hint=f"{fix}, or pass --no-archive-check to take the backup anyway")
    log.warning(f"{message} ({detail}); going on, as --no-archive-check asks")
