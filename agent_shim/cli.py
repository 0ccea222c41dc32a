"""The `agent-shim` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent_shim import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-shim",
        description="Per-call gRPC balancing for clients without the grpclb policy.",
    )
    parser.add_argument("--version", action="version", version=f"agent-shim {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("agent-shim: no subcommand is available in this version yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
