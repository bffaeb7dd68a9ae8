"""OpenPGP: WAL-E's encrypted lzop segment, walrus's messages read by walrus and GnuPG, GnuPG's read by walrus."""
from __future__ import annotations

import base64
import io
import itertools
import os
import random
import shutil
import subprocess
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import pytest

from tests.crypto_stream import decrypt_endless, seal
from walrus import codec
from walrus.config import load_settings
from walrus.crypto import decrypting
from walrus.crypto import pgp_keys as keys
from walrus.crypto.openpgp import OpenPgpCrypter
from walrus.crypto.pgp_packets import (TAG_COMPRESSED, TAG_LITERAL, TAG_PKESK, TAG_SEIPD, PartialWriter, packet,
                                       read_packet)
from walrus.errors import ConfigError, CorruptObject

FIXTURES = Path(__file__).parent.parent / "fixtures"
WALE_SEGMENT = FIXTURES / "000000010000000000000024.lzo"
SEGMENT_SIZE = 16 << 20
# (key file, passphrase, encryption subkey ID)
KEYS = {
    "wale-rsa4096": ("waleGpgKey", None, "64298C9964A0313C"),
    "walg-rsa4096": ("pgpTestPrivateKey", None, "6B7F725716E2A613"),
    "cv25519": ("walrus-cv25519.sec.asc", None, "7E433667DFFA0E6C"),
    "p256": ("walrus-p256-sesame.sec.asc", b"sesame", "E8382362B34111B2"),
    "rsa2048": ("walrus-rsa2048-sesame.sec.asc", b"sesame", "B2F1E7BB39D5BF53"),
}


def crypter(name: str, passphrase: bytes | None = None) -> OpenPgpCrypter:
    file, default_passphrase, _ = KEYS[name]
    return OpenPgpCrypter.from_armored((FIXTURES / file).read_text(), passphrase or default_passphrase)


def read_all(reader, n: int = 1 << 20) -> bytes:
    parts = []
    while chunk := reader.read(n):
        assert len(chunk) <= n
        parts.append(chunk)
    return b"".join(parts)


def encrypt(c: OpenPgpCrypter, plain: bytes, pieces=(1 << 20,)) -> bytes:
    writer = c.new_encryptor()
    out, pos = [], 0
    for size in itertools.cycle(pieces):
        if pos >= len(plain):
            break
        out.append(writer.encrypt(plain[pos:pos + size]))
        pos += size
    return b"".join(out) + writer.finish()


class Trickle:
    def __init__(self, data: bytes, sizes=(1, 7, 4096, 65_537, 333, 1 << 20)):
        self._data = memoryview(data)
        self._pos = 0
        self._sizes = itertools.cycle(sizes)

    def read(self, n: int) -> bytes:
        out = bytes(self._data[self._pos:self._pos + min(n, next(self._sizes))])
        self._pos += len(out)
        return out


# --- WAL-E's legacy object -------------------------------------------------------------------------------


def test_wale_segment_decrypts_and_lzop_decompresses_to_a_wal_segment():
    name = "wal_005/000000010000000000000024.lzo"
    raw = Trickle(WALE_SEGMENT.read_bytes())
    segment = read_all(codec.open_reader("lzo", decrypting(raw, crypter("wale-rsa4096"), name), name=name))
    assert len(segment) == SEGMENT_SIZE
    magic = int.from_bytes(segment[0:2], "little")
    assert 0xD061 <= magic < 0xD200  # a PostgreSQL WAL page magic
    assert int.from_bytes(segment[4:8], "little") == 1  # timeline 1
    assert int.from_bytes(segment[8:16], "little") == 0x24 << 24  # page address of segment 0/24
    assert int.from_bytes(segment[32:36], "little") == SEGMENT_SIZE  # long header: xlp_seg_size


def test_wale_segment_with_another_key_names_the_object_and_the_keys():
    with pytest.raises(CorruptObject, match="none of the configured OpenPGP keys") as e:
        read_all(crypter("cv25519").open_reader(io.BytesIO(WALE_SEGMENT.read_bytes()), "wal_005/x.lzo"))
    assert "wal_005/x.lzo" in e.value.message
    assert "64298C9964A0313C" in e.value.detail and "7E433667DFFA0E6C" in e.value.detail
    assert "WALG_PGP_KEY" in e.value.hint


# --- walrus's own messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(KEYS))
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 70_000, 3 * (1 << 20) + 17])
def test_round_trip(key, size):
    c = crypter(key)
    plain = random.Random(size).randbytes(size)
    sealed = encrypt(c, plain, pieces=(1, 600, 100_000, 1 << 20))
    assert read_all(c.open_reader(Trickle(sealed), "x"), 65_536) == plain


def test_message_shape_is_what_go_crypto_writes_and_reads():
    """PKESK v3 to the encryption subkey, then SEIPD v1; inside, one binary literal packet with no name."""
    c = crypter("walg-rsa4096")
    sealed = encrypt(c, b"payload")
    src = io.BytesIO(sealed)
    tag, body = read_packet(src)
    pkesk = body.read_all(1 << 16)
    assert tag == TAG_PKESK and pkesk[0] == 3 and pkesk[1:9].hex().upper() == KEYS["walg-rsa4096"][2]
    tag, body = read_packet(src)
    assert tag == TAG_SEIPD and body.read(1) == b"\x01"
    assert read_packet(src) is None


def test_every_entity_of_a_key_ring_is_a_recipient_and_each_can_decrypt():
    ring = (FIXTURES / "walrus-cv25519.sec.asc").read_text() + (FIXTURES / "pgpTestPrivateKey").read_text()
    both = OpenPgpCrypter.from_armored(ring, None)
    assert [k.hex_id for k in both.recipients] == [KEYS["cv25519"][2], KEYS["walg-rsa4096"][2]]
    sealed = encrypt(both, b"to both")
    for single in ("cv25519", "walg-rsa4096"):
        assert read_all(crypter(single).open_reader(io.BytesIO(sealed), "x")) == b"to both"


def test_compress_then_encrypt_chain():
    c = crypter("cv25519")
    plain = os.urandom(50_000) + bytes(2 << 20)
    sealed = seal("zstd", c, plain)
    reader = codec.open_reader("zst", decrypting(Trickle(sealed), c, "x"), name="x")
    assert read_all(reader) == plain


def test_memory_is_bounded_whatever_the_object_size():
    c = crypter("cv25519")
    total = 40
    seen, peak = decrypt_endless(c, total)
    assert seen == total << 20
    assert peak < 12 << 20, f"peak {peak} bytes while decrypting {total} MiB"


def _message_with_compressed_packet(c: OpenPgpCrypter, plain: bytes, algo: int) -> bytes:
    """A message as GnuPG writes one by default: PKESK, SEIPD( compressed( literal ) , MDC)."""
    import hashlib

    session = os.urandom(32)
    key = c.recipients[0]
    head = packet(TAG_PKESK, b"\x03" + key.key_id + bytes([key.algo])
                  + keys.encrypt_session_key(key, keys.session_key_payload(9, session)))
    literal = PartialWriter(TAG_LITERAL)
    framed = literal.write(b"b\x00\x00\x00\x00\x00" + plain) + literal.finish()
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -15 if algo == 1 else 15)
    compressed = packet(TAG_COMPRESSED, bytes([algo]) + squeezer.compress(framed) + squeezer.flush())
    prefix = os.urandom(16)
    inner = prefix + prefix[-2:] + compressed + b"\xd3\x14"
    inner += hashlib.sha1(inner).digest()
    cipher = keys.cfb(9, session).encryptor()
    return head + packet(TAG_SEIPD, b"\x01" + cipher.update(inner) + cipher.finalize())


@pytest.mark.parametrize("algo", [1, 2], ids=["zip", "zlib"])
def test_compressed_packets_inflate_within_bounds(algo):
    c = crypter("cv25519")
    plain = bytes(64 << 20)  # 64 MiB of zeros: about 64 KiB compressed
    sealed = _message_with_compressed_packet(c, plain, algo)
    assert len(sealed) < 1 << 20
    tracemalloc.start()
    try:
        reader = c.open_reader(io.BytesIO(sealed), "x")
        seen = 0
        while chunk := reader.read(1 << 20):
            assert chunk == bytes(len(chunk))
            seen += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == len(plain)
    assert peak < 8 << 20


# --- failures ------------------------------------------------------------------------------------------------


def test_tampered_ciphertext_fails_the_integrity_check():
    c = crypter("cv25519")
    sealed = bytearray(encrypt(c, os.urandom(200_000)))
    sealed[len(sealed) // 2] ^= 0x40
    with pytest.raises(CorruptObject, match="integrity check"):
        read_all(c.open_reader(io.BytesIO(bytes(sealed)), "wal_005/x.lz4"))


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_message_is_an_error(keep):
    c = crypter("cv25519")
    sealed = encrypt(c, os.urandom(200_000))
    with pytest.raises(CorruptObject, match="truncated|integrity"):
        read_all(c.open_reader(io.BytesIO(sealed[:int(len(sealed) * keep)]), "x"))


def test_plaintext_object_with_a_key_configured_is_a_clear_error():
    with pytest.raises(CorruptObject, match="not an OpenPGP encrypted message") as e:
        read_all(crypter("cv25519").open_reader(io.BytesIO(bytes.fromhex("04224D186470B9") + b"x" * 100),
                                                "wal_005/000000010000000000000003.lz4"))
    assert "000000010000000000000003.lz4" in e.value.message and "WALG_PGP_KEY" in e.value.hint


def test_encrypted_object_without_a_key_fails_in_the_decompressor_with_a_hint():
    sealed = encrypt(crypter("cv25519"), os.urandom(1000))
    with pytest.raises(CorruptObject) as e:
        read_all(codec.open_reader("lz4", io.BytesIO(sealed), name="wal_005/x.lz4"))
    assert "wal_005/x.lz4" in e.value.message and "WALG_PGP_KEY" in e.value.hint


def test_public_key_pushes_but_cannot_fetch():
    public = OpenPgpCrypter.from_armored((FIXTURES / "walrus-cv25519.pub.asc").read_text(), None)
    sealed = encrypt(public, b"archived with the public key only")
    assert read_all(crypter("cv25519").open_reader(io.BytesIO(sealed), "x")) == b"archived with the public key only"
    with pytest.raises(CorruptObject, match="none of the configured") as e:
        read_all(public.open_reader(io.BytesIO(sealed), "x"))
    assert "only the public part" in e.value.detail


@pytest.mark.parametrize("passphrase,problem", [(None, "protected by a passphrase"),
                                                (b"wrong", "does not unlock")])
def test_protected_secret_key_needs_the_right_passphrase(passphrase, problem):
    file = FIXTURES / KEYS["rsa2048"][0]
    locked = OpenPgpCrypter.from_armored(file.read_text(), passphrase)
    sealed = encrypt(locked, b"pushing needs only the public part")  # no passphrase needed to push
    with pytest.raises(CorruptObject, match=problem) as e:
        read_all(locked.open_reader(io.BytesIO(sealed), "x"))
    assert "WALG_PGP_KEY_PASSPHRASE" in e.value.render()
    assert read_all(crypter("rsa2048").open_reader(io.BytesIO(sealed), "x")) == b"pushing needs only the public part"


# --- settings ----------------------------------------------------------------------------------------------


def _settings(tmp_path, **env):
    return load_settings(env={"HOME": str(tmp_path), **env})


def test_key_inline_with_literal_newlines_and_from_a_path(tmp_path):
    inline = (FIXTURES / "pgpTestPrivateKeyEnv").read_text()
    assert "\\n" in inline and "\n" not in inline.strip()
    from_env = _settings(tmp_path, WALG_PGP_KEY=inline).crypter
    from_path = _settings(tmp_path, WALG_PGP_KEY_PATH=str(FIXTURES / "pgpTestPrivateKey")).crypter
    assert isinstance(from_env, OpenPgpCrypter) and isinstance(from_path, OpenPgpCrypter)
    assert read_all(from_path.open_reader(io.BytesIO(encrypt(from_env, b"same key")), "x")) == b"same key"


def test_pgp_takes_precedence_over_libsodium_with_a_warning(tmp_path):
    warnings: list[str] = []
    both = load_settings(env={"HOME": str(tmp_path), "WALG_PGP_KEY_PATH": str(FIXTURES / "walrus-cv25519.pub.asc"),
                              "WALG_LIBSODIUM_KEY": "TEST_LIBSODIUM_KEY_______"}, warn=warnings.append)
    assert both.crypter.name == "OpenPGP"
    assert warnings == ["WALG_LIBSODIUM_KEY* is ignored: WALG_PGP_KEY* takes precedence, as in WAL-G"]


def _rearmor(data: bytes) -> str:
    body = base64.b64encode(data).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n" + "\n".join(lines) + "\n-----END PGP PUBLIC KEY BLOCK-----\n"


def test_key_without_an_encryption_subkey_is_refused_at_startup(tmp_path):
    from walrus.crypto.pgp_packets import iter_packets

    ring = keys.dearmor((FIXTURES / "walrus-cv25519.pub.asc").read_text())
    primary_only = b"".join(packet(tag, body) for tag, body in iter_packets(ring) if tag not in (14,))
    path = tmp_path / "signing-only.asc"
    path.write_text(_rearmor(primary_only))
    with pytest.raises(ConfigError, match="WALG_PGP_KEY_PATH is not a usable OpenPGP key") as e:
        _settings(tmp_path, WALG_PGP_KEY_PATH=str(path))
    assert "no valid encryption key" in e.value.detail


@pytest.mark.parametrize("text,problem", [
    ("not a key at all", "no armored key block"),
    ((FIXTURES / "waleGpgKey").read_text()[:3000], "no armored key block"),  # cut short
])
def test_malformed_inline_key_is_a_config_error_that_hides_the_key(tmp_path, text, problem):
    with pytest.raises(ConfigError, match="WALG_PGP_KEY is not a usable OpenPGP key") as e:
        _settings(tmp_path, WALG_PGP_KEY=text)
    assert problem in e.value.detail and text[:40] not in e.value.render()


def test_damaged_armor_checksum_is_refused(tmp_path):
    text = (FIXTURES / "walrus-cv25519.pub.asc").read_text()
    lines = text.splitlines()
    checksum_line = next(i for i, line in enumerate(lines) if line.startswith("=") and len(line) == 5)
    lines[checksum_line] = "=AAAA" if lines[checksum_line] != "=AAAA" else "=BBBB"
    with pytest.raises(ConfigError, match="not a usable OpenPGP key") as e:
        _settings(tmp_path, WALG_PGP_KEY="\n".join(lines))
    assert "checksum" in e.value.detail


def test_missing_key_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the key file") as e:
        _settings(tmp_path, WALG_PGP_KEY_PATH=str(tmp_path / "nope.asc"))
    assert "WALG_PGP_KEY_PATH" in e.value.message


# --- GnuPG as an independent implementation -------------------------------------------------------------------

GPG = shutil.which("gpg")
needs_gpg = pytest.mark.skipif(GPG is None, reason="GnuPG (gpg) is not installed")


@pytest.fixture
def gpg():
    home = tempfile.mkdtemp(prefix="wg", dir="/tmp")  # short: gpg-agent's socket path must fit
    os.chmod(home, 0o700)

    def run(*args: str, data: bytes = b"") -> bytes:
        proc = subprocess.run([GPG, "--homedir", home, "--batch", "--quiet", "--pinentry-mode", "loopback",
                               "--passphrase", "sesame", "--trust-model", "always", *args],
                              input=data, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout

    for file, _, _ in KEYS.values():
        run("--import", str(FIXTURES / file))
    try:
        yield run
    finally:
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@needs_gpg
@pytest.mark.parametrize("key", list(KEYS))
def test_gnupg_decrypts_walrus_messages(gpg, key):
    plain = os.urandom(100_000) + bytes(1 << 20)
    assert gpg("--decrypt", data=encrypt(crypter(key), plain, pieces=(7000, 1 << 20))) == plain


@needs_gpg
@pytest.mark.parametrize("options", [[], ["--compress-algo", "zip"], ["--compress-algo", "bzip2"], ["-z", "0"],
                                     ["--sign", "--local-user", "cv@test"]],
                         ids=["default", "zip", "bzip2", "uncompressed", "signed"])
@pytest.mark.parametrize("key", ["cv25519", "p256", "rsa2048"])
def test_walrus_decrypts_gnupg_messages(gpg, key, options):
    plain = os.urandom(50_000) + bytes(300_000)
    sealed = gpg("--encrypt", "--recipient", KEYS[key][2], *options, data=plain)
    assert read_all(crypter(key).open_reader(Trickle(sealed), "x")) == plain


@needs_gpg
def test_gnupg_reads_the_packets_walrus_writes(gpg):
    listing = gpg("--list-packets", data=encrypt(crypter("cv25519"), b"x" * 5000)).decode()
    assert "pubkey enc packet: version 3, algo 18, keyid 7E433667DFFA0E6C" in listing
    assert "mdc_method: 2" in listing
    assert "literal data packet" in listing and 'name=""' in listing
