"""The settings table is the one source of Settings' typed attributes, and Settings is frozen."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from walrus import config
from walrus.config import SETTINGS, Settings, load_settings
from walrus.errors import ConfigError


def test_the_generated_attributes_are_the_tables():
    source = open(config.__file__).read()
    block = source.split(config._BEGIN + "\n", 1)[1].split(config._END, 1)[0]
    assert block == config.settings_fields(), "run `python -m walrus.config` after changing the table"


def test_each_attribute_has_its_parsers_type_and_default():
    from walrus.crypto import Crypter

    hints = typing.get_type_hints(Settings, {**vars(config), "Crypter": Crypter})
    settings = load_settings({"HOME": "/nonexistent"})
    for s in SETTINGS:
        expected = typing.get_type_hints(s.parse)["return"]
        assert hints[s.attr] == (expected | None if s.default is None else expected), s.name
        assert getattr(settings, s.attr) == s.default, s.name


def test_settings_are_frozen_and_unknown_names_are_errors():
    settings = load_settings({"HOME": "/nonexistent", "WALG_COMPRESSION_METHOD": "zstd"})
    assert settings.compression_method == "zstd" and settings.sources["compression_method"].startswith("environment")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.compression_method = "lz4"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        settings.compresion_method  # type: ignore[attr-defined]  # noqa: B018


def test_secrets_stay_out_of_the_repr():
    settings = load_settings({"HOME": "/nonexistent", "AWS_SECRET_ACCESS_KEY": "hunter2-secret",
                              "WALG_S3_PREFIX": "s3://b/p", "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE"})
    assert "hunter2-secret" not in repr(settings) and "AKIDEXAMPLE" not in repr(settings)
    assert settings.aws_secret_access_key == "hunter2-secret"


@pytest.mark.parametrize("name,text", [
    ("walg.env", 'export WALG_FILE_PREFIX="/backups/a b" # comment\nAWS_REGION: eu-west-1\n'
                 "walg_upload_concurrency=3\n# a comment\n"),
    ("walg.toml", 'WALG_FILE_PREFIX = "/backups/a b"\nAWS_REGION = "eu-west-1"\nWALG_UPLOAD_CONCURRENCY = 3\n'),
    ("walg.properties", "WALG_FILE_PREFIX=/backups/a b\n! comment\nAWS_REGION: eu-west-1\n"
                        "WALG_UPLOAD_CONCURRENCY 3\n"),
    ("walg.ini", "WALG_FILE_PREFIX=/backups/a b\nAWS_REGION=eu-west-1\nWALG_UPLOAD_CONCURRENCY=3\n"),
    ("walg.yaml", "walg_file_prefix: /backups/a b\nAWS_REGION: eu-west-1\nWALG_UPLOAD_CONCURRENCY: 3\n"),
])
def test_config_files_in_every_format_viper_reads(tmp_path, name, text):
    """WAL-G's viper reads a config file by its extension, names case-insensitive (Ubicloud and
    Supabase ship .env files): each gives the same settings."""
    path = tmp_path / name
    path.write_text(text)
    settings = load_settings({"HOME": str(tmp_path)}, str(path))
    assert (settings.file_prefix, settings.aws_region, settings.upload_concurrency) == ("/backups/a b", "eu-west-1", 3)


def test_the_default_config_file_may_be_any_viper_type(tmp_path):
    (tmp_path / ".walg.env").write_text("WALG_FILE_PREFIX=/from/env/file\n")
    assert load_settings({"HOME": str(tmp_path)}).file_prefix == "/from/env/file"


def test_hcl_is_refused_clearly(tmp_path):
    path = tmp_path / "walg.hcl"
    path.write_text('WALG_FILE_PREFIX = "/x"\n')
    with pytest.raises(ConfigError, match="does not read HCL"):
        load_settings({"HOME": str(tmp_path)}, str(path))
