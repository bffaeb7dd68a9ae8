"""The README's command lines name the files the packages install: copied as written, they must work."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _installed() -> set[str]:
    spec = yaml.safe_load((ROOT / "packaging/nfpm.yaml").read_text())
    return {entry["dst"] for entry in spec["contents"]}


def _readme_lines() -> list[str]:
    return (ROOT / "README.md").read_text().splitlines()


def test_every_config_file_the_readme_passes_is_the_one_the_packages_install():
    installed = _installed()
    configs = [m.group(1) for line in _readme_lines() for m in re.finditer(r"--config\s+(\S+)", line)]
    assert configs, "the README shows no --config at all"
    wrong = sorted({c for c in configs if c.startswith("/etc/") and c not in installed})
    assert wrong == [], f"README passes config files no package installs: {wrong}"


def test_every_walrus_program_the_readme_runs_is_installed():
    installed = _installed()
    programs = {m.group(0) for line in _readme_lines()
                for m in re.finditer(r"/usr/(?:bin/wal[\w-]*|libexec/walrus/[\w-]+)", line)}
    assert "/usr/bin/walg-daemon-client" in programs and "/usr/bin/walrus" in programs
    assert sorted(p for p in programs if p not in installed) == []
