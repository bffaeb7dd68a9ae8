"""OpenPGP encryption as WAL-G (go-crypto) and WAL-E (gpg) write it: binary messages, streamed both ways.

Writing: one PKESK per key-ring entity (its newest encryption subkey), then a SEIPD packet (AES-256,
MDC) holding one literal-data packet, both framed with partial body lengths, as
`openpgp.Encrypt(w, keyring, nil, nil, nil)` does. Reading: PKESK (RSA, ECDH), SEIPD with its MDC
checked at the end, optionally a compressed packet (ZIP, ZLIB, BZip2), one literal-data packet;
signatures are skipped unverified (go-crypto's UnverifiedBody). Every stage holds at most about one
READ_SIZE block, whatever the object's size.
"""
from __future__ import annotations

import bz2
import hashlib
import hmac
import os
import time
import zlib
from dataclasses import dataclass

from walrus.codec.base import BytesLike, Reader
from walrus.crypto import pgp_keys as keys
from walrus.crypto.pgp_keys import Entity, Key, PgpKeyError
from walrus.crypto.pgp_packets import (TAG_AEAD, TAG_COMPRESSED, TAG_LITERAL, TAG_MARKER, TAG_ONE_PASS_SIGNATURE,
                                       TAG_PKESK, TAG_SED, TAG_SEIPD, TAG_SIGNATURE, TAG_SKESK, PacketBody, PacketError,
                                       PartialWriter, PullReader, packet, read_exact, read_packet)
from walrus.errors import CorruptObject
from walrus.pull import READ_SIZE, Source

MDC_HEADER = b"\xd3\x14"  # new-format tag 19, length 20: the MDC packet's header, hashed with the data
MDC_LENGTH = 22
PKESK_LIMIT = 1 << 16  # an RSA-16384 PKESK is about 2 KiB

HINT_KEY = ("the object was written with another key or without encryption; check WALG_PGP_KEY / "
            "WALG_PGP_KEY_PATH (and WALG_PGP_KEY_PASSPHRASE)")
HINT_DAMAGED = "the object is damaged or truncated (an interrupted upload); restore from another copy"


class OpenPgpCrypter:
    """Encrypts to every entity of a key ring; decrypts with any of its secret keys."""

    name = "OpenPGP"

    def __init__(self, entities: list[Entity], passphrase: bytes | None):
        self._entities = entities
        self._passphrase = passphrase
        now = time.time()
        recipients = []
        for entity in entities:
            key = entity.encryption_key(now)
            if key is None:
                raise PgpKeyError(f"key {entity.primary.hex_id} has no valid encryption key "
                                  "(a subkey flagged for encryption, not expired or revoked)")
            keys.check_encryption_key(key)
            recipients.append(key)
        if not recipients:
            raise PgpKeyError("the key ring holds no key walrus can use (v4 RSA or ECDH)")
        self.recipients: tuple[Key, ...] = tuple(recipients)

    @classmethod
    def from_armored(cls, text: str, passphrase: bytes | None) -> "OpenPgpCrypter":
        return cls(keys.parse_keyring(keys.dearmor(text)), passphrase)

    def __repr__(self) -> str:
        return f"OpenPgpCrypter(recipients={[k.hex_id for k in self.recipients]})"

    def new_encryptor(self) -> "MessageWriter":
        return MessageWriter(self.recipients)

    def open_reader(self, raw: Source, name: str) -> Reader:
        return MessageReader(raw, self, name)

    def session_key(self, pkesks: list[tuple[bytes, int, bytes]], name: str) -> tuple[int, bytes]:
        """(cipher, key) from the first PKESK one of our secret keys opens."""
        ours = [k for e in self._entities for k in e.keys()]
        problems = []
        for key_id, algo, fields in pkesks:
            candidates = [k for k in ours if k.algo == algo and (key_id == bytes(8) or k.key_id == key_id)]
            for key in candidates:
                try:
                    found = keys.decrypt_session_key(key, self._passphrase, fields)
                except keys.NoSecret:
                    problems.append(f"only the public part of key {key.hex_id} is configured")
                    continue
                except keys.NeedPassphrase:
                    raise CorruptObject(
                        f"cannot decrypt {name!r}: secret key {key.hex_id} is protected by a passphrase",
                        hint="set WALG_PGP_KEY_PASSPHRASE") from None
                except keys.BadPassphrase:
                    raise CorruptObject(
                        f"cannot decrypt {name!r}: WALG_PGP_KEY_PASSPHRASE does not unlock secret key {key.hex_id}",
                        hint="set the passphrase the key was exported with") from None
                except PgpKeyError as e:
                    problems.append(str(e))
                    continue
                if found is not None:
                    return found
                problems.append(f"key {key.hex_id} does not decrypt its session key")
        wanted = ", ".join(k.hex().upper() if k != bytes(8) else "(hidden recipient)" for k, _, _ in pkesks)
        have = ", ".join(k.hex_id for k in ours)
        raise CorruptObject(f"cannot decrypt {name!r}: none of the configured OpenPGP keys opens it",
                             detail=f"encrypted to key IDs {wanted}; configured keys {have}"
                                    + (f"; {'; '.join(problems)}" if problems else ""),
                             hint=HINT_KEY)


class MessageWriter:
    """One binary OpenPGP message in the making: encrypt() and finish() return the next bytes to store."""

    def __init__(self, recipients: tuple[Key, ...], sym: int = keys.AES256):
        session_key = keys.random_session_key(sym)
        payload = keys.session_key_payload(sym, session_key)
        head = b"".join(packet(TAG_PKESK, b"\x03" + key.key_id + bytes([key.algo])
                               + keys.encrypt_session_key(key, payload)) for key in recipients)
        self._cipher = keys.cfb(sym, session_key).encryptor()
        self._mdc = hashlib.sha1()
        self._literal = PartialWriter(TAG_LITERAL)
        self._outer = PartialWriter(TAG_SEIPD)
        block = keys.cipher(sym).block_size
        prefix = os.urandom(block)
        # literal data: binary, no file name, time 0 (go-crypto writes the same fields)
        literal_head = self._literal.write(b"b\x00\x00\x00\x00\x00")
        self._pending = head + self._outer.write(b"\x01" + self._seal(prefix + prefix[-2:] + literal_head))

    def _seal(self, plain: bytes) -> bytes:
        self._mdc.update(plain)
        return self._cipher.update(plain)

    def encrypt(self, data: BytesLike) -> bytes:
        out = self._outer.write(self._seal(self._literal.write(data)))
        if self._pending:
            out, self._pending = self._pending + out, b""
        return out

    def finish(self) -> bytes:
        sealed = self._seal(self._literal.finish() + MDC_HEADER)
        sealed += self._cipher.update(self._mdc.digest()) + self._cipher.finalize()
        out = self._pending + self._outer.write(sealed) + self._outer.finish()
        self._pending = b""
        return out


def _corrupt(name: str, problem: str, hint: str = HINT_DAMAGED, detail: str | None = None) -> CorruptObject:
    return CorruptObject(f"cannot decrypt {name!r}: {problem}", detail=detail, hint=hint)


class _Plaintext(PullReader):
    """The decrypted contents of a SEIPD v1 body, without its trailing MDC packet, which is checked at the end."""

    def __init__(self, body: PacketBody, sym: int, session_key: bytes, name: str):
        super().__init__()
        self._body = body
        self._name = name
        version = read_exact(body, 1)[0]
        if version != 1:
            raise _corrupt(name, f"SEIPD version {version} (AEAD) is not supported", hint=HINT_KEY)
        self._cipher = keys.cfb(sym, session_key).decryptor()
        block = keys.cipher(sym).block_size
        prefix = self._cipher.update(read_exact(body, block + 2))
        if prefix[block - 2:block] != prefix[block:]:
            raise _corrupt(name, "the session key does not decrypt the data", hint=HINT_KEY)
        self._mdc = hashlib.sha1(prefix)
        self._tail = b""  # the last 22 plaintext bytes seen: the MDC packet, once the body ends

    def _produce(self) -> bytes:
        while True:
            block = self._body.read(READ_SIZE)
            if not block:
                self._check_mdc()
                return b""
            plain = self._tail + self._cipher.update(block)
            out, self._tail = plain[:-MDC_LENGTH], plain[-MDC_LENGTH:]
            if out:
                self._mdc.update(out)
                return out

    def _check_mdc(self) -> None:
        self._tail += self._cipher.finalize()
        if len(self._tail) != MDC_LENGTH or self._tail[:2] != MDC_HEADER:
            raise _corrupt(self._name, "the encrypted data does not end with its integrity check (truncated)")
        self._mdc.update(MDC_HEADER)
        if not hmac.compare_digest(self._mdc.digest(), self._tail[2:]):
            raise _corrupt(self._name, "the integrity check (MDC) fails: the object was modified or damaged")


class _Inflate(PullReader):
    """A compressed packet's ZIP (raw deflate) or ZLIB body, at most READ_SIZE out per step."""

    def __init__(self, body: Source, wbits: int, name: str):
        super().__init__()
        self._body = body
        self._name = name
        self._d = zlib.decompressobj(wbits)

    def _produce(self) -> bytes:
        while not self._d.eof:
            data = self._d.unconsumed_tail or self._body.read(READ_SIZE)
            if not data:
                raise _corrupt(self._name, "the compressed packet stops before its end")
            try:
                out = self._d.decompress(data, READ_SIZE)
            except zlib.error as e:
                raise _corrupt(self._name, f"the compressed packet is damaged: {e}") from None
            if out:
                return out
        return b""


class _Bunzip(PullReader):
    def __init__(self, body: Source, name: str):
        super().__init__()
        self._body = body
        self._name = name
        self._d = bz2.BZ2Decompressor()

    def _produce(self) -> bytes:
        while not self._d.eof:
            data = self._body.read(READ_SIZE) if self._d.needs_input else b""
            if self._d.needs_input and not data:
                raise _corrupt(self._name, "the compressed packet stops before its end")
            try:
                out = self._d.decompress(data, READ_SIZE)
            except OSError as e:
                raise _corrupt(self._name, f"the compressed packet is damaged: {e}") from None
            if out:
                return out
        return b""


@dataclass
class _Literal:
    body: PacketBody
    enclosing: list[PullReader]  # innermost first: drained after the literal data, so the MDC is checked


def _open_literal(stream: PullReader, name: str) -> _Literal:
    enclosing = [stream]
    while True:
        found = read_packet(stream)
        if found is None:
            raise _corrupt(name, "the message holds no literal data")
        tag, body = found
        if tag == TAG_LITERAL:
            read_exact(body, 1)  # format: binary, text or UTF-8; the bytes are handed out as stored
            read_exact(body, read_exact(body, 1)[0] + 4)  # file name, date
            return _Literal(body, enclosing[::-1])
        if tag == TAG_COMPRESSED:
            algo = read_exact(body, 1)[0]
            if algo == 0:
                stream = body
            elif algo in (1, 2):
                stream = _Inflate(body, -15 if algo == 1 else 15, name)
            elif algo == 3:
                stream = _Bunzip(body, name)
            else:
                raise _corrupt(name, f"compression algorithm {algo} is not supported")
            enclosing.append(stream)
        elif tag in (TAG_ONE_PASS_SIGNATURE, TAG_SIGNATURE, TAG_MARKER):
            body.drain()
        else:
            raise _corrupt(name, f"unexpected packet (tag {tag}) inside the encrypted data")


class MessageReader(PullReader):
    """The literal data of a binary OpenPGP message; read(n) returns 1..n bytes, b"" after the MDC checks."""

    def __init__(self, raw: Source, crypter: OpenPgpCrypter, name: str):
        super().__init__()
        self._raw = raw
        self._crypter = crypter
        self._name = name
        self._literal: _Literal | None = None

    def _open(self) -> _Literal:
        pkesks = []
        while True:
            found = read_packet(self._raw)
            if found is None:
                raise _corrupt(self._name, "the object is empty or holds no encrypted data")
            tag, body = found
            if tag == TAG_PKESK:
                fields = body.read_all(PKESK_LIMIT)
                if len(fields) < 10 or fields[0] != 3:
                    raise _corrupt(self._name, "a public-key encrypted session key packet is malformed")
                pkesks.append((fields[1:9], fields[9], fields[10:]))
            elif tag in (TAG_MARKER, TAG_SKESK):
                body.drain()
            elif tag == TAG_SEIPD:
                break
            elif tag == TAG_SED:
                raise _corrupt(self._name, "the data is encrypted without integrity protection (legacy "
                                           "SED packet), which walrus refuses to read", hint=HINT_KEY)
            elif tag == TAG_AEAD:
                raise _corrupt(self._name, "OpenPGP AEAD-encrypted data is not supported", hint=HINT_KEY)
            else:
                raise _corrupt(self._name, f"not an OpenPGP encrypted message (packet tag {tag} first)",
                               hint=HINT_KEY)
        if not pkesks:
            raise _corrupt(self._name, "the message is encrypted with a passphrase, not to a key", hint=HINT_KEY)
        sym, session_key = self._crypter.session_key(pkesks, self._name)
        return _open_literal(_Plaintext(body, sym, session_key, self._name), self._name)

    def _produce(self) -> bytes:
        try:
            if self._literal is None:
                self._literal = self._open()
            block = self._literal.body.read(READ_SIZE)
            if not block:
                for stream in self._literal.enclosing:
                    stream.drain()  # trailing signatures, then the MDC check at the end of the SEIPD body
            return block
        except PacketError as e:
            if self._literal is None:
                raise _corrupt(self._name, f"not an OpenPGP encrypted message ({e})", hint=HINT_KEY) from None
            raise _corrupt(self._name, str(e)) from None

    def close(self) -> None:
        self._literal = None
        self._raw = None  # type: ignore[assignment]
