"""Registers one backend with every given balancer and heartbeats until SIGTERM
or SIGINT, then drains (--drain-seconds), deregisters it from every balancer
and exits 0. A balancer given by DNS name (a headless Service) is re-
resolved every interval and every address gets its own heartbeats.
"""

# The docstring above is `lbserver register --help`'s description.

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import socket
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

import structlog

from lbserver.addresses import join_host_port
from lbserver.cli._credentials import add_credential_options, channel_credentials, token_source
from lbserver.cli.options import (
    add_balancers_option,
    add_command,
    add_logging_options,
    host_port,
    non_negative_seconds,
    positive_int,
    positive_seconds,
)
from lbserver.domain.model import LoadReport
from lbserver.domain.validation import MAX_STATIC_WEIGHT
from lbserver.logs import configure_logging
from lbserver.registrar import (
    DEFAULT_CPU_METRIC,
    PROBE_KINDS,
    LoadCallback,
    PrometheusLoadProbe,
    Registrar,
    make_probe,
    parse_cpus,
    parse_selector,
    static_load,
)

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger()


def label(value: str) -> tuple[str, str]:
    """argparse type: KEY=VALUE (the value may be empty)."""
    key, sep, text = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE")
    return key.strip(), text


DEFAULT_DRAIN_SECONDS = 5.0


def load_url(value: str) -> str:
    """argparse type: an http:// or https:// URL with a host."""
    try:
        parsed = urllib.parse.urlsplit(value)
        parsed.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r}: {err}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL with a host")
    return value


def load_spec(value: str) -> LoadReport:
    """argparse type: cpu=...,rps=...,eps=...,inflight=..."""
    try:
        return static_load(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def metric(value: str) -> str:
    """argparse type: NAME or NAME{label="value",...}; "" turns the metric off."""
    if not value.strip():
        return ""
    try:
        parse_selector(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value.strip()


def cpu_count(value: str) -> float:
    try:
        return parse_cpus(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# Options that only mean something with --load-url (argparse default None = not given).
_PROBE_OPTIONS = ("cpu_metric", "requests_metric", "errors_metric", "inflight_metric", "cpus")


def build_load(args: argparse.Namespace) -> LoadCallback | None:
    """The load callback the options ask for (None: heartbeats carry no load);
    ValueError on options that do not fit together."""
    if args.load_url is None:
        for name in _PROBE_OPTIONS:
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} needs --load-url")
    if args.load_static is not None:
        report: LoadReport = args.load_static
        return lambda: report
    if args.load_url is None:
        return None

    def chosen(value: str | None, default: str | None = None) -> str | None:
        return default if value is None else value or None

    return PrometheusLoadProbe(
        args.load_url,
        cpu_metric=chosen(args.cpu_metric, DEFAULT_CPU_METRIC),
        requests_metric=chosen(args.requests_metric),
        errors_metric=chosen(args.errors_metric),
        inflight_metric=chosen(args.inflight_metric),
        cpus=args.cpus,
        # A scrape must end before the heartbeat it feeds is due.
        timeout=min(args.interval, 2.0),
        # Every balancer's heartbeat asks for the load; one scrape serves them all,
        # and rates are never taken over a sliver of an interval.
        min_interval=args.interval / 2,
    )


def resolve_ip(host: str, port: int) -> str:
    """The address clients will connect to: the literal itself, or the first
    address the resolver gives for a hostname. Raises ValueError."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise ValueError(f"--backend: cannot resolve {host!r}: {err}") from None
    if not infos:
        raise ValueError(f"--backend: {host!r} resolves to no address")
    # sockaddr is (host, port) or (host, port, flowinfo, scope_id); keep only host.
    return str(infos[0][4][0]).partition("%")[0]


def build_registrar(args: argparse.Namespace) -> Registrar:
    """The Registrar the parsed arguments describe; ValueError on bad input."""
    balancers = list(dict.fromkeys(a for group in args.balancer for a in group))
    host, port = args.backend
    labels = dict(args.label or [])
    ip = resolve_ip(host, port)
    return Registrar(
        balancers,
        args.service,
        ip,
        port,
        instance_id=args.instance_id,
        weight=args.weight,
        zone=args.zone,
        labels=labels,
        interval=args.interval,
        ttl=args.ttl,
        load=build_load(args),
        token=token_source(args.token_file),
        credentials=channel_credentials(args.tls_ca, args.tls_cert, args.tls_key),
        probe=make_probe(
            args.probe,
            ip,
            port,
            args.probe_timeout if args.probe_timeout is not None else min(1.0, args.interval),
        ),
        probe_failures=args.probe_failures,
    )


HELP = "register a backend with the balancers and heartbeat until stopped"


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "register", run, HELP, __doc__)
    add_balancers_option(
        parser,
        "balancer address(es), port 11810 if omitted; repeat the option or separate "
        "with commas. Every replica must get heartbeats (replicas share no state), and a "
        "DNS name such as the balancer's headless Service resolves to every replica: it "
        "is re-resolved every interval and every address gets its own heartbeats. List "
        "addresses only when there is no such name.",
    )
    parser.add_argument(
        "--service", required=True, metavar="NAME", help="service the backend belongs to"
    )
    parser.add_argument(
        "--backend",
        required=True,
        type=host_port,
        metavar="HOST:PORT",
        help="address clients connect to; a hostname is resolved to an IP once at "
        "start; IPv6 as [::1]:8080",
    )
    parser.add_argument(
        "--weight",
        type=positive_int,
        default=1,
        metavar="N",
        help=f"relative static weight, 1-{MAX_STATIC_WEIGHT} (default: %(default)s)",
    )
    parser.add_argument("--zone", default="", metavar="Z", help="zone or locality of the backend")
    parser.add_argument(
        "--interval",
        type=positive_seconds,
        default=3.0,
        metavar="S",
        help="seconds between heartbeats until a balancer says otherwise (default: %(default)s)",
    )
    parser.add_argument(
        "--ttl",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="seconds the balancer keeps the backend without heartbeats; must exceed "
        "--interval (default: the balancer's)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=non_negative_seconds,
        default=DEFAULT_DRAIN_SECONDS,
        metavar="S",
        help="on SIGTERM/SIGINT, keep the backend registered as DRAINING (out of every "
        "server list, still serving its open calls) for this long before deregistering; "
        "a second signal ends the drain at once "
        f"(default {DEFAULT_DRAIN_SECONDS:g}; 0 deregisters at once)",
    )
    add_credential_options(parser)
    parser.add_argument(
        "--probe",
        choices=PROBE_KINDS,
        default="grpc",
        help="how to check that the backend answers before each heartbeat: 'grpc' "
        "(grpc.health.v1 Check with a deadline; a server without the health service "
        "counts as alive), 'tcp' (a connect) or 'none'. A backend that fails "
        "--probe-failures checks in a row is reported DRAINING until it answers again "
        "(default grpc)",
    )
    parser.add_argument(
        "--probe-timeout",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="deadline of one probe (default: the smaller of 1 s and --interval)",
    )
    parser.add_argument(
        "--probe-failures",
        type=positive_int,
        default=2,
        metavar="N",
        help="consecutive failed probes before the backend is drained (default 2)",
    )
    parser.add_argument(
        "--instance-id",
        default=None,
        metavar="ID",
        help="identity of this backend process (default: IP:PORT)",
    )
    parser.add_argument(
        "--label",
        action="append",
        type=label,
        default=[],
        metavar="KEY=VALUE",
        help="label to attach to the backend; repeatable",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--load-url",
        type=load_url,
        default=None,
        metavar="URL",
        help="Prometheus text endpoint of the backend, scraped every heartbeat to report "
        "its load (skywalking-oap with telemetry 'prometheus': http://127.0.0.1:1234/metrics)",
    )
    source.add_argument(
        "--load-static",
        type=load_spec,
        default=None,
        metavar="cpu=U,rps=R[,...]",
        help="report this fixed load with every heartbeat (tests, backends without metrics)",
    )
    parser.add_argument(
        "--cpu-metric",
        type=metric,
        default=None,
        metavar="NAME",
        help=f"counter of CPU seconds; utilization = its rate / --cpus (default: "
        f"{DEFAULT_CPU_METRIC}; '' for none)",
    )
    parser.add_argument(
        "--requests-metric",
        type=metric,
        default=None,
        metavar="NAME",
        help="counter of requests, reported as requests/s summed over its label sets; "
        'NAME{label="value"} selects some (default: none)',
    )
    parser.add_argument(
        "--errors-metric",
        type=metric,
        default=None,
        metavar="NAME",
        help="counter of failed requests, reported as errors/s (default: none)",
    )
    parser.add_argument(
        "--inflight-metric",
        type=metric,
        default=None,
        metavar="NAME",
        help="gauge of requests in progress, summed (default: none)",
    )
    parser.add_argument(
        "--cpus",
        type=cpu_count,
        default=None,
        metavar="N",
        help="CPUs the backend may use, like 2 or 500m (default: this container's CPU "
        "limit, else the CPU count; a sidecar must be given the backend container's)",
    )
    add_logging_options(parser)


def run(args: argparse.Namespace) -> int:
    try:
        registrar = build_registrar(args)
    except ValueError as err:
        print(f"lbserver register: error: {err}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    return asyncio.run(_serve(registrar, args.drain_seconds))


async def _serve(registrar: Registrar, drain_seconds: float) -> int:
    """Heartbeats until a signal; then drains (the backend leaves every list
    but keeps serving the calls it has) for `drain_seconds`, deregisters and
    returns 0. A second signal cuts the drain short."""
    loop = asyncio.get_running_loop()
    signals_received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, signals_received.put_nowait, sig)
    running = asyncio.create_task(registrar.run(), name="registrar")
    first_signal = asyncio.create_task(signals_received.get(), name="signals")
    backend = join_host_port(registrar.ip, registrar.port)
    try:
        await asyncio.wait({running, first_signal}, return_when=asyncio.FIRST_COMPLETED)
        if first_signal.done() and drain_seconds > 0:
            _log.info("draining", backend=backend, service=registrar.service, seconds=drain_seconds)
            await registrar.drain()
            try:
                await asyncio.wait_for(signals_received.get(), drain_seconds)
                _log.info("second signal: ending the drain now", backend=backend)
            except TimeoutError:
                pass
        if first_signal.done():
            _log.info("stopping: deregistering", backend=backend, service=registrar.service)
        await registrar.stop()
        await running
    finally:
        first_signal.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0
