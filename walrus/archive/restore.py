"""restore: a server back at a point in time in one command: the right backup fetched, recovery set up
(recovery.signal, restore_command, the target), and optionally started and followed to the target."""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from walrus.archive import feed
from walrus.backup.fetch import backup_fetch
from walrus.backup.list import BackupInfo, list_backups, load_details
from walrus.config import Settings
from walrus.errors import WalrusError
from walrus.log import log
from walrus.pg.xlog import format_lsn, parse_lsn, segment_of, timeline_from_backup_name
from walrus.storage.base import Storage
from walrus.wal.timelines import ArchivedWal, list_archived

KINDS = ("time", "lsn", "xid", "name", "immediate")
ACTIONS = ("promote", "pause", "shutdown")
PROGRESS_EVERY = 5.0  # seconds between progress lines while recovery runs
STALL_LIMIT = 600.0  # recovery that neither moves nor ends for this long is given up on


class RestoreError(WalrusError):
    pass


@dataclass(frozen=True)
class Target:
    """Where recovery stops: `kind` of KINDS (None: the end of the archive) and its value."""

    kind: str | None = None
    value: str | None = None
    action: str = "promote"

    @property
    def time(self) -> datetime | None:
        return _parse_time(self.value) if self.kind == "time" else None

    @property
    def lsn(self) -> int | None:
        return parse_lsn(self.value) if self.kind == "lsn" else None

    def settings(self) -> dict[str, str]:
        """The recovery_target_* settings (none: recovery runs to the end of the archive)."""
        if self.kind is None:
            return {}
        if self.kind == "immediate":
            return {"recovery_target": "immediate", "recovery_target_action": self.action}
        return {f"recovery_target_{self.kind}": self.value, "recovery_target_action": self.action}


def parse_target(kind: str | None, value: str | None, action: str) -> Target:
    """A target from the command line, checked before anything is read."""
    if kind == "time":
        if _parse_time(value) is None:
            raise RestoreError(f"--target-time {value}: not a time", hint="give an ISO 8601 time with its zone, "
                                                                         "e.g. 2026-12-05T10:30:00+00:00")
    elif kind == "lsn":
        try:
            parse_lsn(value)
        except ValueError as e:
            raise RestoreError(f"--target-lsn {value}: {e}") from None
    elif kind == "xid" and not (value or "").isdigit():
        raise RestoreError(f"--target-xid {value}: not a transaction id", hint="a number, as txid_current() gives")
    return Target(kind, value, action)


@dataclass
class RestoreResult:
    directory: str
    backup: str
    target: Target
    restore_command: str
    fetched: Any = None  # backup-fetch's result
    started: bool = False
    reached: str | None = None  # what --start saw at the end: "promoted", "paused", "shut down"
    replayed_lsn: int | None = None
    fed: int | None = None  # segments recovery took from the WAL feed; None: no feed
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"directory": self.directory, "backup_name": self.backup,
                "target": {"kind": self.target.kind, "value": self.target.value, "action": self.target.action},
                "restore_command": self.restore_command, "fetch": self.fetched.as_json() if self.fetched else None,
                "started": self.started, "reached": self.reached, "wal_fed": self.fed,
                "replayed_lsn": format_lsn(self.replayed_lsn) if self.replayed_lsn is not None else None,
                "seconds": round(self.seconds, 3)}


async def restore(settings: Settings, storage: Storage, directory: str, target: Target, *, restore_command: str,
                  backup: str | None = None, extra: dict[str, str] | None = None, start: bool = False,
                  say: Callable[[str], None] = log.info) -> RestoreResult:
    """Phases: choose (the newest backup that can reach the target, checked against the archive,
    before anything is written); fetch (backup-fetch into `directory`); configure (recovery.signal,
    restore_command, the target and `extra` into postgresql.auto.conf); start (with `start`: the
    server started and followed until recovery reaches the target, the WAL fed ahead of it)."""
    began = time.monotonic()
    chosen, archived = await _choose(settings, storage, target, backup)
    say(f"restoring {chosen.name} (finished {chosen.metadata.finish_time.isoformat()}, "
        f"LSN {format_lsn(chosen.metadata.finish_lsn)}) into {directory}")
    result = RestoreResult(directory, chosen.name, target, restore_command)
    result.fetched = await backup_fetch(settings, storage, directory, chosen.name)
    _configure(directory, target, restore_command, extra or {})
    if start:
        result.started = True
        feeder = _feeder(settings, storage, directory, chosen, archived)
        feeding = asyncio.ensure_future(feeder.run()) if feeder is not None else None
        try:
            result.reached, result.replayed_lsn = await asyncio.to_thread(_start_and_follow, directory, target, say)
        finally:
            if feeding is not None:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
        if feeder is not None:  # (after a failure the server may still be recovering: the feed stays)
            result.fed = feeder.fed - feed.waiting(feed.location(directory))
            feed.remove(directory)
    result.seconds = time.monotonic() - began
    return result


# -- choose --------------------------------------------------------------------------------------

async def _choose(settings: Settings, storage: Storage, target: Target,
                  name: str | None) -> tuple[BackupInfo, ArchivedWal]:
    """The newest backup that finished before the target (time, LSN); the newest of all where the
    metadata cannot tell (xid, name, immediate, the end of the archive). Its WAL from its start to
    its finish, and to a target LSN, must be in the archive (returned as listed)."""
    backups = await list_backups(storage)
    if not backups:
        raise RestoreError("there are no backups to restore", hint="take one with backup-push")
    backups = await load_details(storage, backups)  # oldest first, by start time
    if name is not None:
        picked = [b for b in backups if b.name == name]
        if not picked:
            raise RestoreError(f"backup {name} was not found", hint="backup-list shows the backups")
        candidates = picked
    else:
        candidates = backups
    when, lsn = target.time, target.lsn
    if when is not None:
        reachable = [b for b in candidates if b.metadata.finish_time <= when]
        if not reachable:
            oldest = min(candidates, key=lambda b: b.metadata.finish_time)
            raise RestoreError(f"no backup can reach {target.value}: it is before every backup's end",
                               detail=f"the oldest backup, {oldest.name}, finished at "
                                      f"{oldest.metadata.finish_time.isoformat()}",
                               hint="recovery can stop only after the backup it starts from is consistent")
        candidates = reachable
    if lsn is not None:
        reachable = [b for b in candidates if b.metadata.finish_lsn <= lsn]
        if not reachable:
            raise RestoreError(f"no backup can reach LSN {target.value}: it is before every backup's end",
                               detail=f"the oldest backup ends at {format_lsn(min(b.metadata.finish_lsn for b in candidates))}")
        candidates = reachable
    chosen = max(candidates, key=lambda b: (b.metadata.finish_lsn, b.metadata.finish_time))
    return chosen, await _check_archive(settings, storage, chosen, lsn)


async def _check_archive(settings: Settings, storage: Storage, chosen: BackupInfo, lsn: int | None) -> ArchivedWal:
    """The WAL the backup needs to become consistent, and up to a target LSN, is archived (on the
    backup's timeline or one after it): else recovery could not get there, and nothing is restored."""
    size = settings.segment_size
    archived = await list_archived(storage, size)
    timeline = timeline_from_backup_name(chosen.name)
    first = segment_of(max(chosen.metadata.start_lsn - 1, 0), size)
    last = segment_of(max(max(chosen.metadata.finish_lsn, lsn or 0) - 1, 0), size)
    missing = [s for s in range(first, last + 1)
               if not any(archived.has(t, s) for t in archived.segments if t >= timeline)]
    if missing:
        what = "its WAL" if lsn is None or segment_of(chosen.metadata.finish_lsn - 1, size) >= missing[0] \
            else f"the WAL up to {format_lsn(lsn)}"
        raise RestoreError(f"backup {chosen.name} cannot be recovered: {what} is not all archived",
                           detail=f"{len(missing)} segment(s) missing from the archive, the first at segment "
                                  f"number {missing[0]:X} (wal-verify and wal-show show the gaps)",
                           hint="choose an earlier target, or another backup (--backup)")
    return archived


def _feeder(settings: Settings, storage: Storage, directory: str, chosen: BackupInfo,
            archived: ArchivedWal) -> feed.Feed | None:
    """The WAL feed (archive.feed) of the segments from the backup's start to the end of its timeline
    in the archive, as listed when the backup was chosen; None where recovery may leave that timeline
    (a newer one is archived), so that what it would ask for is not what the feed holds."""
    timeline = timeline_from_backup_name(chosen.name)
    if archived.highest_timeline() != timeline:
        return None
    first = last = segment_of(chosen.metadata.start_lsn, settings.segment_size)
    while archived.has(timeline, last + 1):
        last += 1
    return feed.Feed(settings, storage, directory, timeline, first, last)


# -- configure -----------------------------------------------------------------------------------

def _configure(directory: str, target: Target, restore_command: str, extra: dict[str, str]) -> None:
    """recovery.signal, and restore_command, the target and `extra` appended to postgresql.auto.conf
    (its later lines win over the backup's own)."""
    lines = {"restore_command": restore_command, **target.settings(), **extra}
    with open(os.path.join(directory, "postgresql.auto.conf"), "a") as f:
        f.write("# walrus restore\n" + "".join(f"{k} = {_quote(v)}\n" for k, v in lines.items()))
    open(os.path.join(directory, "recovery.signal"), "w").close()
    # a backup of a standby taken over the replication protocol by WAL-G holds its standby.signal, which
    # would override recovery.signal: the server would wait for more WAL forever instead of reaching the target
    standby = os.path.join(directory, "standby.signal")
    if os.path.exists(standby):
        os.unlink(standby)
        log.info("removed the backup's standby.signal: the restored server recovers to the target, not as a standby")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# -- start and follow ----------------------------------------------------------------------------

def _start_and_follow(directory: str, target: Target, say: Callable[[str], None]) -> tuple[str, int | None]:
    """Start the server on the restored directory and follow recovery until it reaches the target
    (promoted, paused, or shut down, as the target's action says; promoted at the end of the archive
    without one). Fails when the server exits otherwise, or when recovery stalls STALL_LIMIT seconds."""
    pg_ctl = _pg_ctl(directory)
    log_path = os.path.join(directory, "walrus-restore.log")
    started = subprocess.run([pg_ctl, "-D", directory, "-l", log_path, "-W", "start"], capture_output=True, text=True)
    if started.returncode != 0:
        raise RestoreError("the restored server did not start", detail=(started.stderr or started.stdout).strip(),
                           hint=f"see {log_path}")
    action = target.action if target.kind is not None else "promote"
    last_lsn, moved, reported = None, time.monotonic(), 0.0
    pid_file = os.path.join(directory, "postmaster.pid")
    launched = time.monotonic()
    while not os.path.exists(pid_file):  # pg_ctl -W returns before the postmaster writes it
        if time.monotonic() - launched > 60:
            raise RestoreError("the restored server did not start within 60 s", detail=_tail(log_path),
                               hint=f"see {log_path}")
        time.sleep(0.05)
    while True:
        state = _ask(directory)
        if state is None:
            if not os.path.exists(pid_file):
                if action == "shutdown":
                    say("recovery reached the target; the server shut down, as asked")
                    return "shut down", last_lsn
                raise RestoreError("the restored server stopped during recovery", detail=_tail(log_path),
                                   hint=f"see {log_path}")
        else:
            in_recovery, paused, lsn = state
            if lsn is not None and lsn != last_lsn:
                last_lsn, moved = lsn, time.monotonic()
            if not in_recovery:
                say(f"recovery done at {format_lsn(last_lsn) if last_lsn else '?'}: the server is promoted")
                return "promoted", last_lsn
            if paused and action == "pause":
                say(f"recovery reached the target and paused at {format_lsn(last_lsn)}")
                return "paused", last_lsn
            if time.monotonic() - reported >= PROGRESS_EVERY:
                reported = time.monotonic()
                say(f"recovering: replayed up to {format_lsn(last_lsn) if last_lsn else '(not yet consistent)'}")
        if time.monotonic() - moved > STALL_LIMIT:
            raise RestoreError(f"recovery made no progress for {STALL_LIMIT:.0f} s", detail=_tail(log_path),
                               hint="check restore_command in the server log; the server is left running")
        time.sleep(0.2)


def _ask(directory: str) -> tuple[bool, bool, int | None] | None:
    """(in recovery, replay paused, last replayed LSN) from the server, or None while it does not answer."""
    try:
        with open(os.path.join(directory, "postmaster.pid")) as f:
            lines = f.read().splitlines()
        port, sockdir = lines[3], lines[4]
    except (OSError, IndexError):
        return None
    import psycopg

    try:
        with psycopg.connect(host=sockdir or "localhost", port=port, dbname="postgres", connect_timeout=5,
                             autocommit=True, application_name="walrus restore") as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN "
                               "pg_get_wal_replay_pause_state() <> 'not paused' END, "
                               "coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text").fetchone()
    except psycopg.Error:
        return None
    return bool(row[0]), bool(row[1]), parse_lsn(row[2]) if row[2] else None


def _pg_ctl(directory: str) -> str:
    """The pg_ctl of the restored data directory's major version (Debian's layout first, then PATH)."""
    try:
        major = open(os.path.join(directory, "PG_VERSION")).read().strip()
    except OSError:
        major = ""
    for candidate in (f"/usr/lib/postgresql/{major}/bin/pg_ctl", f"/usr/pgsql-{major}/bin/pg_ctl"):
        if major and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("pg_ctl")
    if found is None:
        raise RestoreError("pg_ctl was not found", hint="install PostgreSQL's server package, or start the "
                                                        "server yourself (restore without --start)")
    return found


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.strip().replace(" ", "T", 1).replace("z", "Z"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None  # a zone is required: the server's own may differ from ours


def command_for(walrus: str, config_path: str | None, daemon_socket: str | None, fed: bool = False) -> str:
    """restore_command for the restored server: the daemon's client where one serves, else wal-fetch;
    `fed` (restore --start) puts the feed's rename of a fed segment first."""
    program = walrus if " " in walrus else shlex.quote(walrus)  # "python -m walrus" stays as given
    prefix = feed.feed_prefix() if fed else ""
    if daemon_socket:
        return f"{prefix}{program} daemon-client {shlex.quote(daemon_socket)} wal-fetch %f %p"
    config = f" --config {shlex.quote(config_path)}" if config_path else ""
    return f"{prefix}{program}{config} wal-fetch %f %p"
