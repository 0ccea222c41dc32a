"""Listens for gRPC calls (any service, any method) and forwards each one to a
backend chosen from the balancer's server list, so agents that open one
long-lived connection are balanced per call. Runs until SIGTERM or SIGINT,
then stops taking calls and lets running ones finish.
"""

# The docstring above is `agent-shim proxy --help`'s description.

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from typing import Any

import uvloop

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
from lbserver.cli.options import (
    add_balancers_option,
    add_command,
    add_logging_options,
    address_list,
    listen_address,
    non_negative_seconds,
)
from lbserver.logs import configure_logging, get_logger

_log = get_logger("agent_shim.cli")

HELP = "run a local gRPC proxy that balances every call through a grpclb balancer"


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


def add_parser(commands: Any) -> None:
    parser = add_command(commands, "proxy", run, HELP, __doc__)
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


def run(args: argparse.Namespace) -> int:
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
