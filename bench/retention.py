"""Benchmark: `walrus delete retain N` over a prefix of many WAL objects, on s3rver and on file storage.

Each case lays out, straight on disk, 4 complete backups in WAL-G's layout and WAL objects for
segments 1..OBJECTS of timeline 1 (16 MiB segments), the backups starting at segments spread over
that range, so that `retain 2` deletes the two oldest backups and about half of the WAL. Then it
times `walrus delete retain 2 --json` (the dry run) and `... --confirm --json`, takes each run's
peak RSS from wait4 (ru_maxrss of the walrus process), and checks that exactly the expected objects
remain. The issue's target: 100,000 WAL objects on s3rver in under 30 s and under 128 MiB.

    .venv/bin/python -m bench.retention                      # s3rver 1k, 100k; files 1k, 100k, 1M
    .venv/bin/python -m bench.retention --storage s3 --objects 100000
    .venv/bin/python -m bench.retention --storage file --objects 100000 --file-extra ''

S3 objects are written as s3rver 3.7.1 stores them (the object's bytes in `<key>._S3rver_object`,
its md5 in `<key>._S3rver_object.md5`, its metadata in `<key>._S3rver_metadata.json`; LastModified
is the object file's mtime): a probe object PUT through the API first checks that layout, and a
full listing through the API must return every object before walrus runs. s3rver runs with a
preloaded patch (S3RVER_PATCH below: its listing and delete made independent of the folder's size,
as S3's are, and ListMultipartUploads, which walrus's delete calls and s3rver lacks); its objects
live in the work directory, on disk by default (`--workdir /dev/shm/...` puts them in RAM).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import lz4.frame  # noqa: E402

from bench.measure import drop_caches  # noqa: E402
from bench.s3 import BUCKET, OBJECT_SUFFIX, S3rver  # noqa: E402
from tests.pgcluster import WALRUS  # noqa: E402
from walrus.backup.dto import ExtendedMetadata, Sentinel  # noqa: E402

MIB = 2 ** 20
SEGMENT = 16 * MIB
TIMELINE = 1
WAL_EXT = ".lz4"
TARGET_S = 30.0  # the targets, for the S3 case
TARGET_RSS_MIB = 128
METADATA_SUFFIX = "._S3rver_metadata.json"
MD5_SUFFIX = OBJECT_SUFFIX + ".md5"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# s3rver 3.7.1's filesystem store does two things in time proportional to the whole folder, per request
# (upstream code: node_modules/s3rver/lib/stores/filesystem.js and lib/utils.js):
# - ListObjects walks the folder from its first entry with a statSync of every entry, until it has
#   found 1,000 keys after start-after: page k of a 100,000-object prefix (300,000 files: object, md5
#   and metadata) stats 3,000 k files, about 15 million in all for one listing; and even without
#   the stats, reading the folder's 300,000 names (readdirSync, sorted by libuv) costs about 0.45 s
#   of s3rver's CPU per page: 45 s for one listing of wal_005/;
# - deleteObject, once per key (DeleteObjects of 1,000 keys: 1,000 times), readdirSync()s the
#   object's folder to see whether it emptied: deleting 50,000 WAL objects from wal_005/ reads about
#   10 billion directory entries (10,000 objects already took s3rver 96 CPU s; 100,000 would take hours).
# Both are the emulator's, not S3's (S3 answers each request in time independent of the bucket's size),
# so by default the bench preloads this module into s3rver, which replaces the two methods by ones
# that answer the same:
# - a listing page uses the folder's sorted names from a cache, skips by binary search to the ones
#   from start-after on, and stats only those it visits (a name that vanished is skipped). A folder's
#   names are cached only when its mtime is over 1 s old when read (so any later change gives it
#   another mtime, even with coarse timestamps), and revalidated against its mtime on every page;
#   s3rver's own deletes keep the cache (they move its mtime along, synchronously, when nothing else
#   changed the folder); every other write through s3rver drops the whole cache. Nothing may write to
#   s3rver's folders behind its back while it serves: the bench writes each prefix before listing it.
# - deleteObject finds the folders it emptied by rmdir failing with ENOTEMPTY, not by readdir.
# - ListMultipartUploads, which stock s3rver answers with 501 NotImplemented, lists the uploads in
#   s3rver's own <bucket>/._S3rver_uploads/ (walrus's delete asks for them: a backup in progress).
# An equivalence check (stock and patched s3rver over the same random tree of nested keys, 1,120
# paginated listings with prefixes, delimiters and start-after, between rounds of DeleteObjects and
# a PUT) answered the same. --stock-s3rver runs s3rver unchanged (then keep --objects near 10,000).
S3RVER_PATCH = r"""'use strict';
const fs = require('fs');
const path = require('path');
const { format } = require('util');
const lib = %(lib)s;
const FilesystemStore = require(path.join(lib, 'stores', 'filesystem.js'));
const S3Object = require(path.join(lib, 'models', 'object.js'));
const OBJECT_SUFFIX = format('%%s._S3rver_%%s', '', 'object');
const SETTLED_NS = 1000000000n; // a folder's names are cached only if it was last changed this long ago

const cache = new Map(); // folder -> { names (sorted), mtimeNs }

function folderNames(dir) {
  const mtimeNs = fs.statSync(dir, { bigint: true }).mtimeNs;
  const hit = cache.get(dir);
  if (hit && hit.mtimeNs === mtimeNs) return hit.names;
  const names = fs.readdirSync(dir); // sorted: libuv sorts scandir's entries
  const settled = BigInt(Date.now()) * 1000000n - mtimeNs > SETTLED_NS;
  if (settled) cache.set(dir, { names, mtimeNs });
  else cache.delete(dir);
  return names;
}

function lowerBound(names, value) {
  let lo = 0;
  let hi = names.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (names[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// upstream walk() visits (and stats) every entry of every folder on the way; this one skips, in a
// folder on the path to start-after, the names that sort before it, but for those that are a prefix
// of its next path component: every key at or below a skipped name sorts before start-after, and
// upstream listObjects drops those keys anyway
function* walk(dir, recurseFilter, startAfterPath) {
  const names = folderNames(dir);
  const base = dir + '/';
  let first = 0;
  let before = [];
  if (startAfterPath.startsWith(base)) {
    const rest = startAfterPath.slice(base.length);
    const component = rest.split('/')[0];
    first = lowerBound(names, rest);
    for (let length = 1; length <= component.length; length++) { // ascending, as the names are
      const name = component.slice(0, length);
      const at = lowerBound(names, name);
      if (at < first && names[at] === name) before.push(name);
    }
  }
  for (let i = 0; i < before.length + names.length - first; i++) {
    const filename = i < before.length ? before[i] : names[first + i - before.length];
    const filePath = path.posix.join(dir, filename);
    let stats;
    try {
      stats = fs.statSync(filePath);
    } catch (err) {
      if (err.code === 'ENOENT') continue; // deleted since the names were read
      throw err;
    }
    if (!stats.isDirectory()) {
      yield filePath;
    } else if (!recurseFilter || recurseFilter(filePath)) {
      yield* walk(filePath, recurseFilter, startAfterPath);
    }
  }
}

// upstream listObjects, but for walk()'s third argument
FilesystemStore.prototype.listObjects = async function listObjects(bucket, options) {
  const { delimiter = '', startAfter = '', prefix = '', maxKeys = Infinity } = options;
  const bucketPath = this.getBucketPath(bucket);
  const delimiterEnc = FilesystemStore.encodeKeyPath(delimiter);
  const startAfterPath = [bucketPath, FilesystemStore.encodeKeyPath(startAfter)].join('/');
  const prefixPath = [bucketPath, FilesystemStore.encodeKeyPath(prefix)].join('/');
  const it = walk(bucketPath, dirPath => {
    if (dirPath < startAfterPath && startAfterPath.indexOf(dirPath) === -1) return false;
    if (dirPath.startsWith(prefixPath)) {
      if (delimiterEnc && dirPath.slice(prefixPath.length).indexOf(delimiterEnc) !== -1) return false;
    } else if (!prefixPath.startsWith(dirPath)) {
      return false;
    }
    return true;
  }, startAfterPath);
  const commonPrefixes = new Set();
  const keys = [];
  let isTruncated = false;
  for (const keyPath of it) {
    if (!keyPath.endsWith(OBJECT_SUFFIX)) continue;
    const key = FilesystemStore.decodeKeyPath(keyPath.slice(bucketPath.length + 1, -OBJECT_SUFFIX.length));
    if (key <= startAfter || !key.startsWith(prefix)) continue;
    if (delimiter) {
      const idx = key.slice(prefix.length).indexOf(delimiter);
      if (idx !== -1) {
        commonPrefixes.add(key.slice(0, prefix.length + idx + 1));
        continue;
      }
    }
    if (keys.length < maxKeys) {
      keys.push(key);
    } else {
      isTruncated = true;
      break;
    }
  }
  const metadataArr = await Promise.all(keys.map(key => this.getMetadata(bucket, key).catch(err => {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  })));
  const objects = [];
  keys.forEach((key, i) => {
    if (metadataArr[i] !== undefined) objects.push(new S3Object(bucket, key, null, metadataArr[i]));
  });
  return { objects, commonPrefixes: [...commonPrefixes].sort(), isTruncated };
};

function mtimeNs(dir) {
  try {
    return fs.statSync(dir, { bigint: true }).mtimeNs;
  } catch (err) {
    if (err.code === 'ENOENT') return null;
    throw err;
  }
}

// upstream deleteObject, but synchronous (so that no other request changes the folders meanwhile),
// finding the folders it emptied by rmdir failing, and keeping the cached names of the folders it
// changed when nothing else had changed them (a vanished name is skipped by walk)
FilesystemStore.prototype.deleteObject = async function deleteObject(bucket, key) {
  const bucketPath = this.getBucketPath(bucket);
  const parts = key.split('/');
  parts.pop();
  const folders = parts.map((_, i) => path.join(bucketPath, ...parts.slice(0, i + 1))).reverse(); // deepest first
  const before = new Map(folders.filter(d => cache.has(d)).map(d => [d, mtimeNs(d)]));
  for (const filePath of [
    this.getResourcePath(bucket, key, 'object'),
    this.getResourcePath(bucket, key, 'object.md5'),
    this.getResourcePath(bucket, key, 'metadata.json'),
  ]) {
    try {
      fs.unlinkSync(filePath);
    } catch (err) {
      if (err.code !== 'ENOENT') throw err;
    }
  }
  for (const dir of folders) {
    try {
      fs.rmdirSync(dir);
    } catch (err) {
      if (['ENOTEMPTY', 'EEXIST', 'ENOENT'].includes(err.code)) break;
      throw err;
    }
  }
  for (const [dir, was] of before) {
    const hit = cache.get(dir);
    const now = mtimeNs(dir);
    if (hit && was !== null && hit.mtimeNs === was && now !== null) hit.mtimeNs = now;
    else cache.delete(dir);
  }
};

// every other write through s3rver: the whole cache goes, before and after
for (const method of ['putObject', 'copyObject', 'putObjectMultipart', 'putMetadata', 'initiateUpload', 'putPart',
                      'putBucket', 'deleteBucket', 'putSubresource', 'deleteSubresource', 'reset']) {
  const upstream = FilesystemStore.prototype[method];
  FilesystemStore.prototype[method] = function (...args) {
    cache.clear();
    const result = upstream.apply(this, args);
    if (result && typeof result.then === 'function') {
      return result.finally(() => cache.clear());
    }
    cache.clear();
    return result;
  };
}
// ListMultipartUploads, which s3rver 3.7.1 answers with 501 NotImplemented: the uploads it keeps in
// <bucket>/._S3rver_uploads/<UploadId>/ (the key in `key`, written at initiation), sorted by key and
// UploadId, with Prefix, KeyMarker, UploadIdMarker and MaxUploads (no Delimiter)
const S3Error = require(path.join(lib, 'models', 'error.js'));
const bucketCtrl = require(path.join(lib, 'controllers', 'bucket.js'));
const upstreamBucketExists = bucketCtrl.bucketExists; // routes.js takes it when it loads, after this
bucketCtrl.bucketExists = function bucketExists(ctx, next) {
  if (ctx.method === 'GET' && ctx.params.queryMethod === 'uploads' && !ctx.params.key) {
    return upstreamBucketExists(ctx, () => listMultipartUploads(ctx));
  }
  return upstreamBucketExists(ctx, next);
};

async function listMultipartUploads(ctx) {
  if (ctx.query['delimiter']) {
    throw new S3Error('NotImplemented', 'A parameter you provided implies functionality that is not implemented');
  }
  const prefix = ctx.query['prefix'] || '';
  const keyMarker = ctx.query['key-marker'] || '';
  const idMarker = (keyMarker && ctx.query['upload-id-marker']) || '';
  const maxUploads = Math.min(1000, Number(ctx.query['max-uploads'] || 1000));
  const dir = ctx.store.getResourcePath(ctx.params.bucket, undefined, 'uploads');
  let ids = [];
  try {
    ids = fs.readdirSync(dir);
  } catch (err) {
    if (err.code !== 'ENOENT') throw err;
  }
  const uploads = [];
  for (const id of ids) {
    let key;
    let initiated;
    try {
      key = fs.readFileSync(path.join(dir, id, 'key'), 'utf8');
      initiated = fs.statSync(path.join(dir, id, 'key')).mtime;
    } catch (err) {
      if (err.code === 'ENOENT') continue; // completed or aborted meanwhile
      throw err;
    }
    if (!key.startsWith(prefix)) continue;
    if (keyMarker && (key < keyMarker || (key === keyMarker && (!idMarker || id <= idMarker)))) continue;
    uploads.push({ key, id, initiated });
  }
  uploads.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const page = uploads.slice(0, maxUploads);
  const truncated = uploads.length > maxUploads;
  const last = page[page.length - 1];
  ctx.body = {
    ListMultipartUploadsResult: {
      '@': { xmlns: 'http://s3.amazonaws.com/doc/2006-03-01/' },
      Bucket: ctx.params.bucket,
      KeyMarker: keyMarker,
      UploadIdMarker: idMarker,
      NextKeyMarker: truncated ? last.key : undefined,
      NextUploadIdMarker: truncated ? last.id : undefined,
      Prefix: prefix,
      MaxUploads: maxUploads,
      IsTruncated: truncated,
      Upload: page.map(u => ({
        Key: u.key,
        UploadId: u.id,
        Initiator: { ID: 'S3RVER', DisplayName: 'S3rver' },
        Owner: { ID: 'S3RVER', DisplayName: 'S3rver' },
        StorageClass: 'STANDARD',
        Initiated: u.initiated.toISOString(),
      })),
    },
  };
}

process.stderr.write('walrus bench: s3rver store patched (cached sorted folder names, listing pages skip to ' +
                     'start-after, O(1) emptied-folder check, ListMultipartUploads)\n');
"""


def s3rver_node_options(workdir: str, patched: bool) -> str:
    """NODE_OPTIONS for s3rver: the legacy OpenSSL provider, and the store patch unless stock."""
    from bench.s3 import CACHE

    # s3rver 3.7.1 encrypts ListObjectsV2 continuation tokens with DES, which Node.js 17+ (OpenSSL 3)
    # has only in its legacy provider: without it every listing past 1,000 keys fails (HTTP 500,
    # ERR_OSSL_EVP_UNSUPPORTED)
    options = [os.environ.get("NODE_OPTIONS", ""), "--openssl-legacy-provider"]
    if patched:
        script = os.path.join(workdir, "s3rver-store-patch.js")
        lib = os.path.join(CACHE, "node_modules", "s3rver", "lib")
        with open(script, "w") as f:
            f.write(S3RVER_PATCH % {"lib": json.dumps(lib)})
        options.append(f"--require={script}")
    return " ".join(o for o in options if o)


def say(text: str) -> None:
    print(text, flush=True)


def wal_name(segno: int, timeline: int = TIMELINE) -> str:
    """The 24 hex digits of a segment with 16 MiB segments (256 per xlogid)."""
    return f"{timeline:08X}{segno // 256:08X}{segno % 256:08X}"


# -- the layout ------------------------------------------------------------------------------------


@dataclass
class Layout:
    objects: int  # WAL objects, segments 1..objects
    backups: int = 4
    retain: int = 2
    starts: list[int] = field(default_factory=list)  # each backup's start segment, oldest first

    def __post_init__(self) -> None:
        if self.backups < self.retain + 1:
            raise SystemExit(f"--backups must exceed --retain ({self.retain}) for anything to be deleted")
        # 1, N/4, N/2, 3N/4 for 4 backups: retain 2 keeps the two newest and cuts the WAL at N/2
        self.starts = [max(1, self.objects * i // self.backups) for i in range(self.backups)]
        if len(set(self.starts)) != len(self.starts):
            raise SystemExit(f"--objects {self.objects} is too few for {self.backups} distinct backups")

    @property
    def names(self) -> list[str]:
        return [f"base_{wal_name(s)}" for s in self.starts]

    @property
    def cut(self) -> int:
        """The oldest kept backup's start segment: WAL below it goes."""
        return self.starts[self.backups - self.retain]

    @property
    def deleted_names(self) -> list[str]:
        return self.names[: self.backups - self.retain]

    @property
    def kept_names(self) -> list[str]:
        return self.names[self.backups - self.retain:]

    @property
    def wal_deleted(self) -> int:
        return self.cut - 1

    @property
    def wal_remaining(self) -> int:
        return self.objects - self.cut + 1

    def backup_objects(self) -> list[tuple[str, bytes, float]]:
        """(key, bytes, mtime) of every backup object; sentinels an hour apart, oldest first."""
        now = time.time()
        out = []
        part = lz4.frame.compress(_tiny_tar())
        for i, (name, start) in enumerate(zip(self.names, self.starts)):
            mtime = now - (self.backups - i) * 3600  # the order `retain` counts by: sentinel LastModified
            when = datetime.fromtimestamp(mtime, timezone.utc)
            start_lsn = start * SEGMENT + 0x28
            sentinel = Sentinel(start_lsn=start_lsn, finish_lsn=start_lsn + 0x10000, pg_version=150000,
                                system_identifier=7_300_000_000_000_000_000, uncompressed_size=8192,
                                compressed_size=len(part), start_time=when - timedelta(minutes=5),
                                finish_time=when, hostname="bench", data_dir="/var/lib/postgresql/15/main")
            out.append((f"basebackups_005/{name}/tar_partitions/part_001.tar.lz4", part, mtime - 60))
            out.append((f"basebackups_005/{name}/metadata.json", ExtendedMetadata.from_sentinel(sentinel).to_json(),
                        mtime - 1))
            out.append((f"basebackups_005/{name}_backup_stop_sentinel.json", sentinel.to_json(), mtime))
        return out


def _tiny_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        data = b"15\n"
        info = tarfile.TarInfo("PG_VERSION")
        info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o600
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- the two storages: written and read straight on disk ---------------------------------------------


def _names_in(path: str, name_of) -> list[str]:
    """name_of(entry) of each entry of the folder at path for which it is not false ([] if absent)."""
    if not os.path.isdir(path):
        return []
    with os.scandir(path) as it:
        return [name for e in it if (name := name_of(e))]


class FileStore:
    """WALG_FILE_PREFIX: one file per object, empty WAL files (no data block each)."""

    kind = "file"

    def __init__(self, root: str) -> None:
        self.root = root

    def env(self) -> dict[str, str]:
        return {"WALG_FILE_PREFIX": self.root}

    def put(self, key: str, data: bytes, mtime: float) -> None:
        path = os.path.join(self.root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (mtime, mtime))

    def put_wal(self, count: int) -> None:
        folder = os.path.join(self.root, "wal_005")
        os.makedirs(folder, exist_ok=True)
        dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            for segno in range(1, count + 1):
                os.close(os.open(wal_name(segno) + WAL_EXT, flags, 0o640, dir_fd=dirfd))
        finally:
            os.close(dirfd)

    def keys(self, folder: str) -> list[str]:
        """Object names directly in folder (the WAL folder is flat)."""
        return _names_in(os.path.join(self.root, folder), lambda e: e.is_file(follow_symlinks=False) and e.name)

    def exists(self, key: str) -> bool:
        return os.path.isfile(os.path.join(self.root, key))

    def folder_objects(self, folder: str) -> int:
        return sum(len(files) for _, _, files in os.walk(os.path.join(self.root, folder)))

    def full_listing(self, folder: str) -> int:
        """Every WAL object, as walrus's file listing reads them: scandir and stat of each entry."""
        n = 0
        with os.scandir(os.path.join(self.root, folder)) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    e.stat(follow_symlinks=False)
                    n += 1
        return n

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class S3rverStore:
    """A key prefix in s3rver's bucket, written as s3rver's filesystem store writes objects."""

    kind = "s3"
    CONTENT_TYPE = "binary/octet-stream"  # s3rver's default when the PUT names none (walrus names none)

    def __init__(self, s3: S3rver, repo: str) -> None:
        self.s3, self.repo = s3, repo
        self.prefix = s3.prefix(repo)
        self.root = s3.prefix_dir(repo)

    def env(self) -> dict[str, str]:
        return self.s3.walg_env(self.repo)

    @classmethod
    def _metadata(cls) -> bytes:
        return json.dumps({"content-type": cls.CONTENT_TYPE}, indent=2).encode()

    def put(self, key: str, data: bytes, mtime: float) -> None:
        path = os.path.join(self.root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for suffix, content in ((MD5_SUFFIX, hashlib.md5(data).hexdigest().encode()),
                                (METADATA_SUFFIX, self._metadata()), (OBJECT_SUFFIX, data)):
            with open(path + suffix, "wb") as f:
                f.write(content)
        os.utime(path + OBJECT_SUFFIX, (mtime, mtime))  # s3rver's LastModified

    def put_wal(self, count: int) -> None:
        folder = os.path.join(self.root, "wal_005")
        os.makedirs(folder, exist_ok=True)
        md5, meta = hashlib.md5(b"").hexdigest().encode(), self._metadata()
        dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            for segno in range(1, count + 1):
                name = wal_name(segno) + WAL_EXT
                for suffix, content in ((MD5_SUFFIX, md5), (METADATA_SUFFIX, meta)):
                    fd = os.open(name + suffix, flags, 0o644, dir_fd=dirfd)
                    os.write(fd, content)
                    os.close(fd)
                os.close(os.open(name + OBJECT_SUFFIX, flags, 0o644, dir_fd=dirfd))  # empty: the WAL object
        finally:
            os.close(dirfd)

    def keys(self, folder: str) -> list[str]:
        return _names_in(os.path.join(self.root, folder),
                         lambda e: e.name.endswith(OBJECT_SUFFIX) and e.name[: -len(OBJECT_SUFFIX)])

    def leftovers(self, folder: str) -> int:
        """Metadata or md5 files whose object file is gone (s3rver removes all three on delete)."""
        path = os.path.join(self.root, folder)
        if not os.path.isdir(path):
            return 0
        with os.scandir(path) as it:
            names = [e.name for e in it]
        objects = {n[: -len(OBJECT_SUFFIX)] for n in names if n.endswith(OBJECT_SUFFIX)}
        stray = 0
        for n in names:
            for suffix in (MD5_SUFFIX, METADATA_SUFFIX):
                if n.endswith(suffix) and n[: -len(suffix)] not in objects:
                    stray += 1
        return stray

    def exists(self, key: str) -> bool:
        return os.path.isfile(os.path.join(self.root, key) + OBJECT_SUFFIX)

    def folder_objects(self, folder: str) -> int:
        return sum(sum(f.endswith(OBJECT_SUFFIX) for f in files)
                   for _, _, files in os.walk(os.path.join(self.root, folder)))

    def full_listing(self, folder: str) -> int:
        """Every WAL object through the API: paginated ListObjectsV2 (delimiter '/') with walrus's
        client library and settings, counting the objects (this checks the on-disk layout too)."""
        return asyncio.run(_s3_count(self.s3, f"{self.prefix}/{folder}/"))

    def remove(self) -> None:
        self.s3.remove(self.repo)


def _s3_client(s3: S3rver):
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    from bench.s3 import ACCESS_KEY, REGION, SECRET_KEY

    # walrus's own client settings: path style, checksums only when required (s3rver would store the
    # aws-chunked framing of a flexible checksum as the object's bytes)
    config = AioConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                       response_checksum_validation="when_required")
    return get_session().create_client("s3", region_name=REGION, endpoint_url=s3.endpoint, verify=s3.ca_file,
                                       aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, config=config)


async def _s3_count(s3: S3rver, prefix: str) -> int:
    n = 0
    async with _s3_client(s3) as client:
        async for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix,
                                                                           Delimiter="/"):
            n += len(page.get("Contents") or ())
    return n


async def _s3_probe(s3: S3rver, store: S3rverStore) -> None:
    """PUT one object through the API and check that s3rver stored exactly what put() writes, then
    that an object put() wrote lists and reads back through the API with its size and time."""
    key, data = "probe/000000010000000000000001.lz4", b"walrus retention bench probe"
    mine = "probe-direct/000000010000000000000001.lz4"
    mtime = time.time() - 7200
    store.put(mine, data, mtime)
    async with _s3_client(s3) as client:
        await client.put_object(Bucket=BUCKET, Key=f"{store.prefix}/{key}", Body=data)
        via_api = os.path.join(store.root, key)
        direct = os.path.join(store.root, mine)
        for suffix in (OBJECT_SUFFIX, MD5_SUFFIX, METADATA_SUFFIX):
            with open(via_api + suffix, "rb") as a, open(direct + suffix, "rb") as b:
                if a.read() != b.read():
                    raise SystemExit(f"s3rver's on-disk layout differs from the bench's ({suffix}): "
                                     f"compare {via_api + suffix} with {direct + suffix}")
        listed = await client.list_objects_v2(Bucket=BUCKET, Prefix=f"{store.prefix}/probe-direct/")
        (obj,) = listed["Contents"]
        got = await client.get_object(Bucket=BUCKET, Key=f"{store.prefix}/{mine}")
        body = await got["Body"].read()
        if obj["Size"] != len(data) or body != data or abs(obj["LastModified"].timestamp() - mtime) > 1:
            raise SystemExit(f"an object written on disk does not read back through s3rver's API: {obj}")
        await client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": f"{store.prefix}/{key}"},
                                                                      {"Key": f"{store.prefix}/{mine}"}]})
    if os.path.exists(os.path.join(store.root, "probe")) or os.path.exists(os.path.join(store.root, "probe-direct")):
        raise SystemExit("s3rver left the probe objects behind after DeleteObjects")


# -- running walrus ------------------------------------------------------------------------------------


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    returncode: int
    result: dict | None
    server_cpu_s: float | None = None
    stderr: str = ""


def _proc_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# walrus is started by this small launcher, which reports its child's wall time and wait4 rusage on a
# pipe: ru_maxrss counts the high-water mark of the memory a process was forked with (and, after a
# vfork/posix_spawn, its parent's), so a child of this bench, which holds a million names while it
# verifies, would report the bench's own size. The launcher (python -I -S, about 9 MiB) is the floor.
LAUNCHER = """
import os, sys, time
fd = int(sys.argv[1])
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.close(fd)
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.monotonic() - t0
os.write(fd, f"{wall} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss} {os.waitstatus_to_exitcode(status)}".encode())
"""


def run_walrus(args: list[str], storage_env: dict[str, str], workdir: str, server_pid: int | None,
               cold: bool) -> Run:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "LC_ALL": "C.UTF-8", **storage_env}
    if cold:
        drop_caches()
    read_end, write_end = os.pipe()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            server0 = _proc_cpu_s(server_pid)
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(write_end), WALRUS, *args],
                                    env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=(write_end,))
            os.close(write_end)
            write_end = -1
            with os.fdopen(read_end, "rb") as pipe:
                read_end = -1
                report = pipe.read().decode()
            proc.wait()
            server1 = _proc_cpu_s(server_pid)
            out.seek(0)
            err.seek(0)
            text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    if proc.returncode != 0 or not report:
        raise SystemExit(f"the launcher failed (exit {proc.returncode}): {errors.strip()[-2000:]}")
    wall, cpu, maxrss_kib, returncode = report.split()
    try:
        result = json.loads(text) if int(returncode) == 0 else None
    except ValueError:
        result = None
    return Run(wall_s=float(wall), cpu_s=float(cpu), maxrss_mib=int(maxrss_kib) / 1024, returncode=int(returncode),
               result=result, server_cpu_s=None if server0 is None or server1 is None else server1 - server0,
               stderr=errors)


# -- one case ------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    storage: str
    objects: int
    populate_s: float
    listing_s: float
    listed: int
    dry: Run
    confirm: Run
    problems: list[str]
    wal_deleted_expected: int
    wal_remaining_expected: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        def run(r: Run) -> dict:
            return {"wall_s": round(r.wall_s, 3), "cpu_s": round(r.cpu_s, 3), "peak_rss_mib": round(r.maxrss_mib, 1),
                    "returncode": r.returncode, "server_cpu_s": None if r.server_cpu_s is None else
                    round(r.server_cpu_s, 3)}
        return {"case": self.case, "storage": self.storage, "objects": self.objects,
                "populate_s": round(self.populate_s, 2), "full_listing_s": round(self.listing_s, 3),
                "dry_run": run(self.dry), "confirm": run(self.confirm), "remaining_ok": self.ok,
                "problems": self.problems, "wal_deleted_expected": self.wal_deleted_expected,
                "wal_remaining_expected": self.wal_remaining_expected}


def _check_run(what: str, run: Run, layout: Layout, problems: list[str]) -> None:
    if run.returncode != 0 or run.result is None:
        problems.append(f"{what}: walrus exited {run.returncode}: {run.stderr.strip()[-2000:]}")
        return
    r = run.result
    deleted = [b["backup_name"] for b in r.get("delete", [])]
    kept = [b["backup_name"] for b in r.get("keep", [])]
    if sorted(deleted) != sorted(layout.deleted_names) or sorted(kept) != sorted(layout.kept_names):
        problems.append(f"{what}: planned to delete {deleted} and keep {kept}, expected to delete "
                        f"{layout.deleted_names}")
    wal = r.get("wal", {})
    if wal.get("objects") != layout.wal_deleted:
        problems.append(f"{what}: reports {wal.get('objects')} WAL objects deleted, expected {layout.wal_deleted}")
    if wal.get("below_segment") != wal_name(layout.cut):
        problems.append(f"{what}: cuts WAL below {wal.get('below_segment')}, expected {wal_name(layout.cut)}")


def _check_storage(what: str, store, layout: Layout, confirmed: bool, problems: list[str]) -> None:
    """Exactly the expected objects are there: after the dry run all of them, after the delete the WAL at
    or after the cut, the kept backups whole and no trace of the deleted ones."""
    first = layout.cut if confirmed else 1
    want = {wal_name(s) + WAL_EXT for s in range(first, layout.objects + 1)}
    have = set(store.keys("wal_005"))
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        problems.append(f"{what}: {len(have)} WAL objects remain, expected {len(want)} "
                        f"(missing {len(missing)}, e.g. {missing[:3]}; extra {len(extra)}, e.g. {extra[:3]})")
    for name in layout.names:
        gone = confirmed and name in layout.deleted_names
        sentinel = store.exists(f"basebackups_005/{name}_backup_stop_sentinel.json")
        objects = store.folder_objects(f"basebackups_005/{name}")
        if gone and (sentinel or objects):
            problems.append(f"{what}: deleted backup {name} still has its sentinel ({sentinel}) or {objects} objects")
        if not gone and (not sentinel or objects != 2):
            problems.append(f"{what}: backup {name} lost objects (sentinel {sentinel}, {objects} of 2 in its folder)")
    if isinstance(store, S3rverStore) and (stray := store.leftovers("wal_005")):
        problems.append(f"{what}: s3rver left {stray} md5/metadata files of deleted WAL objects")


def run_case(storage: str, objects: int, args, workdir: str, s3: S3rver | None) -> CaseResult:
    layout = Layout(objects, backups=args.backups, retain=args.retain)
    case = f"{storage} {objects:,}"
    repo = os.path.join(workdir, f"retention-{storage}-{objects}")
    store = S3rverStore(s3, repo) if storage == "s3" else FileStore(repo)
    store.remove()
    server_pid = s3.proc.pid if storage == "s3" and s3 and s3.proc else None
    say(f"==> {case}: backups at segments {', '.join(map(str, layout.starts))}; retain {args.retain} "
        f"deletes {layout.wal_deleted:,} WAL objects and keeps {layout.wal_remaining:,}")
    problems: list[str] = []
    try:
        if storage == "s3":
            asyncio.run(_s3_probe(s3, store))
        t0 = time.monotonic()
        for key, data, mtime in layout.backup_objects():
            store.put(key, data, mtime)
        store.put_wal(objects)
        os.sync()
        populate_s = time.monotonic() - t0
        say(f"    populated on disk in {populate_s:.1f} s")
        if args.cold:
            drop_caches()
        t0 = time.monotonic()
        listed = store.full_listing("wal_005")
        listing_s = time.monotonic() - t0
        say(f"    full listing of wal_005/ ({'ListObjectsV2 through s3rver' if storage == 's3' else 'scandir+stat'}):"
            f" {listed:,} objects in {listing_s:.1f} s")
        if listed != objects:
            problems.append(f"the full listing returned {listed:,} WAL objects, expected {objects:,}")
        retain = ["delete", "retain", str(args.retain), "--json"]
        dry = run_walrus(retain, store.env(), workdir, server_pid, args.cold)
        say(f"    dry run: {dry.wall_s:.1f} s, {dry.cpu_s:.1f} CPU s, peak RSS {dry.maxrss_mib:.0f} MiB"
            + (f", s3rver {dry.server_cpu_s:.1f} CPU s" if dry.server_cpu_s is not None else ""))
        _check_run("dry run", dry, layout, problems)
        _check_storage("after the dry run", store, layout, False, problems)
        confirm = run_walrus(retain + ["--confirm"], store.env(), workdir, server_pid, args.cold)
        say(f"    confirm: {confirm.wall_s:.1f} s, {confirm.cpu_s:.1f} CPU s, peak RSS {confirm.maxrss_mib:.0f} MiB"
            + (f", s3rver {confirm.server_cpu_s:.1f} CPU s" if confirm.server_cpu_s is not None else ""))
        _check_run("confirm", confirm, layout, problems)
        _check_storage("after the delete", store, layout, True, problems)
        for p in problems:
            say(f"    PROBLEM: {p}")
    finally:
        if not args.keep:
            store.remove()
    return CaseResult(case, storage, objects, populate_s, listing_s, listed, dry, confirm, problems,
                      layout.wal_deleted, layout.wal_remaining)


# -- report -----------------------------------------------------------------------------------------


def table(results: list[CaseResult]) -> str:
    header = ["case", "objects", "WAL deleted", "full list s", "dry-run s", "confirm s", "walrus CPU s",
              "s3rver CPU s", "peak RSS MiB", "remaining ok"]
    rows = [header]
    for r in results:
        server = [x.server_cpu_s for x in (r.dry, r.confirm)]
        rows.append([
            r.case, f"{r.objects:,}", f"{r.wal_deleted_expected:,}", f"{r.listing_s:.1f}", f"{r.dry.wall_s:.1f}",
            f"{r.confirm.wall_s:.1f}", f"{r.dry.cpu_s:.1f} / {r.confirm.cpu_s:.1f}",
            "-" if None in server else f"{server[0]:.1f} / {server[1]:.1f}",
            f"{r.dry.maxrss_mib:.0f} / {r.confirm.maxrss_mib:.0f}", "yes" if r.ok else "NO"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def notes(results: list[CaseResult], args) -> list[str]:
    cache = "Cold page cache before each step." if args.cold else "Warm page cache: the objects were just written."
    out = ["two figures in a cell: dry run / confirm. peak RSS = ru_maxrss of the walrus process (wait4, in a small "
           "launcher, so the bench's own memory does not count). "
           "full list s: every page of wal_005/ without walrus, for scale and to check the layout (s3: "
           "paginated ListObjectsV2 with aiobotocore, 1,000 keys a page; file: scandir+stat in Python); "
           "walrus on S3 stops listing at the cut (start_after past the kept segments). " + cache]
    for r in results:
        if r.storage != "s3" or r.objects != args.objects:
            continue
        for what, run in (("dry run", r.dry), ("confirm", r.confirm)):
            verdict = "met" if run.wall_s < TARGET_S and run.maxrss_mib < TARGET_RSS_MIB else "MISSED"
            out.append(f"target {r.case} {what}: under {TARGET_S:.0f} s and {TARGET_RSS_MIB} MiB: {verdict} "
                       f"({run.wall_s:.1f} s, {run.maxrss_mib:.0f} MiB)")
    for kind in ("s3", "file"):
        runs = [r for r in results if r.storage == kind]
        if len(runs) > 1:
            lo, hi = min(runs, key=lambda r: r.objects), max(runs, key=lambda r: r.objects)
            grow = max(hi.dry.maxrss_mib, hi.confirm.maxrss_mib) - max(lo.dry.maxrss_mib, lo.confirm.maxrss_mib)
            out.append(f"{kind} storage: peak RSS from {lo.objects:,} to {hi.objects:,} WAL objects grows by "
                       f"{grow:+.1f} MiB")
    return out


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return ""
    return out.splitlines()[-1] if out else ""


def walrus_commit() -> dict:
    """The commit walrus ran from, and whether walrus/ had uncommitted changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", REPO_ROOT, *a], capture_output=True, text=True).stdout.strip()
    return {"walrus_commit": git("rev-parse", "HEAD"),
            "walrus_dirty": bool(git("status", "--porcelain", "--", "walrus"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", choices=("s3", "file", "all"), default="all")
    ap.add_argument("--objects", type=int, default=100_000,
                    help="WAL objects of the S3 and file cases (default 100000)")
    ap.add_argument("--s3-extra", default="1000",
                    help="more S3 cases, comma-separated object counts ('' for none; default 1000: a floor for memory)")
    ap.add_argument("--file-extra", default="1000,1000000",
                    help="more file-storage cases, comma-separated object counts ('' for none; default "
                         "1000,1000000: a floor for memory, and the million)")
    ap.add_argument("--backups", type=int, default=4)
    ap.add_argument("--retain", type=int, default=2)
    ap.add_argument("--stock-s3rver", action="store_true",
                    help="run s3rver without the bench's patch: quadratic listing and delete (keep --objects to "
                         "about 10000), and no ListMultipartUploads (501), which walrus's delete retries as transient")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each timed step (needs root)")
    ap.add_argument("--workdir", help="where the storages live (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", help="write tables.txt and results.json into this directory")
    args = ap.parse_args()

    cases: list[tuple[str, int]] = []
    for kind, extra in (("s3", args.s3_extra), ("file", args.file_extra)):
        if args.storage in (kind, "all"):
            counts = {args.objects, *(int(x.replace("_", "")) for x in extra.split(",") if x.strip())}
            cases += [(kind, n) for n in sorted(counts)]
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="walrus-retention-", dir=args.workdir)
    workdir_parent = args.workdir or tempfile.gettempdir()
    s3 = None
    results: list[CaseResult] = []
    try:
        if any(kind == "s3" for kind, _ in cases):
            if reason := S3rver.missing():
                raise SystemExit(reason)
            s3 = S3rver(workdir)
            say(f"==> S3 endpoint: {s3.version()} with TLS on 127.0.0.1 (npm install into its cache at first use)"
                + ("; stock" if args.stock_s3rver else "; its store's listing and delete patched (see S3RVER_PATCH)"))
            s3._install()  # the patch requires s3rver's modules by path
            os.environ["NODE_OPTIONS"] = s3rver_node_options(workdir, not args.stock_s3rver)  # S3rver.start inherits it
            log = os.path.join(workdir, "s3rver.log")
            s3.start(log, silent=True)  # its per-key log lines of a DeleteObjects are the emulator's cost, not S3's
            time.sleep(0.5)
            with open(log, errors="replace") as f:
                loaded = "s3rver store patched" in f.read()
            if loaded == args.stock_s3rver:
                raise SystemExit(f"the s3rver store patch is {'' if loaded else 'not '}loaded; see {log}")
        for kind, n in cases:
            results.append(run_case(kind, n, args, workdir, s3))
    finally:
        if s3 is not None:
            s3.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"work directory kept: {workdir}")
    text = "\n".join([table(results), "", *notes(results, args)])
    say("")
    say(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tables.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            meta = {"args": vars(args), "nproc": os.cpu_count(), "walrus": WALRUS, **walrus_commit(),
                    "node": _first_line(["node", "--version"]), "time": datetime.now(timezone.utc).isoformat(),
                    "workdir_fs": _first_line(["df", "--output=fstype", workdir_parent]).split()[-1]}
            json.dump({"meta": meta, "cases": [r.as_json() for r in results]}, f, indent=2)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
