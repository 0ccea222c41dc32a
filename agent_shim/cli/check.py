"""Connects to the proxy's listening address and exits 0 if it accepts the
connection, 1 if not. Use it as the sidecar's startupProbe (exec): the
kubelet's tcpSocket probe dials the pod IP, and a proxy listening on
127.0.0.1 only is not reachable there.
"""

# The docstring above is `agent-shim check --help`'s description.

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

from lbserver.addresses import join_host_port
from lbserver.cli.options import add_command, host_port, positive_seconds

HELP = "exit 0 if the proxy accepts connections (an exec probe for the sidecar)"
DEFAULT_CHECK_ADDRESS = "127.0.0.1:11800"


def add_parser(commands: Any) -> None:
    parser = add_command(commands, "check", run, HELP, __doc__)
    parser.add_argument(
        "--address",
        type=host_port,
        default=DEFAULT_CHECK_ADDRESS,
        metavar="HOST:PORT",
        help="the proxy's --listen address (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=1.0,
        metavar="S",
        help="seconds to wait for the connection (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    host, port = args.address
    try:
        with socket.create_connection((host, port), timeout=args.timeout):
            return 0
    except OSError as err:
        print(
            f"agent-shim check: {join_host_port(host, port)} does not accept connections: "
            f"{err.strerror or err}",
            file=sys.stderr,
        )
        return 1
