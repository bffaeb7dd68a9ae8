"""`walrus st ...` (WAL-G's storage tools) and `walrus copy`: thin click commands over walrus.st and walrus.backup.copy."""
from __future__ import annotations

import json
import os
import sys

import click

from walrus.cli.base import CONTEXT, emit, run
from walrus.cli.walg import HelpGroup, refuse
from walrus.errors import ConfigError, WalrusError
_GROUP_OPTIONS = "walrus.st.options"  # ctx.meta key: the st group's --target and --glob


def _storage_options(f):
    """WAL-G's persistent st flags, accepted after the subcommand too (cobra's persistent flags are)."""
    f = click.option("-t", "--target", metavar="NAME", default=None,
                     help="Storage to act on: 'default' (walrus has no failover storages).")(f)
    return click.option("-g", "--glob", "use_glob", is_flag=True, help="PATH is a glob pattern (Go's path.Match).")(f)


@click.group("st", cls=HelpGroup, context_settings=CONTEXT)
@_storage_options
@click.pass_context
def st_group(ctx: click.Context, target: str | None, use_glob: bool) -> None:
    """(DANGEROUS) Storage tools: list, read, write and delete the configured storage's objects.

    Keys are relative to the storage root (WALG_*_PREFIX), e.g. basebackups_005/ or wal_005/."""
    ctx.meta[_GROUP_OPTIONS] = (target, use_glob)  # meta is shared with the subcommand's context


@st_group.command("ls", context_settings=CONTEXT)
@click.argument("path", default="", required=False)
@click.option("-r", "--recursive", is_flag=True, help="List the folder recursively.")
@click.option("--all-versions", is_flag=True, help="Not supported: an error (S3 object versions).")
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@click.pass_context
def ls_cmd(ctx, path: str, recursive: bool, all_versions: bool, target: str | None, use_glob: bool,
           as_json: bool) -> None:
    """Print the objects (and sub-folders) in the folder PATH (default: the root)."""
    from walrus.st import list_folder, list_glob

    use_glob = _checked(ctx, target, use_glob)
    if all_versions:
        raise refuse("--all-versions", "walrus does not read S3 object versions",
                             "leave it out: walrus lists the current objects")
    if use_glob:
        listings = run(ctx, lambda s, st: list_glob(s, st, path, recursive))
        if as_json:
            click.echo(json.dumps([listing.as_json() for listing in listings]))
        for listing in [] if as_json else listings:
            click.echo(listing.render())
        return
    listing = run(ctx, lambda s, st: list_folder(s, st, path, recursive))
    emit(listing, as_json, listing.render())


@st_group.command("stat", context_settings=CONTEXT)
@click.argument("path")
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the object's row as JSON.")
@click.pass_context
def stat_cmd(ctx, path: str, target: str | None, use_glob: bool, as_json: bool) -> None:
    """Print one object's row in `st ls`'s format, from one stat (HEAD), not a listing."""
    from walrus.st import stat_object

    if _checked(ctx, target, use_glob):
        raise refuse("--glob", "stat looks one object up; a pattern needs a listing", "use `st ls --glob`")
    listing = run(ctx, lambda s, st: stat_object(s, st, path))
    emit(listing, as_json, listing.render())


@st_group.command("cat", context_settings=CONTEXT)
@click.argument("path")
@click.option("--decrypt", is_flag=True, help="Decrypt the object (with the configured key).")
@click.option("--decompress", is_flag=True, help="Decompress the object (by its extension).")
@_storage_options
@click.pass_context
def cat_cmd(ctx, path: str, decrypt: bool, decompress: bool, target: str | None, use_glob: bool) -> None:
    """Write the object PATH to standard output (as stored, unless --decrypt/--decompress)."""
    from walrus.st import glob, read_object

    use_glob = _checked(ctx, target, use_glob)
    out = sys.stdout.buffer

    async def engine(settings, storage):
        keys = (await glob(storage, path))[0] if use_glob else [path]
        for key in keys:
            await read_object(settings, storage, key, out.write, decrypt=decrypt, decompress=decompress)
        out.flush()

    run(ctx, engine)


@st_group.command("get", context_settings=CONTEXT)
@click.argument("path")
@click.argument("destination")
@click.option("--no-decrypt", is_flag=True, help="Do not decrypt the object.")
@click.option("--no-decompress", is_flag=True, help="Do not decompress the object.")
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def get_cmd(ctx, path: str, destination: str, no_decrypt: bool, no_decompress: bool, target: str | None,
            use_glob: bool, as_json: bool) -> None:
    """Download the object PATH to DESTINATION, decrypted and decompressed unless told not to.

    DESTINATION is a new file, or a folder to put the object in."""
    from walrus.st import get_object

    _checked(ctx, target, use_glob, allow_all=False)
    result = run(ctx, lambda s, st: get_object(s, st, path, destination, decrypt=not no_decrypt,
                                                        decompress=not no_decompress))
    emit(result, as_json, None)


@st_group.command("put", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, metavar="LOCAL_PATH DESTINATION_PATH")
@click.option("--no-encrypt", is_flag=True, help="Do not encrypt the object.")
@click.option("--no-compress", is_flag=True, help="Do not compress the object.")
@click.option("-f", "--force", is_flag=True, help="Overwrite the existing object.")
@click.option("-s", "--read-stdin", is_flag=True, help="Read the content from standard input (then only DESTINATION_PATH).")
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def put_cmd(ctx, paths: tuple[str, ...], no_encrypt: bool, no_compress: bool, force: bool, read_stdin: bool,
            target: str | None, use_glob: bool, as_json: bool) -> None:
    """Upload the local file to DESTINATION_PATH, compressed and encrypted as configured.

    Its key gets the compression method's extension; an existing object is kept unless -f."""
    from walrus.st import put_object

    _checked(ctx, target, use_glob)
    if len(paths) != (1 if read_stdin else 2):
        raise click.UsageError("give DESTINATION_PATH with --read-stdin" if read_stdin
                               else "give LOCAL_PATH and DESTINATION_PATH (or --read-stdin and DESTINATION_PATH)")
    source, destination = (None, paths[0]) if read_stdin else paths
    result = run(ctx, lambda s, st: put_object(s, st, source, destination, compress=not no_compress,
                                                        encrypt=not no_encrypt, force=force))
    emit(result, as_json, None)


@st_group.command("rm", context_settings=CONTEXT)
@click.argument("prefix")
@click.option("--all-versions", is_flag=True, help="Not supported: an error (S3 object versions).")
@click.option("--version-id", metavar="ID", help="Not supported: an error (S3 object versions).")
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def rm_cmd(ctx, prefix: str, all_versions: bool, version_id: str | None, target: str | None, use_glob: bool,
           as_json: bool) -> None:
    """Delete the object PREFIX, or else everything in the folder PREFIX. No confirmation, as in WAL-G."""
    from walrus.st import RemoveResult, glob, remove

    use_glob = _checked(ctx, target, use_glob)
    for flag, given in (("--all-versions", all_versions), ("--version-id", version_id)):
        if given:
            raise refuse(flag, "walrus does not handle S3 object versions",
                                 "leave it out: walrus deletes the current objects")

    async def engine(settings, storage):
        if not use_glob:
            return await remove(storage, prefix)
        objects, folders = await glob(storage, prefix)
        deleted = [await remove(storage, path) for path in objects + folders]
        return RemoveResult(prefix, sum(r.deleted for r in deleted))

    result = run(ctx, engine)
    emit(result, as_json, None)


@st_group.group("check", cls=HelpGroup, context_settings=CONTEXT)
def check_group() -> None:
    """Check access to the storage."""


@check_group.command("read", context_settings=CONTEXT)
@click.argument("names", nargs=-1, metavar="[FILENAME]...")
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def check_read_cmd(ctx, names: tuple[str, ...], target: str | None, use_glob: bool, as_json: bool) -> None:
    """The storage can be listed, and each FILENAME exists."""
    from walrus.st import check_read

    _checked(ctx, target, use_glob)
    result = run(ctx, lambda s, st: check_read(st, list(names)))
    emit(result, as_json, None)


@check_group.command("write", context_settings=CONTEXT)
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def check_write_cmd(ctx, target: str | None, use_glob: bool, as_json: bool) -> None:
    """An object can be written to the storage (and is deleted again)."""
    from walrus.st import check_write

    _checked(ctx, target, use_glob)
    result = run(ctx, lambda s, st: check_write(st))
    emit(result, as_json, None)


@st_group.command("copy", context_settings=CONTEXT)
@click.option("--from", "from_config", metavar="CONFIG", help="Config file of the storage to copy from (required).")
@click.option("--to", "to_config", metavar="CONFIG", help="Config file of the storage to copy to (required).")
@click.option("-p", "--prefix", default="", help="Copy only the objects whose key starts with this.")
@click.option("-d", "--decrypt-source", is_flag=True, help="Not supported: an error.")
@click.option("-e", "--encrypt-source", is_flag=True, help="Not supported: an error.")
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def st_copy_cmd(ctx, from_config: str | None, to_config: str | None, prefix: str, decrypt_source: bool, encrypt_source: bool,
                target: str | None, use_glob: bool, as_json: bool) -> None:
    """Copy the objects (under --prefix) from one storage to another, byte for byte."""
    from walrus.backup.copy import copy_prefix

    _checked(ctx, target, use_glob)
    for flag, given in (("--decrypt-source", decrypt_source), ("--encrypt-source", encrypt_source)):
        if given:
            raise refuse(flag, "st copy copies objects as stored; re-encrypting them is not implemented",
                                 "st get (decrypts) with the source's config, then st put (encrypts) with the "
                                 "target's, object by object")
    if not from_config or not to_config:  # not a parse error: WAL-G's flags are optional, its copy then fails
        raise WalrusError("st copy needs --from and --to", hint="give the config file of each storage")
    result = _copy(ctx, from_config, to_config, lambda src, dst, limits, _: copy_prefix(src, dst, prefix, **limits))
    emit(result, as_json, result.render())


@st_group.command("transfer", context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def transfer_cmd(args: tuple[str, ...]) -> None:
    """Not supported: WAL-G moves objects between its failover storages (an error)."""
    raise WalrusError("walrus does not implement WAL-G's st transfer",
                      detail="it moves objects between failover storages (WALG_FAILOVER_STORAGES), "
                             "which walrus does not have",
                      hint="to copy between two storages: `walrus copy --from A.json --to B.json` (backups and "
                           "their WAL) or `walrus st copy --from A.json --to B.json` (any objects)")


@click.command("copy", context_settings=CONTEXT)
@click.option("-f", "--from", "from_config", metavar="CONFIG", required=True,
              help="Config file of the storage to copy from.")
@click.option("-t", "--to", "to_config", metavar="CONFIG", required=True, help="Config file of the storage to copy to.")
@click.option("-b", "--backup-name", metavar="NAME", help="Copy this backup (or LATEST); default: every backup.")
@click.option("-w", "--with-history", is_flag=True,
              help="Also every WAL segment after each backup's own, through the latest archived.")
@click.option("--all", "copy_all", is_flag=True, help="Copy every backup (the default without --backup-name).")
@click.option("--without-history", is_flag=True,
              help="Only the WAL each backup needs (the default; older WAL-G's flag).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def copy_cmd(ctx, from_config: str, to_config: str, backup_name: str | None, with_history: bool, copy_all: bool,
             without_history: bool, as_json: bool) -> None:
    """Copy backups, with the WAL they need, from one storage to another, unchanged.

    Nothing is decompressed or decrypted. Each config file is a whole WAL-G config (its own prefix
    and keys); the environment's settings are not read."""
    from walrus.backup.copy import copy_backups

    if copy_all and backup_name:
        raise click.UsageError("--all and --backup-name exclude each other")
    if with_history and without_history:
        raise click.UsageError("--with-history and --without-history exclude each other")
    result = _copy(ctx, from_config, to_config, lambda src, dst, limits, segment_size: copy_backups(
        src, dst, name=backup_name, with_history=with_history, segment_size=segment_size, **limits))
    emit(result, as_json, result.render())


def _copy(ctx: click.Context, from_config: str, to_config: str, engine):
    """Load both configs (each file alone, as WAL-G's copy: the environment's WALG_* settings must
    not redirect either side), open the source, and run engine(source, target, limits, segment_size):
    the target's WALG_UPLOAD_CONCURRENCY objects at once, within its WALRUS_MEMORY_BUDGET."""
    from walrus.backup.copy import put_buffering
    from walrus.config import load_settings
    from walrus.log import log, setup_logging
    from walrus.storage import BACKENDS, open_storage

    setup_logging(os.environ.get("WALG_LOG_LEVEL", "normal").lower())

    def load(flag: str, path: str):
        try:
            settings = load_settings(env={}, config_path=path, warn=log.warning)
        except ConfigError as e:
            hint = f"{flag} names a WAL-G config file (JSON or YAML)" if "config file" in e.message else e.hint
            raise ConfigError(f"{flag} {path}: {e.message}", detail=e.detail, hint=hint) from None
        if not any(getattr(settings, backend.setting) for backend in BACKENDS):
            raise ConfigError(f"{flag} {path} configures no storage",
                              hint=f"set {' or '.join(b.variable for b in BACKENDS)} in that file")
        return settings

    src, dst = load("--from", from_config), load("--to", to_config)
    async def both_open(_settings, target):
        limits = {"jobs": dst.upload_concurrency, "budget": dst.memory_budget, "per_put": put_buffering(target)}
        source = open_storage(src)
        try:
            return await engine(source, target, limits, src.segment_size)
        finally:
            await source.close()

    return run(ctx, both_open, dst)


def _checked(ctx: click.Context, target: str | None, use_glob: bool, *, allow_all: bool = True) -> bool:
    """Check --target, given before or after the subcommand; whether --glob was given at either place."""
    from walrus.st import DEFAULT_TARGET, check_target

    group_target, group_glob = ctx.meta.get(_GROUP_OPTIONS, (None, False))
    check_target(target or group_target or DEFAULT_TARGET, allow_all=allow_all)
    return use_glob or group_glob


def register(cli: click.Group) -> None:
    cli.add_command(st_group)
    cli.add_command(copy_cmd)
