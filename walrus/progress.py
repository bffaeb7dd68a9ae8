"""A status line on a terminal for backup-push and backup-fetch: bytes done of the total, rate, ETA, parts."""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Callable, TextIO

# Redraws per second at most: a ticker thread draws; the data path only adds to counters.
INTERVAL = 0.25
RATE_WINDOW = 5.0  # seconds of history the rate is taken over (the ETA follows it)
CLEAR = "\r\x1b[K"  # back to the line's start, erase to its end
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

_active: "Progress | None" = None  # the one status line drawn, which log records step around


def format_size(n: float) -> str:
    """Binary units, three significant figures at most: 512 B, 1.2 GiB, 812 MiB, 15 GiB."""
    n = max(0.0, float(n))
    unit = 0
    while n >= 1024 and unit < len(_UNITS) - 1:
        n /= 1024
        unit += 1
    if unit == 0:
        return f"{int(n)} B"
    if round(n, 1) < 10:
        return f"{n:.1f} {_UNITS[unit]}"
    if round(n) >= 1024 and unit < len(_UNITS) - 1:  # 1023.7 MiB rounds to 1.0 GiB, not "1024 MiB"
        return f"1.0 {_UNITS[unit + 1]}"
    return f"{n:.0f} {_UNITS[unit]}"


def format_clock(seconds: float) -> str:
    """m:ss below an hour, h:mm:ss from one: 0:02, 12:34, 1:02:03."""
    s = max(0, int(seconds + 0.5))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def wanted(log_destination: str | None, off: bool = False, fd: int = 2) -> bool:
    """A status line only where a person watches: standard error a terminal (not TERM=dumb), the
    log not sent to a file (it would be a line per redraw there), and not turned off (--no-progress)."""
    if off or (log_destination and log_destination != "stderr"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return os.isatty(fd)
    except OSError:
        return False


class Progress:
    """One status line: `add(n)` bytes and `part_done()` from the data path (cheap: an int add on
    the event loop's thread, per pool buffer or downloaded chunk), redrawn by a ticker thread at
    most every INTERVAL on `out` (`\\r` + erase), and ended by finish() with a summary and a newline.

    While it is drawn, walrus log records clear it before they are written and redraw it after
    (walrus.log's handler calls around()), so the two never share a line.
    """

    def __init__(self, label: str, out: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic,
                 interval: float = INTERVAL, width: int | None = None):
        self.label = label
        self.out = out if out is not None else sys.stderr
        self.clock = clock
        self.interval = interval
        self.width = width  # None: the terminal's
        self.done = 0
        self.total: int | None = None
        self.total_note = ""  # what the total counts, where that needs saying ("compressed")
        self.parts_done = 0
        self.parts_total: int | None = None
        self.note = ""  # the phase, where bytes do not move ("waiting for WAL")
        self.began = clock()
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(self.began, 0)])
        self._lock = threading.RLock()
        self._shown = False  # a status line is on the screen
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._finished = False

    # -- fed by the data path -----------------------------------------------------------------
    def add(self, n: int) -> None:
        self.done += n

    def part_done(self) -> None:
        self.parts_done += 1

    def set_total(self, total: int | None, *, parts: int | None = None, note: str = "") -> None:
        self.total, self.parts_total, self.total_note = total, parts, note

    # -- the line --------------------------------------------------------------------------
    def rate(self, now: float) -> float | None:
        """Bytes per second over the last RATE_WINDOW seconds (None before half a second has passed)."""
        samples = self._samples
        samples.append((now, self.done))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        t0, d0 = samples[0]
        if now - t0 < 0.5:
            return None
        return (self.done - d0) / (now - t0)

    def line(self, now: float | None = None) -> str:
        """The status as it stands: label, bytes done (of the total), percent, rate, ETA, parts, note."""
        now = self.clock() if now is None else now
        done, total = self.done, self.total
        fields = [self.label]
        if total:
            total = max(total, done)
            of = f"{format_size(done)} of {format_size(total)}"
            fields.append(f"{of} {self.total_note}" if self.total_note else of)
            fields.append(f"{min(99, done * 100 // total) if done < total else 100}%")
        else:
            fields.append(format_size(done))
        rate = self.rate(now)
        if rate is not None:
            fields.append(f"{format_size(rate)}/s")
            if total and rate > 0 and done < total and not self.note:
                fields.append(f"ETA {format_clock((total - done) / rate)}")
        fields.append(self._parts())
        if self.note:
            fields.append(self.note)
        return "  ".join(fields)

    def summary(self, ok: bool, now: float | None = None) -> str:
        """The last line: what moved, in how long, at what average rate; or where it stopped."""
        if not ok:
            return self.line(now) + "  stopped"
        now = self.clock() if now is None else now
        elapsed = max(now - self.began, 1e-9)
        return "  ".join([self.label, f"{format_size(self.done)} in {format_clock(elapsed)}",
                          f"{format_size(self.done / elapsed)}/s", self._parts()])

    def _parts(self) -> str:
        if self.parts_total is not None:
            return f"parts {self.parts_done}/{max(self.parts_total, self.parts_done)}"
        return f"parts {self.parts_done}"

    # -- drawing ---------------------------------------------------------------------------
    def _fit(self, text: str) -> str:
        width = self.width
        if width is None:
            try:
                width = os.get_terminal_size(self.out.fileno()).columns
            except (OSError, ValueError, AttributeError):
                width = 0
        width = width or 80  # a terminal that does not say its size (a fresh pty says 0 columns)
        return text[:max(1, width - 1)]  # never the last column: a wrapped line cannot be redrawn

    def draw(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._write(CLEAR + self._fit(self.line()))
            self._shown = True

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):  # the terminal went away: the command goes on without its line
            pass

    def around(self, emit: Callable[[], None]) -> None:
        """Write a log record (`emit`) on a line of its own: the status line cleared first, redrawn after."""
        with self._lock:
            if self._shown:
                self._write(CLEAR)
            emit()
            if self._shown and not self._finished:
                self._write(self._fit(self.line()))

    def start(self) -> "Progress":
        """Draw from now on (a daemon ticker thread) and let log records step around the line."""
        global _active
        with self._lock:
            _active = self
            self._ticker = threading.Thread(target=self._tick, name="walrus-progress", daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.draw()

    def finish(self, ok: bool = True) -> None:
        """The summary (or the line where it stopped, if one was drawn) and a newline; idempotent."""
        global _active
        self._stop.set()
        ticker = self._ticker
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join(2 * self.interval + 1)
        with self._lock:
            if self._finished:
                return
            self._finished = True
            if _active is self:
                _active = None
            if ok or self._shown:  # a command that failed before its first redraw has nothing to end
                self._write(CLEAR + self._fit(self.summary(ok)) + "\n")

    def __enter__(self) -> "Progress":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(ok=exc_type is None)


def active() -> Progress | None:
    """The status line being drawn, if any (walrus.log steps around it)."""
    return _active


def for_command(label: str, log_destination: str | None, off: bool = False) -> Progress | None:
    """The status line of a command (`with line or nullcontext():` around its run), or None where
    wanted() says no."""
    return Progress(label) if wanted(log_destination, off) else None
