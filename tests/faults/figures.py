"""The fault suite's figures: mode, seed, and per scenario the outcome of every trial, printed and saved by conftest."""
from __future__ import annotations

import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

MODE = "long" if os.environ.get("WALRUS_FAULTS", "").strip().lower() == "long" else "ci"
LONG = MODE == "long"
# One seed per run, printed with the figures; WALRUS_FAULTS_SEED=<n> repeats a run's choices.
SEED = int(os.environ.get("WALRUS_FAULTS_SEED") or random.SystemRandom().randrange(1 << 32))

# What one trial can end in. Exactly one per trial; "lost" wins over everything, then "hang",
# then "unclean": a trial is only as good as its worst check.
OUTCOMES = ("success", "clean", "unclean", "hang", "lost")
_RANK = {o: i for i, o in enumerate(OUTCOMES)}


def trials(ci: int, long: int) -> int:
    """A trial count for this mode."""
    return long if LONG else ci


def rng(*names: object) -> random.Random:
    """Randomness for one scenario (or one trial of it), a function of the seed and the names only:
    the order tests run in, or threads finish in, changes nothing."""
    return random.Random(":".join(str(n) for n in (SEED, *names)))


@dataclass
class Outcome:
    """What one trial ended in: kind (see OUTCOMES), why (for anything but success), and for a clean
    failure the seconds the command took to report it."""

    kind: str = "success"
    what: str = ""
    seconds: float | None = None

    def worse(self, kind: str, what: str) -> "Outcome":
        """Record a finding; the trial keeps its worst one (and the reasons of all bad ones)."""
        assert kind in _RANK
        if _RANK[kind] > _RANK[self.kind]:
            bad = [self.what] if self.kind in ("unclean", "hang", "lost") and self.what else []
            self.kind, self.what = kind, "; ".join(bad + [what])
        elif kind in ("unclean", "hang", "lost"):
            self.what = f"{self.what}; {what}" if self.what else what
        return self


@dataclass
class Scenario:
    family: str
    name: str
    trials: int = 0
    success: int = 0
    clean: int = 0
    unclean: int = 0
    hang: int = 0
    lost: int = 0
    longest_clean_s: float = 0.0  # the longest a command took to end in a clean error
    seconds: float = 0.0  # wall time of the scenario, setup included
    notes: dict = field(default_factory=dict)  # scenario-specific counts (requests seen, detected per kind...)
    problems: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome, label: str = "") -> None:
        with _LOCK:
            self.trials += 1
            setattr(self, outcome.kind, getattr(self, outcome.kind) + 1)
            if outcome.kind == "clean" and outcome.seconds is not None:
                self.longest_clean_s = max(self.longest_clean_s, round(outcome.seconds, 2))
            if outcome.kind in ("unclean", "hang", "lost"):
                self.problems.append(f"{outcome.kind}: {label + ': ' if label else ''}{outcome.what}")

    def note(self, key: str, value=1, add: bool = True) -> None:
        with _LOCK:
            self.notes[key] = self.notes.get(key, 0) + value if add else value

    def tally(self, key: str, hit: bool) -> None:
        """notes[key] = "hits/total": how many trials of a kind had a property (detected, say)."""
        with _LOCK:
            hits, total = (int(x) for x in self.notes.get(key, "0/0").split("/"))
            self.notes[key] = f"{hits + int(hit)}/{total + 1}"

    def run(self, count: int, trial: Callable[[int], tuple[str, Outcome] | Outcome], workers: int = 1) -> None:
        """Run trial(i) for i < count (on `workers` threads: trials must not share mutable state) and
        record each; trial returns an Outcome, or (label, Outcome) to name the trial in problems."""
        def one(i: int) -> None:
            result = trial(i)
            label, outcome = result if isinstance(result, tuple) else (f"trial {i}", result)
            self.add(outcome, label)

        if workers <= 1:
            for i in range(count):
                one(i)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(one, range(count)):
                    pass

    def check(self) -> None:
        """The assertion every scenario ends with: no unclean failure, no hang, nothing lost."""
        bad = self.unclean + self.hang + self.lost
        shown = "\n  ".join(self.problems[:15]) + ("\n  ..." if len(self.problems) > 15 else "")
        assert bad == 0 and self.trials > 0, (
            f"{self.name}: {self.unclean} unclean failures, {self.hang} hangs, {self.lost} with data lost, of "
            f"{self.trials} trials (mode {MODE}, WALRUS_FAULTS_SEED={SEED}):\n  {shown}")


_LOCK = threading.RLock()
REGISTRY: dict[str, Scenario] = {}


class scenario:
    """`with scenario(family, name) as s:` registers s and adds the block's wall time to it."""

    def __init__(self, family: str, name: str):
        with _LOCK:
            self.s = REGISTRY.setdefault(name, Scenario(family, name))

    def __enter__(self) -> Scenario:
        self.began = time.monotonic()
        return self.s

    def __exit__(self, *exc) -> None:
        self.s.seconds = round(self.s.seconds + time.monotonic() - self.began, 1)


COLUMNS = [("family", "family"), ("scenario", "name"), ("trials", "trials"), ("ok", "success"),
           ("clean fail", "clean"), ("UNCLEAN", "unclean"), ("HANG", "hang"), ("LOST", "lost"),
           ("max s to err", "longest_clean_s"), ("wall s", "seconds")]


def table() -> list[str]:
    rows = [[h for h, _ in COLUMNS]]
    for s in REGISTRY.values():
        rows.append([str(getattr(s, attr)) for _, attr in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def report() -> dict:
    return {"mode": MODE, "seed": SEED, "scenarios": [asdict(s) for s in REGISTRY.values()]}


def write_report(path: str) -> None:
    with open(path, "w") as f:
        json.dump(report(), f, indent=2)
