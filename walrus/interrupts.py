"""SIGTERM and SIGINT at any instant: held until the work can be cancelled cleanly, then noted once it is decided."""
from __future__ import annotations

import os

# the C module: `signal` wraps it in enums, whose import is a fifth of a quick wal-fetch's start-up
import _signal as signal

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: wal-fetch of a prefetched segment
if TYPE_CHECKING:  # needs neither it nor asyncio
    import asyncio

SIGNALS = {signal.SIGTERM, signal.SIGINT}

# The handler never raises: an exception thrown into whatever runs at that instant (an import, the
# event loop's set-up, a weakref callback that swallows it) leaves things half done or is lost.
# Instead the signals are blocked from the start until the command's work runs as a task, which a
# signal then cancels, so the work cleans up as on any failure; before that only imports and
# settings run, which take a fraction of a second.
_running: tuple[asyncio.AbstractEventLoop, asyncio.Task] | None = None
_finished = False
received: int | None = None  # the first signal taken, if any


def hold() -> None:
    """Block both signals until release() (or cancelling()): they wait, pending."""
    install()
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def release() -> None:
    """Unblock both signals; one waiting is delivered now. Always before a child process is started,
    which would inherit the mask."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def install() -> None:
    for sig in SIGNALS:
        if signal.getsignal(sig) != signal.SIG_IGN:  # nohup, a shell's background job: left ignored
            signal.signal(sig, _handle)


def _handle(signum: int, frame) -> None:
    global received
    received = received or signum
    if _running is not None and not _finished:
        loop, task = _running
        # this handler runs on the main thread, which is the loop's: the cancellation is delivered
        # at the loop's next step, like any callback, and the engine cleans up as on any failure
        loop.call_soon_threadsafe(_cancel_unless_finished, task)


def _cancel_unless_finished(task: asyncio.Task) -> None:
    """On the loop: the engine may have finished between the signal and this step; then it stands."""
    if not _finished:
        task.cancel()


class cancelling:
    """`with cancelling(task):` while in the block a signal cancels `task` (the command's engine); one
    held so far does now. (A class, not contextlib's decorator: the quickest answers import this
    module, and contextlib would add to every archive_command's start-up.)"""

    def __init__(self, task: asyncio.Task):
        self.task = task

    def __enter__(self) -> None:
        global _running
        install()  # again: a daemon's own handlers, gone with its loop, reset them
        _running = (self.task.get_loop(), self.task)
        if received is not None:  # taken before the task existed (signals were not held)
            self.task.get_loop().call_soon(_cancel_unless_finished, self.task)
        release()

    def __exit__(self, *exc: object) -> None:
        global _running
        _running = None


def finished() -> None:
    """The command's outcome is decided; a signal from now on no longer changes it."""
    global _finished
    _finished = True


def pending_stop() -> int | None:
    """The signal the process should end by: one taken while the outcome was still open."""
    release()  # one still held is taken now
    return received if not _finished else None


def ignore_while_exiting() -> None:
    """For the exit itself. The interpreter's teardown puts signals Python handles back to their
    default (a late SIGTERM would kill a command whose outcome is decided, and make it look
    interrupted), but leaves ignored ones ignored. Called last: children inherit ignored signals."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_by(signum: int) -> None:
    """End the process by `signum` itself, once everything is cleaned up and said: PostgreSQL reads a
    restore_command or archive_command that died by a signal as a reason to stop (a fast shutdown),
    and one that exited non-zero as "not available", which can end a recovery early."""
    signal.signal(signum, signal.SIG_DFL)
    release()
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached
