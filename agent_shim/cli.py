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
import asyncio
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import structlog
import uvloop

from agent_shim import __version__
from agent_shim.proxy import (
    DEFAULT_MAX_BUFFER_BYTES,
    DEFAULT_MAX_BUFFER_TOTAL,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_NO_BACKEND_WAIT,
    DEFAULT_SHUTDOWN_GRACE,
    Proxy,
    ProxyServer,
    attach_selector,
)
from lbserver.addresses import join_host_port
from lbserver.cli.options import (
    add_balancers_option,
    add_command,
    add_logging_options,
    address_list,
    bounded_seconds,
    command_parser,
    host_port,
    listen_address,
    non_negative_seconds,
    positive_seconds,
    run_command,
)
from lbserver.logs import configure_logging

__all__ = ["address_list", "build_parser", "byte_count", "listen_address", "main", "serve_proxy"]

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger("agent_shim.cli")


def byte_count(value: str) -> int:
    """argparse type: a number of bytes >= 0, with an optional Ki/Mi/Gi suffix."""
    text = value.strip()
    units = {"ki": 1024, "mi": 1024**2, "gi": 1024**3, "k": 1000, "m": 1000**2, "g": 1000**3}
    multiplier = 1
    lowered = text.lower().removesuffix("b")
    for suffix, size in units.items():
        if lowered.endswith(suffix):
            multiplier, lowered = size, lowered[: -len(suffix)]
            break
    try:
        number = int(lowered) * multiplier
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of bytes") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return number


def service_name(value: str) -> str:
    """argparse type: a non-empty service name."""
    text = value.strip()
    if not text:
        raise argparse.ArgumentTypeError("the service name must not be empty")
    return text


PROXY_HELP = "run a local gRPC proxy that balances every call through a grpclb balancer"
PROXY_DESCRIPTION = (
    "Listens for gRPC calls (any service, any method) and forwards each one to a "
    "backend chosen from the balancer's server list, so agents that open one "
    "long-lived connection are balanced per call. Runs until SIGTERM or SIGINT, "
    "then stops taking calls and lets running ones finish."
)


def _add_proxy_parser(commands: Any) -> None:
    parser = add_command(commands, "proxy", run_proxy, PROXY_HELP, PROXY_DESCRIPTION)
    parser.add_argument(
        "--listen",
        required=True,
        type=listen_address,
        metavar="HOST:PORT",
        help="address to serve on, e.g. 127.0.0.1:11800 (point the agent's collector "
        "backend service here); IPv6 as [::1]:11800",
    )
    add_balancers_option(
        parser,
        "grpclb balancer address(es) (lbserver serve), port 11810 if omitted; repeat "
        "the option or separate with commas; the next one is tried when one is unreachable",
    )
    parser.add_argument(
        "--service",
        required=True,
        type=service_name,
        metavar="NAME",
        help="service name sent to the balancer (e.g. oap, or oap.skywalking:11800)",
    )
    parser.add_argument(
        "--fallback",
        action="append",
        type=address_list,
        default=[],
        metavar="HOST:PORT[,HOST:PORT...]",
        help="backend address(es) used only when the balancer gives no list within "
        "--fallback-timeout or answers with fallback; repeatable",
    )
    parser.add_argument(
        "--max-buffer-bytes",
        type=byte_count,
        default=DEFAULT_MAX_BUFFER_BYTES,
        metavar="N",
        help="request bytes kept per call until the backend accepts it, to replay the call "
        "on another backend if the first one fails before accepting; beyond this the "
        "call cannot be replayed and a failure is passed to the client. Accepts Ki/Mi "
        "suffixes (default: 4Mi)",
    )
    parser.add_argument(
        "--max-buffer-total",
        type=byte_count,
        default=DEFAULT_MAX_BUFFER_TOTAL,
        metavar="N",
        help="request bytes kept for replays by all calls together; a call that would "
        "go beyond it can no longer be replayed (default: 64Mi)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=byte_count,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metavar="N",
        help="largest request message (read from the gRPC message prefix while the "
        "bytes stream through); a call sending a larger one ends with "
        "RESOURCE_EXHAUSTED; 0: no limit (default: 64Mi)",
    )
    parser.add_argument(
        "--fallback-timeout",
        type=non_negative_seconds,
        default=10.0,
        metavar="S",
        help="seconds without a server list before the fallback addresses are used "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--no-backend-wait",
        type=non_negative_seconds,
        default=DEFAULT_NO_BACKEND_WAIT,
        metavar="S",
        help="seconds a call waits for a backend when none can take it (no list yet, all "
        "failing) before it fails with UNAVAILABLE; bounded by the call's deadline "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=non_negative_seconds,
        default=DEFAULT_SHUTDOWN_GRACE,
        metavar="S",
        help="seconds running calls get to finish after SIGTERM/SIGINT (default: %(default)s)",
    )
    add_logging_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser(
        "agent-shim", "Per-call gRPC balancing for clients without the grpclb policy.", __version__
    )
    _add_proxy_parser(commands)
    _add_check_parser(commands)
    _add_demo_parser(commands)
    return parser


DEFAULT_CHECK_ADDRESS = "127.0.0.1:11800"


CHECK_HELP = "exit 0 if the proxy accepts connections (an exec probe for the sidecar)"
CHECK_DESCRIPTION = (
    "Connects to the proxy's listening address and exits 0 if it accepts the "
    "connection, 1 if not. Use it as the sidecar's startupProbe (exec): the "
    "kubelet's tcpSocket probe dials the pod IP, and a proxy listening on "
    "127.0.0.1 only is not reachable there."
)


def _add_check_parser(commands: Any) -> None:
    parser = add_command(commands, "check", run_check, CHECK_HELP, CHECK_DESCRIPTION)
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


DEMO_HELP = "run a self-contained demo: connection balancing vs lbserver"
DEMO_DESCRIPTION = (
    "Starts a balancer, two groups of three demo backends (one at half capacity) "
    "and two groups of six clients with long-lived channels and skewed call rates: "
    "one group balanced like a Kubernetes Service (one connection, one backend), "
    "one through lbserver (agent_shim's balanced channel). Prints a live table of "
    "each backend's share of calls and utilization, stops by itself and exits 0. "
    "Everything binds 127.0.0.1."
)


def _add_demo_parser(commands: Any) -> None:
    parser = add_command(commands, "demo", run_demo, DEMO_HELP, DEMO_DESCRIPTION)
    parser.add_argument(
        "--duration",
        type=bounded_seconds(4, 3600),
        default=20.0,
        metavar="S",
        help="seconds to run, 4 to 3600 (default 20)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed for the client placement")
    parser.add_argument("--json", action="store_true", help="print the final figures as JSON")


def run_demo(args: argparse.Namespace) -> int:
    configure_logging("warning")
    # Imported here: the demo loads grpcio and the balancer, the proxy neither.
    from agent_shim.demo import main

    return main(args.duration, args.seed, args.json)


def run_check(args: argparse.Namespace) -> int:
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


def run_proxy(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    balancers = list(dict.fromkeys(a for group in args.balancer for a in group))
    fallback = list(dict.fromkeys(a for group in args.fallback for a in group))
    # uvloop: the relay spends most of its time in the event loop's I/O
    # (docs/architecture.md has the measurement).
    return uvloop.run(
        serve_proxy(
            listen=args.listen,
            balancers=balancers,
            service=args.service,
            fallback=fallback,
            max_buffer_bytes=args.max_buffer_bytes,
            max_buffer_total=args.max_buffer_total,
            max_message_bytes=args.max_message_bytes,
            fallback_timeout=args.fallback_timeout,
            no_backend_wait=args.no_backend_wait,
            shutdown_grace=args.shutdown_grace,
        )
    )


async def serve_proxy(
    *,
    listen: str,
    balancers: Sequence[str],
    service: str,
    fallback: Sequence[str] = (),
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
    max_buffer_total: int = DEFAULT_MAX_BUFFER_TOTAL,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    fallback_timeout: float = 10.0,
    no_backend_wait: float = DEFAULT_NO_BACKEND_WAIT,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
) -> int:
    """Runs the proxy until SIGTERM or SIGINT; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop_requested.set)
    proxy = Proxy(
        max_buffer_bytes=max_buffer_bytes,
        max_buffer_total=max_buffer_total,
        max_message_bytes=max_message_bytes,
        no_backend_wait=no_backend_wait,
    )
    selector = attach_selector(
        proxy, balancers, service, fallback=fallback, fallback_timeout=fallback_timeout
    )
    server = ProxyServer(proxy, listen)
    try:
        try:
            port = await server.start()
        except OSError as err:
            _log.error("cannot listen", listen=listen, error=str(err))
            return 1
        await selector.start()
        _log.info(
            "agent-shim proxy serving",
            listen=listen,
            port=port,
            balancers=list(balancers),
            service=service,
            fallback=list(fallback),
            max_buffer_bytes=max_buffer_bytes,
        )
        await stop_requested.wait()
        _log.info("stopping: finishing running calls", grace=shutdown_grace)
        await server.stop(shutdown_grace)
        _log.info(
            "agent-shim proxy stopped", calls=server.proxy.calls, replays=server.proxy.replays
        )
        return 0
    finally:
        await server.stop(0)
        await selector.close()
        for sig in signals:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
