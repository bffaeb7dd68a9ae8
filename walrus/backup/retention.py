"""Retention planning, pure: which backups and which WAL a `delete` removes, and why each one stays.

WAL-G's rules (delete retain/before/everything/target/garbage), with its sharp edges made safe:
the newest complete backup is never deleted by retain or before; a kept backup's delta chain is
kept whole; permanent backups are skipped, with their own WAL; WAL is compared by segment number
on every timeline, so no kept backup ever loses WAL it needs to recover (docs/WALG_COMPAT.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

from walrus.errors import WalrusError
from walrus.log import log
from walrus.pg.xlog import parse_wal_file_name, segment_of

MODIFIERS = ("FULL", "FIND_FULL")
_TOKEN_RE = re.compile(r"[0-9A-F]{24}")  # WAL-G's rule: the first 24 uppercase hex digits of a name
HISTORY_RE = re.compile(r"([0-9A-F]{8})\.history(?:\.|$)")


class RetentionError(WalrusError):
    """A delete that cannot be planned as asked (bad arguments, a permanent or incremental target)."""


# -- the backups a plan is made of ----------------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    """What the planner knows of one complete backup (one with a sentinel)."""

    name: str
    time: datetime  # the ordering time: sentinel LastModified, or start_time with --use-sentinel-time
    timeline: int
    start_segno: int  # the segment its name starts from
    finish_segno: int | None = None  # the segment holding finish_lsn - 1 (None: unknown)
    permanent: bool = False
    delta_from: str | None = None  # direct base of a delta
    delta_full: str | None = None  # the full backup at the root of its chain
    user_data: Any = None

    @property
    def is_full(self) -> bool:
        return self.delta_from is None


def wal_token(name: str, segment_size: int) -> tuple[int, int] | None:
    """(timeline, segno) of the first 24-hex-digit run in a name, as WAL-G reads object names."""
    m = _TOKEN_RE.search(name)
    if m is None:
        return None
    try:
        return parse_wal_file_name(m.group(0), segment_size)
    except ValueError:
        return None


def segment_range(start_lsn: int, finish_lsn: int, segment_size: int) -> tuple[int, int]:
    """The segments a backup's WAL spans, from the one holding start_lsn - 1 to finish_lsn - 1."""
    return segment_of(max(start_lsn - 1, 0), segment_size), segment_of(max(finish_lsn - 1, 0), segment_size)


# -- what the user asked for ----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One parsed `delete` command line (WAL-G's grammar)."""

    mode: str  # retain, before, everything, target, garbage
    modifier: str | None = None  # FULL, FIND_FULL, FORCE, ARCHIVES, BACKUPS
    count: int | None = None  # retain N
    after: str | None = None  # retain --after: a time or a backup name
    before: str | None = None  # before: a time or a backup name
    target: str | None = None  # target NAME
    user_data: Any = None  # target --target-user-data (parsed JSON)
    use_sentinel_time: bool = False

    def describe(self) -> str:
        words = [self.mode]
        words += [self.modifier] if self.modifier else []
        words += [str(self.count)] if self.count is not None else []
        words += [self.before] if self.before is not None else []
        words += [self.target] if self.target is not None else []
        words += ["--after", self.after] if self.after is not None else []
        return " ".join(words)


_USAGE = {
    "retain": "delete retain [FULL|FIND_FULL] N [--after TIME|NAME]",
    "before": "delete before [FIND_FULL] TIME|NAME",
    "everything": "delete everything [FORCE]",
    "target": "delete target [FIND_FULL] NAME | delete target [FIND_FULL] --target-user-data JSON",
    "garbage": "delete garbage [ARCHIVES|BACKUPS]",
}


def parse_request(args: Sequence[str], *, after: str | None = None, user_data: Any = None,
                  use_sentinel_time: bool = False) -> Request:
    """WAL-G's `delete` arguments, checked strictly (where WAL-G panics or guesses, this says why)."""
    if not args:
        raise RetentionError("delete needs a mode", hint="; ".join(_USAGE.values()))
    mode, rest = args[0], list(args[1:])
    if mode not in _USAGE:
        raise RetentionError(f"unknown delete mode {mode!r}", hint="; ".join(_USAGE.values()))

    def bad(why: str) -> RetentionError:
        return RetentionError(f"delete {mode}: {why}", hint=f"usage: {_USAGE[mode]}")

    if after is not None and mode != "retain":
        raise bad("--after only applies to retain")
    if user_data is not None and mode != "target":
        raise bad("--target-user-data only applies to target")
    modifier = None
    if mode == "retain":
        if rest and rest[0] in MODIFIERS:
            modifier = rest.pop(0)
        elif len(rest) == 2 and rest[1].isdigit() and not rest[0].lstrip("-").isdigit():
            # WAL-G reads any other first word as FIND_FULL (`retain Full 5` in cron lines): so does
            # walrus, which a drop-in must, but it says so
            log.warning(f"delete retain: {rest[0]!r} is neither FULL nor FIND_FULL; read as FIND_FULL, as WAL-G "
                        "reads it (write FULL for full backups only)")
            modifier = "FIND_FULL"
            rest.pop(0)
        if len(rest) != 1:
            raise bad("expected [FULL|FIND_FULL] and one retention count")
        try:
            count = int(rest[0])
        except ValueError:
            raise bad(f"expected a number as the retention count, got {rest[0]!r}") from None
        if count < 1:
            raise bad("cannot retain fewer than one backup (delete everything deletes them all)")
        if after is not None:
            _check_not_future(after, "--after")
        return Request(mode, modifier, count=count, after=after, use_sentinel_time=use_sentinel_time)
    if mode == "before":
        if rest and rest[0] in MODIFIERS:
            modifier = rest.pop(0)
            if modifier == "FULL":
                raise bad("FULL is not a modifier of before (FIND_FULL is)")
        if len(rest) != 1:
            raise bad("expected one backup name or time")
        _check_not_future(rest[0], "before")
        return Request(mode, modifier, before=rest[0], use_sentinel_time=use_sentinel_time)
    if mode == "everything":
        if rest not in ([], ["FORCE"]):
            raise bad("the only argument everything takes is FORCE")
        return Request(mode, rest[0] if rest else None)
    if mode == "target":
        if rest and rest[0] == "FIND_FULL":
            modifier = rest.pop(0)
        if len(rest) > 1 or (rest and rest[0] in MODIFIERS):
            raise bad("expected one backup name")
        if rest and user_data is not None:
            raise bad("give a backup name or --target-user-data, not both")
        if not rest and user_data is None:
            raise bad("expected a backup name or --target-user-data")
        return Request(mode, modifier, target=rest[0] if rest else None, user_data=user_data,
                       use_sentinel_time=use_sentinel_time)
    # garbage
    if rest not in ([], ["ARCHIVES"], ["BACKUPS"]):
        raise bad("the only arguments garbage takes are ARCHIVES or BACKUPS")
    return Request(mode, rest[0] if rest else None)


def parse_time(text: str) -> datetime | None:
    """An RFC 3339 time (a zone is required, as in WAL-G), or None if text is not one (then it is a name)."""
    if "T" not in text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _check_not_future(text: str, what: str) -> None:
    t = parse_time(text)
    if t is not None and t > datetime.now(timezone.utc):
        raise RetentionError(f"delete {what} {text}: the time is in the future",
                             hint="give a past time (RFC 3339 with a zone, e.g. 2026-01-31T00:00:00Z) or a backup name")


# -- the plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one delete removes. Backups go sentinel first, then their folders; WAL goes last."""

    request: Request
    delete: list[Backup] = field(default_factory=list)  # oldest first
    keep: list[tuple[Backup, str]] = field(default_factory=list)  # with the reason each stays
    wal_cut: int | None = None  # delete WAL whose segment number is below this (None: no WAL rule)
    wal_all: bool = False  # everything: every WAL object goes
    history_below: int | None = None  # delete <TL>.history for TL below this
    protected: list[tuple[int, int, int]] = field(default_factory=list)  # (timeline, first, last) of permanent WAL
    notes: list[str] = field(default_factory=list)

    def deletes_wal(self, name: str, segment_size: int) -> bool:
        """Whether the WAL object `name` (in wal_005/, any extension) goes under this plan."""
        if self.wal_all:
            return True
        history = HISTORY_RE.match(name)
        if history is not None:
            return self.history_below is not None and int(history.group(1), 16) < self.history_below
        if self.wal_cut is None:
            return False
        token = wal_token(name, segment_size)
        if token is None or not name.startswith(_TOKEN_RE.search(name).group(0)):
            return False  # not a WAL-named object: never ours to judge
        timeline, segno = token
        if segno >= self.wal_cut:
            return False
        return not any(tl == timeline and first <= segno <= last for tl, first, last in self.protected)


def plan(request: Request, backups: Sequence[Backup], segment_size: int) -> Plan:
    """The plan of `request` over the complete backups (any order given; planned oldest first)."""
    ordered = sorted(backups, key=lambda b: (b.time, b.name))
    by_name = {b.name: b for b in ordered}
    mode = request.mode
    if mode == "everything":
        return _plan_everything(request, ordered)
    if mode == "target":
        return _plan_target(request, ordered, by_name)
    if mode == "garbage":
        target = next((b for b in ordered if not b.permanent), None)
        result = Plan(request)
        if target is None:
            result.notes.append("no complete backup that is not permanent: no WAL is judged garbage")
            result.keep = [(b, "permanent") for b in ordered]
            return result
        return _plan_before_target(request, ordered, by_name, target, segment_size, deletes_backups=False)
    target = _retain_target(request, ordered, by_name) if mode == "retain" else _before_target(request, ordered, by_name)
    if target is None:
        result = Plan(request, keep=[(b, "kept") for b in ordered])
        result.notes.append("no backup matches: nothing to delete")
        return result
    return _plan_before_target(request, ordered, by_name, target, segment_size, deletes_backups=True)


def _full_of(b: Backup, by_name: dict[str, Backup]) -> Backup | None:
    """The full backup at the root of b's chain, or None when a link of the chain is missing."""
    seen = set()
    while b.delta_from is not None:
        if b.name in seen or b.delta_from not in by_name:
            return None
        seen.add(b.name)
        b = by_name[b.delta_from]
    return b


def _retain_target(request: Request, ordered: list[Backup], by_name: dict[str, Backup]) -> Backup | None:
    """The oldest backup `retain` keeps (everything before it goes); None when there are no more than
    N backups (of the kind counted) to keep, --after or not: retain keeps the N newest and, with
    --after, everything since then as well."""
    newest_first = ordered[::-1]
    n = request.count or 1
    counted = [b for b in newest_first if b.is_full] if request.modifier == "FULL" else newest_first
    if len(counted) < n:
        return None
    target = counted[n - 1]
    if request.modifier == "FIND_FULL":
        target = _full_of(target, by_name) or target
    if request.after is not None:
        since = _first_at_or_after(request, ordered)
        if since is not None and request.modifier in MODIFIERS:
            since = _full_of(since, by_name) or since
        if since is not None and ordered.index(since) < ordered.index(target):
            target = since  # the older of the two: keep both the N newest and everything since --after
    return target


def _first_at_or_after(request: Request, ordered: list[Backup]) -> Backup | None:
    when = parse_time(request.after or "")
    if when is not None:
        return next((b for b in ordered if b.time >= when), None)
    named = next((b for b in ordered if b.name.startswith(request.after or "")), None)
    if named is None:
        raise RetentionError(f"delete retain --after {request.after}: no backup has that name",
                             hint="give a backup name (backup-list shows them) or an RFC 3339 time with a zone")
    return named


def _before_target(request: Request, ordered: list[Backup], by_name: dict[str, Backup]) -> Backup | None:
    """The backup `before` keeps as its oldest: the named one, or the first at or after the time.
    Never past the newest backup, which before never deletes."""
    when = parse_time(request.before or "")
    if when is not None:
        # none at or after the time: nothing is deleted (as in WAL-G), never all but the newest
        target = next((b for b in ordered if b.time >= when), None)
    else:
        target = by_name.get(request.before or "") or next(
            (b for b in reversed(ordered) if b.name.startswith(request.before or "")), None)
        if target is None:
            raise RetentionError(f"delete before {request.before}: no such backup",
                                 hint="give a backup name (backup-list shows them) or an RFC 3339 time with a zone")
    if target is not None and request.modifier == "FIND_FULL" and not target.is_full:
        target = _full_of(target, by_name) or target
    return target


def _plan_before_target(request: Request, ordered: list[Backup], by_name: dict[str, Backup], target: Backup,
                        segment_size: int, *, deletes_backups: bool) -> Plan:
    """Everything ordered before target goes, but for permanent backups and the chains kept backups need."""
    if deletes_backups and not target.is_full:
        raise RetentionError(f"{target.name} is a delta backup: the backups it is built on cannot be deleted",
                             hint="add FIND_FULL to keep its whole chain (delete retain FIND_FULL N, "
                                  "delete before FIND_FULL NAME)")
    index = ordered.index(target)
    keep: dict[str, str] = {}
    for b in ordered[index:]:
        keep[b.name] = "target: the oldest backup kept" if b is target else "newer than the target"
    for b in ordered[:index]:
        if b.permanent:
            keep[b.name] = "permanent"
        elif not deletes_backups:
            keep[b.name] = "kept (garbage deletes no complete backup)"
    # a kept delta keeps the chain it restores from (WAL-G relies on marks being transitive; this checks)
    for name in list(keep):
        b = by_name[name]
        while b.delta_from is not None and b.delta_from in by_name:
            base = by_name[b.delta_from]
            keep.setdefault(base.name, f"base of kept delta {b.name}")
            b = base
    result = Plan(request)
    for b in ordered:
        if b.name in keep:
            result.keep.append((b, keep[b.name]))
        else:
            result.delete.append(b)
    if deletes_backups and result.delete and result.delete[-1] is ordered[-1]:  # impossible by construction
        raise RetentionError("refusing a plan that deletes the newest backup", hint="report this as a bug")
    kept = [b for b, _ in result.keep]
    regular = [b for b in kept if not b.permanent] or kept
    result.wal_cut = min(b.start_segno for b in regular)
    result.history_below = min(b.timeline for b in kept)
    for b in kept:
        if b.permanent and b.start_segno < result.wal_cut:
            result.protected.append((b.timeline, b.start_segno, max(b.finish_segno or b.start_segno, b.start_segno)))
    return result


def _plan_everything(request: Request, ordered: list[Backup]) -> Plan:
    permanent = [b.name for b in ordered if b.permanent]
    if permanent and request.modifier != "FORCE":
        raise RetentionError(f"{len(permanent)} permanent backups would be deleted: {', '.join(permanent[:10])}",
                             hint="delete everything FORCE deletes permanent backups too; "
                                  "or backup-mark -i NAME them first")
    return Plan(request, delete=list(ordered), wal_all=True)


def _plan_target(request: Request, ordered: list[Backup], by_name: dict[str, Backup]) -> Plan:
    """The target and every delta built on it (FIND_FULL: its whole chain); WAL is not touched."""
    if request.user_data is not None:
        matches = [b for b in ordered if b.user_data == request.user_data]
        if not matches:
            raise RetentionError("no backup has that user data", hint="backup-list --detail --json shows user_data")
        if len(matches) > 1:
            raise RetentionError(f"{len(matches)} backups have that user data: "
                                 + ", ".join(b.name for b in matches[:10]), hint="delete target NAME picks one")
        target = matches[0]
    elif request.target == "LATEST":
        if not ordered:
            raise RetentionError("no backups found", hint="nothing to delete")
        target = ordered[-1]
    else:
        target = by_name.get(request.target or "")
        if target is None:
            raise RetentionError(f"backup {request.target} not found", hint="backup-list shows the backups in this storage")
    doomed = {target.name}
    if request.modifier == "FIND_FULL":
        root = _full_of(target, by_name) or target
        doomed = {root.name} | {b.name for b in ordered if b.delta_full == root.name or
                                _full_of(b, by_name) is root}
    doomed = with_dependants(doomed, ordered)
    permanent = [b.name for b in ordered if b.name in doomed and b.permanent]
    if permanent:
        raise RetentionError(f"cannot delete permanent backup {', '.join(permanent)}",
                             hint="backup-mark -i NAME makes it impermanent first")
    return Plan(request, delete=[b for b in ordered if b.name in doomed],
                keep=[(b, "not the target") for b in ordered if b.name not in doomed])


def with_dependants(names: set[str], backups: Sequence[Backup]) -> set[str]:
    """names and every delta built on one of them, however deep."""
    found, grew = set(names), True
    while grew:
        grew = False
        for b in backups:
            if b.delta_from in found and b.name not in found:
                found.add(b.name)
                grew = True
    return found


def garbage_backup_folders(folders: Iterable[tuple[str, datetime]], complete: Sequence[Backup],
                           older_than: datetime, segment_size: int) -> list[str]:
    """Folders under basebackups_005/ with no sentinel that `delete garbage` removes: named like a
    backup older than the newest complete one (by WAL position), and untouched since older_than, so
    that a backup being taken right now, whose sentinel is not written yet, is never touched."""
    if not complete:
        return []
    newest = max(complete, key=lambda b: (b.time, b.name))
    limit = (newest.timeline, newest.start_segno)
    names = {b.name for b in complete}
    out = []
    for name, modified in folders:
        token = wal_token(name, segment_size)
        if name in names or token is None or modified >= older_than:
            continue
        if token < limit:
            out.append(name)
    return sorted(out)
