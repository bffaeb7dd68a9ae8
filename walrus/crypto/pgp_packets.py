"""OpenPGP packet framing (RFC 4880 section 4.2): headers, bodies streamed through partial lengths, writers."""
from __future__ import annotations

from walrus.pull import READ_SIZE, Source

TAG_PKESK = 1
TAG_SIGNATURE = 2
TAG_SKESK = 3
TAG_ONE_PASS_SIGNATURE = 4
TAG_SECRET_KEY = 5
TAG_PUBLIC_KEY = 6
TAG_SECRET_SUBKEY = 7
TAG_COMPRESSED = 8
TAG_SED = 9
TAG_MARKER = 10
TAG_LITERAL = 11
TAG_TRUST = 12
TAG_USER_ID = 13
TAG_PUBLIC_SUBKEY = 14
TAG_USER_ATTRIBUTE = 17
TAG_SEIPD = 18
TAG_MDC = 19
TAG_AEAD = 20

# RFC 4880 4.2.2.4: the first partial body must be at least 512 bytes; we keep every part that large.
MIN_PARTIAL = 512
MAX_PARTIAL_EXP = 30
_PARTIAL_HEADERS = tuple(bytes([224 + exp]) for exp in range(MAX_PARTIAL_EXP + 1))


class PacketError(ValueError):
    """Bytes that are not the OpenPGP packets they should be."""


def read_exact(src: Source, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = src.read(left)
        if not chunk:
            raise PacketError(f"the data ends {left} bytes before the end of a field (truncated)")
        parts.append(chunk)
        left -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class PullReader:
    """read(n) over a producer of blocks: a block larger than n is handed out over several reads.

    Subclasses implement `_produce`, which returns the next non-empty block, or b"" at the end.
    """

    def __init__(self) -> None:
        self._spill = memoryview(b"")
        self._done = False

    def _produce(self) -> bytes:
        raise NotImplementedError

    def read(self, n: int) -> bytes:
        if not self._spill:
            if self._done:
                return b""
            block = self._produce()
            if not block:
                self._done = True
                return b""
            if len(block) <= n:
                return block
            self._spill = memoryview(block)
        out = bytes(self._spill[:n])
        self._spill = self._spill[n:]
        return out

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass


def _new_length(src: Source) -> tuple[int, bool]:
    """A new-format body length: (length, whether it is a partial length and more follows)."""
    first = read_exact(src, 1)[0]
    if first < 192:
        return first, False
    if first < 224:
        return ((first - 192) << 8) + read_exact(src, 1)[0] + 192, False
    if first == 255:
        return int.from_bytes(read_exact(src, 4), "big"), False
    return 1 << (first & 0x1F), True


class PacketBody(PullReader):
    """One packet's body, across partial lengths; length None reads to the end of the source."""

    def __init__(self, src: Source, length: int | None, partial: bool):
        super().__init__()
        self._src = src
        self._left = length
        self._partial = partial

    def _produce(self) -> bytes:
        if self._left is None:  # old-format indeterminate length: the rest of the enclosing data
            return self._src.read(READ_SIZE)
        while self._left == 0:
            if not self._partial:
                return b""
            self._left, self._partial = _new_length(self._src)
        block = self._src.read(min(READ_SIZE, self._left))
        if not block:
            raise PacketError(f"a packet body ends {self._left} bytes early (truncated)")
        self._left -= len(block)
        return block

    def read_all(self, limit: int) -> bytes:
        """The whole (small) body; more than `limit` bytes is an error, not an allocation."""
        parts, total = [], 0
        while chunk := self.read(limit + 1 - total):
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise PacketError(f"a packet that should be small is longer than {limit} bytes")
        return b"".join(parts)


def read_packet(src: Source) -> tuple[int, PacketBody] | None:
    """The next packet's tag and streamed body; None at a clean end of the source."""
    first = src.read(1)
    if not first:
        return None
    octet = first[0]
    if not octet & 0x80:
        raise PacketError(f"byte 0x{octet:02x} does not start an OpenPGP packet")
    if octet & 0x40:  # new format
        return octet & 0x3F, PacketBody(src, *_new_length(src))
    tag, length_type = (octet >> 2) & 0x0F, octet & 0x03
    if length_type == 3:
        return tag, PacketBody(src, None, False)
    return tag, PacketBody(src, int.from_bytes(read_exact(src, 1 << length_type), "big"), False)


def iter_packets(data: bytes):
    """(tag, body bytes) of every packet in a small, complete buffer (keys, signatures)."""
    src = _BytesSource(data)
    while (packet := read_packet(src)) is not None:
        tag, body = packet
        yield tag, body.read_all(len(data))


class _BytesSource:
    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int) -> bytes:
        out = bytes(self._data[self._pos:self._pos + n])
        self._pos += len(out)
        return out


def encode_length(n: int) -> bytes:
    if n < 192:
        return bytes([n])
    if n < 8384:
        n -= 192
        return bytes([(n >> 8) + 192, n & 0xFF])
    return b"\xff" + n.to_bytes(4, "big")


def packet(tag: int, body: bytes) -> bytes:
    """A complete new-format packet."""
    return bytes([0xC0 | tag]) + encode_length(len(body)) + body


class PartialWriter:
    """One packet of a length not known in advance: power-of-two partial bodies, then a final length.

    write() returns the framed bytes ready so far (fewer than 512 are held back); finish() the rest.
    """

    def __init__(self, tag: int):
        self._head = bytes([0xC0 | tag])
        self._pending = bytearray()

    def _take_head(self) -> bytes:
        head, self._head = self._head, b""
        return head

    def write(self, data) -> bytes:
        view = memoryview(data).cast("B")
        left = len(self._pending) + len(view)
        if left < MIN_PARTIAL:
            self._pending += view
            return b""
        # The held-back bytes (< 512) all go into the first part; one join copies everything once.
        pieces: list = [self._take_head()]
        start = -len(self._pending)  # where the next part starts in `view`; negative: in the held bytes
        while left >= MIN_PARTIAL:
            exp = min(left.bit_length() - 1, MAX_PARTIAL_EXP)
            size = 1 << exp
            pieces.append(_PARTIAL_HEADERS[exp])
            if start < 0:
                pieces += (self._pending, view[:start + size])
            else:
                pieces.append(view[start:start + size])
            start += size
            left -= size
        out = b"".join(pieces)
        self._pending = bytearray(view[start:])
        return out

    def finish(self) -> bytes:
        tail, self._pending = bytes(self._pending), bytearray()
        return self._take_head() + encode_length(len(tail)) + tail
