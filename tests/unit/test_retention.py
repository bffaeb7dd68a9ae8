"""The retention planner on synthetic backup sets: WAL-G's modes, permanence, deltas, timelines, --after."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from walrus.backup.retention import Backup, Plan, Request, RetentionError, garbage_backup_folders, parse_request, \
    plan, wal_token

SEG = 16 << 20
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def wal(timeline: int, segno: int, suffix: str = ".lz4") -> str:
    return f"{timeline:08X}{segno // 256:08X}{segno % 256:08X}{suffix}"


def backup(segno: int, day: int, *, timeline: int = 1, permanent: bool = False, base: "Backup | None" = None,
           full: "Backup | None" = None, user_data=None, finish: int | None = None) -> Backup:
    name = "base_" + wal(timeline, segno, "")
    if base is not None:
        name += "_D_" + base.name[5:]
    return Backup(name=name, time=T0 + timedelta(days=day), timeline=timeline, start_segno=segno,
                  finish_segno=finish if finish is not None else segno + 1, permanent=permanent,
                  delta_from=base.name if base else None, delta_full=(full or base).name if base else None,
                  user_data=user_data)


def names(backups) -> list[str]:
    return [b.name for b in backups]


def kept(p: Plan) -> list[str]:
    return [b.name for b, _ in p.keep]


FOUR = [backup(2, 1), backup(10, 2), backup(20, 3), backup(30, 4)]


# -- the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, kw, expected", [
    (["retain", "2"], {}, Request("retain", count=2)),
    (["retain", "FULL", "7"], {}, Request("retain", "FULL", count=7)),
    (["retain", "FIND_FULL", "3"], {"after": "2026-01-01T00:00:00Z"},
     Request("retain", "FIND_FULL", count=3, after="2026-01-01T00:00:00Z")),
    (["before", "base_000000010000000000000002"], {}, Request("before", before="base_000000010000000000000002")),
    (["before", "FIND_FULL", "2026-01-01T00:00:00+02:00"], {},
     Request("before", "FIND_FULL", before="2026-01-01T00:00:00+02:00")),
    (["everything"], {}, Request("everything")),
    (["everything", "FORCE"], {}, Request("everything", "FORCE")),
    (["target", "FIND_FULL", "LATEST"], {}, Request("target", "FIND_FULL", target="LATEST")),
    (["target"], {"user_data": {"a": 1}}, Request("target", user_data={"a": 1})),
    (["garbage"], {}, Request("garbage")),
    (["garbage", "ARCHIVES"], {}, Request("garbage", "ARCHIVES")),
])
def test_parse_accepts_walg_command_lines(args, kw, expected):
    assert parse_request(args, **kw) == expected


@pytest.mark.parametrize("args, kw, why", [
    ([], {}, "needs a mode"),
    (["retain"], {}, "one retention count"),  # WAL-G panics here
    (["retain", "0"], {}, "fewer than one"),
    (["retain", "-1"], {}, "fewer than one"),
    (["retain", "two"], {}, "expected a number"),
    (["retain", "2", "3"], {}, "one retention count"),
    (["retain", "2"], {"after": "2999-01-01T00:00:00Z"}, "in the future"),
    (["before"], {}, "one backup name or time"),
    (["before", "FULL", "x"], {}, "FULL is not a modifier"),
    (["before", "2999-01-01T00:00:00Z"], {}, "in the future"),
    (["before", "x"], {"after": "y"}, "--after only applies to retain"),
    (["everything", "NOW"], {}, "FORCE"),
    (["target"], {}, "a backup name or --target-user-data"),
    (["target", "x"], {"user_data": {}}, "not both"),
    (["target", "FULL", "x"], {}, "one backup name"),
    (["garbage", "ALL"], {}, "ARCHIVES or BACKUPS"),
    (["purge"], {}, "unknown delete mode"),
])
def test_parse_refuses_with_the_reason(args, kw, why):
    with pytest.raises(RetentionError) as e:
        parse_request(args, **kw)
    assert why in e.value.message and e.value.hint


def test_an_unknown_retain_modifier_is_find_full_as_in_walg(log_lines):
    """`retain Full 5` runs in WAL-G's users' crontabs: WAL-G reads any word other than FULL as
    FIND_FULL, and so does walrus, with a warning."""
    assert parse_request(["retain", "Full", "5"]) == Request("retain", "FIND_FULL", count=5)
    assert any("read as FIND_FULL" in line for line in log_lines)


# -- retain ---------------------------------------------------------------------------------------

def test_retain_keeps_the_newest_and_cuts_wal_at_the_oldest_kept():
    p = plan(Request("retain", count=2), FOUR[::-1], SEG)  # any input order
    assert names(p.delete) == names(FOUR[:2])
    assert kept(p) == names(FOUR[2:])
    assert p.wal_cut == 20
    assert p.deletes_wal(wal(1, 19), SEG) and not p.deletes_wal(wal(1, 20), SEG)


def test_retain_with_no_more_backups_than_n_deletes_nothing():
    p = plan(Request("retain", count=4), FOUR, SEG)
    assert p.delete == [] and kept(p) == names(FOUR)
    assert p.wal_cut == 2  # the 4th newest is the target: WAL older than it goes, as in WAL-G
    p = plan(Request("retain", count=5), FOUR, SEG)
    assert p.delete == [] and kept(p) == names(FOUR)
    assert p.wal_cut is None and not p.deletes_wal(wal(1, 1), SEG)  # no 5th: nothing at all, as in WAL-G
    p = plan(Request("retain", count=5, after="2026-01-04T00:00:00Z"), FOUR, SEG)
    assert p.delete == []  # --after only adds to what is kept (WAL-G would delete by --after alone)


def test_retain_one_never_deletes_the_newest():
    p = plan(Request("retain", count=1), FOUR, SEG)
    assert kept(p) == [FOUR[-1].name] and len(p.delete) == 3


def test_retain_orders_by_time_not_by_name():
    shuffled = [backup(30, 1), backup(2, 2), backup(20, 3), backup(10, 4)]
    p = plan(Request("retain", count=2), shuffled, SEG)
    assert names(p.delete) == names(shuffled[:2])
    assert p.wal_cut == 10  # the lowest start among the kept, not the target's


def test_retain_after_keeps_the_union():
    p = plan(Request("retain", count=1, after="2026-01-04T00:00:00Z"), FOUR, SEG)
    assert kept(p) == names(FOUR[2:])  # 1 newest, and everything since the third
    p = plan(Request("retain", count=3, after="2026-01-05T00:00:00Z"), FOUR, SEG)
    assert kept(p) == names(FOUR[1:])  # 3 newest, more than since the fourth
    p = plan(Request("retain", count=1, after=FOUR[1].name), FOUR, SEG)
    assert kept(p) == names(FOUR[1:])  # a backup name works as the --after anchor


def test_retain_after_an_unknown_name_is_an_error():
    with pytest.raises(RetentionError, match="no backup has that name"):
        plan(Request("retain", count=1, after="base_nope"), FOUR, SEG)


def chain():
    """full1 <- d1 <- d2, full2 <- d3 (days 1..5)."""
    full1 = backup(2, 1)
    d1 = backup(5, 2, base=full1)
    d2 = backup(8, 3, base=d1, full=full1)
    full2 = backup(11, 4)
    d3 = backup(14, 5, base=full2)
    return [full1, d1, d2, full2, d3]


def test_retain_landing_on_a_delta_needs_find_full():
    backups = chain()
    with pytest.raises(RetentionError, match="delta") as e:
        plan(Request("retain", count=3), backups, SEG)  # target d2
    assert "FIND_FULL" in e.value.hint
    p = plan(Request("retain", "FIND_FULL", count=3), backups, SEG)
    assert p.delete == [] and p.wal_cut == 2  # d2's chain starts at full1: all kept


def test_retain_full_counts_full_backups_and_keeps_newer_deltas():
    backups = chain()
    p = plan(Request("retain", "FULL", count=1), backups, SEG)
    assert names(p.delete) == names(backups[:3]) and kept(p) == names(backups[3:])
    p = plan(Request("retain", "FULL", count=2), backups, SEG)
    assert p.delete == []


def test_a_kept_delta_keeps_a_base_older_than_the_target():
    """A delta built on an old base (WAL-G's --delta-from-name): WAL-G would delete the base."""
    old = backup(2, 1)
    mid = backup(10, 2)
    late = backup(20, 3, base=old)
    p = plan(Request("retain", count=2), [old, mid, late], SEG)
    assert p.delete == [] and dict((b.name, why) for b, why in p.keep)[old.name] == f"base of kept delta {late.name}"


# -- permanence -----------------------------------------------------------------------------------

def test_permanent_backups_and_their_wal_stay():
    perm = backup(10, 2, permanent=True, finish=12)
    backups = [backup(2, 1), perm, backup(20, 3), backup(30, 4)]
    p = plan(Request("retain", count=1), backups, SEG)
    assert names(p.delete) == [backups[0].name, backups[2].name]
    assert kept(p) == [perm.name, backups[3].name]
    assert p.wal_cut == 30  # the cut ignores the permanent backup ...
    assert p.protected == [(1, 10, 12)]  # ... whose own WAL stays
    assert [s for s in range(1, 30) if not p.deletes_wal(wal(1, s), SEG)] == [10, 11, 12]
    assert p.deletes_wal(wal(2, 11), SEG)  # the range is the backup's own timeline
    assert not p.deletes_wal(wal(1, 11, ".00000028.backup.lz4"), SEG)


def test_everything_refuses_permanent_backups_without_force():
    backups = [backup(2, 1, permanent=True), backup(10, 2)]
    with pytest.raises(RetentionError, match="permanent") as e:
        plan(Request("everything"), backups, SEG)
    assert "FORCE" in e.value.hint
    p = plan(Request("everything", "FORCE"), backups, SEG)
    assert names(p.delete) == names(backups) and p.wal_all
    assert p.deletes_wal("00000001.history", SEG) and p.deletes_wal("anything", SEG)


# -- before ---------------------------------------------------------------------------------------

def test_before_a_name_keeps_it_and_the_newer():
    p = plan(Request("before", before=FOUR[2].name), FOUR, SEG)
    assert names(p.delete) == names(FOUR[:2]) and p.wal_cut == 20


def test_before_a_time():
    p = plan(Request("before", before="2026-01-03T12:00:00Z"), FOUR, SEG)  # between the 2nd and the 3rd
    assert names(p.delete) == names(FOUR[:2])
    p = plan(Request("before", before="2026-01-09T00:00:00Z"), FOUR, SEG)
    assert p.delete == []  # no backup at or after it: nothing (never all but the newest silently)


def test_before_a_delta_needs_find_full():
    backups = chain()
    with pytest.raises(RetentionError, match="delta"):
        plan(Request("before", before=backups[2].name), backups, SEG)
    p = plan(Request("before", "FIND_FULL", before=backups[2].name), backups, SEG)
    assert p.delete == []  # moved back to full1
    p = plan(Request("before", "FIND_FULL", before=backups[4].name), backups, SEG)
    assert names(p.delete) == names(backups[:3])


def test_before_an_unknown_name_is_an_error():
    with pytest.raises(RetentionError, match="no such backup"):
        plan(Request("before", before="base_nope"), FOUR, SEG)


# -- target ---------------------------------------------------------------------------------------

def test_target_takes_the_deltas_built_on_it():
    backups = chain()
    p = plan(Request("target", target=backups[1].name), backups, SEG)
    assert names(p.delete) == names(backups[1:3])
    assert p.wal_cut is None and not p.deletes_wal(wal(1, 1), SEG)  # target never deletes WAL
    p = plan(Request("target", "FIND_FULL", target=backups[2].name), backups, SEG)
    assert names(p.delete) == names(backups[:3])
    p = plan(Request("target", target="LATEST"), backups, SEG)
    assert names(p.delete) == [backups[4].name]


def test_target_refuses_permanent_and_unknown():
    backups = chain()
    backups[2] = Backup(**{**backups[2].__dict__, "permanent": True})
    with pytest.raises(RetentionError, match="permanent"):
        plan(Request("target", target=backups[0].name), backups, SEG)  # d2 depends on it
    with pytest.raises(RetentionError, match="not found"):
        plan(Request("target", target="base_000000010000000000000063"), backups, SEG)


def test_target_by_user_data():
    backups = [backup(2, 1, user_data={"x": 1}), backup(10, 2, user_data={"x": 2}), backup(20, 3, user_data={"x": 2})]
    assert names(plan(Request("target", user_data={"x": 1}), backups, SEG).delete) == [backups[0].name]
    with pytest.raises(RetentionError, match="2 backups have that user data"):
        plan(Request("target", user_data={"x": 2}), backups, SEG)
    with pytest.raises(RetentionError, match="no backup has that user data"):
        plan(Request("target", user_data={"x": 3}), backups, SEG)


# -- garbage and WAL names ------------------------------------------------------------------------

def test_garbage_deletes_no_backup_and_cuts_at_the_oldest_impermanent():
    backups = [backup(2, 1, permanent=True), backup(10, 2), backup(20, 3)]
    p = plan(Request("garbage"), backups, SEG)
    assert p.delete == [] and kept(p) == names(backups)
    assert p.wal_cut == 10 and p.protected == [(1, 2, 3)]
    p = plan(Request("garbage"), [backup(2, 1, permanent=True)], SEG)
    assert p.wal_cut is None and not p.deletes_wal(wal(1, 1), SEG)


def test_wal_names_on_every_timeline_and_history_files():
    backups = [backup(2, 1), backup(10, 2, timeline=2), backup(20, 3, timeline=3)]
    p = plan(Request("retain", count=2), backups, SEG)
    assert p.wal_cut == 10 and p.history_below == 2
    assert p.deletes_wal(wal(3, 9), SEG) and p.deletes_wal(wal(1, 9), SEG)  # below the cut on any timeline
    assert not p.deletes_wal(wal(1, 10), SEG)  # a lower timeline at or after the cut stays (WAL-G deletes it)
    assert p.deletes_wal(wal(1, 9, ".partial.lz4"), SEG) and p.deletes_wal(wal(1, 9, ".00000028.backup.br"), SEG)
    assert p.deletes_wal("00000001.history.lz4", SEG)
    assert not p.deletes_wal("00000002.history.lz4", SEG) and not p.deletes_wal("00000003.history", SEG)
    for other in ("README", "x" + wal(1, 1), "wal_005", "0000000100000000000000XX.lz4"):
        assert not p.deletes_wal(other, SEG)


def test_wal_token_reads_names_as_walg_does():
    assert wal_token("base_000000020000000100000003_D_000000010000000000000002", SEG) == (2, 256 + 3)
    assert wal_token("000000010000000000000100", SEG) is None  # 0x100 is past 255 segments per xlogid
    assert wal_token("lowercase_00000001000000000000000a", SEG) is None


def test_garbage_backup_folders_spare_the_fresh_and_the_newer():
    complete = [backup(10, 1), backup(20, 2)]
    now = T0 + timedelta(days=10)
    old, fresh = now - timedelta(days=2), now - timedelta(minutes=5)
    folders = [("base_" + wal(1, 5, ""), old), ("base_" + wal(1, 15, ""), old), ("base_" + wal(1, 16, ""), fresh),
               ("base_" + wal(1, 25, ""), old), ("not-a-backup", old), (complete[0].name, old)]
    assert garbage_backup_folders(folders, complete, now - timedelta(hours=24), SEG) == [folders[0][0], folders[1][0]]
    assert garbage_backup_folders(folders, [], now, SEG) == []
