"""The console script's entry point: ``--version`` is answered before the CLI is imported.

Importing click and the command definitions costs most of the start-up time; a script that
only asks for the version should not pay for them.
"""

from __future__ import annotations

import sys


def main() -> int:
    args = sys.argv[1:]
    if args in (["--version"], ["-V"]):
        from . import __version__

        sys.stdout.write(f"imgbridge, version {__version__}\n")
        return 0
    from .cli import main as cli_main

    return cli_main(args)
