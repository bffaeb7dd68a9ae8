"""OpenPGP keys: armor, key rings, recipient choice, S2K unlocking and session-key (un)wrapping (RSA, ECDH)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography 47+ keeps CFB (OpenPGP's mode) among the "decrepit" primitives
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:
    from cryptography.hazmat.primitives.ciphers.modes import CFB
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from walrus.crypto.pgp_packets import (TAG_PUBLIC_KEY, TAG_PUBLIC_SUBKEY, TAG_SECRET_KEY, TAG_SECRET_SUBKEY,
                                       TAG_SIGNATURE, TAG_USER_ATTRIBUTE, TAG_USER_ID, PacketError, iter_packets)

ALGO_RSA = 1
ALGO_RSA_ENCRYPT_ONLY = 2
ALGO_ECDH = 18
ENCRYPTING_ALGOS = frozenset({ALGO_RSA, ALGO_RSA_ENCRYPT_ONLY, ALGO_ECDH})
ALGO_NAMES = {1: "RSA", 2: "RSA", 3: "RSA", 16: "Elgamal", 17: "DSA", 18: "ECDH", 19: "ECDSA", 22: "EdDSA"}

FLAG_ENCRYPT_COMMUNICATIONS = 0x04  # what go-crypto requires of an encryption (sub)key

SIG_UID_CERTS = frozenset({0x10, 0x11, 0x12, 0x13})
SIG_SUBKEY_BINDING = 0x18
SIG_DIRECT_KEY = 0x1F
SIG_KEY_REVOCATION = 0x20
SIG_SUBKEY_REVOCATION = 0x28

S2K_USAGE_SHA1 = 254
S2K_USAGE_CHECKSUM = 255


class PgpKeyError(ValueError):
    """A key that cannot be read or used; the message is shown to the user (never the key itself)."""


# --- symmetric ciphers and hashes (RFC 4880 9.2, 9.4) ---------------------------------------------


@dataclass(frozen=True)
class SymCipher:
    name: str
    key_size: int
    block_size: int
    make: Callable[[bytes], object]


def _decrepit(name: str) -> Callable[[bytes], object]:
    def make(key: bytes):
        from cryptography.hazmat.decrepit.ciphers import algorithms as old

        return getattr(old, name)(key)

    return make


CIPHERS: dict[int, SymCipher] = {
    2: SymCipher("TripleDES", 24, 8, _decrepit("TripleDES")),
    3: SymCipher("CAST5", 16, 8, _decrepit("CAST5")),
    4: SymCipher("Blowfish", 16, 8, _decrepit("Blowfish")),
    7: SymCipher("AES-128", 16, 16, algorithms.AES),
    8: SymCipher("AES-192", 24, 16, algorithms.AES),
    9: SymCipher("AES-256", 32, 16, algorithms.AES),
}
AES256 = 9


def cipher(algo: int) -> SymCipher:
    try:
        return CIPHERS[algo]
    except KeyError:
        raise PgpKeyError(f"symmetric algorithm {algo} is not supported "
                        f"(supported: {', '.join(c.name for c in CIPHERS.values())})") from None


def cfb(algo: int, key: bytes, iv: bytes | None = None) -> Cipher:
    c = cipher(algo)
    return Cipher(c.make(key), CFB(iv if iv is not None else bytes(c.block_size)))


HASHES = {1: "md5", 2: "sha1", 3: "ripemd160", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}


def new_hash(algo: int):
    try:
        return hashlib.new(HASHES[algo])
    except (KeyError, ValueError):
        raise PgpKeyError(f"hash algorithm {algo} is not supported") from None


# --- armor (RFC 4880 6.2) ----------------------------------------------------------------------------

_ARMOR_RE = re.compile(r"-----BEGIN PGP (PUBLIC|PRIVATE) KEY BLOCK-----\s*\n(.*?)\n-----END PGP \1 KEY BLOCK-----",
                       re.S)


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def dearmor(text: str) -> bytes:
    """The binary packets of every armored key block in `text`, concatenated."""
    blocks = _ARMOR_RE.findall(text.replace("\r\n", "\n"))
    if not blocks:
        raise PgpKeyError("no armored key block (-----BEGIN PGP PUBLIC/PRIVATE KEY BLOCK-----) found")
    out = []
    for _, body in blocks:
        lines = [line.strip() for line in body.split("\n")]
        if lines and ":" in lines[0]:  # armor headers (Version:, Comment:) end at a blank line
            lines = lines[lines.index(""):] if "" in lines else []
        data_lines = [line for line in lines if line]
        checksum = None
        if data_lines and data_lines[-1].startswith("=") and len(data_lines[-1]) == 5:
            checksum = data_lines.pop()[1:]
        try:
            data = base64.b64decode("".join(data_lines), validate=True)
        except ValueError as e:
            raise PgpKeyError(f"the armored key block is not valid base64: {e}") from None
        if checksum is not None and base64.b64decode(checksum) != _crc24(data).to_bytes(3, "big"):
            raise PgpKeyError("the armored key block's checksum does not match (damaged or incomplete key)")
        out.append(data)
    return b"".join(out)


# --- key packets -------------------------------------------------------------------------------------


class _Fields:
    """Sequential reading of a key or signature packet body."""

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise PgpKeyError("a key packet ends early (damaged key)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def mpi_bytes(self) -> bytes:
        bits = int.from_bytes(self.take(2), "big")
        return self.take((bits + 7) // 8)

    def mpi(self) -> int:
        return int.from_bytes(self.mpi_bytes(), "big")

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)


def mpi(value: bytes) -> bytes:
    """A big-endian number as an OpenPGP MPI: bit count, then the bytes without leading zeros."""
    raw = value.lstrip(b"\0")
    bits = (len(raw) - 1) * 8 + raw[0].bit_length() if raw else 0
    return bits.to_bytes(2, "big") + raw


CURVE25519_OID = bytes.fromhex("2b060104019755010501")
NIST_CURVES: dict[bytes, type[ec.EllipticCurve]] = {
    bytes.fromhex("2a8648ce3d030107"): ec.SECP256R1,
    bytes.fromhex("2b81040022"): ec.SECP384R1,
    bytes.fromhex("2b81040023"): ec.SECP521R1,
}
KDF_HASHES = {8: hashes.SHA256, 9: hashes.SHA384, 10: hashes.SHA512}


@dataclass
class Key:
    """A v4 primary key or subkey, with what its self-signatures say about using it for encryption."""

    version: int
    created: int
    algo: int
    public: bytes  # the public part of the packet body, which the fingerprint hashes
    params: dict
    secret: bytes | None  # the (possibly protected) secret part; None for a public key packet
    fingerprint: bytes
    self_sig: "Signature | None" = None  # the self-signature that speaks for this key's use
    revoked: bool = False
    _unlocked: dict | None = field(default=None, repr=False)

    @property
    def key_id(self) -> bytes:
        return self.fingerprint[-8:]

    @property
    def hex_id(self) -> str:
        return self.key_id.hex().upper()

    def can_encrypt(self, now: float) -> bool:
        sig = self.self_sig
        return (sig is not None and self.algo in ENCRYPTING_ALGOS and not self.revoked
                and bool((sig.flags or 0) & FLAG_ENCRYPT_COMMUNICATIONS) and not _expired(self, sig, now))

    def __repr__(self) -> str:  # never the secret material
        return f"Key({ALGO_NAMES.get(self.algo, self.algo)} {self.hex_id})"


def _parse_key(body: bytes, secret: bool) -> Key | None:
    """A v4 key packet; None for versions and algorithms walrus cannot use (so they can be skipped)."""
    f = _Fields(body)
    version = f.byte()
    if version != 4:
        return None
    created = int.from_bytes(f.take(4), "big")
    algo = f.byte()
    params: dict = {}
    if algo in (1, 2, 3):
        params = {"n": f.mpi(), "e": f.mpi()}
    elif algo == 16:
        params = {"p": f.mpi(), "g": f.mpi(), "y": f.mpi()}
    elif algo == 17:
        params = {"p": f.mpi(), "q": f.mpi(), "g": f.mpi(), "y": f.mpi()}
    elif algo == ALGO_ECDH:
        oid = f.take(f.byte())
        point = f.mpi_bytes()
        kdf = f.take(f.byte())
        if len(kdf) != 3 or kdf[0] != 1:
            return None
        params = {"oid": oid, "point": point, "kdf_hash": kdf[1], "kdf_cipher": kdf[2]}
    elif algo in (19, 22):
        params = {"oid": f.take(f.byte()), "point": f.mpi_bytes()}
    elif secret:
        return None  # the public part's length is unknown: the fingerprint cannot be computed
    else:
        f.rest()
    public = body[:f.pos]
    fingerprint = hashlib.sha1(b"\x99" + struct.pack(">H", len(public)) + public).digest()
    return Key(version, created, algo, public, params, body[f.pos:] if secret else None, fingerprint)


@dataclass
class Signature:
    sig_type: int
    created: int = 0
    expires: int | None = None  # signature expiration, seconds after created
    key_expires: int | None = None
    flags: int | None = None
    primary_uid: bool = False
    issuer: bytes | None = None


def _subpackets(data: bytes):
    pos = 0
    while pos < len(data):
        first = data[pos]
        if first < 192:
            length, pos = first, pos + 1
        elif first < 255:
            length, pos = ((first - 192) << 8) + data[pos + 1] + 192, pos + 2
        else:
            length, pos = int.from_bytes(data[pos + 1:pos + 5], "big"), pos + 5
        if length == 0 or pos + length > len(data):
            raise PgpKeyError("a signature subpacket is malformed (damaged key)")
        yield data[pos] & 0x7F, data[pos + 1:pos + length]
        pos += length


def _parse_signature(body: bytes) -> Signature | None:
    if not body:
        return None
    if body[0] == 3 and len(body) >= 7:
        return Signature(body[2], created=int.from_bytes(body[3:7], "big"))
    if body[0] != 4 or len(body) < 6:
        return None
    sig = Signature(body[1])
    hashed_len = int.from_bytes(body[4:6], "big")
    hashed = body[6:6 + hashed_len]
    unhashed_at = 6 + hashed_len
    unhashed = body[unhashed_at + 2:unhashed_at + 2 + int.from_bytes(body[unhashed_at:unhashed_at + 2], "big")]
    for kind, value in _subpackets(hashed):
        if kind == 2 and len(value) == 4:
            sig.created = int.from_bytes(value, "big")
        elif kind == 3 and len(value) == 4:
            sig.expires = int.from_bytes(value, "big")
        elif kind == 9 and len(value) == 4:
            sig.key_expires = int.from_bytes(value, "big")
        elif kind == 27 and value:
            sig.flags = value[0]
        elif kind == 25 and value:
            sig.primary_uid = bool(value[0])
        elif kind == 16 and len(value) == 8:
            sig.issuer = value
        elif kind == 33 and len(value) == 21:
            sig.issuer = value[-8:]
    for kind, value in _subpackets(unhashed):
        if kind == 16 and len(value) == 8 and sig.issuer is None:
            sig.issuer = value
    return sig


def _expired(key: Key, sig: Signature, now: float) -> bool:
    return bool((sig.key_expires and key.created + sig.key_expires <= now)
                or (sig.expires and sig.created + sig.expires <= now))


@dataclass
class Entity:
    """A primary key, its subkeys and what its self-signatures say."""

    primary: Key
    subkeys: list[Key] = field(default_factory=list)
    primary_sigs: list[Signature] = field(default_factory=list, repr=False)

    def encryption_key(self, now: float) -> Key | None:
        """The key go-crypto would encrypt to: the newest valid encryption subkey, else the primary."""
        primary = self.primary
        if primary.self_sig is None or primary.revoked or _expired(primary, primary.self_sig, now):
            return None
        candidates = [k for k in self.subkeys if k.can_encrypt(now)]
        if candidates:
            return max(candidates, key=lambda k: k.self_sig.created)  # type: ignore[union-attr]
        return primary if primary.can_encrypt(now) else None

    def keys(self) -> list[Key]:
        return [self.primary, *self.subkeys]


def parse_keyring(data: bytes) -> list[Entity]:
    """Entities of a binary key ring (transferable public or secret keys, RFC 4880 11.1-11.2).

    Self-signatures are trusted as written, not verified: the key ring is the operator's configuration.
    Keys of other versions or unknown algorithms are skipped (an entity whose primary is skipped, whole).
    """
    entities: list[Entity] = []
    entity: Entity | None = None
    key: Key | None = None
    in_user_id = False
    try:
        for tag, body in iter_packets(data):
            if tag in (TAG_PUBLIC_KEY, TAG_SECRET_KEY):
                key = _parse_key(body, tag == TAG_SECRET_KEY)
                entity = Entity(key) if key is not None else None
                if entity is not None:
                    entities.append(entity)
                in_user_id = False
            elif tag in (TAG_PUBLIC_SUBKEY, TAG_SECRET_SUBKEY):
                key, in_user_id = _parse_key(body, tag == TAG_SECRET_SUBKEY), False
                if entity is not None and key is not None:
                    entity.subkeys.append(key)
            elif tag in (TAG_USER_ID, TAG_USER_ATTRIBUTE):
                in_user_id = True
            elif tag == TAG_SIGNATURE and entity is not None and key is not None:
                _attach(entity, key, in_user_id, _parse_signature(body))
    except PacketError as e:
        raise PgpKeyError(f"the key ring is not valid OpenPGP: {e}") from None
    for e in entities:
        # go-crypto's primary self-signature: the primary user ID's, else the newest
        if e.primary_sigs:
            e.primary.self_sig = max(e.primary_sigs, key=lambda s: (s.primary_uid, s.created))
    return entities


def _attach(entity: Entity, key: Key, in_user_id: bool, sig: Signature | None) -> None:
    primary = entity.primary
    if sig is None or (sig.issuer is not None and sig.issuer != primary.key_id):
        return  # a third party's certification says nothing about how the owner uses the key
    if key is primary:
        if sig.sig_type == SIG_KEY_REVOCATION:
            primary.revoked = True
        elif (sig.sig_type in SIG_UID_CERTS and in_user_id) or sig.sig_type == SIG_DIRECT_KEY:
            entity.primary_sigs.append(sig)
    elif sig.sig_type == SIG_SUBKEY_BINDING:
        if key.self_sig is None or sig.created >= key.self_sig.created:
            key.self_sig = sig
    elif sig.sig_type == SIG_SUBKEY_REVOCATION:
        key.revoked = True


# --- secret keys (RFC 4880 3.7, 5.5.3) ------------------------------------------------------------------


class NoSecret(Exception):
    """The key ring holds only the public part of this key (or a gpg stub pointing to a card)."""


class NeedPassphrase(Exception):
    """The secret part is protected and no passphrase was given."""


class BadPassphrase(Exception):
    """The passphrase does not unlock the secret part."""


def s2k(spec: _Fields, passphrase: bytes, key_size: int) -> bytes:
    kind, hash_algo = spec.byte(), spec.byte()
    salt = spec.take(8) if kind in (1, 3) else b""
    count = 0
    if kind == 3:
        c = spec.byte()
        count = (16 + (c & 15)) << ((c >> 4) + 6)
    elif kind not in (0, 1):
        raise PgpKeyError(f"S2K specifier {kind} is not supported")
    data = salt + passphrase
    out = b""
    preload = 0
    while len(out) < key_size:
        h = new_hash(hash_algo)
        h.update(b"\0" * preload)
        if kind == 3:
            total = max(count, len(data))
            repeats, tail = divmod(total, len(data))
            block_repeats = max(1, (64 << 10) // len(data))
            block = data * block_repeats
            for _ in range(repeats // block_repeats):
                h.update(block)
            h.update(data * (repeats % block_repeats) + data[:tail])
        else:
            h.update(data)
        out += h.digest()
        preload += 1
    return out[:key_size]


def _secret_fields(key: Key, passphrase: bytes | None) -> _Fields:
    """The secret MPIs of `key`, decrypted and checked."""
    assert key.secret is not None
    f = _Fields(key.secret)
    usage = f.byte()
    if usage == 0:
        material = f.rest()
        body, check = material[:-2], material[-2:]
        if sum(body) & 0xFFFF != int.from_bytes(check, "big"):
            raise PgpKeyError(f"the secret part of key {key.hex_id} fails its checksum (damaged key)")
        return _Fields(body)
    if usage not in (S2K_USAGE_SHA1, S2K_USAGE_CHECKSUM):
        raise PgpKeyError(f"key {key.hex_id} is protected in a legacy way (S2K usage {usage}) walrus cannot read")
    sym = f.byte()
    if f.data[f.pos:f.pos + 1] == b"\x65":  # S2K 101, GnuPG's: no secret here (gnu-dummy) or on a smartcard
        raise NoSecret
    spec = _Fields(f.take(_s2k_length(f.data[f.pos:f.pos + 1])))
    iv = f.take(cipher(sym).block_size)
    encrypted = f.rest()
    if passphrase is None:
        raise NeedPassphrase
    session = s2k(spec, passphrase, cipher(sym).key_size)
    decryptor = cfb(sym, session, iv).decryptor()
    plain = decryptor.update(encrypted) + decryptor.finalize()
    if usage == S2K_USAGE_SHA1:
        body, check = plain[:-20], plain[-20:]
        ok = hmac.compare_digest(hashlib.sha1(body).digest(), check)
    else:
        body, check = plain[:-2], plain[-2:]
        ok = sum(body) & 0xFFFF == int.from_bytes(check, "big")
    if not ok:
        raise BadPassphrase
    return _Fields(body)


def _s2k_length(kind: bytes) -> int:
    """Bytes of an S2K specifier of this kind: type and hash, then salt (salted), then count (iterated)."""
    try:
        return {b"\0": 2, b"\1": 10, b"\3": 11}[kind]
    except KeyError:
        raise PgpKeyError(f"S2K specifier {kind.hex() or '(missing)'} is not supported") from None


def unlock(key: Key, passphrase: bytes | None) -> dict:
    """The secret parameters walrus needs for decryption (cached on the key)."""
    if key._unlocked is None:
        if key.secret is None:
            raise NoSecret
        f = _secret_fields(key, passphrase)
        if key.algo in (ALGO_RSA, ALGO_RSA_ENCRYPT_ONLY):
            d, p, q = f.mpi(), f.mpi(), f.mpi()
            n, e = key.params["n"], key.params["e"]
            numbers = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q),
                                            rsa.rsa_crt_iqmp(p, q), rsa.RSAPublicNumbers(e, n))
            key._unlocked = {"rsa": numbers.private_key()}
        elif key.algo == ALGO_ECDH:
            key._unlocked = {"d": f.mpi_bytes()}
        else:
            raise PgpKeyError(f"key {key.hex_id} ({ALGO_NAMES.get(key.algo, key.algo)}) cannot decrypt")
    return key._unlocked


# --- session keys (RFC 4880 5.1, RFC 6637 8) ---------------------------------------------------------------


def session_key_payload(sym: int, session_key: bytes) -> bytes:
    """algorithm octet, key, two-octet checksum: what the public-key algorithm encrypts."""
    return bytes([sym]) + session_key + (sum(session_key) & 0xFFFF).to_bytes(2, "big")


def parse_session_key_payload(m: bytes) -> tuple[int, bytes] | None:
    if len(m) < 3 or m[0] not in CIPHERS:
        return None
    sym, key, check = m[0], m[1:-2], m[-2:]
    if len(key) != CIPHERS[sym].key_size or sum(key) & 0xFFFF != int.from_bytes(check, "big"):
        return None
    return sym, key


def _ecdh_kek(key: Key, shared: bytes) -> bytes:
    params = key.params
    oid = params["oid"]
    kdf_hash, kek_algo = params["kdf_hash"], params["kdf_cipher"]
    if kdf_hash not in KDF_HASHES or kek_algo not in (7, 8, 9):
        raise PgpKeyError(f"ECDH key {key.hex_id} uses KDF parameters walrus does not support")
    param = (bytes([len(oid)]) + oid + bytes([ALGO_ECDH, 3, 1, kdf_hash, kek_algo])
             + b"Anonymous Sender    " + key.fingerprint)
    digest = hashes.Hash(KDF_HASHES[kdf_hash]())
    digest.update(b"\0\0\0\1" + shared + param)
    return digest.finalize()[:CIPHERS[kek_algo].key_size]


def _check_curve(key: Key) -> None:
    oid = key.params["oid"]
    if oid != CURVE25519_OID and oid not in NIST_CURVES:
        raise PgpKeyError(f"ECDH key {key.hex_id} is on a curve walrus does not support "
                        "(supported: Curve25519, NIST P-256, P-384, P-521)")


def check_encryption_key(key: Key) -> None:
    """Raise PgpKeyError now, at startup, for a recipient key walrus could not encrypt to."""
    if key.algo == ALGO_ECDH:
        _check_curve(key)
        _ecdh_kek(key, b"")


def encrypt_session_key(key: Key, payload: bytes) -> bytes:
    """The algorithm-specific fields of a PKESK packet carrying `payload` to `key`."""
    if key.algo in (ALGO_RSA, ALGO_RSA_ENCRYPT_ONLY):
        public = rsa.RSAPublicNumbers(key.params["e"], key.params["n"]).public_key()
        return mpi(public.encrypt(payload, padding.PKCS1v15()))
    _check_curve(key)
    point, oid = key.params["point"], key.params["oid"]
    if oid == CURVE25519_OID:
        ephemeral = x25519.X25519PrivateKey.generate()
        shared = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(point[1:]))
        ephemeral_point = b"\x40" + ephemeral.public_key().public_bytes(serialization.Encoding.Raw,
                                                                         serialization.PublicFormat.Raw)
    else:
        curve = NIST_CURVES[oid]()
        ephemeral_nist = ec.generate_private_key(curve)
        shared = ephemeral_nist.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(curve, point))
        ephemeral_point = ephemeral_nist.public_key().public_bytes(serialization.Encoding.X962,
                                                                   serialization.PublicFormat.UncompressedPoint)
    # PKCS#5 padding to 40 bytes, as go-crypto and GnuPG pad
    pad = 40 - len(payload)
    wrapped = aes_key_wrap(_ecdh_kek(key, shared), payload + bytes([pad]) * pad)
    return mpi(ephemeral_point) + bytes([len(wrapped)]) + wrapped


def decrypt_session_key(key: Key, passphrase: bytes | None, fields: bytes) -> tuple[int, bytes] | None:
    """(cipher algorithm, session key) from a PKESK's fields, or None if they do not decrypt with `key`."""
    secret = unlock(key, passphrase)
    f = _Fields(fields)
    if key.algo in (ALGO_RSA, ALGO_RSA_ENCRYPT_ONLY):
        private = secret["rsa"]
        size = (private.key_size + 7) // 8
        ciphertext = f.mpi_bytes().rjust(size, b"\0")
        try:
            payload = private.decrypt(ciphertext, padding.PKCS1v15())
        except ValueError:
            return None
        return parse_session_key_payload(payload)
    _check_curve(key)
    ephemeral = f.mpi_bytes()
    wrapped = f.take(f.byte())
    oid = key.params["oid"]
    if oid == CURVE25519_OID:
        # OpenPGP stores the Curve25519 scalar big-endian: reversed from X25519's native order
        native = secret["d"].rjust(32, b"\0")[::-1]
        shared = x25519.X25519PrivateKey.from_private_bytes(native).exchange(
            x25519.X25519PublicKey.from_public_bytes(ephemeral[1:]))
    else:
        curve = NIST_CURVES[oid]()
        private_ec = ec.derive_private_key(int.from_bytes(secret["d"], "big"), curve)
        shared = private_ec.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(curve, ephemeral))
    try:
        padded = aes_key_unwrap(_ecdh_kek(key, shared), wrapped)
    except InvalidUnwrap:
        return None
    pad = padded[-1]
    if not 0 < pad <= len(padded):
        return None
    return parse_session_key_payload(padded[:-pad])


def random_session_key(sym: int = AES256) -> bytes:
    return os.urandom(CIPHERS[sym].key_size)
