"""The `walrus` command line: thin click commands over the engine modules, one error-to-exit-code map."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
import traceback

import click

from walrus import __version__, interrupts, metrics
from walrus.cli.base import CONTEXT, EXIT_GRACE, emit, run, settings_of, target_storage_option
from walrus.cli.st import register as register_st
from walrus.cli.walg import GlobalFlags, HelpGroup, check_target_storage, refuse, split_global_flags
from walrus.cli.walg import register as register_walg
from walrus.config import settings_help
from walrus.errors import EXIT_FAILURE, ConfigError, Stopped, WalrusError
from walrus.log import log
from walrus.runtime import tune_process


@click.group(cls=HelpGroup, context_settings=CONTEXT,
             epilog="Settings (a flag on the command line, else the environment, else a JSON/YAML config file):\n\n\b\n"
                    + settings_help())
@click.option("--config", "config_path", metavar="PATH", envvar=None,
              help="Config file (default: $WALG_CONFIG_PATH, else ~/.walg.json); anywhere on the line, as in WAL-G.")
@click.option("--turbo", is_flag=True, help="Ignore the rate limits (WALG_NETWORK_RATE_LIMIT, WALG_DISK_RATE_LIMIT).")
@click.version_option(__version__, "-v", "--version", prog_name="walrus")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, turbo: bool) -> None:
    """walrus: WAL-G-compatible PostgreSQL backups and WAL archiving.

    Every setting is also a flag, anywhere on the line, over the environment and the config file:
    --walg-upload-concurrency 4 (`walrus flags` lists them)."""
    ctx.obj = ctx.obj or GlobalFlags()
    ctx.obj.config_path = config_path or ctx.obj.config_path
    ctx.obj.turbo = turbo or ctx.obj.turbo


@cli.command("wal-push", context_settings=CONTEXT)
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@target_storage_option
@click.pass_context
def wal_push_cmd(ctx, path: str, as_json: bool, target_storage: str | None) -> None:
    """Archive one WAL file (archive_command = 'walrus wal-push %p').

    With WALG_UPLOAD_CONCURRENCY above 1 it also archives further .ready segments in the background
    (at most TOTAL_BG_UPLOADED_LIMIT), as WAL-G does."""
    from walrus.wal.push import pushed_in_background, wal_push

    check_target_storage(target_storage)
    settings = settings_of(ctx)
    # a segment an earlier call stored in the background is answered without opening the storage
    result = pushed_in_background(path) or run(ctx, lambda s, st: wal_push(s, st, path), settings)
    emit(result, as_json, None)


@cli.command("wal-fetch", context_settings=CONTEXT)
@click.argument("name")
@click.argument("destination")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@target_storage_option
@click.pass_context
def wal_fetch_cmd(ctx, name: str, destination: str, as_json: bool, target_storage: str | None) -> None:
    """Restore one WAL file (restore_command = 'walrus wal-fetch %f %p'); exit 74 if it is not archived.

    The next WALG_DOWNLOAD_CONCURRENCY segments are then prefetched in the background."""
    from walrus.wal.fetch import prefetch_after, prefetch_before, wal_fetch

    # entry.py has already answered the plain form when the segment was prefetched or the running
    # prefetcher could fetch it; here wal_fetch takes a prefetched copy itself, or downloads
    check_target_storage(target_storage)
    settings = settings_of(ctx)
    config_path = ctx.find_root().obj.config_path
    prefetch_before(settings, name, destination, config_path)
    result = run(ctx, lambda s, st: wal_fetch(s, st, name, destination), settings)
    prefetch_after(settings, name, destination, config_path)
    emit(result, as_json, None)


@cli.command("wal-prefetch", hidden=True, context_settings=CONTEXT)
@click.argument("name")
@click.argument("location")
@target_storage_option
@click.pass_context
def wal_prefetch_cmd(ctx, name: str, location: str, target_storage: str | None) -> None:
    """Download the segments after NAME into LOCATION/.wal-g/prefetch, following recovery (started by wal-fetch)."""
    from walrus.wal import prefetch, prefetcher

    check_target_storage(target_storage)
    config_path = ctx.find_root().obj.config_path
    run(ctx, lambda s, st: prefetcher.follow(s, st, name, prefetch.location(s, os.path.join(location, name)),
                                             config_path))


@cli.command("backup-push", context_settings=CONTEXT)
@click.argument("pgdata", metavar="[PGDATA]", required=False)
@click.option("-p", "--permanent", is_flag=True, help="Mark the backup permanent (never deleted by retention).")
@click.option("-f", "--full", is_flag=True, help="A full backup, even where WALG_DELTA_MAX_STEPS allows a delta.")
@click.option("--add-user-data", "user_data", metavar="JSON",
              help="JSON stored as the sentinel's UserData (default: WALG_SENTINEL_USER_DATA).")
@click.option("-v", "--verify", is_flag=True,
              help="Check each page read (header, and checksum where the cluster has them): WALG_VERIFY_PAGE_CHECKSUMS.")
@click.option("-s", "--store-all-corrupt", is_flag=True,
              help="Record every corrupt block in files_metadata.json, not the first 10: WALG_STORE_ALL_CORRUPT_BLOCKS.")
@click.option("-r", "--rating-composer", is_flag=True, help="Accepted, ignored with a warning (walrus fills parts its own way).")
@click.option("-c", "--copy-composer", is_flag=True, help="Accepted, ignored with a warning (walrus fills parts its own way).")
@click.option("-b", "--database-composer", is_flag=True,
              help="Accepted, ignored with a warning (walrus fills parts its own way).")
@click.option("--delta-from-name", metavar="NAME",
              help="Build the delta on backup NAME (default: WALG_DELTA_FROM_NAME, else LATEST).")
@click.option("--delta-from-user-data", metavar="JSON",
              help="Build the delta on the backup with this user data (default: WALG_DELTA_FROM_USER_DATA).")
@click.option("--no-archive-check", is_flag=True,
              help="Take the backup even when WAL archiving is off or failing (it may not be restorable).")
@click.option("--without-files-metadata", is_flag=True,
              help="Accepted, ignored with a warning (walrus always writes files_metadata.json).")
@click.option("--no-progress", is_flag=True, help="No status line on a terminal's standard error.")
@target_storage_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def backup_push_cmd(ctx, pgdata: str | None, permanent: bool, full: bool, user_data: str | None, verify: bool,
                    store_all_corrupt: bool, rating_composer: bool, copy_composer: bool, database_composer: bool,
                    delta_from_name: str | None, delta_from_user_data: str | None, no_archive_check: bool,
                    without_files_metadata: bool, target_storage: str | None, as_json: bool,
                    no_progress: bool = False) -> None:
    """Take a base backup of the running server whose data directory is PGDATA (default: the PGDATA setting).

    Without a data directory, the server streams it over a replication connection (WAL-G's remote
    mode, PostgreSQL 15 or later, a role with REPLICATION): always a full backup."""
    from walrus.progress import for_command

    check_target_storage(target_storage)
    settings = settings_of(ctx)
    if verify or store_all_corrupt:
        settings = dataclasses.replace(settings, verify_page_checksums=settings.verify_page_checksums or verify,
                                       store_all_corrupt_blocks=settings.store_all_corrupt_blocks or store_all_corrupt)
    for flag, given in (("--rating-composer", rating_composer), ("--copy-composer", copy_composer),
                        ("--database-composer", database_composer), ("--without-files-metadata", without_files_metadata)):
        if given:
            log.warning(f"{flag} has no effect in walrus: the backup is written in walrus's own way, in WAL-G's format")
    pgdata = pgdata or settings.pgdata
    if not pgdata:
        # WAL-G's remote mode: a BASE_BACKUP over a replication connection, always a full backup
        given = [flag for flag, value in (("--delta-from-name", delta_from_name),
                                          ("--delta-from-user-data", delta_from_user_data)) if value is not None]
        if given:
            raise WalrusError(f"{' and '.join(given)}: a backup without a data directory is always a full backup",
                              detail="a delta reads the data directory's files; the server streams a full copy",
                              hint="give the data directory as the argument (or set PGDATA) for a delta, on the "
                                   "database host; or leave out the delta flags")
        if settings.delta_max_steps:
            log.info("no data directory: a full backup over a replication connection (WALG_DELTA_MAX_STEPS "
                     "applies only with one)")
    raw = user_data if user_data is not None else settings.sentinel_user_data
    data = None
    if raw:
        try:
            data = json.loads(raw)
        except ValueError as e:
            flag = "--add-user-data" if user_data is not None else "WALG_SENTINEL_USER_DATA"
            raise WalrusError(f"{flag} is not valid JSON", detail=str(e),
                              hint="give a JSON value, e.g. '{\"kind\": \"nightly\"}'") from None
    base_data = None
    if delta_from_user_data is not None:
        try:
            base_data = json.loads(delta_from_user_data)
        except ValueError as e:
            raise WalrusError("--delta-from-user-data is not valid JSON", detail=str(e),
                              hint="give the JSON user data of the backup to build on") from None
    line = for_command("backup-push", settings.log_destination, no_progress)
    with line or contextlib.nullcontext():
        if pgdata:
            from walrus.backup.push import backup_push
            from walrus.wal.push import store_for_backup

            result = run(ctx, lambda s, st: backup_push(s, st, pgdata, permanent=permanent, user_data=data, full=full,
                                                        delta_from_name=delta_from_name, delta_from_user_data=base_data,
                                                        archive=store_for_backup, archive_check=not no_archive_check,
                                                        progress=line),
                         settings)
        else:
            from walrus.backup.remote import remote_backup_push
            from walrus.wal.stored import candidate_keys

            result = run(ctx, lambda s, st: remote_backup_push(s, st, permanent=permanent, user_data=data,
                                                               archive_check=not no_archive_check,
                                                               candidates=candidate_keys, progress=line),
                         settings)
    log.info(f"Wrote backup with name {result.name} to storage {result.storage}")
    emit(result, as_json, None)


@cli.command("backup-fetch", context_settings=CONTEXT)
@click.argument("directory")
@click.argument("name", required=False)
@click.option("--target-user-data", metavar="JSON",
              help="Restore the backup whose user data is this JSON (default: WALG_FETCH_TARGET_USER_DATA).")
@click.option("--mask", metavar="PATTERN",
              help="Restore only files whose path in the data directory matches this shell pattern (base/16384/*).")
@click.option("--restore-spec", metavar="FILE", help="Tablespace locations to restore to (the Spec's JSON shape).")
@click.option("--restore-only", "restore_only", metavar="DB[/TABLE],...", multiple=True,
              help="Restore only these databases or tables, and the system ones (comma-separated or repeated).")
@click.option("--reverse-unpack", is_flag=True,
              help="Accepted: walrus restores a delta's chain full backup first, and the result is the same.")
@click.option("--skip-redundant-tars", is_flag=True,
              help="Accepted: walrus never downloads a part that holds no file to restore.")
@click.option("--no-progress", is_flag=True, help="No status line on a terminal's standard error.")
@target_storage_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def backup_fetch_cmd(ctx, directory: str, name: str | None, target_user_data: str | None, mask: str | None,
                     restore_spec: str | None, restore_only: tuple[str, ...], reverse_unpack: bool,
                     skip_redundant_tars: bool, target_storage: str | None, as_json: bool,
                     no_progress: bool = False) -> None:
    """Restore backup NAME (default LATEST), or the one with --target-user-data, into the empty DIRECTORY."""
    from walrus.backup.delete import parse_user_data
    from walrus.backup.fetch import backup_fetch
    from walrus.backup.list import resolve_by_user_data
    from walrus.progress import for_command

    check_target_storage(target_storage)
    settings = settings_of(ctx)
    raw = target_user_data if target_user_data is not None else settings.fetch_target_user_data
    if raw and name:
        raise WalrusError(f"backup-fetch got both a backup name ({name}) and target user data",
                          hint="give the backup name or --target-user-data, not both")
    wanted = parse_user_data(raw) if raw else None
    only = [item for value in restore_only for item in value.split(",") if item] or None

    async def engine(s, storage):
        target = await resolve_by_user_data(storage, wanted, s.segment_size) if raw else (name or "LATEST")
        return await backup_fetch(s, storage, directory, target, restore_spec=restore_spec, mask=mask,
                                  restore_only=only, progress=line)

    line = for_command("backup-fetch", settings.log_destination, no_progress)
    with line or contextlib.nullcontext():
        result = run(ctx, engine, settings)
    log.info(f"restored {result.name} into {result.directory}: {result.files} files, {result.bytes} bytes")
    emit(result, as_json, None)


@cli.command("backup-list", context_settings=CONTEXT)
@click.option("--detail", is_flag=True, help="Add the columns of each backup's metadata.json.")
@click.option("--pretty", is_flag=True, help="A boxed table (with --json: indented JSON).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array ([] when there are none).")
@target_storage_option
@click.pass_context
def backup_list_cmd(ctx, detail: bool, pretty: bool, as_json: bool, target_storage: str | None) -> None:
    """List backups, oldest first."""
    from walrus.backup.list import list_backups, load_details, render

    check_target_storage(target_storage)

    async def engine(settings, storage):
        backups = await list_backups(storage)
        return await load_details(storage, backups) if detail else backups

    backups = run(ctx, engine)
    text = render(backups, detail, pretty, as_json)
    if text is None:
        log.info("No backups found")
    else:
        click.echo(text)


@cli.command("restore", context_settings=CONTEXT)
@click.argument("directory")
@click.option("--target-time", metavar="TIME", help="Recover to this time (ISO 8601 with a zone).")
@click.option("--target-lsn", metavar="X/X", help="Recover to this WAL position.")
@click.option("--target-xid", metavar="XID", help="Recover to this transaction's commit.")
@click.option("--target-name", metavar="NAME", help="Recover to this restore point (pg_create_restore_point).")
@click.option("--immediate", is_flag=True, help="Recover only until the backup is consistent.")
@click.option("--target-action", type=click.Choice(["promote", "pause", "shutdown"]), default="promote",
              show_default=True, help="What the server does at the target.")
@click.option("--backup", "backup_name", metavar="NAME", help="Restore this backup (default: the newest that can "
                                                              "reach the target).")
@click.option("--daemon-socket", metavar="PATH", help="restore_command through the daemon serving on this socket.")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Another setting for the restored server's postgresql.auto.conf (repeatable), e.g. port=5433.")
@click.option("--start", is_flag=True, help="Start the server and wait until recovery reaches the target.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def restore_cmd(ctx, directory: str, target_time: str | None, target_lsn: str | None, target_xid: str | None,
                target_name: str | None, immediate: bool, target_action: str, backup_name: str | None,
                daemon_socket: str | None, extra: tuple[str, ...], start: bool, as_json: bool) -> None:
    """Restore a server to a point in time into the empty DIRECTORY: the newest backup that can reach
    the target, recovery.signal, restore_command (this configuration) and the recovery target; with
    --start, start it and follow recovery to the target. Without a target: the end of the archive."""
    from walrus.archive.restore import command_for, parse_target, restore

    given = [(k, v) for k, v in (("time", target_time), ("lsn", target_lsn), ("xid", target_xid),
                                 ("name", target_name), ("immediate", "immediate" if immediate else None)) if v]
    if len(given) > 1:
        raise click.UsageError("give one target: --target-time, --target-lsn, --target-xid, --target-name or --immediate")
    settings_pairs = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        settings_pairs[key.strip()] = value
    kind, value = given[0] if given else (None, None)
    target = parse_target(kind, value, target_action)
    config_path = ctx.find_root().obj.config_path
    if config_path is None and daemon_socket is None:
        log.warning("no --config: the restored server's restore_command finds walrus's settings in its own environment")
    executable = os.path.abspath(sys.argv[0])
    walrus = executable if os.path.basename(executable) == "walrus" else f"{sys.executable} -m walrus"
    command = command_for(walrus, os.path.abspath(config_path) if config_path else None, daemon_socket, fed=start)
    result = run(ctx, lambda s, st: restore(s, st, directory, target, restore_command=command, backup=backup_name,
                                            extra=settings_pairs, start=start))
    emit(result, as_json, None)


@cli.command("backup-verify", context_settings=CONTEXT)
@click.argument("name", required=False, metavar="[NAME|LATEST]")
@click.option("--all", "every", is_flag=True, help="Verify every backup.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_context
def backup_verify_cmd(ctx, name: str | None, every: bool, as_json: bool) -> None:
    """Read a backup back and check it: every tar part decoded and walked, its files against
    files_metadata.json, page checksums (a cluster with data checksums), and the WAL from its start
    to its finish archived and whole. Exits 1 on any fault."""
    from walrus.archive.backupverify import backup_verify
    from walrus.backup.list import resolve_backup

    if every and name:
        raise click.UsageError("give a backup NAME or --all, not both")

    async def engine(settings, storage):
        names = None if every else [await resolve_backup(storage, name or "LATEST")]
        return await backup_verify(settings, storage, names)

    result = run(ctx, engine)
    emit(result, as_json, result.text())
    failure = result.failure()
    if failure is not None:
        raise failure


@cli.command("wal-show", context_settings=CONTEXT)
@click.option("--detailed-json", is_flag=True, help="Print JSON (each timeline's missing segments and backups).")
@click.option("--without-backups", is_flag=True, help="Do not look up which backups lie on each timeline.")
@target_storage_option
@click.pass_context
def wal_show_cmd(ctx, detailed_json: bool, without_backups: bool, target_storage: str | None) -> None:
    """Show the archived WAL by timeline: its range, missing segments, parent and backups."""
    from walrus.archive.walshow import wal_show

    check_target_storage(target_storage)
    result = run(ctx, lambda s, st: wal_show(s, st, with_backups=not without_backups))
    click.echo(result.json_text() if detailed_json else result.text())


@cli.command("wal-verify", context_settings=CONTEXT)
@click.argument("checks", nargs=-1, metavar="integrity|timeline...")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--timeline", type=int, help="The server's timeline, with --lsn (else asked of PostgreSQL).")
@click.option("--lsn", metavar="X/X", help="The server's WAL position, with --timeline (else asked of PostgreSQL).")
@click.option("--backup-name", metavar="NAME", help="integrity: check from this backup's start, not the oldest one's.")
@target_storage_option
@click.pass_context
def wal_verify_cmd(ctx, checks: tuple[str, ...], as_json: bool, timeline: int | None, lsn: str | None,
                   backup_name: str | None, target_storage: str | None) -> None:
    """Check that the archive holds every WAL segment from the oldest backup to the server's position
    (integrity) and that its newest timeline is the server's (timeline). Exits 1 when a check fails."""
    from walrus.pg.client import PgSession
    from walrus.pg.xlog import parse_lsn
    from walrus.archive.walverify import CHECKS, Position, wal_verify

    check_target_storage(target_storage)
    if not checks:
        raise click.UsageError(f"name at least one check of: {', '.join(CHECKS)}")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise click.UsageError(f"invalid check {unknown[0]!r}: choose from {', '.join(CHECKS)}")
    if (lsn is None) != (timeline is None):
        raise click.UsageError("--lsn and --timeline go together")
    position = None
    if lsn is not None:
        try:
            position = Position(timeline, parse_lsn(lsn))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--lsn") from None

    def locate(settings):
        session = PgSession(settings)
        try:
            return session.wal_position()
        finally:
            session.close()

    result = run(ctx, lambda s, st: wal_verify(s, st, list(checks), locate=locate, position=position,
                                               backup_name=backup_name))
    click.echo(result.json_text() if as_json else result.text())
    failure = result.failure()
    if failure is not None:
        raise failure


@cli.command("delete", context_settings={**CONTEXT, "ignore_unknown_options": False})
@click.argument("args", nargs=-1, metavar="MODE [ARGS]...")
@click.option("--confirm", is_flag=True, help="Delete; without it the command only shows what it would delete.")
@click.option("--use-sentinel-time", is_flag=True,
              help="Order backups by their start time (metadata.json), not by the sentinels' modification time.")
@click.option("-a", "--after", metavar="TIME|NAME", help="retain: also keep every backup since this time or backup.")
@click.option("--target-user-data", metavar="JSON", help="target: the backup whose user data is this JSON.")
@click.option("--grace", metavar="DURATION", default="24h", show_default=True,
              help="Leftovers (backup folders without a sentinel, abandoned uploads) younger than this are left alone.")
@click.option("--without-backup-check", is_flag=True,
              help="Not supported: an error (garbage: WAL-G deletes WAL without checking the backups).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (or what was deleted) as JSON.")
@click.pass_context
def delete_cmd(ctx, args: tuple[str, ...], confirm: bool, use_sentinel_time: bool, after: str | None,
               target_user_data: str | None, grace: str, without_backup_check: bool, as_json: bool) -> None:
    """Retention, WAL-G's way; a dry run unless --confirm.

    \b
    MODE is one of:
      retain [FULL|FIND_FULL] N [--after TIME|NAME]   keep the N newest backups (FULL: full ones)
      before [FIND_FULL] TIME|NAME                    delete the backups older than it
      everything [FORCE]                              every backup and all WAL (FORCE: permanent ones too)
      target [FIND_FULL] NAME | --target-user-data J  one backup and the deltas built on it
      garbage [ARCHIVES|BACKUPS]                      WAL older than every backup, leftovers of crashes

    WAL older than the oldest backup kept goes with the backups. Permanent backups (backup-mark)
    and the newest backup are never deleted by retain or before; TIME is RFC 3339 with a zone."""
    from walrus.backup.delete import delete, parse_user_data
    from walrus.backup.retention import parse_request
    from walrus.config import parse_duration

    if without_backup_check:
        raise refuse("--without-backup-check", "walrus always checks which WAL the kept backups need before deleting it",
                     "leave it out: `delete garbage` keeps exactly the WAL the backups need")

    try:
        grace_seconds = parse_duration(grace)
    except ValueError as e:
        raise WalrusError(f"--grace {grace!r} is not a duration", detail=str(e)) from None
    request = parse_request(args, after=after, user_data=parse_user_data(target_user_data),
                            use_sentinel_time=use_sentinel_time)
    result = run(ctx, lambda s, st: delete(s, st, request, confirm=confirm, grace=grace_seconds))
    emit(result, as_json, result.render())


@cli.command("backup-mark", context_settings=CONTEXT)
@click.argument("name")
@click.option("-i", "--impermanent", is_flag=True, help="Make the backup impermanent again.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def backup_mark_cmd(ctx, name: str, impermanent: bool, as_json: bool) -> None:
    """Mark backup NAME permanent, so that retention never deletes it (a delta: with its chain)."""
    from walrus.backup.mark import backup_mark

    result = run(ctx, lambda s, st: backup_mark(s, st, name, permanent=not impermanent))
    emit(result, as_json, None)


@cli.command("check", context_settings=CONTEXT)
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True, metavar="SECONDS",
              help="How long a switched WAL segment may take to arrive in storage.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_context
def check_cmd(ctx, timeout: float, as_json: bool) -> None:
    """Check this host's setup before relying on it: the settings load; the storage takes a probe
    object (write, read back, delete); the user owns what it writes; PostgreSQL answers;
    archive_mode and archive_command send WAL to walrus; a forced WAL switch arrives in storage.
    One line per check; exits 1 when any failed."""
    from walrus.archive.check import FAILED, check, settings_failed

    try:
        settings = settings_of(ctx)
        result = run(ctx, lambda s, st: check(s, st, timeout=timeout), settings)
    except ConfigError as e:  # the settings, or the storage they name, cannot be used: nothing else can be checked
        result = settings_failed(e)
    emit(result, as_json, result.render())
    failed = [c.name for c in result.checks if c.status == FAILED]
    if failed:
        raise WalrusError(f"{len(failed)} of {len(result.checks)} checks failed: {', '.join(failed)}",
                          hint="each failed check's HINT says what to change; run walrus check again after")


@cli.command("daemon", context_settings=CONTEXT)
@click.argument("socket_path", metavar="SOCKET")
@click.pass_context
def daemon_cmd(ctx, socket_path: str) -> None:
    """Serve wal-push and wal-fetch on a Unix socket (WAL-G's protocol; archive_command =
    'walg-daemon-client SOCKET wal-push %p'), or on the socket systemd passes in (socket
    activation: walrus-daemon.socket). Needs PGDATA."""
    from walrus.daemon.server import run_daemon

    run(ctx, lambda s, st: run_daemon(s, st, socket_path))


@cli.command("daemon-client", context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def daemon_client_cmd(args) -> None:
    """SOCKET wal-push NAME | SOCKET wal-fetch NAME DEST: one request to the daemon; exits 0, 74 or 1.
    Also installed as walg-daemon-client. Starts in milliseconds: it imports almost nothing."""
    from walrus.daemon.client import run

    sys.exit(run(list(args)))


@cli.command("wal-receive", context_settings=CONTEXT)
@click.option("--spool-dir", metavar="DIR",
              help="Local directory where segments are received before they are stored (a subdirectory per "
                   "slot; default ~/.walrus/receive).")
@click.pass_context
def wal_receive_cmd(ctx, spool_dir: str | None) -> None:
    """Stream WAL over the physical replication slot WALG_SLOTNAME (default walg; created, reserving WAL, if
    missing) into the archive, each segment as wal-push stores it, until stopped (SIGTERM).

    The server is told WAL is flushed only once its segment is in storage, so the slot keeps the rest:
    a restart goes on from the slot. Lost connections are retried (one log line per attempt); a role
    without REPLICATION, or a slot another receiver holds, exits 1. Needs PostgreSQL 15 or later."""
    from walrus.wal.receive import default_spool_dir, wal_receive

    run(ctx, lambda s, st: wal_receive(s, st, spool_dir or default_spool_dir()))


register_walg(cli)
register_st(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure ends here, printed PostgreSQL-style, mapped to its exit code."""
    signum = None  # a signal stopped the command: the process ends by it, once all is said
    began = time.monotonic()
    args: list[str] | None = None  # the command line without WAL-G's global flags, once taken apart
    try:
        interrupts.hold()  # until _run's engine task can be cancelled by them
        tune_process()
        args, flags = split_global_flags(sys.argv[1:] if argv is None else list(argv))
        rc = cli.main(args=args, prog_name="walrus", standalone_mode=False, obj=flags)
        code = rc if isinstance(rc, int) else 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = e.exit_code if e.exit_code != 1 else 2
    except Stopped as e:
        print(e.render(), file=sys.stderr)
        code, signum = e.exit_code, e.signum
    except WalrusError as e:
        print(e.render(), file=sys.stderr)
        code = e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):  # only before interrupts.hold()
        print("ERROR: interrupted", file=sys.stderr)
        code = 130
    except OSError as e:
        print(f"ERROR: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        print("HINT: check permissions and free space, and that walrus runs as the server's OS user",
              file=sys.stderr)
        code = EXIT_FAILURE
    except Exception as e:  # a bug: say so, with the traceback when asked for
        print(f"ERROR: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        if os.environ.get("WALG_LOG_LEVEL", "").upper() == "DEVEL":
            traceback.print_exc()
        print("HINT: set WALG_LOG_LEVEL=DEVEL for a traceback and report it", file=sys.stderr)
        code = EXIT_FAILURE
    metrics.finish(code, began, args)  # WALG_STATSD_ADDRESS, WALRUS_METRICS_FILE: never fails, bounded wait
    _exit(code, signum or interrupts.pending_stop())




def _exit(code: int, signum: int | None = None) -> None:
    interrupts.finished()  # exiting already: a signal now would only interrupt the exit itself
    lingering = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    deadline = time.monotonic() + EXIT_GRACE
    for thread in lingering:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = any(t.is_alive() for t in lingering)
    if stuck:
        log.warning("a worker thread did not stop; exiting without it")
    if signum is not None or stuck:
        sys.stdout.flush()
        sys.stderr.flush()
    if signum is not None:
        interrupts.die_by(signum)
    interrupts.ignore_while_exiting()
    if stuck:
        os._exit(code)
    sys.exit(code)
