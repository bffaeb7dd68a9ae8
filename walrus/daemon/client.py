"""walg-daemon-client: sends one request to the daemon and exits 0 (O), 74 (N) or 1; imports almost nothing.

This module stands alone (the standard library's _socket, struct and sys, nothing of walrus): the build
installs it verbatim as the `walg-daemon-client` script run by `python -IS`, without site-packages,
because PostgreSQL starts it once per WAL segment and every millisecond of start-up is paid serially
by the archiver and by recovery. So the request encoder lives here and protocol.py re-exports it.
"""

import _socket  # the C module: `socket` would import enum, selectors and collections
import struct
import sys

HEADER = 3  # type byte and u16 big-endian total length
MAX_MESSAGE = 0xFFFF

USAGE = """usage: walg-daemon-client SOCKET wal-push WAL_NAME [-timeout 60s] [-connection-timeout 5s]
       walg-daemon-client SOCKET wal-fetch WAL_NAME DESTINATION [-timeout 60s] [-connection-timeout 5s]"""
COMMANDS = {"wal-push": (ord("F"), 1), "wal-fetch": (ord("f"), 2)}


class ProtocolError(ValueError):
    """A request that does not follow the framing (the daemon answers E and closes)."""


def encode(kind: int, *args: str) -> bytes:
    """A request as WAL-G's client frames it: no body, one raw argument, or counted arguments."""
    if len(args) == 0:
        body = b""
    elif len(args) == 1:
        body = args[0].encode()
    else:
        if len(args) > 255:
            raise ProtocolError("at most 255 arguments")
        body = bytes([len(args)])
        for a in args:
            raw = a.encode()
            if len(raw) > 0xFFFF:
                raise ProtocolError("argument too long")
            body += struct.pack(">H", len(raw)) + raw
    if HEADER + len(body) > MAX_MESSAGE:
        raise ProtocolError("message too long")
    return bytes([kind]) + struct.pack(">H", HEADER + len(body)) + body


def _duration(text: str) -> float:
    """Go-style durations as WAL-G's client takes them: 500ms, 60s, 2m, 1h, or plain seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * scale
    return float(text)


def run(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 1
    sock_path, (kind, nargs) = argv[0], COMMANDS[argv[1]]
    args, flags = argv[2:2 + nargs], argv[2 + nargs:]
    if len(args) != nargs:
        print(USAGE, file=sys.stderr)
        return 1
    timeout, connect_timeout = 60.0, 5.0
    try:
        while flags:
            flag, value, flags = flags[0].lstrip("-"), flags[1], flags[2:]
            if flag == "timeout":
                timeout = _duration(value)
            elif flag == "connection-timeout":
                connect_timeout = _duration(value)
            else:
                raise ValueError(flag)
    except (IndexError, ValueError):
        print(USAGE, file=sys.stderr)
        return 1
    try:
        request = encode(kind, *args)
    except ProtocolError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.settimeout(connect_timeout)
            s.connect(sock_path)
            s.settimeout(timeout)
            s.sendall(request)
            reply = s.recv(1)  # WAL-G sends one byte; WAL-RUS frames three: the first decides
        finally:
            s.close()
    except OSError as e:
        print(f"ERROR: walrus daemon at {sock_path}: {e.strerror or e}", file=sys.stderr)
        print("HINT: is `walrus daemon` running, and may this user open its socket?", file=sys.stderr)
        return 1
    if reply == b"O":
        return 0
    if reply == b"N":
        print(f"ERROR: WAL file {args[0]} is not in the archive", file=sys.stderr)
        return 74
    print(f"ERROR: walrus daemon failed {argv[1]} {' '.join(args)} (reply {reply!r})", file=sys.stderr)
    print("HINT: the daemon's log says why", file=sys.stderr)
    return 1


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
