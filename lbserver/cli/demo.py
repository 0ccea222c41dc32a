"""`lbserver demo`: see lbserver work in one command."""

from __future__ import annotations

import argparse
from typing import Any

from lbserver.logs import configure_logging


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 4 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("must be between 4 and 3600 seconds")
    return seconds


def add_parser(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="run a self-contained demo: connection balancing vs lbserver",
        description=(
            "Starts a balancer, two groups of three demo backends (one at half capacity) "
            "and two groups of six clients with long-lived channels and skewed call rates: "
            "one group balanced like a Kubernetes Service (one connection, one backend), "
            "one through lbserver. Prints a live table of each backend's share of calls "
            "and utilization, stops by itself and exits 0. Everything binds 127.0.0.1."
        ),
    )
    parser.add_argument(
        "--duration", type=_seconds, default=20.0, metavar="S", help="seconds to run (default 20)"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed for the client placement")
    parser.add_argument("--json", action="store_true", help="print the final figures as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    configure_logging("warning")
    from lbserver.demo import main

    return main(args.duration, args.seed, args.json)
