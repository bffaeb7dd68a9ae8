"""The `walrus` command line: thin click commands over the engine modules, one error-to-exit-code map."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Protocol

import click

from walrus import __version__, interrupts
from walrus.config import Settings, load_settings, settings_help
from walrus.errors import EXIT_FAILURE, Stopped, WalrusError
from walrus.log import log, setup_logging
from walrus.runtime import tune_process

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    def list_commands(self, ctx):
        return list(self.commands)  # in the order they were defined, most used first


@click.group(cls=_Group, context_settings=CONTEXT,
             epilog="Settings (environment, or a JSON/YAML config file; the environment wins):\n\n\b\n"
                    + settings_help())
@click.option("--config", "config_path", metavar="PATH", envvar=None,
              help="Config file (default: $WALG_CONFIG_PATH, else ~/.walg.json).")
@click.version_option(__version__, "--version", prog_name="walrus")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """walrus: WAL-G-compatible PostgreSQL backups and WAL archiving."""
    ctx.obj = {"config_path": config_path}


def _settings(ctx: click.Context) -> Settings:
    settings = load_settings(config_path=ctx.obj["config_path"], warn=log.warning)
    setup_logging(settings.log_level)
    return settings


def _run(ctx: click.Context, engine: Callable[[Settings, Any], Awaitable[Any]],
         settings: Settings | None = None) -> Any:
    """Resolve settings (unless given), open the storage, run one engine coroutine, always close the storage."""
    import asyncio  # here: a wal-fetch of a prefetched segment never starts a loop (its imports are a large share of a short command's start-up)

    from walrus.storage import open_storage

    settings = settings or _settings(ctx)
    storage = open_storage(settings)

    async def main():
        asyncio.get_running_loop().set_default_executor(_BoundedExecutor(thread_name_prefix="walrus-io"))
        # SIGTERM and SIGINT cancel the work, so uploads in progress are aborted cleanly (no multipart
        # upload left behind, no temporary file under a final key); once it is done they change nothing
        with interrupts.cancelling(asyncio.current_task()):
            try:
                result = await engine(settings, storage)
                interrupts.finished()
            finally:
                await storage.close()
        return result

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        signum = interrupts.received or signal.SIGTERM
        raise Stopped(signum, signal.Signals(signum).name) from None
    finally:
        interrupts.install()  # asyncio resets the handlers a daemon took when its loop closes
        interrupts.release()  # before anything starts a child, which would inherit a held signal


class _BoundedExecutor(ThreadPoolExecutor):
    """The loop's default executor (asyncio.to_thread: file writes, fsyncs, libpq calls), whose
    shutdown at the end of asyncio.run waits EXIT_GRACE for its threads instead of forever: a
    thread stuck in a system call (a hung mount) must not keep a failed command from ending."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=cancel_futures)
        if wait:
            deadline = time.monotonic() + EXIT_GRACE
            for thread in list(self._threads):
                thread.join(max(0.0, deadline - time.monotonic()))


class _Result(Protocol):
    """What an engine returns: `--json` prints as_json(), text commands print their own rendering."""

    def as_json(self) -> dict[str, Any]: ...


def _emit(result: _Result, as_json: bool, text: str | None) -> None:
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=None))
    elif text:
        click.echo(text)


@cli.command("wal-push", context_settings=CONTEXT)
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def wal_push_cmd(ctx, path: str, as_json: bool) -> None:
    """Archive one WAL file (archive_command = 'walrus wal-push %p')."""
    from walrus.wal.push import wal_push

    result = _run(ctx, lambda s, st: wal_push(s, st, path))
    _emit(result, as_json, None)


@cli.command("wal-fetch", context_settings=CONTEXT)
@click.argument("name")
@click.argument("destination")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def wal_fetch_cmd(ctx, name: str, destination: str, as_json: bool) -> None:
    """Restore one WAL file (restore_command = 'walrus wal-fetch %f %p'); exit 74 if it is not archived.

    The next WALG_DOWNLOAD_CONCURRENCY segments are then prefetched in the background."""
    from walrus.wal.fetch import prefetch_after, wal_fetch

    # entry.py has already answered the plain form when the segment was prefetched; here wal_fetch
    # takes a prefetched copy itself, or downloads
    settings = _settings(ctx)
    result = _run(ctx, lambda s, st: wal_fetch(s, st, name, destination), settings)
    prefetch_after(settings, name, destination, ctx.obj["config_path"])
    _emit(result, as_json, None)


@cli.command("wal-prefetch", hidden=True, context_settings=CONTEXT)
@click.argument("name")
@click.argument("location")
@click.pass_context
def wal_prefetch_cmd(ctx, name: str, location: str) -> None:
    """Download the segments after NAME into LOCATION/.wal-g/prefetch, following recovery (started by wal-fetch)."""
    from walrus.wal import prefetch, prefetcher

    _run(ctx, lambda s, st: prefetcher.follow(s, st, name, prefetch.location(s, os.path.join(location, name))))


@cli.command("backup-push", context_settings=CONTEXT)
@click.argument("pgdata", metavar="PGDATA")
@click.option("-p", "--permanent", is_flag=True, help="Mark the backup permanent (never deleted by retention).")
@click.option("--add-user-data", "user_data", metavar="JSON", help="JSON stored in the sentinel's UserData.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def backup_push_cmd(ctx, pgdata: str, permanent: bool, user_data: str | None, as_json: bool) -> None:
    """Take a base backup of the running server whose data directory is PGDATA."""
    from walrus.backup.push import backup_push

    data = None
    if user_data is not None:
        try:
            data = json.loads(user_data)
        except ValueError as e:
            raise WalrusError("--add-user-data is not valid JSON", detail=str(e)) from None
    result = _run(ctx, lambda s, st: backup_push(s, st, pgdata, permanent=permanent, user_data=data))
    log.info(f"Wrote backup with name {result.name} to storage {result.storage}")
    _emit(result, as_json, None)


@cli.command("backup-fetch", context_settings=CONTEXT)
@click.argument("directory")
@click.argument("name", default="LATEST")
@click.option("--restore-spec", metavar="FILE", help="Tablespace locations to restore to (the Spec's JSON shape).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def backup_fetch_cmd(ctx, directory: str, name: str, restore_spec: str | None, as_json: bool) -> None:
    """Restore backup NAME (or LATEST) into the empty DIRECTORY."""
    from walrus.backup.fetch import backup_fetch

    result = _run(ctx, lambda s, st: backup_fetch(s, st, directory, name, restore_spec=restore_spec))
    log.info(f"restored {result.name} into {result.directory}: {result.files} files, {result.bytes} bytes")
    _emit(result, as_json, None)


@cli.command("backup-list", context_settings=CONTEXT)
@click.option("--detail", is_flag=True, help="Add the columns of each backup's metadata.json.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array ([] when there are none).")
@click.pass_context
def backup_list_cmd(ctx, detail: bool, as_json: bool) -> None:
    """List backups, oldest first."""
    from walrus.backup.list import list_backups, load_details, render_table

    async def engine(settings, storage):
        backups = await list_backups(storage)
        return await load_details(storage, backups) if detail else backups

    backups = _run(ctx, engine)
    if as_json:
        click.echo(json.dumps([b.as_json(detail) for b in backups]))
    elif not backups:
        log.info("No backups found")
    else:
        click.echo(render_table(backups, detail))


@cli.command("delete", context_settings={**CONTEXT, "ignore_unknown_options": False})
@click.argument("args", nargs=-1, metavar="MODE [ARGS]...")
@click.option("--confirm", is_flag=True, help="Delete; without it the command only shows what it would delete.")
@click.option("--use-sentinel-time", is_flag=True,
              help="Order backups by their start time (metadata.json), not by the sentinels' modification time.")
@click.option("-a", "--after", metavar="TIME|NAME", help="retain: also keep every backup since this time or backup.")
@click.option("--target-user-data", metavar="JSON", help="target: the backup whose user data is this JSON.")
@click.option("--grace", metavar="DURATION", default="24h", show_default=True,
              help="Leftovers (backup folders without a sentinel, abandoned uploads) younger than this are left alone.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (or what was deleted) as JSON.")
@click.pass_context
def delete_cmd(ctx, args: tuple[str, ...], confirm: bool, use_sentinel_time: bool, after: str | None,
               target_user_data: str | None, grace: str, as_json: bool) -> None:
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

    try:
        grace_seconds = parse_duration(grace)
    except ValueError as e:
        raise WalrusError(f"--grace {grace!r} is not a duration", detail=str(e)) from None
    request = parse_request(args, after=after, user_data=parse_user_data(target_user_data),
                            use_sentinel_time=use_sentinel_time)
    result = _run(ctx, lambda s, st: delete(s, st, request, confirm=confirm, grace=grace_seconds))
    _emit(result, as_json, result.render())


@cli.command("backup-mark", context_settings=CONTEXT)
@click.argument("name")
@click.option("-i", "--impermanent", is_flag=True, help="Make the backup impermanent again.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def backup_mark_cmd(ctx, name: str, impermanent: bool, as_json: bool) -> None:
    """Mark backup NAME permanent, so that retention never deletes it (a delta: with its chain)."""
    from walrus.backup.mark import backup_mark

    result = _run(ctx, lambda s, st: backup_mark(s, st, name, permanent=not impermanent))
    _emit(result, as_json, None)


@cli.command("daemon", context_settings=CONTEXT)
@click.argument("socket_path", metavar="SOCKET")
@click.pass_context
def daemon_cmd(ctx, socket_path: str) -> None:
    """Serve wal-push and wal-fetch on a Unix socket (WAL-G's protocol; archive_command =
    'walrus daemon-client SOCKET wal-push %f'). Needs PGDATA."""
    from walrus.daemon.server import run_daemon

    _run(ctx, lambda s, st: run_daemon(s, st, socket_path))


@cli.command("daemon-client", context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def daemon_client_cmd(args) -> None:
    """SOCKET wal-push NAME | SOCKET wal-fetch NAME DEST: one request to the daemon; exits 0, 74 or 1.
    Also installed as walg-daemon-client. Starts in milliseconds: it imports almost nothing."""
    from walrus.daemon.client import run

    sys.exit(run(list(args)))


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure ends here, printed PostgreSQL-style, mapped to its exit code."""
    signum = None  # a signal stopped the command: the process ends by it, once all is said
    try:
        interrupts.hold()  # until _run's engine task can be cancelled by them
        tune_process()
        rc = cli.main(args=argv, prog_name="walrus", standalone_mode=False)
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
    _exit(code, signum or interrupts.pending_stop())


# Seconds the process waits at exit for worker threads still running. A thread stops at its next
# read once its command is cancelled; one stuck in a system call (a hung disk or mount) would
# otherwise keep the process alive forever after its error was reported.
EXIT_GRACE = 5.0


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
