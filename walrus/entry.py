"""The `walrus` executable: the daemon client, and wal-fetch of a prefetched segment, are answered before
anything heavy (click, asyncio, codecs, storage) is imported: PostgreSQL runs them once per segment."""
# No `from __future__` import: this module's body runs before main() can take a SIGINT, so it imports
# nothing that is not loaded already (os and sys come with the interpreter's start).
import os
import sys


def main() -> None:
    try:
        _main()
    except KeyboardInterrupt:  # SIGINT before walrus took the signals (interrupts.hold)
        import signal

        from walrus import interrupts

        print("ERROR: stopped by SIGINT before any work began", file=sys.stderr)
        interrupts.die_by(signal.SIGINT)
    except SystemExit as e:
        _leave(e.code)


def _leave(code: object) -> None:
    """End the process once the command has said everything, without the interpreter's teardown:
    freeing every module's objects costs each call tens of milliseconds (archive_command pays them
    once per segment) and does nothing walrus needs, since the command flushed and closed its work.
    What is buffered is flushed here; a result that cannot be written is a failure, as Python's own
    exit reports it (120)."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging = sys.modules.get("logging")  # not imported by the quickest answers, which log nothing
    if logging is not None:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120
    os._exit(code)


def _main() -> None:
    if os.path.basename(sys.argv[0]) == "walg-daemon-client":  # multicall name
        from walrus.daemon.client import run

        sys.exit(run(sys.argv[1:]))
    if len(sys.argv) > 1 and sys.argv[1] == "daemon-client":
        from walrus.daemon.client import run

        sys.exit(run(sys.argv[2:]))
    from walrus import interrupts

    # First, before any import: Python's SIGINT handler raises KeyboardInterrupt wherever the main
    # thread is, and one raised inside an import can leave the import system's module lock held
    # (a later import by a worker thread then waits forever: a SIGINT trial hung so).
    interrupts.hold()  # a signal waits until the work can be cancelled cleanly (walrus.cli.base.run)
    answered = _quick_fetch(sys.argv[1:])
    if answered is None and _pushed_in_background(sys.argv[1:]):
        answered = 0
    if answered is not None:
        interrupts.ignore_while_exiting()  # done: a signal held meanwhile changes nothing
        sys.exit(answered)
    from walrus.cli import main as cli_main

    cli_main()


def _quick_fetch(argv: list[str]) -> int | None:
    """`walrus [--config PATH] wal-fetch NAME DEST` answered with nothing resolved that the answer does
    not need: NAME taken from the prefetch folder (prefetch.take_unresolved), else asked of the running
    prefetcher (prefetch.ask); the exit code, 74 quietly where the storage answered that NAME is absent.

    None for any other form, or whenever the settings might have a say: the full command then does
    the work and reports errors as usual.
    """
    config_path, argv = _plain_form(argv, "wal-fetch", 2)
    if argv is None:
        return None
    from walrus.pg.segname import is_segment_name
    from walrus.wal import prefetch

    name, destination = argv[1], argv[2]
    location = prefetch.unresolved_location(destination, config_path, os.environ)
    if location is None:
        return None
    if is_segment := is_segment_name(name):
        if prefetch.take_whole(location, name, destination):
            prefetch.advance(location, name)
            prefetch.spawn(name, destination, location, config_path)
            return 0
    answer = prefetch.ask(location, name, destination, config_path)
    if answer == 0 and is_segment:
        prefetch.spawn(name, destination, location, config_path)  # it may be about to exit
    elif answer == 74:
        print(f"ERROR: WAL file {name} is not in the archive", file=sys.stderr)  # as the full command says
    return answer


def _pushed_in_background(argv: list[str]) -> bool:
    """`walrus [--config PATH] wal-push PATH` for a segment an earlier call stored in the background,
    which its marker proves: done here, as WAL-G answers it, silently and without reading settings
    or opening the storage, so that PostgreSQL's call for each segment of a backlog costs little
    more than a process start. Any other form, or a marker that does not vouch for the file, goes
    to the full command."""
    _config_path, argv = _plain_form(argv, "wal-push", 1)
    if argv is None:
        return False
    from walrus.pg.segname import is_segment_name
    from walrus.wal import ready

    wal_dir, name = os.path.split(os.path.abspath(argv[1]))
    # take_marker removes it either way: a stale one is gone, and the full command pushes the file
    return is_segment_name(name) and ready.take_marker(wal_dir, name)


def _plain_form(argv: list[str], command: str, nargs: int) -> tuple[str | None, list[str] | None]:
    """(config path, [command, args...]) when argv is `[--config PATH] command ARG...` with nargs
    arguments and nothing else; (None, None) for any other form."""
    config_path = None
    if argv[:1] == ["--config"] and len(argv) > 1:
        config_path, argv = argv[1], argv[2:]
    elif argv[:1] and argv[0].startswith("--config="):
        config_path, argv = argv[0][len("--config="):], argv[1:]
    if len(argv) != nargs + 1 or argv[0] != command or any(a.startswith("-") for a in argv[1:]):
        return None, None
    return config_path, argv
