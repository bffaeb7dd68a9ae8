"""Compression methods: names, key extensions, WAL-G-identical writers and bounded streaming readers."""
from __future__ import annotations

import importlib
from typing import NamedTuple

from walrus.codec.base import Compressor, Reader
from walrus.errors import ConfigError, CorruptObject
from walrus.pull import Source

__all__ = [
    "WRITABLE_METHODS",
    "WAL_PROBE_EXTENSIONS",
    "Compressor",
    "Reader",
    "extension",
    "method_for_extension",
    "new_compressor",
    "open_reader",
    "preload",
]


class _Codec(NamedTuple):
    extension: str
    module: str  # walrus.codec.<module>, imported on first use: a command loads only the codecs it meets
    reader: str  # its Reader class
    compressor: str | None  # its Compressor class; None where walrus only reads (as WAL-G)


_CODECS: dict[str, _Codec] = {
    "lz4": _Codec("lz4", "lz4", "Lz4Reader", "Lz4Compressor"),
    "lzma": _Codec("lzma", "lzma", "LzmaReader", "LzmaCompressor"),
    "zstd": _Codec("zst", "zstd", "ZstdReader", "ZstdCompressor"),
    "brotli": _Codec("br", "brotli", "BrotliReader", "BrotliCompressor"),
    "none": _Codec("", "none", "IdentityReader", "IdentityCompressor"),
    "gzip": _Codec("gz", "gzip", "GzipReader", None),
    "lzo": _Codec("lzo", "lzo", "LzoReader", None),
}


def _module(method: str):
    return importlib.import_module(f"walrus.codec.{_CODECS[method].module}")


def _load(method: str, attr: str):
    return getattr(_module(method), attr)


# WALG_COMPRESSION_METHOD values walrus writes (gzip and lzo are read only, as in WAL-G).
WRITABLE_METHODS: tuple[str, ...] = tuple(method for method, codec in _CODECS.items() if codec.compressor)

# wal-fetch probes after the cached extension, in WAL-G's order (internal/fetch_helper.go); "." is
# the v3.0.8 trailing-dot key of an uncompressed segment; "lzo" is where builds with lzo probe it
# (WAL-E's segments); extensions WAL-G does not know come last. The caller probes the bare name last.
_WALG_PROBE_ORDER = ("lz4", "lzma", "gz", ".", "br", "lzo", "zst")
WAL_PROBE_EXTENSIONS: tuple[str, ...] = _WALG_PROBE_ORDER + tuple(
    codec.extension for codec in _CODECS.values() if codec.extension and codec.extension not in _WALG_PROBE_ORDER)

_METHOD_BY_EXTENSION: dict[str, str] = {codec.extension: method for method, codec in _CODECS.items()}
_METHOD_BY_EXTENSION["tar"] = "none"  # tar parts of uncompressed backups: part_001.tar


def extension(method: str) -> str:
    """The key suffix (without the dot) for a compression method; "" for none."""
    try:
        return _CODECS[method].extension
    except KeyError:
        raise _unknown_method(method) from None


def method_for_extension(ext: str) -> str:
    """The method that reads objects with this key suffix; "", "." and "tar" mean uncompressed.

    One leading dot is ignored, as WAL-G's FindDecompressor ignores it.
    """
    bare = ext[1:] if ext.startswith(".") else ext
    method = _METHOD_BY_EXTENSION.get(bare)
    if method is None:
        detail = f"known extensions: {', '.join(repr(e) for e in sorted(_METHOD_BY_EXTENSION))}"
        raise CorruptObject(
            f"unknown compression extension {ext!r}",
            detail=detail,
            hint="the object was not written by WAL-G or walrus, or by a build with another codec",
        )
    return method


def new_compressor(method: str, *, zstd_level: str | None = None) -> Compressor:
    """A compressor for one object. zstd_level (a WALG_ZSTD_LEVEL name) only matters for zstd."""
    codec = _CODECS.get(method)
    if codec is None or codec.compressor is None:
        raise _unknown_method(method)
    make = _load(method, codec.compressor)
    return make(zstd_level) if method == "zstd" else make()


def preload(method: str) -> None:
    """Imports the codec for `method` now rather than on first use: a long-lived process (the daemon)
    takes the import at start-up, not inside the first request PostgreSQL waits on."""
    if method not in _CODECS:
        raise _unknown_method(method)
    _module(method)


def open_reader(ext: str, raw: Source, *, name: str = "") -> Reader:
    """A decompressing reader over `raw` for an object whose key ends in `ext`; name is for errors."""
    method = method_for_extension(ext)
    return _load(method, _CODECS[method].reader)(raw, name)


def _unknown_method(method: str) -> ConfigError:
    problem = "is read only" if method in _CODECS else "is unknown"
    return ConfigError(
        f"compression method {method!r} {problem}",
        detail="WALG_COMPRESSION_METHOD must be one of: " + ", ".join(WRITABLE_METHODS),
    )
