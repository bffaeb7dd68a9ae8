"""Client-side encryption (WAL-G's libsodium and OpenPGP): chosen once from the settings, run after compression.

Order as WAL-G: upload is raw -> compress -> encrypt -> storage, download storage -> decrypt ->
decompress. Only data objects (WAL files, tar parts) are encrypted; sentinels and the JSON metadata
stay plaintext, so backup-list and retention work without the key. Objects carry no marker saying
they are encrypted: the key must be configured for every command that reads them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from walrus.codec.base import BytesLike, Reader
from walrus.errors import ConfigError
from walrus.pull import Source

__all__ = ["Crypter", "Encryptor", "crypter_from_settings", "decrypting"]


class Encryptor(Protocol):
    """One encrypted object in the making; returns the ciphertext ready so far (possibly b"")."""

    def encrypt(self, data: BytesLike) -> bytes: ...

    def finish(self) -> bytes: ...


class Crypter(Protocol):
    name: str

    def new_encryptor(self) -> Encryptor: ...

    def open_reader(self, raw: Source, name: str) -> Reader: ...


def decrypting(raw: Source, crypter: Crypter | None, name: str) -> Source:
    """The stored bytes of object `name`, decrypted when a crypter is configured (before decompression)."""
    return raw if crypter is None else crypter.open_reader(raw, name)


# Settings that make WAL-G encrypt in ways walrus does not implement. Set, they are an error:
# carrying on would store plaintext where the operator asked for encryption.
_UNSUPPORTED = (
    ("gpg_key_id", "WALG_GPG_KEY_ID", "keys from an external gpg keyring (deprecated in WAL-G)",
     "export the key (gpg --armor --export-secret-keys ID) and set WALG_PGP_KEY_PATH to the file"),
    ("envelope_pgp_key", "WALG_ENVELOPE_PGP_KEY", "envelope OpenPGP encryption (Yandex Cloud KMS)",
     "use WALG_PGP_KEY or WALG_LIBSODIUM_KEY"),
    ("cse_kms_id", "WALG_CSE_KMS_ID", "client-side AWS KMS encryption", "use WALG_PGP_KEY or WALG_LIBSODIUM_KEY"),
    ("yc_cse_kms_key_id", "YC_CSE_KMS_KEY_ID", "client-side Yandex Cloud KMS encryption",
     "use WALG_PGP_KEY or WALG_LIBSODIUM_KEY"),
)


def crypter_from_settings(values: Mapping[str, Any], sources: Mapping[str, str],
                          warn: Callable[[str], None] | None = None) -> Crypter | None:
    """The crypter WAL-G would choose from the resolved settings (walrus.config's table: value and
    origin by attribute), ready to use; a key that is set but unusable is a ConfigError.

    WAL-G's precedence: OpenPGP (inline key, then key path), then the KMS modes, then libsodium
    (inline key, then key path).
    """
    pgp = values["pgp_key"] is not None or values["pgp_key_path"] is not None
    if pgp and values["envelope_pgp_key"] is not None:
        raise ConfigError("WALG_PGP_KEY* and WALG_ENVELOPE_PGP_KEY* are both set",
                          hint="set one of them (as WAL-G requires)")
    if pgp:
        if warn is not None and (values["libsodium_key"] is not None or values["libsodium_key_path"] is not None):
            warn("WALG_LIBSODIUM_KEY* is ignored: WALG_PGP_KEY* takes precedence, as in WAL-G")
        return _openpgp(values, sources)
    for attr, name, what, hint in _UNSUPPORTED:
        if values[attr] is not None:
            raise ConfigError(f"{name} is set, but walrus does not implement {what}",
                              detail=f"set in {sources[attr]}; walrus refuses to store plaintext instead",
                              hint=hint)
    if values["libsodium_key"] is not None or values["libsodium_key_path"] is not None:
        return _libsodium(values, sources)
    return None


def _key_file(values: Mapping[str, Any], attr: str, name: str) -> bytes:
    path = values[attr]
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the key file {path} ({name})", detail=e.strerror,
                          hint="the file must exist and be readable by the user walrus runs as "
                               "(archive_command runs as the server's OS user)") from None


def _libsodium(values: Mapping[str, Any], sources: Mapping[str, str]) -> Crypter:
    try:
        from walrus.crypto.libsodium import LibsodiumCrypter, derive_key
    except ImportError as e:
        raise ConfigError("WALG_LIBSODIUM_KEY* is set, but PyNaCl is not installed", detail=str(e),
                          hint="pip install 'walrus-pg[crypto]' (PyNaCl)") from None
    transform = values["libsodium_key_transform"]
    if values["libsodium_key"] is not None:
        # the inline key is used as given; only a key file is trimmed (WAL-G's rules)
        attr, name = "libsodium_key", "WALG_LIBSODIUM_KEY"
        material = values["libsodium_key"].encode("utf-8", "surrogateescape")
    else:
        attr, name = "libsodium_key_path", "WALG_LIBSODIUM_KEY_PATH"
        material = _key_file(values, attr, name).strip()
    try:
        return LibsodiumCrypter(derive_key(material, transform))
    except ValueError as e:
        raise ConfigError(f"{name} is not a usable libsodium key",
                          detail=f"{e} (WALG_LIBSODIUM_KEY_TRANSFORM={transform}; set in {sources[attr]})",
                          hint="with transform none the key is at least 25 bytes (WAL-G pads or truncates it to 32); "
                               "hex and base64 keys decode to exactly 32 bytes") from None


def _openpgp(values: Mapping[str, Any], sources: Mapping[str, str]) -> Crypter:
    try:
        from walrus.crypto.openpgp import OpenPgpCrypter
        from walrus.crypto.pgp_keys import PgpKeyError
    except ImportError as e:
        raise ConfigError("WALG_PGP_KEY* is set, but the cryptography package is not installed", detail=str(e),
                          hint="pip install 'walrus-pg[crypto]' (cryptography)") from None
    if values["pgp_key"] is not None:
        # WAL-G accepts the armored key on one line, with literal \n for the line breaks
        name, attr, text = "WALG_PGP_KEY", "pgp_key", values["pgp_key"].replace("\\n", "\n")
    else:
        name, attr = "WALG_PGP_KEY_PATH", "pgp_key_path"
        text = _key_file(values, attr, name).decode("ascii", "replace")
    passphrase = values["pgp_key_passphrase"]
    try:
        return OpenPgpCrypter.from_armored(text, None if passphrase is None else passphrase.encode("utf-8"))
    except PgpKeyError as e:
        raise ConfigError(f"{name} is not a usable OpenPGP key", detail=f"{e}; set in {sources[attr]}",
                          hint="give an armored key ring (gpg --armor --export KEY for pushing, "
                               "--export-secret-keys to fetch as well)") from None
