"""Boxed text tables as WAL-G draws them (go-pretty's default style), for the commands that print WAL-G's tables."""
from __future__ import annotations

from typing import Sequence


def box_table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool]) -> str:
    """`+-|` borders, one space of padding, the header upper-cased and ruled off (even with no rows).
    Columns flagged in `right` (go-pretty's numeric columns: numbers, LSNs, status enums) are
    right-aligned, header included; the others left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    head = [h.upper() for h in header]
    widths = [max([len(head[i])] + [len(r[i]) for r in cells]) for i in range(len(head))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)) + " |"

    return "\n".join([rule, line(head), rule] + [line(r) for r in cells] + [rule])
