"""Renders walrus(1) in troff from the click commands and the settings table, so the page never drifts from --help,
and walg-daemon-client(1) from the client's own usage: `manpage.py [walrus|walg-daemon-client]`."""
from __future__ import annotations

import os
import sys
import textwrap
import time

import click

from walrus import __version__
from walrus.cli import cli
from walrus.cli.walg import walk_commands
from walrus.config import SETTINGS

# the build's date, or the reproducible one (SOURCE_DATE_EPOCH) when set
DATE = time.strftime("%Y-%m-%d", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))))

FILES = [
    ("/etc/walrus/walrus.yaml", "Settings read by the systemd units and the archive_command of EXAMPLES "
                                "(--config); root:postgres 0640, as it may hold credentials."),
    ("/etc/walrus/walrus.env", "Environment of the systemd units: PGDATA, the cluster to back up and serve."),
    ("/var/lib/walrus", "State, and backups when WALG_FILE_PREFIX points here (the example config's default). "
                        "Never deleted by the package manager."),
    ("/var/log/walrus/backup-push.log", "Log of the scheduled backups, rotated by /etc/logrotate.d/walrus."),
    ("walrus-daemon.service", "walrus daemon on /run/walrus/walrus.sock as postgres (Type=notify); disabled."),
    ("walrus-daemon.socket", "Listens on /run/walrus/walrus.sock (postgres:postgres 0660) and starts "
                             "walrus-daemon.service on the first request; disabled."),
    ("walrus-backup.service, walrus-backup.timer", "A daily backup-push of PGDATA as postgres; disabled."),
    ("/opt/walrus", "The virtualenv holding walrus and its Python dependencies."),
]

EXIT_STATUS = [
    ("0", "Success."),
    ("1", "Failure; the ERROR, DETAIL and HINT lines on standard error say what, why and what to do."),
    ("2", "Wrong usage."),
    ("74", "wal-fetch: the WAL file is not in the archive (PostgreSQL reads this as the end of the archive)."),
    ("130", "Interrupted."),
]

EXAMPLES = """\
Archive WAL (postgresql.conf):
.PP
.RS
.nf
archive_mode = on
archive_command = '/usr/bin/walrus \\-\\-config /etc/walrus/walrus.yaml wal\\-push %p'
.fi
.RE
.PP
Take a base backup, as the postgres user, and list backups:
.PP
.RS
.nf
walrus \\-\\-config /etc/walrus/walrus.yaml backup\\-push /var/lib/postgresql/15/main
walrus \\-\\-config /etc/walrus/walrus.yaml backup\\-list \\-\\-detail
.fi
.RE
.PP
Restore the latest backup into an empty directory, then replay the archive:
.PP
.RS
.nf
walrus \\-\\-config /etc/walrus/walrus.yaml backup\\-fetch /var/lib/postgresql/15/main LATEST
touch /var/lib/postgresql/15/main/recovery.signal
restore_command = '/usr/bin/walrus \\-\\-config /etc/walrus/walrus.yaml wal\\-fetch %f %p'
.fi
.RE
.PP
Schedule daily backups, or serve WAL from the daemon:
.PP
.RS
.nf
systemctl enable \\-\\-now walrus\\-backup.timer
systemctl enable \\-\\-now walrus\\-daemon.socket
archive_command = '/usr/bin/walg\\-daemon\\-client /run/walrus/walrus.sock wal\\-push %p'
.fi
.RE
"""


def esc(text: str) -> str:
    """Text safe in a troff line: backslashes and hyphens escaped, no line starting a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + out if out.startswith((".", "'")) else out


def paragraph(text: str) -> str:
    """click docstrings are wrapped; troff fills text itself, so join the lines into one."""
    return esc(" ".join(textwrap.dedent(text).split()))


def tagged(tag: str, body: str) -> list[str]:
    return [".TP", f"\\fB{esc(tag)}\\fR", paragraph(body)]


def tagged_section(title: str, items) -> list[str]:
    """A .SH section of tagged paragraphs, one per (tag, body)."""
    lines = [f".SH {title}"]
    for tag, body in items:
        lines += tagged(tag, body)
    return lines


def command_section(ctx: click.Context) -> list[str]:
    lines = [".SH COMMANDS"]
    for name, command in walk_commands(cli):
        sub = click.Context(command, info_name=name, parent=ctx)
        usage = " ".join(command.collect_usage_pieces(sub))
        lines += [".SS " + esc(f"{name} {usage}"), paragraph(command.help or "")]
        help_option = command.get_help_option(sub)  # every command has one: said once, under OPTIONS
        for param in command.get_params(sub):
            record = param.get_help_record(sub) if isinstance(param, click.Option) else None
            if record and param is not help_option:
                lines += [".RS"] + tagged(*record) + [".RE"]
    return lines


def render() -> str:
    ctx = click.Context(cli, info_name="walrus")
    lines = [
        f'.TH WALRUS 1 "{DATE}" "walrus {__version__}" "User Commands"',
        ".SH NAME",
        "walrus \\- WAL\\-G\\-compatible PostgreSQL backup and WAL archiving",
        ".SH SYNOPSIS",
        ".B walrus",
        "[\\fB\\-\\-config\\fR \\fIPATH\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".br",
        ".B walg\\-daemon\\-client",
        "\\fISOCKET\\fR \\fBwal\\-push\\fR|\\fBwal\\-fetch\\fR \\fIARGS\\fR...",
        ".SH DESCRIPTION",
        paragraph(cli.help or ""),
        paragraph("A drop-in replacement for WAL-G: the same commands, the same WALG_* settings and the same "
                  "storage layout, so a backup either tool wrote restores with the other."),
        ".SH OPTIONS",
    ]
    for param in cli.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record:
            lines += tagged(*record)
    lines += command_section(ctx)
    lines += [".SH SETTINGS",
              paragraph("Each setting is read from its flag on the command line (the setting's name in lower "
                        "case with - for _: --walg-upload-concurrency 4; `walrus flags` lists them), else from the "
                        "environment, else from the config file (--config, else $WALG_CONFIG_PATH, else "
                        "~/.walg.json, .yaml or .yml: a flat JSON or YAML map), else its default. "
                        "docs/WALG_COMPAT.md lists the WAL-G settings walrus does not act on.")]
    for s in SETTINGS:
        default = "" if s.default is None else f" Default: {s.default}."
        aliases = f" Also read as {', '.join(s.aliases)}." if s.aliases else ""
        lines += tagged(s.name, s.doc + default + aliases)
    lines += tagged_section("FILES", FILES)
    lines += tagged_section("EXIT STATUS", EXIT_STATUS)
    lines += [".SH EXAMPLES", EXAMPLES.rstrip("\n"),
              ".SH SEE ALSO", "\\fBpostgres\\fR(1), \\fBpg_basebackup\\fR(1), \\fBsystemctl\\fR(1), "
              "\\fBlogrotate\\fR(8), /usr/share/doc/walrus/README.md"]
    return "\n".join(lines) + "\n"


CLIENT_DESCRIPTION = (
    "Sends one request to a walrus daemon (walrus daemon, or walrus-daemon.service started by "
    "walrus-daemon.socket) over its Unix socket and exits with the daemon's answer. It is WAL-G's "
    "daemon client: PostgreSQL runs it as archive_command and restore_command, once per WAL file, so "
    "it imports nothing but the standard library and starts in milliseconds; the daemon does the work "
    "with the settings it was started with.")
CLIENT_COMMANDS = [
    ("wal-push WAL", "Archive WAL, a file name (%f) or a path relative to the daemon's PGDATA (%p)."),
    ("wal-fetch WAL DESTINATION", "Restore WAL from the archive to DESTINATION (%p, relative to PGDATA)."),
]
CLIENT_OPTIONS = [
    ("-timeout DURATION", "How long to wait for the daemon's answer: 500ms, 60s, 2m, 1h or seconds. Default: 60s."),
    ("-connection-timeout DURATION", "How long to wait to connect to the socket. Default: 5s."),
]
CLIENT_EXIT_STATUS = [
    ("0", "The daemon did it."),
    ("1", "The daemon failed, could not be reached, or the usage was wrong; the daemon's log says why it failed."),
    ("74", "wal-fetch: the WAL file is not in the archive (PostgreSQL reads this as the end of the archive)."),
]
CLIENT_EXAMPLES = """\
postgresql.conf, with walrus\\-daemon.socket enabled (systemctl enable \\-\\-now walrus\\-daemon.socket):
.PP
.RS
.nf
archive_mode = on
archive_command = '/usr/bin/walg\\-daemon\\-client /run/walrus/walrus.sock wal\\-push %p'
restore_command = '/usr/bin/walg\\-daemon\\-client /run/walrus/walrus.sock wal\\-fetch %f %p'
.fi
.RE
"""


def render_client() -> str:
    lines = [
        f'.TH WALG\\-DAEMON\\-CLIENT 1 "{DATE}" "walrus {__version__}" "User Commands"',
        ".SH NAME",
        "walg\\-daemon\\-client \\- send wal\\-push and wal\\-fetch requests to the walrus daemon",
        ".SH SYNOPSIS",
        ".B walg\\-daemon\\-client",
        "\\fISOCKET\\fR \\fBwal\\-push\\fR \\fIWAL\\fR [\\fIOPTIONS\\fR]",
        ".br",
        ".B walg\\-daemon\\-client",
        "\\fISOCKET\\fR \\fBwal\\-fetch\\fR \\fIWAL\\fR \\fIDESTINATION\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        paragraph(CLIENT_DESCRIPTION),
    ]
    lines += tagged_section("COMMANDS", CLIENT_COMMANDS)
    lines += tagged_section("OPTIONS", CLIENT_OPTIONS)
    lines += tagged_section("EXIT STATUS", CLIENT_EXIT_STATUS)
    lines += [".SH EXAMPLES", CLIENT_EXAMPLES.rstrip("\n"),
              ".SH SEE ALSO", "\\fBwalrus\\fR(1), \\fBsystemctl\\fR(1), /usr/share/doc/walrus/README.md"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    page = sys.argv[1] if len(sys.argv) > 1 else "walrus"
    if page not in ("walrus", "walg-daemon-client"):
        sys.exit(f"usage: {sys.argv[0]} [walrus|walg-daemon-client]")
    sys.stdout.write(render_client() if page == "walg-daemon-client" else render())
