"""The `lbserver` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lbserver import __version__


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: agent-shim uses lbserver.cli.options,
    # and importing this package must not load the balancer and grpcio.
    from lbserver.cli import register, serve, status
    from lbserver.cli.options import command_parser

    parser, commands = command_parser(
        "lbserver", "A lookaside gRPC load balancer speaking the grpclb protocol.", __version__
    )
    for module in (serve, register, status):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lbserver.cli.options import run_command

    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
