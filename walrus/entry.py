"""The `walrus` executable: the daemon client is answered before anything heavy is imported."""
from __future__ import annotations

import os
import sys


def main() -> None:
    if os.path.basename(sys.argv[0]) == "walg-daemon-client":  # multicall name
        from walrus.daemon.client import run

        sys.exit(run(sys.argv[1:]))
    if len(sys.argv) > 1 and sys.argv[1] == "daemon-client":
        from walrus.daemon.client import run

        sys.exit(run(sys.argv[2:]))
    from walrus.cli import main as cli_main

    cli_main()
