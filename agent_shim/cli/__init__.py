"""The `agent-shim` command.

    agent-shim proxy --listen HOST:PORT --balancer HOST[:PORT][,HOST[:PORT]...] --service NAME
                     [--fallback HOST:PORT ...] [--max-buffer-bytes N] [--max-buffer-total N]
                     [--max-message-bytes N] [--fallback-timeout S]
                     [--no-backend-wait S] [--shutdown-grace S]
                     [--log-level L] [--log-format F]
    agent-shim check [--address HOST:PORT] [--timeout S]
    agent-shim demo [--duration S] [--seed N] [--json]

`proxy` exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 if it cannot
listen, 2 for bad options. `check` (a startup or readiness probe for the
sidecar: kubelet's tcpSocket probe dials the pod IP, which a proxy listening
on 127.0.0.1 does not answer) exits 0 when the address accepts a connection,
1 when it does not.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from agent_shim import __version__
from agent_shim.cli import check, demo, proxy
from agent_shim.cli.proxy import byte_count, serve_proxy
from lbserver.cli.options import address_list, command_parser, listen_address, run_command

__all__ = ["address_list", "build_parser", "byte_count", "listen_address", "main", "serve_proxy"]


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser(
        "agent-shim", "Per-call gRPC balancing for clients without the grpclb policy.", __version__
    )
    for module in (proxy, check, demo):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
