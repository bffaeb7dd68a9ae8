"""Small OS helpers Python lacks: durable files and renames, writeback, unmapping a carved-up mapping."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from typing import Callable, Iterable, TypeVar

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc (ctypes.util.find_library runs ldconfig)


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str) -> None:
    """Flush every dirty page and inode of the filesystem holding `path`; raises on writeback errors."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # <linux/fs.h>
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28 and later
if _renameat2 is not None:
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename src to dst only if dst does not exist, atomically; FileExistsError if it does.

    renameat2(RENAME_NOREPLACE) where the filesystem supports it; elsewhere (NFS, some FUSE
    filesystems) a hard link, which is just as exclusive, then the unlink of src.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst)
    os.unlink(src)


def discard(fd: int, tmp: str) -> None:
    """After a failed write of temporary file `tmp`: close `fd` (unless already closed, -1), remove `tmp`."""
    if fd >= 0:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def write_all(fd: int, data) -> int:
    """os.write until every byte is written (it may write less on pipes, signals, full disks)."""
    view = memoryview(data)
    total = len(view)
    while view:
        view = view[os.write(fd, view):]
    return total


def pwrite_all(fd: int, data, offset: int) -> int:
    """os.pwrite at `offset` until every byte is written: a short write (a disk filling up) goes on
    from where it stopped, so the next call raises its error instead of leaving a hole."""
    view = memoryview(data)
    total = len(view)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # a regular file does not answer a write with 0 bytes; never spin if one does
            raise OSError(errno.EIO, f"a write of {len(view)} bytes at offset {offset} wrote nothing")
        view, offset = view[n:], offset + n
    return total


def writev_all(fd: int, chunks: list) -> int:
    """Write `chunks` in order with one writev where the kernel takes them all; finish any short write."""
    written = os.writev(fd, chunks)
    total = sum(map(len, chunks))
    if written < total:
        for chunk in chunks:
            if written >= len(chunk):
                written -= len(chunk)
                continue
            write_all(fd, memoryview(chunk)[written:])
            written = 0
    return total


_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.pwrite.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
_libc.pwrite.restype = ctypes.c_ssize_t


def fallocate(fd: int, length: int) -> int:
    """fallocate(2) of bytes [0, length) of `fd`, extending its size: 0, or the errno."""
    return 0 if _libc.fallocate(fd, 0, 0, length) == 0 else ctypes.get_errno()


def pwrite_from(fd: int, address: int, nbytes: int, offset: int) -> int:
    """pwrite(2) of `nbytes` from raw memory at `address`, without holding the GIL for the call:
    the bytes written, or -errno (io_uring's way of reporting a result)."""
    n = _libc.pwrite(fd, address, nbytes, offset)
    return n if n >= 0 else -ctypes.get_errno()


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of `fd` to disk now, without waiting for it.

    Used while a large object is written, so the final fsync finds little left to do instead of
    stalling on everything at once (PostgreSQL's *_flush_after settings do the same). Purely a
    hint: where the call is refused (not Linux, a filesystem without it) nothing changes.
    """
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def ask_huge_pages(mapping: mmap.mmap) -> None:
    """Transparent huge pages for an I/O buffer mapping where the kernel offers them (THP "madvise"
    mode); a refusal only costs speed. A 1 MiB direct read or write into 4 KiB pages is 256
    scattered segments, over virtio-blk's 254 a request, so the kernel splits each one in two."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mapping.madvise(advice)
        except OSError:
            pass


def unmap(mapping: mmap.mmap, views: Iterable[memoryview]) -> None:
    """Release the views carved from `mapping`, then unmap it now; where something still holds a
    slice of it (a traceback's frame, a job still reading), the mapping stays until the GC frees it."""
    for view in views:
        view.release()
    try:
        mapping.close()
    except BufferError:
        pass


T = TypeVar("T")


class Released(OSError):
    """A call on a resource its owner had already released."""

    def __init__(self) -> None:
        super().__init__(errno.EBADF, "the resource was released")


class WorkerResource:
    """A descriptor (or scandir) used by calls on worker threads and released by the event loop.

    A task cancelled while its call runs on a thread (SIGTERM, a failed sibling) must not close the
    resource under that call: closedir during readdir crashes the interpreter, and a descriptor
    number closed during a writev loop may be reused by another file, which the rest of the loop
    would then write into. So release() closes at once only when no call runs; otherwise the call
    closes it as it ends. A call that starts after release() is refused (Released)."""

    def __init__(self, close: Callable[[], None]):
        self._close = close
        self._lock = threading.Lock()  # held only to flip the flags, and for the close itself
        self._running = 0
        self._released = False

    def call(self, fn: Callable[..., T], *args) -> T:
        """fn(*args), on a worker thread."""
        with self._lock:
            if self._released:
                raise Released()
            self._running += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1
                if self._released and not self._running:
                    self._close()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            if not self._running:
                self._close()


def user_name(uid: int) -> str:
    """The account name of uid, or the number when it has none (as ls shows)."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
