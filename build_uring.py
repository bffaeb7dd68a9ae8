"""Build of walrus._uring._liburing (cffi, API mode) and the PEP 517 backend that compiles it on install."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import sysconfig


def _bind_pypa_packaging() -> None:
    """Imports PyPA's `packaging` from the build environment before setuptools asks for it.

    pip and `build` load an in-tree backend through a meta-path finder that resolves every top-level
    import against backend-path (the project root) first; there the project's own packaging/
    directory (distro packaging files, no __init__.py) would pass for a namespace package and hide
    PyPA's library from setuptools.
    """
    if "packaging" in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec("packaging", sys.path)
    if spec is None or not spec.has_location:  # not found, or only our namespace directory
        raise SystemExit("walrus: the build environment lacks the `packaging` library")
    module = importlib.util.module_from_spec(spec)
    sys.modules["packaging"] = module
    spec.loader.exec_module(module)


_bind_pypa_packaging()

import cffi  # noqa: E402  (after _bind_pypa_packaging)
from setuptools import build_meta as _setuptools_backend  # noqa: E402

SCRIPT = "build_uring.py"
MODULE = "walrus._uring._liburing"
HEADER = "liburing.h"

# API mode (set_source) rather than ABI mode: liburing's io_uring_prep_* helpers, io_uring_get_sqe and
# io_uring_cq_advance are static inline in the header, so only a compiled module can call them.
CDEF = """
typedef int... __s32;
typedef int... __u64;

struct io_uring { ...; };
struct io_uring_sqe { __u64 user_data; ...; };
struct io_uring_cqe { __u64 user_data; __s32 res; ...; };
struct io_uring_probe { ...; };
struct iovec { void *iov_base; size_t iov_len; };

static const int IORING_OP_READ;
static const int IORING_OP_READ_FIXED;
static const int IORING_OP_WRITE;
static const int IORING_OP_WRITE_FIXED;

int io_uring_queue_init(unsigned entries, struct io_uring *ring, unsigned flags);
void io_uring_queue_exit(struct io_uring *ring);
struct io_uring_probe *io_uring_get_probe_ring(struct io_uring *ring);
void io_uring_free_probe(struct io_uring_probe *probe);
int io_uring_opcode_supported(const struct io_uring_probe *p, int op);

int io_uring_register_buffers(struct io_uring *ring, const struct iovec *iovecs, unsigned nr_iovecs);
int io_uring_unregister_buffers(struct io_uring *ring);

struct io_uring_sqe *io_uring_get_sqe(struct io_uring *ring);
void io_uring_prep_read(struct io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes, __u64 offset);
void io_uring_prep_read_fixed(struct io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes, __u64 offset,
                              int buf_index);
void io_uring_prep_write(struct io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes, __u64 offset);
void io_uring_prep_write_fixed(struct io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                               __u64 offset, int buf_index);
int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
struct __kernel_timespec { long long tv_sec; long long tv_nsec; };
typedef struct { ...; } sigset_t;
int io_uring_submit_and_wait_timeout(struct io_uring *ring, struct io_uring_cqe **cqe_ptr, unsigned wait_nr,
                                     struct __kernel_timespec *ts, sigset_t *sigmask);
unsigned io_uring_peek_batch_cqe(struct io_uring *ring, struct io_uring_cqe **cqes, unsigned count);
void io_uring_cq_advance(struct io_uring *ring, unsigned nr);

long walrus_select_pages(const unsigned char *pages, size_t count, unsigned page_size, uint64_t lsn,
                         uint32_t first_block, uint32_t *out, size_t *selected);
"""

# Delta backups' page scan (walrus.pg.pages), here so a buffer the io_uring reader filled is scanned
# without a Python step per page. WAL-G's rules (incremental_page_reader.go, postgres_page_header.go):
# a page is selected when it is new (pd_upper 0) or valid with pd_lsn >= lsn; any other page is
# invalid and ends the scan: the return value is its index (the caller copies the file whole), -1
# when all `count` pages were scanned. Pages are in the host's byte order, as PostgreSQL writes them.
PAGES_SOURCE = """
#include <stdint.h>
#include <string.h>

static long walrus_select_pages(const unsigned char *pages, size_t count, unsigned page_size, uint64_t lsn,
                                uint32_t first_block, uint32_t *out, size_t *selected)
{
    size_t n = 0;
    for (size_t i = 0; i < count; i++) {
        const unsigned char *p = pages + i * (size_t)page_size;
        uint32_t xlogid, xrecoff;
        uint16_t flags, lower, upper, special, size_version;
        memcpy(&xlogid, p, 4);
        memcpy(&xrecoff, p + 4, 4);
        memcpy(&flags, p + 10, 2);
        memcpy(&lower, p + 12, 2);
        memcpy(&upper, p + 14, 2);
        memcpy(&special, p + 16, 2);
        memcpy(&size_version, p + 18, 2);
        uint64_t page_lsn = ((uint64_t)xlogid << 32) | xrecoff;
        int valid = (flags & 7) == flags && lower >= 24 && lower <= upper && upper <= special
                    && special <= page_size && page_lsn != 0 && (size_version & 0xFF00) == page_size
                    && (size_version & 0xFF) <= 5;
        if (valid ? page_lsn >= lsn : upper == 0)
            out[n++] = first_block + (uint32_t)i;
        else if (!valid) {
            *selected = n;
            return (long)i;
        }
    }
    *selected = n;
    return -1;
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(MODULE, f"#include <{HEADER}>\n" + PAGES_SOURCE, libraries=["uring"])


def _include_dirs() -> list[str]:
    dirs = [d for var in ("CPATH", "C_INCLUDE_PATH") for d in os.environ.get(var, "").split(os.pathsep) if d]
    flags = f"{os.environ.get('CPPFLAGS', '')} {os.environ.get('CFLAGS', '')}".split()
    dirs += [f[2:] for f in flags if f.startswith("-I") and len(f) > 2]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        dirs.append(f"/usr/include/{multiarch}")
    return dirs + ["/usr/local/include", "/usr/include"]


def _require_liburing() -> None:
    """Fails the build up front with the fix, instead of a compiler error deep in the build log."""
    if not any(os.path.isfile(os.path.join(d, HEADER)) for d in _include_dirs()):
        raise SystemExit(
            f"walrus: cannot build the io_uring module: {HEADER} not found "
            f"(searched {', '.join(_include_dirs())}).\n"
            "Install liburing's development files first: `apt-get install liburing-dev` "
            "(Debian/Ubuntu) or `dnf install liburing-devel` (Fedora/RHEL).")


CLIENT_SOURCE = os.path.join("walrus", "daemon", "client.py")
CLIENT_SCRIPT = os.path.join("build", "scripts-walrus", "walg-daemon-client")

# PostgreSQL runs the daemon client once per WAL segment, serially, so its start-up is paid by the
# archiver and by recovery on every segment. A console script runs the venv's python with
# site-packages (20 ms in an editable install, 11 in a plain one); `python -IS` on the stand-alone
# client takes 7. pip rewrites only `#!python` shebangs, and drops their flags, so the script starts
# as sh, which execs the python beside the script (the venv's bin/, or /usr/bin through the packages'
# symlink) without forking anything. To Python the sh part is the module's first string.
CLIENT_PRELUDE = "\n".join([
    "#!/bin/sh",
    "''':'",
    'py="${0%/*}/python3"',
    '[ -x "$py" ] || py=python3',
    'exec "$py" -IS "$0" "$@"',
    "'''",
    "",
])


def _write_client_script() -> str:
    """build/scripts-walrus/walg-daemon-client: the prelude, then walrus/daemon/client.py verbatim."""
    root = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(root, CLIENT_SOURCE), encoding="utf-8") as f:
        source = f.read()
    if "from __future__" in source:
        raise SystemExit(f"walrus: {CLIENT_SOURCE} cannot use __future__ imports: the prelude comes first")
    target = os.path.join(root, CLIENT_SCRIPT)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w", encoding="utf-8") as f:
        f.write(CLIENT_PRELUDE + source)
    os.chmod(target, 0o755)
    return CLIENT_SCRIPT


class _Backend(_setuptools_backend._BuildMetaBackend):
    """setuptools.build_meta with cffi's `cffi_modules` keyword, which pyproject.toml cannot express.

    setuptools runs a default `setup()` when there is no setup.py; this backend runs that same call
    with the cffi module added, so `pip install .`, `pip install -e .` and wheel builds all compile it.
    """

    def run_setup(self, setup_script: str = "setup.py") -> None:
        import setuptools

        # script_name: sdists ship the setup script, and this file is ours (a wheel built from the
        # sdist needs it as backend and as cffi build script)
        setuptools.setup(cffi_modules=[f"{SCRIPT}:ffibuilder"], script_name=SCRIPT,
                         scripts=[_write_client_script()])

    def build_wheel(self, wheel_directory, config_settings=None, metadata_directory=None):
        _require_liburing()
        return super().build_wheel(wheel_directory, config_settings, metadata_directory)

    def build_editable(self, wheel_directory, config_settings=None, metadata_directory=None):
        _require_liburing()
        return super().build_editable(wheel_directory, config_settings, metadata_directory)


_BACKEND = _Backend()
get_requires_for_build_wheel = _BACKEND.get_requires_for_build_wheel
get_requires_for_build_sdist = _BACKEND.get_requires_for_build_sdist
get_requires_for_build_editable = _BACKEND.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _BACKEND.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _BACKEND.prepare_metadata_for_build_editable
build_wheel = _BACKEND.build_wheel
build_editable = _BACKEND.build_editable
build_sdist = _BACKEND.build_sdist
