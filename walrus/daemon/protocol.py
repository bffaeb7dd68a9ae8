"""WAL-G's daemon wire format: type byte, u16 big-endian total length, body; one-byte replies."""
from __future__ import annotations

import struct

# the client's side of the framing lives in client.py, which must import nothing of walrus
from walrus.daemon.client import HEADER, MAX_MESSAGE, ProtocolError, encode  # noqa: F401

CHECK = ord("C")
WAL_PUSH = ord("F")
WAL_FETCH = ord("f")
OK = b"O"
ERROR = b"E"
NOT_FOUND = b"N"  # wal-fetch: the archive has no such file; the client exits 74


def parse_header(header: bytes) -> tuple[int, int]:
    """(kind, body length) from the 3 header bytes; a total length under 3 is malformed."""
    kind, total = header[0], struct.unpack(">H", header[1:3])[0]
    if total < HEADER:
        raise ProtocolError(f"message length {total} is shorter than its header")
    return kind, total - HEADER


def request_args(kind: int, body: bytes) -> list[str]:
    """A request's arguments, checked against its type: a check ignores its body (the walg_archive
    module sends "CHECK"), a wal-push has one raw argument, a wal-fetch two counted ones."""
    if kind == CHECK:
        return []
    if kind == WAL_PUSH:
        if not body:
            raise ProtocolError("wal-push without a WAL file name")
        return [_text(body)]
    if kind == WAL_FETCH:
        args = split_args(body)
        if len(args) != 2:
            raise ProtocolError(f"wal-fetch takes 2 arguments, not {len(args)}")
        return args
    raise ProtocolError(f"unknown message type {chr(kind)!r}")


def split_args(body: bytes) -> list[str]:
    """Counted arguments: a count byte, then per argument a u16 length and its bytes; all consumed."""
    if not body:
        raise ProtocolError("empty argument list")
    count, pos, out = body[0], 1, []
    for _ in range(count):
        if pos + 2 > len(body):
            raise ProtocolError("argument length runs past the message")
        (n,) = struct.unpack(">H", body[pos:pos + 2])
        pos += 2
        if pos + n > len(body):
            raise ProtocolError("argument runs past the message")
        out.append(_text(body[pos:pos + n]))
        pos += n
    if pos != len(body):
        raise ProtocolError("bytes left after the arguments")
    return out


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise ProtocolError(f"argument is not UTF-8 ({e.reason} at byte {e.start})") from None
