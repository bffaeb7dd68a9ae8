"""libsodium: WAL-G's secretstream framing both ways, checked against PyNaCl's public API; WAL-G's key rules."""
from __future__ import annotations

import io
import itertools
import os
import random
from pathlib import Path

import pytest
from nacl import bindings as nacl

from tests.crypto_stream import decrypt_endless, seal
from walrus import codec
from walrus.config import load_settings
from walrus.crypto import decrypting
from walrus.crypto import libsodium
from walrus.crypto.libsodium import LibsodiumCrypter, derive_key
from walrus.errors import ConfigError, CorruptObject

FIXTURES = Path(__file__).parent.parent / "fixtures"
WALG_TEST_KEY = "TEST_LIBSODIUM_KEY_______"  # WAL-G's own test key, transform none
KEY = derive_key(WALG_TEST_KEY.encode(), "none")
HEADER, CHUNK, SEALED, ABYTES = 24, 8192, 8209, 17
FINAL = nacl.crypto_secretstream_xchacha20poly1305_TAG_FINAL
MESSAGE = nacl.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE


@pytest.fixture(autouse=True, params=["compiled", "python"])
def chunk_loop(request, monkeypatch):
    """Every test runs with both chunk loops: the compiled module's (what an install uses) and the
    Python loop that stands in where the module is not built."""
    if request.param == "compiled":
        assert libsodium._compiled() is not None, "the compiled module is built for the tests"
    else:
        monkeypatch.setattr(libsodium, "_compiled", lambda: None)
    return request.param


def walg_framed(plain: bytes, key: bytes = KEY, final_on_full: bool = False, tags: dict[int, int] | None = None) -> bytes:
    """What WAL-G's writer stores, built with PyNaCl: MESSAGE per complete 8192 bytes, then FINAL with the
    rest (`tags`: other tags for some full chunks, by index, which libsodium's own writer may use)."""
    state = nacl.crypto_secretstream_xchacha20poly1305_state()
    out = [nacl.crypto_secretstream_xchacha20poly1305_init_push(state, key)]
    full = len(plain) // CHUNK
    for i in range(full):
        last = final_on_full and i == full - 1
        out.append(nacl.crypto_secretstream_xchacha20poly1305_push(
            state, plain[i * CHUNK:(i + 1) * CHUNK], tag=FINAL if last else (tags or {}).get(i, MESSAGE)))
    if not final_on_full:
        out.append(nacl.crypto_secretstream_xchacha20poly1305_push(state, plain[full * CHUNK:], tag=FINAL))
    return b"".join(out)


def pynacl_read(sealed: bytes, key: bytes = KEY) -> bytes:
    """An independent reader with WAL-G's rules: full chunks are MESSAGE, the short last one is FINAL."""
    state = nacl.crypto_secretstream_xchacha20poly1305_state()
    nacl.crypto_secretstream_xchacha20poly1305_init_pull(state, sealed[:HEADER], key)
    body = sealed[HEADER:]
    chunks = [body[i:i + SEALED] for i in range(0, len(body), SEALED)]
    assert chunks and len(chunks[-1]) < SEALED, "the last chunk must be short"
    out = []
    for i, chunk in enumerate(chunks):
        plain, tag = nacl.crypto_secretstream_xchacha20poly1305_pull(state, chunk)
        assert tag == (FINAL if i == len(chunks) - 1 else MESSAGE)
        out.append(plain)
    return b"".join(out)


class Trickle:
    """A raw source handing out short reads of varying sizes, as a network stream does."""

    def __init__(self, data: bytes, sizes=(1, 7, 8209, 4096, 65_537, 333, 1 << 20)):
        self._data = memoryview(data)
        self._pos = 0
        self._sizes = itertools.cycle(sizes)

    def read(self, n: int) -> bytes:
        out = bytes(self._data[self._pos:self._pos + min(n, next(self._sizes))])
        self._pos += len(out)
        return out


def read_all(reader, n: int = 1 << 20) -> bytes:
    parts = []
    while chunk := reader.read(n):
        assert len(chunk) <= n
        parts.append(chunk)
    return b"".join(parts)


def encrypt(plain: bytes, pieces=(1 << 20,), key: bytes = KEY) -> bytes:
    writer = LibsodiumCrypter(key).new_encryptor()
    out, pos = [], 0
    for size in itertools.cycle(pieces):
        if pos >= len(plain):
            break
        out.append(writer.encrypt(plain[pos:pos + size]))
        pos += size
    out.append(writer.finish())
    return b"".join(out)


# --- framing and lengths (spec 13.2 item 1) ----------------------------------------------------------


def test_fixture_made_by_pynacl_in_walg_framing_decrypts():
    sealed = (FIXTURES / "libsodium-20000.bin").read_bytes()
    assert len(sealed) == HEADER + SEALED + SEALED + (3616 + ABYTES)
    reader = LibsodiumCrypter(KEY).open_reader(Trickle(sealed), "wal_005/fixture.lz4")
    assert read_all(reader) == bytes(i % 251 for i in range(20000))


@pytest.mark.parametrize("size,expected", [
    (20_000, HEADER + 2 * SEALED + 3616 + ABYTES),
    (16_384, HEADER + 2 * SEALED + ABYTES),  # a multiple of 8192: an empty FINAL chunk
    (8192, HEADER + SEALED + ABYTES),
    (8191, HEADER + 8191 + ABYTES),
    (1, HEADER + 1 + ABYTES),
    (0, HEADER + ABYTES),  # header written even for nothing (WAL-G would store an unreadable 17 bytes)
])
@pytest.mark.parametrize("pieces", [(1 << 20,), (1, 8191, 3, 9000), (8192,)], ids=["whole", "uneven", "chunks"])
def test_walrus_output_has_walg_lengths_and_pynacl_reads_it(size, expected, pieces):
    plain = random.Random(size).randbytes(size)
    sealed = encrypt(plain, pieces)
    assert len(sealed) == expected
    assert pynacl_read(sealed) == plain


@pytest.mark.parametrize("size", [0, 1, 8191, 8192, 8193, 16_384, 20_000, 3 * (1 << 20) + 5])
def test_walg_framed_objects_decrypt(size):
    plain = random.Random(size).randbytes(size)
    reader = LibsodiumCrypter(KEY).open_reader(Trickle(walg_framed(plain)), "x")
    assert read_all(reader, 10_000) == plain
    assert reader.read(10) == b""  # and stays at the end


def test_final_tag_on_a_full_chunk_is_refused_as_walg_does():
    sealed = walg_framed(os.urandom(2 * CHUNK), final_on_full=True)
    with pytest.raises(CorruptObject, match="premature end"):
        read_all(LibsodiumCrypter(KEY).open_reader(io.BytesIO(sealed), "wal_005/x.lz4"))


@pytest.mark.parametrize("cut,problem", [
    (HEADER + SEALED, "ends without its final chunk"),  # at a chunk boundary: WAL-G would accept it
    (HEADER, "ends without its final chunk"),
    (HEADER + SEALED + 100, "chunk 2 does not authenticate"),  # mid-chunk
    (HEADER + 10, "ends without its final chunk"),  # shorter than a chunk's overhead
    (10, "shorter than a libsodium header"),
])
def test_truncated_streams_fail_naming_the_object(cut, problem):
    sealed = walg_framed(os.urandom(20_000))
    with pytest.raises(CorruptObject, match=problem) as e:
        read_all(LibsodiumCrypter(KEY).open_reader(io.BytesIO(sealed[:cut]), "basebackups_005/b/part_001.tar.lz4"))
    assert "basebackups_005/b/part_001.tar.lz4" in e.value.message


def test_empty_object_is_an_error():
    with pytest.raises(CorruptObject, match="0 bytes is shorter than a libsodium header"):
        LibsodiumCrypter(KEY).open_reader(io.BytesIO(b""), "x").read(1)


def test_wrong_key_is_a_clear_error_naming_the_object():
    sealed = walg_framed(b"segment bytes" * 1000)
    other = derive_key(b"another key of thirty-two bytes!", "none")
    with pytest.raises(CorruptObject, match="first chunk does not authenticate") as e:
        read_all(LibsodiumCrypter(other).open_reader(io.BytesIO(sealed), "wal_005/000000010000000000000003.lz4"))
    assert "wal_005/000000010000000000000003.lz4" in e.value.message
    assert "WALG_LIBSODIUM_KEY" in e.value.hint


def test_damaged_byte_is_detected():
    sealed = bytearray(walg_framed(os.urandom(30_000)))
    sealed[HEADER + SEALED + 5] ^= 1
    with pytest.raises(CorruptObject, match="chunk 2 does not authenticate"):
        read_all(LibsodiumCrypter(KEY).open_reader(io.BytesIO(bytes(sealed)), "x"))


@pytest.mark.parametrize("source", [io.BytesIO, Trickle])
@pytest.mark.parametrize("damaged", [0, 1, 39, 127, 128, 299])
def test_damage_deep_in_a_long_stream_names_its_chunk(damaged, source):
    # reads of 1 MiB open 128 chunks per call: the chunk named is counted across calls and within one,
    # and across chunks split between raw reads (every 1 MiB read splits one; Trickle's, many)
    sealed = bytearray(walg_framed(os.urandom(300 * CHUNK + 10)))
    sealed[HEADER + damaged * SEALED + 100] ^= 0x40
    reader = LibsodiumCrypter(KEY).open_reader(source(bytes(sealed)), "x")
    named = "the first chunk" if damaged == 0 else f"chunk {damaged + 1}"
    with pytest.raises(CorruptObject, match=f"{named} does not authenticate"):
        read_all(reader)


def test_other_tags_on_full_chunks_are_read_through():
    # PUSH and REKEY are libsodium's own tags: not WAL-G's, but a valid stream, read as before
    plain = os.urandom(10 * CHUNK + 77)
    sealed = walg_framed(plain, tags={2: nacl.crypto_secretstream_xchacha20poly1305_TAG_PUSH,
                                      5: nacl.crypto_secretstream_xchacha20poly1305_TAG_REKEY})
    assert read_all(LibsodiumCrypter(KEY).open_reader(Trickle(sealed), "x")) == plain


def test_final_tag_on_a_full_chunk_in_the_middle_of_a_read_is_refused():
    plain = os.urandom(20 * CHUNK + 5)
    sealed = walg_framed(plain, tags={7: FINAL})
    with pytest.raises(CorruptObject, match="premature end"):
        read_all(LibsodiumCrypter(KEY).open_reader(io.BytesIO(sealed), "x"))


def test_compress_then_encrypt_round_trip_through_the_codec():
    plain = os.urandom(100_000) + bytes(3 << 20)
    crypter = LibsodiumCrypter(KEY)
    sealed = seal("lz4", crypter, plain[:1 << 20], plain[1 << 20:])
    assert not sealed.startswith(bytes.fromhex("04224D18"))  # no lz4 magic: it is encrypted
    lz4_frame = pynacl_read(sealed)
    assert lz4_frame.startswith(bytes.fromhex("04224D18607073"))  # compressed first, as WAL-G
    reader = codec.open_reader("lz4", decrypting(Trickle(sealed), crypter, "x"), name="x")
    assert read_all(reader) == plain


def test_memory_is_bounded_whatever_the_object_size():
    crypter = LibsodiumCrypter(KEY)
    total = 48
    seen, peak = decrypt_endless(crypter, total)
    assert seen == total << 20
    assert peak < 8 << 20, f"peak {peak} bytes while decrypting {total} MiB"


# --- key rules (spec 13.2 item 2) --------------------------------------------------------------------------


def test_none_transform_pads_and_truncates_to_32_bytes():
    assert derive_key(WALG_TEST_KEY.encode(), "none") == WALG_TEST_KEY.encode() + bytes(7)
    forty = b"0123456789abcdefghijklmnopqrstuvwxyzABCD"
    assert derive_key(forty, "none") == forty[:32]
    with pytest.raises(ValueError, match="at least 25 bytes"):
        derive_key(b"x" * 24, "none")


def test_hex_and_base64_transforms_decode_walgs_test_keys():
    hex_key = "4c0829fdfe7ae1987918edc585b1a90556d901eaea963c7625bb5734576dfb59"
    assert derive_key(hex_key.encode(), "hex") == bytes.fromhex(hex_key)
    b64 = derive_key(b"jv81yb3v3gNePrY0JmJ4q2j2NrqcM7tDYSHFoZ0tTIw=", "base64")
    assert len(b64) == 32 and b64[:3] == bytes.fromhex("8eff35")


@pytest.mark.parametrize("material,transform", [
    (b"2e4af6d03c7f73f4a80b0594dee2b4bcd11300bafb8a", "hex"),  # 22 bytes: WAL-G's own case
    (b"invalid hex", "hex"),
    (b"4c08 29fdfe7ae1987918edc585b1a90556d901eaea963c7625bb5734576dfb59", "hex"),
    (b"invalid base64", "base64"),
    (b"DBXYo+QaYKCLSNad+m27jl2UHtW4Htm9pStJv1ujjKPB2N5fmitOFw==", "base64"),  # 40 bytes
    (b"jv81yb3v3gNePrY0JmJ4q2j2NrqcM7tDYSHFoZ0tTIw", "base64"),  # padding missing
])
def test_malformed_or_wrong_length_keys_fail(material, transform):
    with pytest.raises(ValueError):
        derive_key(material, transform)


def _settings(tmp_path, **env):
    return load_settings(env={"HOME": str(tmp_path), **env})


@pytest.mark.parametrize("name,transform", [("libsodium-testKey", "none"), ("libsodium-testKeyHex", "hex"),
                                            ("libsodium-testKeyB64", "base64")])
def test_key_files_are_trimmed_then_transformed(tmp_path, name, transform):
    path = FIXTURES / name
    crypter = _settings(tmp_path, WALG_LIBSODIUM_KEY_PATH=str(path), WALG_LIBSODIUM_KEY_TRANSFORM=transform).crypter
    inline = derive_key(path.read_bytes().strip(), transform)
    assert crypter is not None
    plain = b"key file round trip" * 500
    writer = crypter.new_encryptor()
    assert pynacl_read(writer.encrypt(plain) + writer.finish(), inline) == plain
    assert read_all(crypter.open_reader(io.BytesIO(walg_framed(plain, inline)), "x")) == plain


def test_the_none_key_file_is_cut_after_trimming(tmp_path):
    text = (FIXTURES / "libsodium-testKey").read_bytes()
    assert text.startswith(b"\n") and len(text.strip()) == 50
    crypter = _settings(tmp_path, WALG_LIBSODIUM_KEY_PATH=str(FIXTURES / "libsodium-testKey")).crypter
    sealed = walg_framed(b"x" * 100, text.strip()[:32])
    assert read_all(crypter.open_reader(io.BytesIO(sealed), "x")) == b"x" * 100


def test_inline_key_is_not_trimmed(tmp_path):
    key = " " + WALG_TEST_KEY  # 26 bytes, the leading space is part of the key
    crypter = _settings(tmp_path, WALG_LIBSODIUM_KEY=key).crypter
    sealed = walg_framed(b"payload", derive_key(key.encode(), "none"))
    assert read_all(crypter.open_reader(io.BytesIO(sealed), "x")) == b"payload"


def test_inline_key_wins_over_the_key_path(tmp_path):
    crypter = _settings(tmp_path, WALG_LIBSODIUM_KEY=WALG_TEST_KEY,
                        WALG_LIBSODIUM_KEY_PATH=str(tmp_path / "missing")).crypter
    assert read_all(crypter.open_reader(io.BytesIO(walg_framed(b"abc")), "x")) == b"abc"


@pytest.mark.parametrize("env,named", [
    ({"WALG_LIBSODIUM_KEY": "only-24-bytes-long-key!!"}, "WALG_LIBSODIUM_KEY"),
    ({"WALG_LIBSODIUM_KEY": "abcd", "WALG_LIBSODIUM_KEY_TRANSFORM": "hex"}, "WALG_LIBSODIUM_KEY"),
    ({"WALG_LIBSODIUM_KEY_PATH": "/nonexistent/walrus.key"}, "WALG_LIBSODIUM_KEY_PATH"),
    ({"WALG_LIBSODIUM_KEY": WALG_TEST_KEY, "WALG_LIBSODIUM_KEY_TRANSFORM": "rot13"}, "WALG_LIBSODIUM_KEY_TRANSFORM"),
])
def test_unusable_key_is_a_config_error_naming_the_setting_not_the_key(tmp_path, env, named):
    with pytest.raises(ConfigError) as e:
        _settings(tmp_path, **env)
    text = e.value.render()
    assert named in text and "HINT" in text
    secret = env.get("WALG_LIBSODIUM_KEY")
    assert secret is None or secret not in text


@pytest.mark.parametrize("setting", ["WALG_CSE_KMS_ID", "YC_CSE_KMS_KEY_ID", "WALG_ENVELOPE_PGP_KEY",
                                     "WALE_GPG_KEY_ID"])
def test_encryption_walrus_lacks_is_refused_not_ignored(tmp_path, setting):
    with pytest.raises(ConfigError, match="walrus does not implement"):
        _settings(tmp_path, **{setting: "some-id", "WALG_LIBSODIUM_KEY": WALG_TEST_KEY})


def test_no_key_no_crypter(tmp_path):
    assert _settings(tmp_path).crypter is None
    assert "key hidden" in repr(LibsodiumCrypter(KEY)) and WALG_TEST_KEY not in repr(LibsodiumCrypter(KEY))
