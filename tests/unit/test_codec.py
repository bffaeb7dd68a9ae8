"""walrus.codec: WAL-G framing of every writer, and readers that are bounded, multi-frame and strict."""
from __future__ import annotations

import gzip
import io
import itertools
import lzma
import random
import struct
import subprocess
import sys
import tracemalloc
import zlib

import brotli
import lz4.block
import lz4.frame
import pytest
import xxhash
import zstandard

from walrus.codec import (
    WAL_PROBE_EXTENSIONS,
    WRITABLE_METHODS,
    extension,
    method_for_extension,
    new_compressor,
    open_reader,
    preload,
)
from walrus.errors import ConfigError, CorruptObject

MiB = 1 << 20
COMPRESSED_METHODS = ("lz4", "lzma", "zstd", "brotli", "gzip")


def _mixed(size: int, seed: int = 7) -> bytes:
    """Random and highly compressible runs interleaved, so blocks of both kinds occur."""
    rnd = random.Random(seed)
    parts, total = [], 0
    while total < size:
        n = rnd.randint(1, 300_000)
        part = rnd.randbytes(n) if rnd.random() < 0.4 else bytes([rnd.randrange(256)]) * n
        parts.append(part)
        total += n
    return b"".join(parts)[:size]


PAYLOADS = {"empty": b"", "small": b"hello, WAL\n", "5MiB-mix": _mixed(5 * MiB)}
UNEVEN = (1, 7, 4096, 65_537, MiB + 3, 333)


class Trickle:
    """A raw source that hands out short reads of varying sizes, as a network stream does."""

    def __init__(self, data: bytes, sizes=UNEVEN):
        self._data = memoryview(data)
        self._pos = 0
        self._sizes = itertools.cycle(sizes)

    def read(self, n: int) -> bytes:
        k = min(n, next(self._sizes))
        out = bytes(self._data[self._pos:self._pos + k])
        self._pos += len(out)
        return out


def compress(method: str, data: bytes, sizes=UNEVEN, **kw) -> bytes:
    """Feed `data` through one buffer that is overwritten after every call, as the upload pipeline
    recycles pool buffers: a compressor that kept a reference to its input would corrupt output."""
    c = new_compressor(method, **kw)
    pool = bytearray(max(sizes))
    out, pos = [], 0
    for size in itertools.cycle(sizes):
        if pos >= len(data):
            break
        piece = data[pos:pos + size]
        pool[:len(piece)] = piece
        out.append(c.compress(memoryview(pool)[:len(piece)]))
        pool[:len(piece)] = b"\xaa" * len(piece)
        pos += len(piece)
    out.append(c.finish())
    return b"".join(out)


def read_all(ext: str, raw, n_sizes=(65_536, 1, MiB, 4097), name: str = "obj") -> bytes:
    reader = open_reader(ext, raw, name=name)
    parts = []
    for n in itertools.cycle(n_sizes):
        chunk = reader.read(n)
        if not chunk:
            break
        assert len(chunk) <= n
        parts.append(chunk)
    assert reader.read(10) == b""  # the end is sticky
    reader.close()
    return b"".join(parts)


def method_ext(method: str) -> str:
    return "gz" if method == "gzip" else extension(method)


def decode(method: str, blob: bytes) -> bytes:
    return read_all(method_ext(method), Trickle(blob))


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", WRITABLE_METHODS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_round_trip(method, payload):
    data = PAYLOADS[payload]
    blob = compress(method, data)
    assert decode(method, blob) == data
    if method == "none":
        assert blob == data
    elif payload == "5MiB-mix":
        assert len(blob) < len(data) * 0.8


@pytest.mark.parametrize("method", COMPRESSED_METHODS)
def test_reader_survives_one_byte_reads_from_the_source(method):
    data = _mixed(20_000, seed=3) + b"tail" * 5000
    blob = gzip.compress(data) if method == "gzip" else compress(method, data)
    assert read_all(method_ext(method), Trickle(blob, sizes=(1, 2, 3))) == data


# --- WAL-G framing -----------------------------------------------------------------------------


def _seal_of(frame: bytes) -> bytes:
    """walrus's seal as the format note in walrus.codec.lz4 defines it, built here independently."""
    return struct.pack("<II8sQ", 0x184D2A5E, 16, b"walrus\x00\x01", xxhash.xxh3_64(frame).intdigest())


def test_lz4_header_is_walgs_without_the_content_checksum():
    blob = compress("lz4", b"x" * 100)
    assert blob[:7] == bytes.fromhex("04224D18 607073")  # FLG 0x60: WAL-G's 0x64 less the checksum bit


def test_lz4_empty_stream_is_a_header_an_end_mark_and_the_seal():
    frame = bytes.fromhex("04224D18 607073 00000000")
    assert compress("lz4", b"") == frame + _seal_of(frame)


def test_lz4_writes_exactly_one_frame_then_its_seal():
    data = _mixed(9 * MiB, seed=11)
    blob = compress("lz4", data)
    decoded, consumed = lz4.frame.decompress(blob, return_bytes_read=True)
    assert decoded == data
    assert blob[consumed:] == _seal_of(blob[:consumed])


def test_lz4_cli_reads_the_frame_and_skips_the_seal(tmp_path):
    """The seal is a well-formed skippable frame: liblz4's own tool decodes the object whole."""
    data = _mixed(3 * MiB, seed=12)
    (tmp_path / "x.lz4").write_bytes(compress("lz4", data))
    subprocess.run(["lz4", "-d", "-q", "-f", str(tmp_path / "x.lz4"), str(tmp_path / "x")], check=True)
    assert (tmp_path / "x").read_bytes() == data


def _lz4_blocks(blob: bytes) -> list[tuple[int, bool]]:
    """(decoded size, stored compressed?) of each block of a one-frame object with walrus's header."""
    pos, blocks = 7, []
    while (word := struct.unpack_from("<I", blob, pos)[0]) != 0:
        size, packed = word & 0x7FFFFFFF, not word >> 31
        body = blob[pos + 4:pos + 4 + size]
        blocks.append((len(lz4.block.decompress(body, uncompressed_size=4 * MiB)) if packed else size, packed))
        pos += 4 + size
    assert len(blob) == pos + 4 + 24  # end mark, then the seal
    return blocks


def test_lz4_blocks_are_at_most_4_mib_and_incompressible_ones_are_stored():
    c = new_compressor("lz4")
    noise = random.Random(3).randbytes(MiB)
    blob = c.compress(bytes(10 * MiB)) + c.compress(noise) + c.finish()
    assert _lz4_blocks(blob) == [(4 * MiB, True), (4 * MiB, True), (2 * MiB, True), (MiB, False)]
    assert lz4.frame.decompress(blob) == bytes(10 * MiB) + noise


def test_lz4_block_form_makes_the_same_object_in_any_encoding_order():
    chunks = [_mixed(MiB, seed=n) for n in range(5)]
    c = new_compressor("lz4")
    expected = b"".join(c.compress(x) for x in chunks) + c.finish()
    c = new_compressor("lz4")
    head = c.start()
    encoded = {i: c.encode(chunks[i]) for i in (3, 0, 4, 1, 2)}  # threads finish in any order
    for i in range(5):
        c.digest(encoded[i])
    assert head + b"".join(encoded[i] for i in range(5)) + c.finish() == expected
    assert c.start() == b""  # the header once per frame


@pytest.mark.parametrize("where", ["header", "block", "end mark", "seal tag", "seal digest"])
def test_lz4_damage_anywhere_fails_the_seal(where):
    data = _mixed(3 * MiB)
    blob = bytearray(compress("lz4", data))
    at = {"header": 5, "block": len(blob) // 2, "end mark": len(blob) - 26,
          "seal tag": len(blob) - 12, "seal digest": len(blob) - 1}[where]
    blob[at] ^= 0x40
    with pytest.raises(CorruptObject, match="not a valid|truncated"):  # a bad end mark reads on into the seal
        read_all("lz4", Trickle(bytes(blob), sizes=(7, 1 << 16)))


def test_lz4_seal_cut_short_is_a_truncated_object():
    blob = compress("lz4", _mixed(MiB))
    for cut in (1, 10, 23):
        with pytest.raises(CorruptObject, match="truncated"):
            read_all("lz4", io.BytesIO(blob[:-cut]))


def test_lz4_frames_without_a_seal_are_still_read():
    """WAL-G's frames (content checksum, checked by liblz4) and ones with no checksum at all."""
    data = _mixed(2 * MiB, seed=5)
    walg = lz4.frame.compress(data, content_checksum=True, block_size=lz4.frame.BLOCKSIZE_MAX4MB)
    bare = lz4.frame.compress(data, content_checksum=False)
    assert decode("lz4", walg) == data and decode("lz4", bare) == data
    damaged = bytearray(walg)
    damaged[-1] ^= 0x01
    with pytest.raises(CorruptObject):
        read_all("lz4", io.BytesIO(bytes(damaged)))


def _zstd_frames(blob: bytes) -> list[bytes]:
    """The frames of a zstd object, each found by decoding it (decompressobj stops at a frame's end)."""
    frames = []
    while blob:
        decoder = zstandard.ZstdDecompressor().decompressobj()
        decoder.decompress(blob)
        end = len(blob) - len(decoder.unused_data)
        frames.append(blob[:end])
        blob = blob[end:]
    return frames


def test_zstd_writes_one_checksummed_frame_per_chunk():
    data = PAYLOADS["5MiB-mix"]
    chunks = [data[i:i + MiB] for i in range(0, len(data), MiB)]
    c = new_compressor("zstd")
    blob = b"".join(c.compress(x) for x in chunks) + c.finish()
    frames = _zstd_frames(blob)
    assert len(frames) == len(chunks)
    for frame, chunk in zip(frames, chunks):
        params = zstandard.get_frame_parameters(frame)
        assert params.has_checksum and params.content_size == len(chunk)
        assert zstandard.ZstdDecompressor().decompress(frame) == chunk
    assert read_all("zst", io.BytesIO(blob)) == data


def test_zstd_empty_object_is_one_empty_frame():
    c = new_compressor("zstd")
    blob = c.compress(b"") + c.finish()
    assert blob.startswith(bytes.fromhex("28B52FFD")) and zstandard.ZstdDecompressor().decompress(blob) == b""


def test_lzma_header_is_ulikunitz_default():
    for data in (b"", b"abc" * 1000):
        blob = compress("lzma", data)
        assert blob[:13] == bytes.fromhex("5D 00008000 FFFFFFFFFFFFFFFF")
        assert lzma.decompress(blob, format=lzma.FORMAT_ALONE) == data


def test_brotli_is_a_raw_stream_at_quality_3():
    data = _mixed(MiB, seed=5)
    blob = compress("brotli", data, sizes=(len(data),))
    assert blob == brotli.compress(data, quality=3)


@pytest.mark.parametrize(
    "name,level", [(None, 3), ("fastest", 1), ("default", 3), ("better", 7), ("BEST", 11)]
)
def test_zstd_levels_follow_the_documented_mapping(name, level):
    data = _mixed(300_000, seed=9)
    blob = compress("zstd", data, sizes=(len(data),), zstd_level=name)
    assert blob == zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def test_unknown_zstd_level_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown zstd level 'ultra'"):
        new_compressor("zstd", zstd_level="ultra")


@pytest.mark.parametrize("method", ["gzip", "lzo", "LZ4", "xz"])
def test_unwritable_method_is_a_config_error(method):
    with pytest.raises(ConfigError):
        new_compressor(method)


# --- what readers accept -----------------------------------------------------------------------


def test_reads_concatenated_zstd_frames_of_any_kind():
    skippable = struct.pack("<II", 0x184D2A53, 6) + b"walrus"
    parts = [b"first " * 1000, b"", b"third " * 5000]
    frames = [
        zstandard.ZstdCompressor(level=1).compress(parts[0]),  # content size, no checksum
        zstandard.ZstdCompressor().compress(parts[1]),  # an empty frame
        skippable,
        compress("zstd", parts[2]),
    ]
    blob = b"".join(frames)
    assert decode("zstd", blob) == b"".join(parts)


def test_reads_concatenated_lz4_frames_and_python_lz4_defaults():
    parts = [b"alpha" * 3000, _mixed(300_000, seed=1), b"omega"]
    default = lz4.frame.compress(parts[0])  # python-lz4 one-shot default: FLG 0x68, content size
    assert default[4] == 0x68
    checked = lz4.frame.compress(parts[0], content_checksum=True)
    assert checked[4] == 0x6C
    linked = lz4.frame.LZ4FrameCompressor(
        block_size=lz4.frame.BLOCKSIZE_MAX64KB, block_linked=True, content_checksum=True, block_checksum=True
    )
    streamed = linked.begin(len(parts[1])) + linked.compress(parts[1]) + linked.flush()
    assert streamed[4] == 0x5C  # linked blocks, block checksums, content size, content checksum
    blob = default + checked + streamed + compress("lz4", parts[2])
    assert decode("lz4", blob) == parts[0] * 2 + parts[1] + parts[2]


def test_reads_gzip_including_multiple_members():
    data = _mixed(2 * MiB, seed=4)
    assert decode("gzip", gzip.compress(data)) == data
    assert decode("gzip", gzip.compress(data[:1000]) + gzip.compress(data[1000:])) == data


# From XZ Utils tests/files (0BSD): the three legal ways an .lzma file can end; each holds "Hello\nWorld!\n".
LZMA_KNOWN_SIZE_WITH_EOPM = bytes.fromhex(
    "5d001000000d0000000000000000241949986f051527270d7678d02a681715ffff75f80000"
)
LZMA_KNOWN_SIZE_WITHOUT_EOPM = bytes.fromhex(
    "5d001000000d0000000000000000241949986f051527270d7678d0291d2000"
)
LZMA_UNKNOWN_SIZE_WITH_EOPM = bytes.fromhex(
    "5d00100000ffffffffffffffff00241949986f051527270d7678d02a681715ffff75f80000"
)
LZMA_UNKNOWN_SIZE_WITHOUT_EOPM = bytes.fromhex(
    "5d00100000ffffffffffffffff00241949986f051527270d7678d0291d2000"
)


@pytest.mark.parametrize(
    "blob", [LZMA_KNOWN_SIZE_WITH_EOPM, LZMA_KNOWN_SIZE_WITHOUT_EOPM, LZMA_UNKNOWN_SIZE_WITH_EOPM]
)
def test_reads_every_legal_lzma_alone_ending(blob):
    assert decode("lzma", blob) == b"Hello\nWorld!\n"


def test_lzma_dictionary_beyond_the_memory_cap_is_refused():
    blob = bytearray(LZMA_UNKNOWN_SIZE_WITH_EOPM)
    assert decode("lzma", bytes(blob)) == b"Hello\nWorld!\n"
    blob[1:5] = (1 << 30).to_bytes(4, "little")  # header asks for a 1 GiB dictionary
    with pytest.raises(CorruptObject, match="not a valid lzma stream") as err:
        decode("lzma", bytes(blob))
    assert "limit" in err.value.detail


def test_lzma_with_unknown_size_and_no_end_marker_is_truncated():
    with pytest.raises(CorruptObject, match="truncated"):
        decode("lzma", LZMA_UNKNOWN_SIZE_WITHOUT_EOPM)


def test_none_reader_passes_bytes_through_and_allows_empty():
    assert read_all("", Trickle(b"")) == b""
    assert read_all(".", Trickle(b"raw bytes")) == b"raw bytes"
    assert read_all("tar", Trickle(PAYLOADS["5MiB-mix"])) == PAYLOADS["5MiB-mix"]


# --- bounded output ----------------------------------------------------------------------------


def _zero_bomb(method: str, mib: int) -> bytes:
    zeros = bytes(MiB)
    if method == "gzip":
        c = zlib.compressobj(1, wbits=31)
        return b"".join(c.compress(zeros) for _ in range(mib)) + c.flush()
    c = new_compressor(method)
    return b"".join(c.compress(zeros) for _ in range(mib)) + c.finish()


# Sizes keep the file fast; each is far beyond one read (65536) and, for lz4, beyond one 4 MiB block.
BOMBS = {"zstd": 256, "lz4": 64, "brotli": 64, "gzip": 64, "lzma": 16}


@pytest.mark.parametrize("method", BOMBS)
def test_every_read_is_bounded_whatever_the_ratio(method):
    mib = BOMBS[method]
    blob = _zero_bomb(method, mib)
    assert len(blob) * 50 < mib * MiB
    reader = open_reader(method_ext(method), io.BytesIO(blob))
    total = 0
    tracemalloc.start()
    try:
        while chunk := reader.read(65_536):
            assert len(chunk) <= 65_536
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == mib * MiB
    # Python-heap peak: one raw chunk (1 MiB) plus a read's output, never the decoded whole;
    # CPython's lzma module allocates liblzma's 8 MiB dictionary on that heap too.
    assert peak < 4 * MiB + (8 * MiB if method == "lzma" else 0)


# --- corrupt input -----------------------------------------------------------------------------


def _sample(method: str) -> bytes:
    data = _mixed(400_000, seed=2)
    return gzip.compress(data) if method == "gzip" else compress(method, data)


@pytest.mark.parametrize("method", COMPRESSED_METHODS)
def test_truncated_stream_is_corrupt_archive(method):
    blob = _sample(method)
    for cut in (len(blob) - 1, len(blob) - 5, len(blob) // 2, 3):
        with pytest.raises(CorruptObject) as err:
            read_all(method_ext(method), Trickle(blob[:cut]), name="wal_005/000000010000000000000003.x")
        assert "wal_005/000000010000000000000003.x" in err.value.message
        assert "truncated object" in err.value.message
        assert method in err.value.detail
        assert "WALG_LIBSODIUM_KEY" in err.value.hint


@pytest.mark.parametrize("method", COMPRESSED_METHODS)
def test_empty_object_is_corrupt_archive(method):
    with pytest.raises(CorruptObject, match="empty"):
        read_all(method_ext(method), Trickle(b""))


@pytest.mark.parametrize("method", COMPRESSED_METHODS)
@pytest.mark.parametrize("seed", range(3))
def test_random_garbage_is_corrupt_archive(method, seed):
    garbage = random.Random(seed).randbytes(50_000)
    with pytest.raises(CorruptObject):
        read_all(method_ext(method), Trickle(garbage))


@pytest.mark.parametrize("method", COMPRESSED_METHODS)
def test_bytes_after_the_end_are_corrupt_archive(method):
    with pytest.raises(CorruptObject):
        read_all(method_ext(method), Trickle(_sample(method) + b"\x00junk after the end"))


@pytest.mark.parametrize("method", ["lz4", "zstd", "gzip"])
def test_checksum_mismatch_is_corrupt_archive(method):
    blob = bytearray(_sample(method))
    blob[-6 if method == "gzip" else -2] ^= 0x01  # inside the seal's digest / zstd checksum / gzip CRC32
    with pytest.raises(CorruptObject, match="not a valid"):
        read_all(method_ext(method), Trickle(bytes(blob)))


# --- names -------------------------------------------------------------------------------------


def test_extensions_of_writable_methods():
    assert {m: extension(m) for m in WRITABLE_METHODS} == {
        "lz4": "lz4", "lzma": "lzma", "zstd": "zst", "brotli": "br", "none": "",
    }
    with pytest.raises(ConfigError):
        extension("xz")


@pytest.mark.parametrize(
    "ext,method",
    [("lz4", "lz4"), ("lzma", "lzma"), ("zst", "zstd"), ("br", "brotli"), ("gz", "gzip"),
     ("", "none"), ("tar", "none"), (".", "none"), (".lz4", "lz4")],
)
def test_method_for_extension(ext, method):
    assert method_for_extension(ext) == method


def test_every_writable_method_reads_back_by_its_extension():
    for method in WRITABLE_METHODS:
        assert method_for_extension(extension(method)) == method


@pytest.mark.parametrize("ext", ["xz", "rar", "zstd", "LZ4"])
def test_unknown_extension_is_corrupt_archive(ext):
    with pytest.raises(CorruptObject, match="unknown compression extension"):
        method_for_extension(ext)
    with pytest.raises(CorruptObject, match="unknown compression extension"):
        open_reader(ext, io.BytesIO(b""), name="x")


def test_wal_probe_order_is_walgs():
    assert WAL_PROBE_EXTENSIONS == ("lz4", "lzma", "gz", ".", "br", "lzo", "zst")
    methods = [method_for_extension(e) for e in WAL_PROBE_EXTENSIONS]
    assert methods == ["lz4", "lzma", "gzip", "none", "brotli", "lzo", "zstd"]


def test_only_the_codecs_in_use_are_imported():
    # wal-fetch runs once per segment: it must not pay for importing every compression library
    probe = ("import sys, walrus.codec as c; c.open_reader('zst', None); c.extension('lzma'); "
             "print(sorted(m for m in sys.modules if m.startswith('walrus.codec.')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['walrus.codec.base', 'walrus.codec.zstd']"


def test_preload_imports_the_codec_and_rejects_unknown_methods():
    probe = ("import sys, walrus.codec as c; c.preload('brotli'); "
             "print(sorted(m for m in sys.modules if m.startswith('walrus.codec.')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['walrus.codec.base', 'walrus.codec.brotli']"
    with pytest.raises(ConfigError, match="'snappy' is unknown"):
        preload("snappy")
