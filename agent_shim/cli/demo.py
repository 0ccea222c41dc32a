"""Starts a balancer, two groups of three demo backends (one at half capacity)
and two groups of six clients with long-lived channels and skewed call
rates: one group balanced like a Kubernetes Service (one connection, one
backend), one through lbserver (agent_shim's balanced channel). Prints a live
table of each backend's share of calls and utilization, stops by itself and
exits 0. Everything binds 127.0.0.1.
"""

# The docstring above is `agent-shim demo --help`'s description.

from __future__ import annotations

import argparse
from typing import Any

from lbserver.cli.options import add_command, bounded_seconds
from lbserver.logs import configure_logging

HELP = "run a self-contained demo: connection balancing vs lbserver"


def add_parser(commands: Any) -> None:
    parser = add_command(commands, "demo", run, HELP, __doc__)
    parser.add_argument(
        "--duration",
        type=bounded_seconds(4, 3600),
        default=20.0,
        metavar="S",
        help="seconds to run, 4 to 3600 (default 20)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed for the client placement")
    parser.add_argument("--json", action="store_true", help="print the final figures as JSON")


def run(args: argparse.Namespace) -> int:
    configure_logging("warning")
    # Imported here: the demo loads grpcio and the balancer, the proxy neither.
    from agent_shim.demo import main

    return main(args.duration, args.seed, args.json)
