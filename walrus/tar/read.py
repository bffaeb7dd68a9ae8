"""Streaming tar reader and safe extraction of one backup tar part into a restore directory."""
from __future__ import annotations

import errno
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

from walrus.errors import BackupError, CorruptObject
from walrus.fileio import FileSink, PlainSink
from walrus.fsutil import pwrite_all
from walrus.pg.pages import BLOCK_SIZE, read_increment_head
from walrus.pull import Source

_BLOCK = 512
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # undecodable name bytes round-trip to the same bytes on disk
_GNU_MAGIC = b"ustar  \x00"
# PAX and GNU long-name payloads are held in memory; Go's archive/tar caps them at the same size.
_MAX_META_SIZE = 1 << 20
_MAX_SIZE = (1 << 63) - 1  # Go's archive/tar keeps sizes in an int64
_SKIP_CHUNK = 1 << 20
_META_TYPES = (b"x", b"g", b"L", b"K")
_KINDS = {b"0": "file", b"\x00": "file", b"7": "file", b"5": "dir", b"2": "symlink",
          b"1": "hardlink"}
# Links, devices, directories and fifos carry no payload whatever their size field says;
# Go's and Python's readers both skip nothing after them.
_HEADER_ONLY = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))

_DIR_WALK = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_OPEN = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
_INCREMENT_WRITE = 1 << 20  # bytes of consecutive pages an increment writes at once


@dataclass(frozen=True)
class Member:
    """One archive member; `name` is as stored, after PAX and GNU long-name resolution."""

    name: str
    kind: str  # "file" | "dir" | "symlink" | "hardlink" | "other"
    size: int  # payload bytes that follow the header (0 for links and directories)
    mode: int  # permission bits from the header
    mtime: int
    linkname: str
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""


@dataclass
class ExtractStats:
    """What extract_tar did; `files` counts regular files and links, `dirs` includes the root."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    skipped: int = 0
    root_mode: int | None = None
    restored: set[str] = field(default_factory=set)  # relpaths now in place: files, links, directories


def _label(name: str) -> str:
    return repr(name) if name else "tar stream"


class _Source:
    """Exact reads over a pull reader whose read(n) may return fewer bytes than asked."""

    def __init__(self, stream: Source):
        self._stream = stream
        self.offset = 0

    def read(self, n: int) -> bytes:
        """Up to n bytes; fewer only at EOF."""
        chunk = self._stream.read(n)
        if len(chunk) < n and chunk:
            parts = [chunk]
            got = len(chunk)
            while got < n:
                more = self._stream.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            chunk = b"".join(parts)
        self.offset += len(chunk)
        return chunk

    def readinto(self, view: memoryview) -> int:
        """Fills view; returns fewer than len(view) bytes only at EOF."""
        fill = getattr(self._stream, "readinto", None)
        if fill is not None:  # a stream that reads into the caller's buffer itself: no copy here
            got = 0
            while got < len(view) and (n := fill(view[got:])):
                got += n
            self.offset += got
            return got
        got = 0
        while got < len(view):
            chunk = self._stream.read(len(view) - got)  # the decoders hand out bytes: one copy either way
            n = len(chunk)
            view[got:got + n] = chunk
            if not n:
                break
            got += n
        self.offset += got
        return got

    def read_some(self, n: int):
        """Up to n bytes, as one read of the stream gives them (fewer, and a memoryview, if that is
        what it hands out): for a caller that copies them on anyway."""
        chunk = self._stream.read(n)
        self.offset += len(chunk)
        return chunk

    def skip(self, n: int) -> int:
        """Discards up to n bytes in bounded chunks; returns how many were there."""
        skipped = 0
        while skipped < n:
            chunk = self.read(min(_SKIP_CHUNK, n - skipped))
            if not chunk:
                break
            skipped += len(chunk)
        return skipped


class MemberData:
    """The payload of the member just yielded; reads fail rather than come up short."""

    def __init__(self, source: _Source, size: int, member: str, archive: str):
        self._source = source
        self._size = size
        self._remaining = size
        self._member = member
        self._archive = archive

    @property
    def remaining(self) -> int:
        return self._remaining

    def read(self, n: int = -1) -> bytes:
        """min(n, remaining) bytes (all remaining if n < 0); b"" once the payload is consumed."""
        want = self._remaining if n < 0 else min(n, self._remaining)
        chunk = self._source.read(want)
        self._consumed(len(chunk), want)
        return chunk

    def pieces(self, n: int):
        """The rest of the payload in the pieces the source hands out, each at most n bytes, without
        joining them into larger ones (bytes or memoryviews, valid until the caller lets go)."""
        while self._remaining:
            chunk = self._source.read_some(min(n, self._remaining))
            if not chunk:
                self._consumed(0, self._remaining)  # truncated: raises
            self._remaining -= len(chunk)
            yield chunk

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fills buf with up to min(len(buf), remaining) bytes; 0 once the payload is consumed."""
        view = memoryview(buf).cast("B")
        want = min(len(view), self._remaining)
        got = self._source.readinto(view[:want])
        self._consumed(got, want)
        return got

    def _consumed(self, got: int, want: int) -> None:
        self._remaining -= got
        if got < want:
            raise CorruptObject(
                f"tar archive {self._archive} is truncated",
                detail=f"member {self._member!r} ends after {self._size - self._remaining} "
                f"of {self._size} payload bytes",
            )

    def _drain(self) -> None:
        want = self._remaining
        self._consumed(self._source.skip(want), want)


def _corrupt(archive: str, why: str, after: str | None) -> CorruptObject:
    where = f"after member {after!r}" if after is not None else "before the first member"
    return CorruptObject(f"tar archive {archive} is corrupt", detail=f"{why} ({where})")


def _parse_pax(data: bytes, fail: Callable[[str], CorruptObject]) -> dict[str, str]:
    """Parses PAX records `LEN key=value\\n`, where LEN counts the whole record."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise fail("malformed PAX record length")
        end = pos + int(digits)
        if end <= space + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise fail("malformed PAX record")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise fail("PAX record without '='")
        records[key.decode(_ENCODING, _ERRORS)] = value.decode(_ENCODING, _ERRORS)
        pos = end
    return records


def _pax_int(records: dict[str, str], key: str,
             fail: Callable[[str], CorruptObject]) -> int | None:
    value = records.get(key)
    if not value:  # an empty value cancels the override (POSIX)
        return None
    try:
        if key == "mtime":
            return int(float(value))  # PAX times may carry a fraction
        if value.isascii() and value.isdigit():
            return int(value)
    except (ValueError, OverflowError):
        pass
    raise fail(f"bad PAX {key} {value!r}")


def _dir_name(name: str) -> str:
    """Directory names lose trailing slashes, but an all-slash name stays "/" (the root member)."""
    return name.rstrip("/") or name[:1]


def _read_header(source: _Source, archive: str, after: str | None) -> Member | None:
    """Reads headers up to and including the next real member; None at the end-of-archive block."""
    pax: dict[str, str] = {}
    long_name: str | None = None
    long_link: str | None = None
    pending = False

    def fail(why: str) -> CorruptObject:
        return _corrupt(archive, why, after)

    while True:
        offset = source.offset
        buf = source.read(_BLOCK)
        if not buf:
            if after is not None and not pending:
                return None  # EOF at a member boundary: Go's reader takes it for the end (WAL-G's remote parts)
            raise fail(f"archive ends at byte {offset} without an end-of-archive block")
        if len(buf) < _BLOCK:
            raise fail(f"archive ends inside the header at byte {offset}")
        if buf.count(0) == _BLOCK:
            if pending:
                raise fail("extended header not followed by a member")
            return None
        try:
            info = tarfile.TarInfo.frombuf(buf, _ENCODING, _ERRORS)
        except tarfile.HeaderError as exc:
            raise fail(f"{exc} in the header at byte {offset}") from None
        if info.size < 0 or info.size > _MAX_SIZE:
            raise fail(f"size {info.size} in the header at byte {offset}")
        if info.type in _META_TYPES:
            if info.size > _MAX_META_SIZE:
                raise fail(f"extended header of {info.size} bytes at byte {offset}")
            payload = source.read(info.size)
            if len(payload) < info.size or source.skip(-info.size % _BLOCK) < -info.size % _BLOCK:
                raise fail(f"archive ends inside the extended header at byte {offset}")
            if info.type != b"g":  # global PAX defaults carry nothing a restore uses
                pending = True
            if info.type == b"x":
                pax.update(_parse_pax(payload, fail))
            elif info.type == b"L":
                long_name = tarfile.nts(payload, _ENCODING, _ERRORS)
            elif info.type == b"K":
                long_link = tarfile.nts(payload, _ENCODING, _ERRORS)
            continue

        kind = _KINDS.get(info.type, "other")
        if any(key.startswith("GNU.sparse.") for key in pax):
            # A sparse map lives in the payload; writing it out verbatim would corrupt the file.
            kind = "other"
        name = info.name
        if buf[257:265] == _GNU_MAGIC or not name:
            # GNU headers keep atime/ctime where ustar has the name prefix; an empty name is the
            # root "/" whose slash frombuf stripped.
            name = tarfile.nts(buf[:100], _ENCODING, _ERRORS)
        name = pax.get("path") or name
        linkname = pax.get("linkpath") or info.linkname
        size = info.size
        mtime = info.mtime
        pax_size = _pax_int(pax, "size", fail)
        if pax_size is not None:
            size = pax_size
        pax_mtime = _pax_int(pax, "mtime", fail)
        if pax_mtime is not None:
            mtime = pax_mtime
        # Go's archive/tar lets GNU long names win over PAX ones.
        name = long_name if long_name is not None else name
        linkname = long_link if long_link is not None else linkname
        if info.type == tarfile.AREGTYPE and name.endswith("/"):
            kind = "dir"  # pre-POSIX archives mark directories by a trailing slash alone
        if kind == "dir":
            name = _dir_name(name)
        if info.type in _HEADER_ONLY or kind == "dir":
            size = 0
        if size > _MAX_SIZE:
            raise fail(f"size {size} of member {name!r}")
        return Member(name=name, kind=kind, size=size, mode=info.mode & 0o7777, mtime=mtime,
                      linkname=linkname, uid=info.uid, gid=info.gid, uname=info.uname, gname=info.gname)


def iter_members(stream: Source, *, name: str = "") -> Iterator[tuple[Member, MemberData]]:
    """Yields each member and its payload reader; whatever the caller leaves unread is skipped. A
    stream that also has readinto (walrus.pull.Payload) fills MemberData.readinto's buffer itself.

    After the end-of-archive block every remaining byte must be zero, as WAL-G requires. As Go's
    archive/tar, the stream may also end right after a member's data, with or without its padding
    (WAL-G's remote-mode parts and PostgreSQL's BASE_BACKUP archives lack the end-of-archive block);
    an end inside a header, a payload or part of the padding is still corrupt.
    """
    archive = _label(name)
    source = _Source(stream)
    after: str | None = None
    while True:
        member = _read_header(source, archive, after)
        if member is None:
            break
        data = MemberData(source, member.size, member.name, archive)
        yield member, data
        data._drain()
        padding = -member.size % _BLOCK
        if 0 < source.skip(padding) < padding:
            raise _corrupt(archive, "archive ends inside the padding", member.name)
        after = member.name
    _check_trailing_zeros(source, archive)


def _check_trailing_zeros(source: _Source, archive: str) -> None:
    while chunk := source.read(_SKIP_CHUNK):
        if chunk.count(0) != len(chunk):
            raise CorruptObject(
                f"tar archive {archive} is corrupt",
                detail="non-zero bytes follow the end-of-archive marker",
                hint="the object may hold two concatenated archives or trailing garbage",
            )


def _relpath(name: str, archive: str | None) -> str:
    where = f" in {archive}" if archive else ""
    if "\x00" in name:
        raise CorruptObject(f"tar member {name!r}{where} has an invalid name",
                             detail="the name contains a NUL byte")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise CorruptObject(f"tar member {name!r}{where} points outside the restore directory",
                             detail="its name has a '..' component")
    return "/".join(parts)


def member_relpath(name: str) -> str:
    """The member's path relative to the restore root ("" for the root itself)."""
    return _relpath(name, None)


def _links_outside(member: Member, archive: str, detail: str) -> CorruptObject:
    return CorruptObject(
        f"tar member {member.name!r} in {archive} links outside the restore directory",
        detail=detail,
    )


class _Extractor:
    """Writes members under one directory, never following a symlink the caller did not allow."""

    def __init__(self, dest: str, archive: str, allowed_links: frozenset[str], sink: FileSink):
        self.dest = dest
        self.archive = archive
        self.allowed = frozenset(_relpath(link, None) for link in allowed_links)
        self.sink = sink
        self.stats = ExtractStats()
        try:
            self.root = os.open(dest, _DIR_WALK)
        except OSError as exc:
            raise BackupError(f"cannot open restore directory {dest!r}",
                              detail=exc.strerror) from exc
        # Members arrive grouped by directory, so one cached parent saves most of the walking.
        self._cached: tuple[tuple[str, ...], int] = ((), self.root)

    def close(self) -> None:
        self._release(self._cached[1])
        os.close(self.root)

    def _release(self, fd: int) -> None:
        if fd != self.root:
            os.close(fd)

    def extract(self, member: Member, data: MemberData, wanted: Callable[[str], bool] | None,
                incremented: Callable[[str], bool] | None = None) -> None:
        rel = _relpath(member.name, self.archive)
        target = os.path.join(self.dest, rel)
        try:
            if member.kind == "dir":
                self._directory(member, rel)
            elif member.kind == "file":
                if wanted is not None and not wanted(rel):
                    self.stats.skipped += 1
                    return
                if incremented is not None and incremented(rel):
                    self._increment(member, rel, data, target)
                else:
                    self._file(member, rel, data, target)
            elif member.kind == "symlink":
                self._symlink(member, rel, target)
            elif member.kind == "hardlink":
                self._hardlink(member, rel)
            else:
                raise CorruptObject(
                    f"tar member {member.name!r} in {self.archive} has an unsupported type",
                    detail="a backup holds only regular files, directories and links",
                )
            if rel:
                self.stats.restored.add(rel)
        except OSError as exc:
            reason = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)
            raise BackupError(
                f"cannot restore tar member {member.name!r} from {self.archive} to {target!r}",
                detail=reason,
            ) from exc

    def _open_step(self, dirfd: int, parts: tuple[str, ...], member: Member, create: bool,
                   flags: int) -> int:
        """Opens parts[-1] under dirfd as a directory, creating it when asked."""
        rel = "/".join(parts)
        if rel not in self.allowed:
            flags |= os.O_NOFOLLOW
        try:
            return os.open(parts[-1], flags, dir_fd=dirfd)
        except FileNotFoundError:
            if not create:
                raise
        except NotADirectoryError:  # also what O_NOFOLLOW|O_DIRECTORY gives for a symlink
            raise self._blocked(member, dirfd, parts) from None
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=dirfd)
        except FileExistsError:
            pass  # created meanwhile, or a dangling allowed link: the open below decides
        return os.open(parts[-1], flags, dir_fd=dirfd)

    def _blocked(self, member: Member, dirfd: int, parts: tuple[str, ...]) -> BackupError:
        path = os.path.join(self.dest, *parts)
        if stat.S_ISLNK(os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False).st_mode):
            return BackupError(
                f"refusing to restore tar member {member.name!r} through symbolic link {path!r}",
                detail="only the tablespace links made for this restore may be followed",
                hint="restore into an empty directory",
            )
        return BackupError(f"cannot restore tar member {member.name!r}",
                           detail=f"{path!r} exists and is not a directory")

    def _walk(self, parts: tuple[str, ...], member: Member, create: bool) -> int:
        """A descriptor of dest/parts reached without following any symlink not allowed."""
        fd = self.root
        try:
            for depth in range(1, len(parts) + 1):
                step = self._open_step(fd, parts[:depth], member, create, _DIR_WALK)
                self._release(fd)
                fd = step
        except BaseException:
            self._release(fd)
            raise
        return fd

    def _parent(self, parts: tuple[str, ...], member: Member) -> int:
        """The created-as-needed parent directory of parts, cached until another is asked for."""
        if self._cached[0] != parts:
            fd = self._walk(parts, member, create=True)
            self._release(self._cached[1])
            self._cached = (parts, fd)
        return self._cached[1]

    def _directory(self, member: Member, rel: str) -> None:
        self.stats.dirs += 1
        if not rel:
            self.stats.root_mode = member.mode & 0o777  # the caller chmods the root last
            return
        parts = tuple(rel.split("/"))
        parent = self._parent(parts[:-1], member)
        fd = self._open_step(parent, parts, member, True, _DIR_OPEN)
        try:
            # Go's os.Chmod keeps only the permission bits of a tar mode; so do we.
            os.fchmod(fd, member.mode & 0o777)
        finally:
            os.close(fd)

    def _file(self, member: Member, rel: str, data: MemberData, target: str) -> None:
        parts = self._not_root(member, rel)
        parent = self._parent(parts[:-1], member)
        direct = 0 < self.sink.direct_threshold <= member.size
        try:
            fd, direct = self._open_file(parts[-1], parent, direct)
        except IsADirectoryError:
            raise BackupError(f"cannot restore tar member {member.name!r}",
                              detail=f"a directory exists at {target!r}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._blocked(member, parent, parts) from None
            raise
        try:
            os.fchmod(fd, member.mode & 0o777)
        except BaseException:
            os.close(fd)
            raise
        self.sink.write(fd, data, member.size, direct)
        self.stats.files += 1
        self.stats.bytes += member.size

    def _increment(self, member: Member, rel: str, data: MemberData, target: str) -> None:
        """Apply a `wi1` member to the file a lower level of the chain restored: cut or extend it to
        the size it had, then write each page carried at its block (WAL-G's ApplyFileIncrement).
        The head is checked whole before the first write; durability comes with the restore's sync."""
        parts = self._not_root(member, rel)
        parent = self._parent(parts[:-1], member)
        increment = read_increment_head(data.read, member.size, member.name)
        try:
            fd = os.open(parts[-1], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            raise CorruptObject(f"tar member {member.name!r} in {self.archive} is an increment of a file the "
                                f"delta's base does not hold", detail=f"no {target!r} after restoring the base",
                                hint="the delta chain is damaged; restore an older full backup") from None
        try:
            os.ftruncate(fd, increment.file_size)
            blocks, i = increment.blocks, 0
            while i < len(blocks):
                run = 1  # consecutive blocks go in one write, up to _INCREMENT_WRITE bytes
                while (i + run < len(blocks) and blocks[i + run] == blocks[i] + run
                       and run * BLOCK_SIZE < _INCREMENT_WRITE):
                    run += 1
                pwrite_all(fd, data.read(run * BLOCK_SIZE), blocks[i] * BLOCK_SIZE)
                i += run
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += len(increment.blocks) * BLOCK_SIZE

    @staticmethod
    def _open_file(name: str, parent: int, direct: bool) -> tuple[int, bool]:
        """Open for writing, with O_DIRECT where asked and the filesystem allows it (tmpfs refuses)."""
        if direct:
            try:
                return os.open(name, _FILE_OPEN | os.O_DIRECT, 0o600, dir_fd=parent), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return os.open(name, _FILE_OPEN, 0o600, dir_fd=parent), False

    def _not_root(self, member: Member, rel: str) -> tuple[str, ...]:
        if not rel:
            raise CorruptObject(f"tar member {member.name!r} in {self.archive} names the restore "
                                 f"root but is not a directory")
        return tuple(rel.split("/"))

    def _symlink(self, member: Member, rel: str, target: str) -> None:
        parts = self._not_root(member, rel)
        if rel in self.allowed:
            self.stats.skipped += 1  # the caller already made this tablespace link from the Spec
            return
        self._check_link_target(member, parts)
        parent = self._parent(parts[:-1], member)
        try:
            os.symlink(member.linkname, parts[-1], dir_fd=parent)
        except FileExistsError:
            # A delta chain restore meets the same link twice; anything else in the way is an error.
            try:
                same = os.readlink(parts[-1], dir_fd=parent) == member.linkname
            except OSError:
                same = False
            if not same:
                raise BackupError(f"cannot restore tar member {member.name!r}",
                                  detail=f"something else exists at {target!r}") from None
        self.stats.files += 1

    def _check_link_target(self, member: Member, parts: tuple[str, ...]) -> None:
        """Accepts only `../`* followed by plain components, climbing no higher than dest.

        Lexically folding `a/../b` is unsound once `a` is itself a link, so `..` may only lead.
        Climbing is counted from the deepest allowed link above the symlink, since `..` there
        moves in the tablespace location rather than in dest.
        """
        link = member.linkname
        if not link or "\x00" in link or link.startswith("/"):
            raise _links_outside(member, self.archive, f"link target {link!r} is not relative")
        steps = [step for step in link.split("/") if step not in ("", ".")]
        ups = 0
        while ups < len(steps) and steps[ups] == "..":
            ups += 1
        parent = parts[:-1]
        floor = max((depth for depth in range(1, len(parent) + 1)
                     if "/".join(parent[:depth]) in self.allowed), default=0)
        if ".." in steps[ups:] or ups > len(parent) - floor:
            raise _links_outside(member, self.archive, f"link target {link!r} escapes")

    def _hardlink(self, member: Member, rel: str) -> None:
        parts = self._not_root(member, rel)
        try:
            source = tuple(_relpath(member.linkname, None).split("/"))
        except CorruptObject:
            raise _links_outside(member, self.archive,
                                 f"hard link target {member.linkname!r}") from None
        not_restored = CorruptObject(
            f"tar member {member.name!r} in {self.archive} is a hard link to "
            f"{member.linkname!r}, which is not a regular file already restored",
        )
        try:
            source_dir = self._walk(source[:-1], member, create=False)
        except (BackupError, FileNotFoundError):
            raise not_restored from None
        try:
            try:
                found = os.stat(source[-1], dir_fd=source_dir, follow_symlinks=False).st_mode
            except FileNotFoundError:
                found = 0
            if not source[-1] or not stat.S_ISREG(found):
                raise not_restored
            parent = self._parent(parts[:-1], member)
            os.link(source[-1], parts[-1], src_dir_fd=source_dir, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            self._release(source_dir)
        self.stats.files += 1


def extract_tar(stream: Source, dest: str, *, name: str = "",
                wanted: Callable[[str], bool] | None = None,
                allowed_links: frozenset[str] = frozenset(),
                sink: FileSink | None = None, buffer_size: int = 1 << 20,
                incremented: Callable[[str], bool] | None = None) -> ExtractStats:
    """Extracts one tar part under the existing directory dest; see ExtractStats for the tally.

    `wanted(relpath)` filters regular files; `allowed_links` names the symlinks under dest (the
    tablespace links made for this restore) that may be written through. The root member's mode
    is returned in stats.root_mode for the caller to apply once every part is extracted.
    `incremented(relpath)`: the file is a delta's `wi1` increment, applied to the file in place.
    """
    sink = sink or PlainSink(buffer_size)
    extractor = _Extractor(dest, _label(name), allowed_links, sink)
    try:
        for member, data in iter_members(stream, name=name):
            extractor.extract(member, data, wanted, incremented)
        sink.finish()
    finally:
        extractor.close()
    return extractor.stats
