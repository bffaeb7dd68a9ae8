"""What every walrus command shares: settings resolved once, one engine coroutine run with the
storage open and signals cancelling it, and the text or JSON rendering of its result."""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Protocol

import click

from walrus import interrupts, metrics
from walrus.cli.walg import GlobalFlags
from walrus.config import Settings, load_settings
from walrus.errors import Stopped
from walrus.log import log, setup_logging

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

target_storage_option = click.option(
    "--target-storage", metavar="NAME", help="WAL-G's failover storage choice: only `default` (walrus has one storage).")

# Seconds the process waits at exit for worker threads still running. A thread stops at its next
# read once its command is cancelled; one stuck in a system call (a hung disk or mount) would
# otherwise keep the process alive forever after its error was reported.
EXIT_GRACE = 5.0


def settings_of(ctx: click.Context) -> Settings:
    flags: GlobalFlags = ctx.find_root().obj
    warnings: list[str] = []  # said once logging is set up, in its format and to its destination
    settings = load_settings(config_path=flags.config_path, warn=warnings.append, flags=flags.settings,
                             turbo=flags.turbo)
    setup_logging(settings.log_level, settings.log_destination)
    for text in warnings:
        log.warning(text)
    os.environ.update(settings.exports)  # for botocore and libpq, which read them there (as WAL-G exports them)
    metrics.configure(settings, ctx.command_path)  # reported when the command ends (cli.main)
    return settings


def run(ctx: click.Context, engine: Callable[[Settings, Any], Awaitable[Any]],
         settings: Settings | None = None) -> Any:
    """Resolve settings (unless given), open the storage, run one engine coroutine, always close the storage."""
    import asyncio  # here: a wal-fetch of a prefetched segment never starts a loop (its imports are a large share of a short command's start-up)

    from walrus.storage import open_storage

    settings = settings or settings_of(ctx)
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


class Result(Protocol):
    """What an engine returns: `--json` prints as_json(), text commands print their own rendering."""

    def as_json(self) -> dict[str, Any]: ...


def emit(result: Result, as_json: bool, text: str | None) -> None:
    metrics.record(result)
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=None))
    elif text:
        click.echo(text)
