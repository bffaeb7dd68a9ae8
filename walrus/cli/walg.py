"""WAL-G's command line beyond walrus's own commands: global flags anywhere on the line, per-setting
flags, `flags`, `completion`, `help`, and WAL-G commands walrus does not have, refused clearly."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import click

from walrus.config import SETTINGS, parse_bool, setting_flags
from walrus.errors import ConfigError, WalrusError
from walrus.walg_settings import OTHER_SETTINGS


class HelpGroup(click.Group):
    """A group of commands, listed in the order they were defined (most used first), that prints its
    help and exits 0 when given no command, as cobra's groups do (`walrus st --target default`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("invoke_without_command", True)
        super().__init__(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context):
        if not ctx.invoked_subcommand and not getattr(ctx, "_protected_args", None) and not ctx.args:
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().invoke(ctx)


@dataclass
class GlobalFlags:
    """What WAL-G's root (persistent) flags set, wherever they stood on the command line."""

    config_path: str | None = None
    turbo: bool = False
    settings: dict[str, str] = field(default_factory=dict)  # setting name -> value (--walg-upload-concurrency 4)


def split_global_flags(argv: list[str]) -> tuple[list[str], GlobalFlags]:
    """Take WAL-G's persistent flags out of argv, before or after the command as cobra allows:
    --config PATH, --turbo[=BOOL], and --<setting> VALUE for every setting (--walg-file-prefix /x).
    Everything from `--` on is left as it is."""
    flags = GlobalFlags()
    by_flag = setting_flags()
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest += argv[i:]
            break
        name, eq, value = token.partition("=")
        if token.startswith("--") and (name in by_flag or name == "--config"):
            if not eq:
                if i + 1 == len(argv):
                    raise click.UsageError(f"flag needs an argument: {name}")
                i += 1
                value = argv[i]
            if name == "--config":
                flags.config_path = value
            else:
                flags.settings[by_flag[name]] = value
        elif name == "--turbo":
            try:
                flags.turbo = parse_bool(value) if eq else True
            except ValueError:
                raise click.UsageError(f"invalid argument {value!r} for --turbo: expected true or false") from None
        else:
            rest.append(token)
        i += 1
    return rest, flags


def check_target_storage(value: str | None) -> None:
    """WAL-G's --target-storage (and WALG_TARGET_STORAGE) picks one of several storages; walrus has one."""
    value = value or os.environ.get("WALG_TARGET_STORAGE") or ""
    if value not in ("", "default"):
        raise ConfigError(f"--target-storage {value}: walrus has one storage, not failover storages",
                          hint="leave --target-storage out (or give `default`); WALG_FAILOVER_STORAGES is not supported")


def refuse(flag: str, why: str, hint: str) -> WalrusError:
    """A WAL-G flag walrus does not implement: an error naming it, before any work (never a usage error)."""
    return WalrusError(f"{flag} is not supported by walrus", detail=why, hint=hint)


# WAL-G's PostgreSQL commands walrus does not have, with what to do instead.
MISSING_COMMANDS = {
    "wal-restore": "walrus does not restore WAL between clusters; use pg_rewind with restore_command = "
                   "'walrus wal-fetch %f %p'",
    "catchup-push": "walrus has no catch-up backups; take a full backup (backup-push) and restore it",
    "catchup-fetch": "walrus has no catch-up backups; take a full backup (backup-push) and restore it",
    "catchup-list": "walrus has no catch-up backups; backup-list lists the backups",
    "catchup-send": "walrus has no catch-up backups; take a full backup (backup-push) and restore it",
    "catchup-receive": "walrus has no catch-up backups; take a full backup (backup-push) and restore it",
    "pgbackrest": "walrus does not read pgBackRest repositories; restore with pgBackRest itself",
}


def add_missing_commands(group: click.Group) -> None:
    """Each missing command parses whatever WAL-G would accept, then fails with exit 1 and a hint."""
    for name, hint in MISSING_COMMANDS.items():
        def run(args: tuple[str, ...], _name: str = name, _hint: str = hint) -> None:
            raise WalrusError(f"walrus does not implement WAL-G's {_name} command yet", hint=_hint)

        group.add_command(click.Command(
            name, callback=run, help=f"Not in walrus yet (WAL-G's {name}): exits 1 with a hint.",
            params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                              "help_option_names": ["-h", "--help"]}))


def setting_flag_lines() -> list[tuple[str, str]]:
    """(flag, what it sets) for every per-setting flag, walrus's own table first, as `walrus flags` prints them."""
    docs = {s.name: s.doc for s in SETTINGS}
    docs.update({alias: f"Same as {s.name}." for s in SETTINGS for alias in s.aliases})
    docs.update({o.name: f"WAL-G's {o.name}: {o.disposition} in walrus ({o.reason})." for o in OTHER_SETTINGS})
    return [(flag, docs[name]) for flag, name in setting_flags().items()]


def register(cli: click.Group) -> None:
    @cli.command("flags", context_settings={"help_option_names": ["-h", "--help"]})
    def flags_cmd() -> None:
        """List the global flags: --config, --turbo, and one flag per setting (over the environment and file)."""
        lines = [("--config PATH", "Config file (default: $WALG_CONFIG_PATH, else ~/.walg.json)."),
                 ("--turbo", "Ignore the rate limits.")]
        lines += [(f"{flag} VALUE", doc) for flag, doc in setting_flag_lines()]
        width = max(len(flag) for flag, _ in lines)
        click.echo("Global Flags (anywhere on the command line; a flag wins over the environment and the config file):")
        for flag, doc in lines:
            click.echo(f"  {flag.ljust(width)}  {doc}")

    @cli.command("completion", context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
    def completion_cmd(shell: str) -> None:
        """Print the shell completion script: `source <(walrus completion bash)`."""
        from click.shell_completion import get_completion_class

        complete = get_completion_class(shell)
        assert complete is not None  # click ships all three
        click.echo(complete(cli, {}, "walrus", "_WALRUS_COMPLETE").source())

    @cli.command("help", context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("command", nargs=-1)
    @click.pass_context
    def help_cmd(ctx: click.Context, command: tuple[str, ...]) -> None:
        """Help for walrus, or for COMMAND (as `walrus COMMAND --help`)."""
        target: click.Command = cli
        info_ctx = ctx.parent
        for name in command:
            if not isinstance(target, click.Group) or target.get_command(ctx, name) is None:
                raise click.UsageError(f"unknown command {' '.join(command)!r}")
            target = target.get_command(ctx, name)
            info_ctx = click.Context(target, info_name=name, parent=info_ctx)
        click.echo(target.get_help(info_ctx))

    add_missing_commands(cli)


def walk_commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    """Every command under group, depth first in definition order, with its full path ("st ls")."""
    found = []
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        found.append((path, command))
        if isinstance(command, click.Group):
            found += walk_commands(command, path + " ")
    return found


def flag_table(root: click.Group) -> str:
    """The command-line reference of docs/WALG_COMPAT.md, generated from the parser itself (a test
    compares the two): every command and option, with its help, which says what walrus does."""
    rows = ["| command | option | what walrus does |", "|---|---|---|"]
    options = [p for p in root.params if isinstance(p, click.Option)]
    rows += [f"| (any) | {', '.join(sorted(o.opts + o.secondary_opts, key=len))} | {o.help} |" for o in options]
    rows.append("| (any) | --<setting> VALUE | Every setting as a flag (`walrus flags`): over the environment and the config file. |")
    for path, command in walk_commands(root):
        summary = (command.help or "").strip().split("\n")[0]
        rows.append(f"| {path} | | {summary} |")
        for param in command.params:
            if isinstance(param, click.Option):
                names = ", ".join(sorted(param.opts + param.secondary_opts, key=len))
                rows.append(f"| {path} | {names} | {param.help or ''} |")
    return "\n".join(row.replace("\n", " ") for row in rows) + "\n"


def settings_table() -> str:
    """WAL-G's settings walrus does not act on, for docs/WALG_COMPAT.md (generated; a test compares)."""
    rows = ["| setting | walrus | why |", "|---|---|---|"]
    rows += [f"| {o.name} | {o.disposition} | {o.reason} |" for o in OTHER_SETTINGS]
    return "\n".join(rows) + "\n"


def _write_reference(path: str) -> None:
    """Regenerate the generated sections of docs/WALG_COMPAT.md (python -m walrus.cli.walg)."""
    import re

    from walrus.cli import cli

    with open(path, encoding="utf-8") as f:
        text = f.read()
    for marker, generated in (("command line", flag_table(cli)), ("settings", settings_table())):
        pattern = rf"(<!-- BEGIN {marker} .*?-->\n)(.*?)(<!-- END {marker} -->)"
        text, found = re.subn(pattern, lambda m: m.group(1) + generated + m.group(3), text, flags=re.S)
        if not found:
            raise SystemExit(f"{path} has no <!-- BEGIN {marker} ... --> section")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    _write_reference(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "WALG_COMPAT.md"))
