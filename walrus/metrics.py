"""After every command: WAL-G's statsd metrics (WALG_STATSD_ADDRESS) and a Prometheus textfile (WALRUS_METRICS_FILE)."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from walrus.config import Settings

# Longest a command waits for another's hold on the textfile, and for its statsd datagrams to leave
# (a host name's look-up included): metrics never hold up the command that reports them for longer.
LOCK_WAIT = 2.0
STATSD_WAIT = 0.5
STATSD_PACKET = 1432  # bytes per datagram at most (WAL-G's statsd client's default), metrics a line each
EXIT_NOT_FOUND = 74  # walrus.errors.EXIT_NOT_FOUND (not imported: this module is imported at start-up)
UPLOADING = ("wal-push", "backup-push")

# The textfile's metrics: name -> (type, help)
PROM: dict[str, tuple[str, str]] = {
    "walrus_command_runs_total": (
        "counter", "Commands run, by result: success, failure, not_found (wal-fetch of a segment not archived)."),
    "walrus_last_success_timestamp_seconds": ("gauge", "Unix time the command last ended successfully."),
    "walrus_last_failure_timestamp_seconds": ("gauge", "Unix time the command last failed."),
    "walrus_command_duration_seconds": ("gauge", "Seconds the command's last run took, success or failure."),
    "walrus_bytes_total": (
        "counter", "Bytes moved by successful commands: upload = stored (compressed, encrypted), download = restored."),
    "walrus_wal_pushed_segments_total": ("counter", "WAL segments wal-push stored, background uploads included."),
    "walrus_backup_last_size_bytes": (
        "gauge", "Sizes of the last backup-push that succeeded: kind = compressed (stored) or uncompressed."),
}

_state: dict[str, Any] = {"settings": None, "command": None, "results": []}


def configure(settings: Settings, command_path: str) -> None:
    """The command's resolved settings and its name (click's command path, `walrus wal-push`)."""
    _state["settings"] = settings
    _state["command"] = " ".join(command_path.split()[1:]) or None


def record(result: Any) -> None:
    """An engine's result, for the bytes and counts it reports (walrus.cli.base.emit hands each one here)."""
    _state["results"].append(result)


def finish(code: int, began: float, args: list[str] | None = None) -> None:
    """Report the command that is ending with exit code `code` (began: its time.monotonic() start;
    args: the command line without WAL-G's global flags).
    Never raises, and never takes more than LOCK_WAIT + STATSD_WAIT."""
    try:
        _finish(code, time.monotonic() - began, args)
    except Exception as e:  # metrics are never a reason for a command to fail
        _warn(f"metrics not written: {type(e).__name__}: {e}")
    finally:  # the next command in this process (tests run several) starts afresh
        _state.update(settings=None, command=None, results=[])


def _finish(code: int, seconds: float, args: list[str] | None) -> None:
    settings, command = _state["settings"], _state["command"]
    if settings is None:  # ended before its settings were resolved: a usage or settings error, --help
        path = os.environ.get("WALRUS_METRICS_FILE")
        command = _command_of(args)
        if code == 0 or not path or not command:
            return
        address, tags = None, {}
    else:
        path, address, tags = settings.metrics_file, settings.statsd_address, settings.statsd_extra_tags or {}
    if not (path or address) or not command:
        return
    facts = _facts(command, code, _state["results"])
    if address:
        send_statsd(address, statsd_lines(command, code, seconds, facts, tags))
    if path:
        update_textfile(path, command, code, seconds, facts)


def _command_of(args: list[str] | None) -> str | None:
    """The command a failed command line named (its settings never resolved): the first word of
    the line without WAL-G's global flags (None where even those could not be taken apart)."""
    return next((arg for arg in args or () if not arg.startswith("-")), None)


def _facts(command: str, code: int, results: Iterable[Any]) -> dict[str, float]:
    """What the command's results tell: bytes up and down, files uploaded, WAL segments, backup sizes."""
    facts = {"upload": 0, "download": 0, "files": 0, "failed_files": 0, "segments": 0}
    if code != 0:
        if command in UPLOADING:
            facts["files"] = facts["failed_files"] = 1
        return facts
    for r in results:
        if command == "wal-push":
            stored = (getattr(r, "status", "") == "uploaded") + len(getattr(r, "background", ()))
            facts["segments"] += stored
            facts["files"] += stored
            facts["upload"] += getattr(r, "stored", 0) or 0
            facts["upload_seconds"] = facts.get("upload_seconds", 0) + (getattr(r, "seconds", 0) or 0)
        elif command == "backup-push":
            facts["upload"] += getattr(r, "compressed_size", 0) or 0
            facts["files"] += len(getattr(r, "parts", ())) + 3  # and metadata.json, files_metadata.json, sentinel
            facts["compressed"] = getattr(r, "compressed_size", 0) or 0
            facts["uncompressed"] = getattr(r, "uncompressed_size", 0) or 0
        elif command == "wal-fetch" and getattr(r, "key", "") != "prefetched":
            facts["download"] += getattr(r, "size", 0) or 0
        elif command == "backup-fetch":
            facts["download"] += getattr(r, "bytes", 0) or 0
    return facts


# --- statsd: WAL-G's metric names and tag format (cactus/go-statsd-client's InfixComma: name,k=v:value|type)

def statsd_lines(command: str, code: int, seconds: float, facts: dict[str, float], tags: dict[str, str]) -> list[str]:
    """The metrics WAL-G gathers and pushes at the end of a command, with this command's values."""
    suffix = "".join(f",{k}={v}" for k, v in sorted(tags.items()))
    lines = [f"walg_s3_bytes_read{suffix}:{int(facts['download'])}|g",
             f"walg_s3_bytes_written{suffix}:{int(facts['upload'])}|g"]
    if command == "wal-push" and facts["segments"]:  # the push's own time, as WAL-G's: only when it uploaded
        lines.append(f"walg_s3_upload_time{suffix}:{int(facts.get('upload_seconds', seconds) * 1000)}|ms")
    lines += [f"walg_uploader_uploaded_files_failed_total{suffix}:{int(facts['failed_files'])}|c",
              f"walg_uploader_uploaded_files_total{suffix}:{int(facts['files'])}|c"]
    return lines


def send_statsd(address: str, lines: list[str]) -> None:
    """Send the lines in as few UDP datagrams as fit, from a thread waited for STATSD_WAIT at most (a
    host name's look-up may hang); every error is swallowed and logged at DEBUG."""
    import threading

    packets: list[str] = []
    for line in lines:
        if packets and len(packets[-1]) + 1 + len(line) <= STATSD_PACKET:
            packets[-1] += "\n" + line
        else:
            packets.append(line)
    sender = threading.Thread(target=_deliver, args=(address, packets), name="walrus-statsd", daemon=True)
    sender.start()
    sender.join(STATSD_WAIT)
    if sender.is_alive():
        _debug(f"statsd: {address} not reached within {STATSD_WAIT}s; metrics dropped")


def _deliver(address: str, packets: list[str]) -> None:
    import socket

    try:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family, kind, proto, _, target = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setblocking(False)
            for packet in packets:
                sock.sendto(packet.encode(), target)
    except (OSError, ValueError, IndexError) as e:
        _debug(f"statsd: sending to {address} failed: {e}")


# --- the Prometheus textfile (node_exporter's textfile collector reads DIR/*.prom)

_SAMPLE = r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$'
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"'
Series = tuple[str, tuple[tuple[str, str], ...]]  # (name, sorted labels)


def update_textfile(path: str, command: str, code: int, seconds: float, facts: dict[str, float]) -> None:
    """Add this command's run to the file, atomically, under an flock on PATH.lock shared by every
    walrus writing it: a reader sees the old file or the new one, and no run's counts are lost.
    Any failure is one WARNING line."""
    try:
        with _locked(path + ".lock"):
            series = parse_textfile(_read(path))
            apply_run(series, command, code, seconds, facts, time.time())
            _replace(path, render_textfile(series))
    except (OSError, TimeoutError) as e:
        _warn(f"metrics file {path} not updated: {getattr(e, 'strerror', None) or e}")


def apply_run(series: dict[Series, float], command: str, code: int, seconds: float, facts: dict[str, float],
              now: float) -> None:
    result = "success" if code == 0 else "not_found" if code == EXIT_NOT_FOUND else "failure"

    def add(name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        series[key] = series.get(key, 0) + value

    def put(name: str, value: float, **labels: str) -> None:
        series[(name, tuple(sorted(labels.items())))] = value

    # success and failure both from the first run on, so that increase() sees a first failure
    for outcome in dict.fromkeys(("success", "failure", result)):
        add("walrus_command_runs_total", outcome == result, command=command, result=outcome)
    put("walrus_command_duration_seconds", round(seconds, 3), command=command)
    if result == "success":
        put("walrus_last_success_timestamp_seconds", round(now, 3), command=command)
        for direction in ("upload", "download"):
            if facts[direction]:
                add("walrus_bytes_total", facts[direction], command=command, direction=direction)
        if command == "wal-push":
            add("walrus_wal_pushed_segments_total", facts["segments"])
        if "compressed" in facts:
            put("walrus_backup_last_size_bytes", facts["compressed"], kind="compressed")
            put("walrus_backup_last_size_bytes", facts["uncompressed"], kind="uncompressed")
    elif result == "failure":
        put("walrus_last_failure_timestamp_seconds", round(now, 3), command=command)


def parse_textfile(text: str) -> dict[Series, float]:
    """The samples of walrus's own metrics in a textfile it wrote (anything else is dropped)."""
    import re  # here, not at the top: importing this module costs start-up nothing

    series: dict[Series, float] = {}
    for line in text.splitlines():
        found = re.match(_SAMPLE, line)
        if found is None or found.group(1) not in PROM:
            continue
        try:
            value = float(found.group(3))
        except ValueError:
            continue
        labels = tuple(sorted((k, _unescape(v)) for k, v in re.findall(_LABEL, found.group(2) or "")))
        series[(found.group(1), labels)] = value
    return series


def render_textfile(series: dict[Series, float]) -> str:
    out = []
    for name, (kind, help_text) in PROM.items():
        samples = sorted((labels, value) for (n, labels), value in series.items() if n == name)
        if not samples:
            continue
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            shown = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{name}{{{shown}}} {_number(value)}" if shown else f"{name} {_number(value)}")
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2 ** 53 else repr(float(value))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(text: str) -> str:
    import re

    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _replace(path: str, text: str) -> None:
    """Write a temporary file beside PATH (not *.prom: the collector skips it), fsync it, rename it over PATH."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class _locked:
    """An exclusive flock on a sidecar file, waited for LOCK_WAIT at most (TimeoutError after)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> _locked:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT
        pause = 0.001
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"another walrus held {self.path} for {LOCK_WAIT}s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
            except BaseException:
                os.close(self.fd)
                raise

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def _warn(text: str) -> None:
    from walrus.log import log

    log.warning(text)


def _debug(text: str) -> None:
    from walrus.log import log

    log.debug(text)
