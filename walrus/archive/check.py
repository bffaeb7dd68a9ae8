"""walrus check: could a restore rely on this host's setup? Settings, storage, ownership, PostgreSQL, archiving."""
from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import socket
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from walrus.config import Settings
from walrus.errors import WalrusError
from walrus.fsutil import group_name, user_name
from walrus.storage.base import Storage
from walrus.wal.stored import candidate_keys

OK, WARN, FAILED, SKIPPED = "ok", "warning", "failed", "skipped"
PROBE_FOLDER = "walrus-check"  # beside basebackups_005/ and wal_005/, which is all WAL-G and walrus list
# What archive_command may run for walrus to be the archiver: walrus, the daemon's client, or
# walrus installed under WAL-G's name.
ARCHIVERS = ("walrus", "walg-daemon-client", "wal-g")
DAEMON_CLIENT = "walg-daemon-client"
POLL = 0.25  # seconds between looks for the switched segment in storage


@dataclass
class Check:
    name: str
    status: str
    detail: str
    hint: str | None = None


@dataclass
class CheckResult:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAILED for c in self.checks)

    def add(self, name: str, status: str, detail: str, hint: str | None = None) -> None:
        self.checks.append(Check(name, status, detail, hint if status in (FAILED, WARN) else None))

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    def render(self) -> str:
        """One line per check (name, status, what was found), and a HINT line under each problem."""
        width = max(len(c.name) for c in self.checks)
        lines = []
        for c in self.checks:
            lines.append(f"{c.name:<{width}}  {c.status:<8}  {c.detail}")
            if c.hint:
                lines.append(f"{'':<{width}}  {'':<8}  HINT: {c.hint}")
        return "\n".join(lines)


def settings_failed(error: WalrusError) -> CheckResult:
    """The result when the settings do not load: nothing else can be checked."""
    result = CheckResult()
    result.add("settings", FAILED, error.message + (f": {error.detail}" if error.detail else ""), error.hint)
    return result


async def check(settings: Settings, storage: Storage, *, timeout: float,
                connect: Callable[[Settings], Any] | None = None) -> CheckResult:
    """Every check, in the order a setup is built; each says what it found and, when wrong, what to do."""
    result = CheckResult()
    _settings(settings, storage, result)
    probe = await _storage(storage, result)
    if probe is not None:
        try:
            _ownership(storage, probe, result)
        finally:
            await _remove_probe(storage, probe, result)
    else:
        result.add("ownership", SKIPPED, "no probe object could be written")
    session = await _postgres(settings, result, connect)
    if session is None:
        result.add("archiving", SKIPPED, "PostgreSQL could not be reached")
        result.add("wal switch", SKIPPED, "PostgreSQL could not be reached")
        return result
    try:
        info = await asyncio.to_thread(session.server_info)
        archiving = _archiving(settings, info, result)
        await _switch(settings, storage, session, info, archiving and probe is not None, timeout, result)
    finally:
        await asyncio.to_thread(session.close)
    return result


def _settings(settings: Settings, storage: Storage, result: CheckResult) -> None:
    path = settings.config_path
    source = f"config {path}" if path and os.path.exists(path) else "no config file (the environment only)"
    result.add("settings", OK, f"{source}; {storage.describe()}, compression {settings.compression_method}, "
                               f"{'encrypted' if settings.crypter is not None else 'not encrypted'}")


async def _storage(storage: Storage, result: CheckResult) -> str | None:
    """Writes and reads back a small probe object; returns its key, or None when that failed."""
    key = f"{PROBE_FOLDER}/probe-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    payload = secrets.token_bytes(4096)
    began = time.monotonic()
    try:
        await storage.put_bytes(key, payload)
    except WalrusError as e:
        result.add("storage", FAILED, f"could not write a probe object: {_said(e)}", e.hint)
        return None
    try:
        back = await storage.get_bytes(key)
    except WalrusError as e:
        result.add("storage", FAILED, f"could not read back a probe object: {_said(e)}", e.hint)
        return key
    if back != payload:
        result.add("storage", FAILED, f"a probe object read back other bytes ({len(back)} of {len(payload)})",
                   "the storage does not return what was written to it: check what stands in between")
    else:
        result.add("storage", OK, f"{storage.describe()}: a probe object written and read back in "
                                  f"{(time.monotonic() - began) * 1000:.0f} ms")
    return key


async def _remove_probe(storage: Storage, key: str, result: CheckResult) -> None:
    try:
        await storage.delete([key])
        left = await storage.exists(key)
    except WalrusError as e:
        result.add("storage delete", FAILED, f"could not delete the probe object {key}: {_said(e)}",
                   e.hint or "retention (walrus delete) needs delete rights on the storage")
        return
    if left:
        result.add("storage delete", FAILED, f"the probe object {key} is still listed after its delete",
                   "retention (walrus delete) needs delete rights on the storage")
    else:
        result.add("storage delete", OK, "the probe object was deleted")


def _ownership(storage: Storage, key: str, result: CheckResult) -> None:
    owner = storage.object_owner(key)
    if owner is None:
        result.add("ownership", SKIPPED, f"{storage.describe()} has no file owners")
        return
    uid, gid, mode = owner
    who = f"{user_name(uid)}:{group_name(gid)} {mode:04o}"
    if uid != os.geteuid() or not mode & stat.S_IRGRP:
        result.add("ownership", FAILED, f"a probe object was written as {who}",
                   "objects must belong to the user walrus runs as and be readable by its group")
    else:
        result.add("ownership", OK, f"objects are written as {who}, readable by group {group_name(gid)}")


async def _postgres(settings: Settings, result: CheckResult, connect):
    if connect is None:
        from walrus.pg.client import PgSession as connect
    try:
        session = await asyncio.to_thread(connect, settings)
        info = await asyncio.to_thread(session.server_info)
    except WalrusError as e:
        result.add("postgresql", FAILED, _said(e), e.hint)
        return None
    role = "a standby" if info.in_recovery else "a primary"
    detail = f"PostgreSQL {info.version_num // 10000}, {role}, data directory {info.data_directory}"
    if settings.pgdata and os.path.realpath(settings.pgdata) != os.path.realpath(info.data_directory):
        result.add("postgresql", FAILED, f"{detail}, but PGDATA is {settings.pgdata}",
                   "backup-push would refuse this server: set PGDATA (or PGHOST/PGPORT) to the same cluster")
    else:
        result.add("postgresql", OK, detail)
    return session


def _archiving(settings: Settings, info, result: CheckResult) -> bool:
    """archive_mode and archive_command send WAL to walrus, and the archiver is not failing."""
    if info.archive_mode == "off":
        status = WARN if info.in_recovery else FAILED
        result.add("archiving", status, "archive_mode = off",
                   "set archive_mode = on (needs a restart) and archive_command to walrus; on a standby, "
                   "the primary must archive")
        return False
    command = info.archive_command.strip()
    if not command:
        what = f"archive_library = {info.archive_library!r}" if info.archive_library else "archive_command is empty"
        result.add("archiving", FAILED, what, "set archive_command = 'walrus wal-push %p' (or the daemon client)")
        return False
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    program = next((w for w in words if os.path.basename(w) in ARCHIVERS), None)
    if program is None:
        result.add("archiving", FAILED, f"archive_command does not run walrus: {command!r}",
                   "set archive_command = 'walrus wal-push %p' (or the daemon client); a reload applies it")
        return False
    if info.archiver_failure:
        result.add("archiving", FAILED, f"the archiver is failing: pg_stat_archiver's last failure is "
                                        f"{info.archiver_failure}, with no success since",
                   "the server log says why archive_command fails")
        return False
    problem, hint = _archiver_setup(settings, words, program)
    if problem:
        result.add("archiving", FAILED, f"{command!r}: {problem}", hint)
        return False
    result.add("archiving", OK, f"archive_mode = {info.archive_mode}, archive_command = {command!r}")
    return True


def _archiver_setup(settings: Settings, words: list[str], program: str) -> tuple[str | None, str | None]:
    """What in archive_command would send WAL elsewhere than this check looked: a missing daemon
    socket, or another config file."""
    after = words[words.index(program) + 1:]
    if os.path.basename(program) == DAEMON_CLIENT:
        sock = after[0] if after else ""
        try:
            is_socket = stat.S_ISSOCK(os.stat(sock).st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            return (f"the daemon's socket {sock} is not there",
                    "enable the daemon: systemctl enable --now walrus-daemon.socket")
        return None, None
    if "--config" in words:
        i = words.index("--config")
        config = words[i + 1] if i + 1 < len(words) else ""
        if settings.config_path and os.path.realpath(config) != os.path.realpath(settings.config_path):
            return (f"it reads {config}, this check read {settings.config_path}",
                    "give both the same --config, or the archive goes where this check did not look")
    return None, None


async def _switch(settings: Settings, storage: Storage, session, info, archiving: bool, timeout: float,
                  result: CheckResult) -> None:
    """A forced segment switch, then the segment looked for in storage until `timeout`."""
    if info.in_recovery:
        result.add("wal switch", SKIPPED, "a standby cannot switch WAL segments (check its primary)")
        return
    if not archiving:
        result.add("wal switch", SKIPPED, "archiving is not set up")
        return
    try:
        name = await asyncio.to_thread(session.switch_wal)
    except WalrusError as e:
        result.add("wal switch", FAILED, f"could not switch WAL: {_said(e)}",
                   "the check's user needs pg_switch_wal (superuser, or GRANT EXECUTE)")
        return
    began = time.monotonic()
    keys = [key for key, _ in candidate_keys(name, settings.compression_method)]
    while True:
        for key in keys:
            if await storage.exists(key):
                result.add("wal switch", OK, f"{name} arrived in storage {time.monotonic() - began:.1f} s "
                                             "after the switch")
                return
        if time.monotonic() - began >= timeout:
            result.add("wal switch", FAILED, f"{name} did not arrive in storage within {timeout:.0f} s of the switch",
                       "pg_stat_archiver and the server log say whether archive_command runs and why it fails")
            return
        await asyncio.sleep(POLL)


def _said(e: WalrusError) -> str:
    detail = " ".join(e.detail.split()) if e.detail else ""  # libpq's messages run over several lines
    return e.message + (f" ({detail})" if detail else "")
