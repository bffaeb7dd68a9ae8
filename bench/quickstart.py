"""Quickstart: a throwaway PostgreSQL, archived and backed up by walrus to local file storage, then restored."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.pgcluster import WALRUS, Cluster, make_workdir, pg_bindir, remove_tree, run, walrus, write_config  # noqa: E402


def step(text: str) -> float:
    print(f"==> {text}", flush=True)
    return time.monotonic()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale of the demo database (default 10, ~150 MiB)")
    ap.add_argument("--compression", default="lz4", choices=["lz4", "zstd", "brotli", "lzma", "none"])
    ap.add_argument("--keep", action="store_true", help="keep the work directory (clusters stopped)")
    args = ap.parse_args()

    root = make_workdir("walrus-quickstart-")
    storage = os.path.join(root, "storage")
    config = write_config(os.path.join(root, "walg.json"),
                          {"WALG_FILE_PREFIX": storage, "WALG_COMPRESSION_METHOD": args.compression})
    print(f"work directory {root}; storage {storage}; config {config}")
    clusters = []
    try:
        step("initdb and start a PostgreSQL cluster with archive_command = walrus wal-push")
        primary = Cluster.init(root)
        clusters.append(primary)
        primary.configure(archive_mode="on", archive_command=f"{WALRUS} --config {config} wal-push %p")
        primary.start()
        step(f"pgbench -i -s {args.scale}")
        run([os.path.join(pg_bindir(), "pgbench"), "-i", "-q", "-s", str(args.scale), "-h", primary.sockdir,
             "-p", str(primary.port), "postgres"])

        t = step("walrus backup-push")
        pushed = json.loads(walrus(["backup-push", primary.data, "--json"], config=config, env=primary.env).stdout)
        push_s = time.monotonic() - t
        print(walrus(["backup-list", "--detail"], config=config).stdout)

        step("more writes after the backup, then archive the last segment")
        run([os.path.join(pg_bindir(), "pgbench"), "-n", "-t", "2000", "-h", primary.sockdir, "-p",
             str(primary.port), "postgres"])
        expected = primary.digest()
        last = primary.psql("SELECT pg_walfile_name(pg_switch_wal())")
        primary.wait_until("SELECT last_archived_wal FROM pg_stat_archiver", last)

        t = step("walrus backup-fetch LATEST, then recover with restore_command = walrus wal-fetch")
        restored_dir = os.path.join(root, "restored")
        walrus(["backup-fetch", restored_dir, "LATEST"], config=config)
        fetch_s = time.monotonic() - t
        open(os.path.join(restored_dir, "recovery.signal"), "w").close()
        restored = Cluster(data=restored_dir, sockdir=root)
        clusters.append(restored)
        restored.configure(archive_mode="off", restore_command=f"{WALRUS} --config {config} wal-fetch %f %p")
        primary.stop()
        restored.start()
        restored.wait_until("SELECT pg_is_in_recovery()", "f", timeout=600)
        same = restored.digest() == expected
        print(f"\nbackup {pushed['backup_name']}: {pushed['uncompressed_size'] / 2**20:.1f} MiB of files -> "
              f"{pushed['compressed_size'] / 2**20:.1f} MiB stored ({args.compression}) in {push_s:.1f} s; "
              f"restored in {fetch_s:.1f} s; recovered contents {'MATCH' if same else 'DIFFER'}")
        return 0 if same else 1
    finally:
        for c in clusters:
            c.stop("immediate")
        if args.keep:
            print(f"kept {root}")
        else:
            remove_tree(root)


if __name__ == "__main__":
    sys.exit(main())
