"""libsodium encryption as WAL-G frames it: crypto_secretstream_xchacha20poly1305 over 8192-byte chunks.

Stream: a 24-byte header, then each 8192 plaintext bytes as a MESSAGE chunk (8209 bytes) the moment
they are complete, then one FINAL chunk of the 0..8191 bytes left (an empty one when the length is a
multiple of 8192). WAL-G's reader refuses FINAL on a full-size chunk; walrus's reader also refuses a
stream that ends without FINAL (WAL-G's accepts one cut at a chunk boundary, silently truncated).

Whole chunks are sealed and opened many at a time by a loop in walrus's compiled module, which calls
PyNaCl's libsodium through its function pointers: one call and one release of the GIL per buffer. A
call per chunk from Python (the fallback where the module is not built) gives the GIL up and takes it
back every 8 KiB, and beside the compress threads that cost a backup about 13 thread switches a
buffer. Either way the buffers are preallocated, not nacl.bindings' two allocations and a copy per
chunk. The tests check the output with nacl.bindings, the public API, as an independent reader.
"""
from __future__ import annotations

import base64
import binascii
import functools

from nacl import bindings as _nacl
from nacl._sodium import ffi as _ffi, lib as _lib

from walrus.codec.base import BytesLike
from walrus.errors import CorruptObject
from walrus.pull import READ_SIZE, Source

CHUNK = 8192
HEADER_BYTES = _nacl.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
ABYTES = _nacl.crypto_secretstream_xchacha20poly1305_ABYTES  # 17: one encrypted tag byte, 16 of MAC
SEALED_CHUNK = CHUNK + ABYTES
TAG_MESSAGE = _nacl.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = _nacl.crypto_secretstream_xchacha20poly1305_TAG_FINAL
KEY_BYTES = 32
MIN_KEY_LENGTH = 25  # WAL-G's floor for the "none" transform
TRANSFORMS = ("none", "hex", "base64")

HINT_KEY = ("the object was written with another key or without encryption; check WALG_LIBSODIUM_KEY / "
            "WALG_LIBSODIUM_KEY_PATH and WALG_LIBSODIUM_KEY_TRANSFORM")
HINT_DAMAGED = "the object is damaged or truncated (an interrupted upload); restore from another copy"


@functools.cache
def _compiled():
    """(ffi, lib, push, pull) of walrus's compiled chunk loops and libsodium's secretstream functions'
    addresses in PyNaCl's module, or None where the module is not built."""
    try:
        from walrus._uring._liburing import ffi, lib
    except ImportError:
        return None
    push, pull = (int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, f"crypto_secretstream_xchacha20poly1305_{op}")))
                  for op in ("push", "pull"))
    return ffi, lib, push, pull


def _push_chunks(state, dst: BytesLike, src: BytesLike, count: int) -> None:
    """Seals `count` whole chunks of `src` into `dst` (SEALED_CHUNK bytes each), tagged MESSAGE."""
    compiled = _compiled()
    if compiled is not None:
        ffi, lib, push, _ = compiled
        with ffi.from_buffer("unsigned char[]", dst, require_writable=True) as d, \
                ffi.from_buffer("unsigned char[]", src) as s:
            sealed = lib.walrus_ss_push(push, _address(state), d, s, count, CHUNK, TAG_MESSAGE)
        if sealed != count:
            raise RuntimeError(f"libsodium refused to seal chunk {sealed + 1} of {count}")
        return
    with _ffi.from_buffer(dst, require_writable=True) as d, _ffi.from_buffer(src) as s:
        for i in range(count):
            _lib.crypto_secretstream_xchacha20poly1305_push(state.statebuf, d + i * SEALED_CHUNK, _ffi.NULL,
                                                           s + i * CHUNK, CHUNK, _ffi.NULL, 0, TAG_MESSAGE)


def _address(state) -> int:
    return int(_ffi.cast("uintptr_t", state.statebuf))


def derive_key(material: bytes, transform: str) -> bytes:
    """WAL-G's key rules; ValueError says what is wrong (never showing the key)."""
    if transform == "none":
        if len(material) < MIN_KEY_LENGTH:
            raise ValueError(f"the key must be at least {MIN_KEY_LENGTH} bytes with transform none, "
                             f"got {len(material)}")
        return material[:KEY_BYTES].ljust(KEY_BYTES, b"\0")  # truncated or zero-padded to 32
    if transform == "hex":
        try:
            key = binascii.unhexlify(material)  # strict like Go's hex.DecodeString: no spaces, even length
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"the key is not valid hex: {e}") from None
    elif transform == "base64":
        try:  # Go's StdEncoding: padding required, CR and LF ignored
            key = base64.b64decode(material.replace(b"\r", b"").replace(b"\n", b""), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"the key is not valid base64: {e}") from None
    else:
        raise ValueError(f"unknown key transform {transform!r} (must be {', '.join(TRANSFORMS)})")
    if len(key) != KEY_BYTES:
        raise ValueError(f"the key must decode to exactly {KEY_BYTES} bytes, got {len(key)}")
    return key


class LibsodiumCrypter:
    name = "libsodium"

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a libsodium key is {KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "LibsodiumCrypter(key hidden)"

    def new_encryptor(self) -> "SecretStreamWriter":
        return SecretStreamWriter(self._key)

    def open_reader(self, raw: Source, name: str) -> "SecretStreamReader":
        return SecretStreamReader(raw, self._key, name)


class SecretStreamWriter:
    """encrypt() seals every complete 8192-byte chunk at once; finish() the FINAL chunk."""

    def __init__(self, key: bytes):
        self._state = _nacl.crypto_secretstream_xchacha20poly1305_state()
        self._header = _nacl.crypto_secretstream_xchacha20poly1305_init_push(self._state, key)
        self._pending = bytearray(CHUNK)  # fixed size: cffi pins it while a push reads from it
        self._filled = 0

    def _push(self, dst, src, length: int, tag: int) -> None:
        _lib.crypto_secretstream_xchacha20poly1305_push(self._state.statebuf, dst, _ffi.NULL, src, length,
                                                       _ffi.NULL, 0, tag)

    def encrypt(self, data: BytesLike) -> bytes:
        view = memoryview(data).cast("B")
        full = (self._filled + len(view)) // CHUNK
        if not full:
            self._pending[self._filled:self._filled + len(view)] = view
            self._filled += len(view)
            return self._take_header()
        out = bytearray(full * SEALED_CHUNK)
        done = 0
        if self._filled:
            need = CHUNK - self._filled
            self._pending[self._filled:] = view[:need]
            view = view[need:]
            _push_chunks(self._state, memoryview(out)[:SEALED_CHUNK], self._pending, 1)
            self._filled = 0
            done = 1
        whole = (full - done) * CHUNK
        if whole:
            _push_chunks(self._state, memoryview(out)[done * SEALED_CHUNK:], view[:whole], full - done)
        rest = view[whole:]
        self._pending[:len(rest)] = rest
        self._filled = len(rest)
        return self._take_header() + out

    def finish(self) -> bytes:
        out = bytearray(self._filled + ABYTES)
        with _ffi.from_buffer(out, require_writable=True) as dst, _ffi.from_buffer(self._pending) as src:
            self._push(dst, src, self._filled, TAG_FINAL)
        self._filled = 0
        return self._take_header() + out

    def _take_header(self) -> bytes:
        # Always written, even for an empty object: WAL-G writes it lazily on the first write and so
        # stores an unreadable 17-byte object for empty input; ours is readable by both.
        header, self._header = self._header, b""
        return header


class SecretStreamReader:
    """Pull-style plaintext: read(n) returns 1..n bytes, b"" only after the FINAL chunk.

    Whole sealed chunks are opened where they lie in the raw chunk read (no copy of the input); only
    a chunk split between two raw reads is put together, in `_carry`.
    """

    def __init__(self, raw: Source, key: bytes, name: str):
        self._raw = raw
        self._key = key
        self._name = name
        self._state = None
        self._view = memoryview(b"")  # the raw chunk read last, from its first byte not yet used
        self._carry = bytearray()  # the header, or a sealed chunk begun in an earlier raw chunk
        self._eof = False
        self._final = False
        self._chunks = 0
        self._spill = memoryview(b"")
        self._tag = _ffi.new("unsigned char *")

    def _more(self) -> bool:
        """The next raw chunk into _view; False at the end of the input."""
        while not self._eof:
            block = self._raw.read(READ_SIZE)
            if block:
                self._view = memoryview(block)
                return True
            self._eof = True
        return False

    def _gather(self, size: int) -> None:
        """_carry up to `size` bytes from the input (fewer only at its end)."""
        while len(self._carry) < size and (self._view or self._more()):
            take = self._view[:size - len(self._carry)]
            self._carry += take
            self._view = self._view[len(take):]

    def _start(self) -> None:
        self._gather(HEADER_BYTES)
        if len(self._carry) < HEADER_BYTES:
            raise CorruptObject(f"cannot decrypt {self._name!r}: {len(self._carry)} bytes is shorter than a "
                                 f"libsodium header ({HEADER_BYTES} bytes)",
                                 hint=HINT_KEY if not self._carry else HINT_DAMAGED)
        self._state = _nacl.crypto_secretstream_xchacha20poly1305_state()
        _nacl.crypto_secretstream_xchacha20poly1305_init_pull(self._state, bytes(self._carry), self._key)
        self._carry.clear()

    def read(self, n: int) -> bytes:
        if n < 1:
            raise ValueError(f"read size must be positive, got {n}")
        if not self._spill:
            if self._final:
                return b""
            plain = self._open((n + CHUNK - 1) // CHUNK)
            if len(plain) <= n:
                return plain  # the usual read, of whole chunks: handed out as opened
            self._spill = memoryview(plain)
        out = bytes(self._spill[:n])
        self._spill = self._spill[n:]
        return out

    def _open(self, count: int) -> bytes:
        """Up to `count` chunks of plaintext; at least one byte unless the stream ends (FINAL)."""
        if self._state is None:
            self._start()
        out = bytearray(count * CHUNK)
        opened = 0
        while opened < count:
            if self._carry:  # finish the chunk split between raw reads
                self._gather(SEALED_CHUNK)
                if len(self._carry) < SEALED_CHUNK:
                    break  # the input ended: what is carried is the short last chunk
                self._pull_whole(out, opened, self._carry, 1)
                self._carry.clear()
                opened += 1
                continue
            whole = min(count - opened, len(self._view) // SEALED_CHUNK)
            if whole:
                self._pull_whole(out, opened, self._view[:whole * SEALED_CHUNK], whole)
                self._view = self._view[whole * SEALED_CHUNK:]
                opened += whole
            elif self._view:
                self._carry += self._view  # less than a chunk left here: completed from the next read
                self._view = memoryview(b"")
            elif not self._more():
                break
        if opened:
            return bytes(memoryview(out)[:opened * CHUNK])
        # no full chunk left: the input has ended, and what is left is the short last chunk, which
        # must carry FINAL
        length = len(self._carry)
        if length < ABYTES:
            raise self._truncated()
        last = bytearray(length - ABYTES)
        with _ffi.from_buffer(self._carry) as src, _ffi.from_buffer(last, require_writable=True) as dst:
            if _lib.crypto_secretstream_xchacha20poly1305_pull(self._state.statebuf, dst, _ffi.NULL, self._tag,
                                                               src, length, _ffi.NULL, 0) != 0:
                raise self._bad_chunk()
        self._chunks += 1
        if self._tag[0] != TAG_FINAL:
            raise self._truncated()
        self._carry.clear()
        self._final = True
        return bytes(last)

    def _pull_whole(self, out: bytearray, at: int, sealed: BytesLike, count: int) -> None:
        """Opens `count` full-size chunks of `sealed` into `out`, from its chunk `at` on. FINAL may
        only close a short chunk (WAL-G): on a full-size one it is an error."""
        compiled = _compiled()
        if compiled is not None:
            ffi, lib, _, pull = compiled
            tag = ffi.new("unsigned char *")
            done = 0
            with ffi.from_buffer("unsigned char[]", sealed) as src, \
                    ffi.from_buffer("unsigned char[]", out, require_writable=True) as dst:
                while done < count:  # the loop stops after a tag other than MESSAGE: FINAL is refused below
                    opened = lib.walrus_ss_pull(pull, _address(self._state), dst + (at + done) * CHUNK,
                                                src + done * SEALED_CHUNK, count - done, CHUNK, tag)
                    if opened < 0:
                        self._chunks += -opened - 1  # those before the one that failed
                        raise self._bad_chunk()
                    done += opened
                    self._chunks += opened
                    if tag[0] == TAG_FINAL:
                        raise self._premature_end()
            return
        with _ffi.from_buffer(sealed) as src, _ffi.from_buffer(out, require_writable=True) as dst:
            for i in range(count):
                rc = _lib.crypto_secretstream_xchacha20poly1305_pull(
                    self._state.statebuf, dst + (at + i) * CHUNK, _ffi.NULL, self._tag, src + i * SEALED_CHUNK,
                    SEALED_CHUNK, _ffi.NULL, 0)
                if rc != 0:
                    raise self._bad_chunk()
                self._chunks += 1
                if self._tag[0] == TAG_FINAL:
                    raise self._premature_end()

    def _premature_end(self) -> CorruptObject:
        return CorruptObject(f"cannot decrypt {self._name!r}: a full-size chunk carries the final tag "
                             f"(premature end)", hint=HINT_DAMAGED)

    def _bad_chunk(self) -> CorruptObject:
        if self._chunks == 0:
            return CorruptObject(f"cannot decrypt {self._name!r}: the first chunk does not authenticate "
                                  "with the configured libsodium key", hint=HINT_KEY)
        return CorruptObject(f"cannot decrypt {self._name!r}: chunk {self._chunks + 1} does not authenticate",
                              hint=HINT_DAMAGED)

    def _truncated(self) -> CorruptObject:
        return CorruptObject(f"cannot decrypt {self._name!r}: the stream ends without its final chunk "
                              "(truncated object)", hint=HINT_DAMAGED)

    def close(self) -> None:
        self._view = self._spill = memoryview(b"")
        self._carry = bytearray()
        self._final = True
