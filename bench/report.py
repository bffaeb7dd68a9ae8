"""Bench output: the per-operation tables, JSON and CSV rows, machine facts, memory and WAL backlog plots."""
from __future__ import annotations

import csv
import importlib
import json
import os
import platform
import subprocess
import sys

MIB = 2 ** 20
# walrus's peak RSS for a backup or a restore, whatever the database size (the issues' target;
# the data path's own share is WALRUS_MEMORY_BUDGET, the rest is the interpreter and its libraries)
RSS_BUDGET_MIB = 128

COLUMNS = [  # (header, row key, format)
    ("tool", "tool", "{}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("MiB/s", "mib_s", "{:.1f}"),
    ("CPU s", "cpu_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
    ("VmPeak MiB", "vmpeak_mib", "{:.1f}"),
    ("output MiB", "output_mib", "{:.1f}"),
    ("x walrus(io_uring)", "wall_ratio", "{:.2f}"),
    ("srv CPU s", "server_cpu_s", "{:.1f}"),
]
RESTORE_EXTRA = [("verified", "verified", "{}")]
WAL_COLUMNS = {
    "archive": [
        ("tool", "tool", "{}"), ("burst s", "wall_s", "{:.1f}"), ("TPS", "tps", "{:.0f}"),
        ("WAL MiB", "wal_mib", "{:.0f}"), ("WAL segs", "wal_segments", "{}"), ("archived", "archived_segments", "{}"),
        ("backlog end", "backlog_end", "{}"), ("max backlog", "backlog_max", "{}"),
        ("catch-up s", "catchup_s", "{:.1f}"), ("CPU s", "cpu_s", "{:.1f}"),
        ("CPU ms/seg", "cpu_ms_per_segment", "{:.0f}"), ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
        ("stored MiB", "output_mib", "{:.1f}"), ("srv CPU s", "server_cpu_s", "{:.1f}"),
    ],
    "drain": [
        ("tool", "tool", "{}"), ("wall s", "wall_s", "{:.2f}"), ("segs/s", "segments_s", "{:.2f}"),
        ("MiB/s", "mib_s", "{:.1f}"), ("CPU s", "cpu_s", "{:.1f}"), ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
        ("stored MiB", "output_mib", "{:.1f}"), ("x walrus daemon", "wall_ratio", "{:.2f}"),
        ("srv CPU s", "server_cpu_s", "{:.1f}"), ("verified", "verified", "{}"),
    ],
    "replay": [
        ("tool", "tool", "{}"), ("wall s", "wall_s", "{:.2f}"), ("WAL MiB", "wal_mib", "{:.0f}"),
        ("MiB/s", "mib_s", "{:.1f}"), ("CPU s", "cpu_s", "{:.1f}"), ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
        ("x walrus daemon", "wall_ratio", "{:.2f}"), ("srv CPU s", "server_cpu_s", "{:.1f}"),
        ("verified", "verified", "{}"),
    ],
}


def machine_facts(path: str) -> dict[str, object]:
    """nproc, memory, kernel, CPU and the filesystem holding path."""
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", path], capture_output=True, text=True)
    return {"nproc": len(os.sched_getaffinity(0)), "mem_mib": mem_kib // 1024, "kernel": platform.release(),
            "cpu": cpu, "fs": " ".join(fs.stdout.split()) or "unknown", "fs_path": path}


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def table(rows: list[dict], operation: str) -> str:
    """A fixed-width text table of one backup or restore operation's rows."""
    return table_of(rows, COLUMNS + (RESTORE_EXTRA if operation == "restore" else []))


def table_of(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table: one line per row, one column per (header, key, format)."""
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        line = [_cell(r, k, f) for _, k, f in cols]
        if r.get("error"):
            line[1] = "FAILED"
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
        f.write("\n")


def write_csv(path: str, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})


def load_matplotlib(install: bool):
    """matplotlib with the Agg backend, pip-installed into this interpreter's environment if asked; else None.

    matplotlib is a bench-only dependency, not a runtime one.
    """
    try:
        import matplotlib
    except ImportError:
        if not install:
            return None
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=False)
        importlib.invalidate_caches()
        try:
            import matplotlib
        except ImportError:
            return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_memory(plt, path: str, operation: str, series: dict[str, list[list[float]]], title: str,
                budget_mib: float = RSS_BUDGET_MIB) -> None:
    """One figure per operation: summed RSS (top) and summed virtual size (bottom) over time, a line per tool,
    and walrus's peak RSS budget as a dashed line across the RSS panel.

    series maps a tool label to samples [t_s, rss_bytes, vmsize_bytes].
    """
    fig, (ax_rss, ax_vm) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    for label, samples in series.items():
        t = [s[0] for s in samples]
        ax_rss.plot(t, [s[1] / MIB for s in samples], label=label, linewidth=1.4)
        ax_vm.plot(t, [s[2] / MIB for s in samples], label=label, linewidth=1.4)
    ax_rss.axhline(budget_mib, color="red", linestyle="--", linewidth=1.2,
                   label=f"walrus budget: {budget_mib:.0f} MiB peak RSS")
    ax_rss.set_ylabel("RSS, MiB (sum over process tree)")
    ax_vm.set_ylabel("virtual size, MiB (sum)")
    ax_vm.set_xlabel("seconds since the tool started")
    for ax in (ax_rss, ax_vm):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_rss.set_ylim(top=max(ax_rss.get_ylim()[1], budget_mib * 1.15))  # the budget line in view, with its label
    ax_rss.legend(loc="lower right", fontsize=9)
    fig.suptitle(f"{operation}: memory over time - {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_backlog(plt, path: str, series: dict[str, list[list[float]]], title: str, progress: bool,
                 mark_s: float | None) -> None:
    """The .ready backlog over time, a line per tool; with progress, a second panel of segments written
    (dashed) and archived (solid) since the start; a dotted line at mark_s (the end of the load) if given.

    series maps a tool label to samples [t_s, ready, written, archived] (progress) or [t_s, ready].
    """
    panels = 2 if progress else 1
    fig, axes = plt.subplots(panels, 1, figsize=(10, 4 + 3.5 * (panels - 1)), sharex=True, squeeze=False)
    ax_ready = axes[0][0]
    for label, samples in series.items():
        t = [s[0] for s in samples]
        line, = ax_ready.plot(t, [s[1] for s in samples], label=label, linewidth=1.4)
        if progress:
            ax = axes[1][0]
            ax.plot(t, [s[3] for s in samples], color=line.get_color(), linewidth=1.4)
            ax.plot(t, [s[2] for s in samples], color=line.get_color(), linewidth=1.0, linestyle="--")
    ax_ready.set_ylabel(".ready segments (backlog)")
    if progress:
        axes[1][0].set_ylabel("segments: written (dashed), archived")
    axes[-1][0].set_xlabel("seconds since the step started")
    from matplotlib.ticker import MaxNLocator

    for (ax,) in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # segments come whole
        if mark_s is not None:
            ax.axvline(mark_s, color="grey", linestyle=":", linewidth=1.2)
    ax_ready.legend(loc="upper right", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
