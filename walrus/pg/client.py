"""The PostgreSQL session backup-push holds: facts about the server, backup start and stop."""
from __future__ import annotations

from dataclasses import dataclass

from walrus.config import Settings
from walrus.errors import BackupError
from walrus.pg.libpq import Session, SessionError
from walrus.pg.xlog import parse_lsn


@dataclass(frozen=True)
class ServerInfo:
    data_directory: str
    version_num: int
    system_identifier: int
    segment_size: int
    in_recovery: bool
    archive_mode: str
    archive_command: str
    archive_library: str = ""  # PostgreSQL 15's archive module ("" before 15, or none)
    archiver_failure: str | None = None  # pg_stat_archiver's last failure, when none has succeeded since


@dataclass(frozen=True)
class BackupStart:
    lsn: int
    timeline: int


@dataclass(frozen=True)
class BackupStop:
    lsn: int
    label: str
    tablespace_map: str


def conninfo_kwargs(settings: Settings) -> dict:
    """libpq parameters from the settings table; libpq reads the rest (PGSSLMODE...) from the environment."""
    kw = {"host": settings.pg_host, "port": settings.pg_port, "user": settings.pg_user,
          "dbname": settings.pg_database, "password": settings.pg_password}
    return {k: v for k, v in kw.items() if v is not None}


class PgSession:
    """One connection, held for the whole backup: a non-exclusive backup ends with its session."""

    def __init__(self, settings: Settings, binding: str | None = None):
        try:
            self._session = Session(conninfo_kwargs(settings), binding)
        except SessionError as e:
            raise BackupError("could not connect to PostgreSQL", detail=str(e),
                              hint="set PGHOST/PGPORT/PGUSER/PGDATABASE (and PGPASSWORD or ~/.pgpass)") from None

    @property
    def sql(self) -> Session:
        """The session's connection, for other statements than the backup's (the catalog that
        partial restore records, read once the backup has stopped)."""
        return self._session

    def _one(self, sql: str, params: tuple = ()) -> tuple:
        """The statement's one row, its values as text."""
        try:
            return self._session.one(sql, params)
        except SessionError as e:
            raise BackupError("PostgreSQL refused a backup query", detail=f"{sql}: {e}",
                              hint="the backup user needs pg_backup_start/pg_backup_stop rights "
                                   "(superuser or GRANT EXECUTE) and pg_read_all_settings") from None

    def server_info(self) -> ServerInfo:
        row = self._one(
            "SELECT current_setting('data_directory'), current_setting('server_version_num')::int,"
            " (SELECT system_identifier FROM pg_control_system()),"
            " (SELECT bytes_per_wal_segment FROM pg_control_init()),"
            " pg_is_in_recovery(), current_setting('archive_mode'), current_setting('archive_command'),"
            " coalesce(current_setting('archive_library', true), ''),"
            " (SELECT last_failed_wal || ' at ' || last_failed_time::text FROM pg_stat_archiver"
            "  WHERE last_failed_time > coalesce(last_archived_time, '-infinity'))")
        directory, version, system_identifier, segment_size, in_recovery, mode, command, library, failure = row
        return ServerInfo(directory, int(version), int(system_identifier), int(segment_size), in_recovery == "t",
                          mode, command, library, failure)

    def backup_start(self, label: str, version_num: int) -> BackupStart:
        if version_num >= 150000:
            sql = "SELECT pg_backup_start($1, true)::text"
        elif version_num >= 100000:
            sql = "SELECT pg_start_backup($1, true, false)::text"
        else:
            raise BackupError(f"PostgreSQL {version_num} is too old", hint="walrus supports PostgreSQL 10 and later")
        (lsn_text,) = self._one(sql, (label,))
        (timeline,) = self._one("SELECT timeline_id FROM pg_control_checkpoint()")
        return BackupStart(parse_lsn(lsn_text), int(timeline))

    def backup_stop(self, version_num: int, wait_for_archive: bool = True) -> BackupStop:
        fn = "pg_backup_stop($1)" if version_num >= 150000 else "pg_stop_backup(false, $1)"
        label, spcmap, lsn_text = self._one(f"SELECT labelfile, spcmapfile, lsn::text FROM {fn}",
                                            ("true" if wait_for_archive else "false",))
        return BackupStop(parse_lsn(lsn_text), label or "", spcmap or "")

    def wal_position(self) -> tuple[int, int, int]:
        """(timeline, LSN, WAL segment size) of the server now: a primary's write position on its
        timeline; a standby's last WAL received (else replayed) on its last checkpoint's timeline."""
        in_recovery, segment_size, checkpoint_timeline = self._one(
            "SELECT pg_is_in_recovery(), (SELECT bytes_per_wal_segment FROM pg_control_init()),"
            " (SELECT timeline_id FROM pg_control_checkpoint())")
        if in_recovery == "f":
            lsn_text, name = self._one("SELECT lsn::text, pg_walfile_name(lsn) FROM pg_current_wal_lsn() AS lsn")
            return int(name[:8], 16), parse_lsn(lsn_text), int(segment_size)
        (lsn_text,) = self._one("SELECT coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text")
        if lsn_text is None:
            raise BackupError("the standby reports no WAL position yet",
                              hint="give the position with --lsn and --timeline")
        return int(checkpoint_timeline), parse_lsn(lsn_text), int(segment_size)

    def switch_wal(self) -> str:
        """Close the current WAL segment so the archiver takes it; returns its name. A restore point
        first makes sure there is WAL to close (an idle server's switch would close nothing)."""
        try:
            self._one("SELECT pg_create_restore_point('walrus check')")
        except BackupError:
            pass  # not granted: the switch alone still closes any WAL written since the last one
        (name,) = self._one("SELECT pg_walfile_name(pg_switch_wal())")
        return str(name)

    def timeline(self) -> int:
        (timeline,) = self._one("SELECT timeline_id FROM pg_control_checkpoint()")
        return int(timeline)

    def close(self) -> None:
        self._session.close()
