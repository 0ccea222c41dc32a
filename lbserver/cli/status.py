"""`lbserver status`: what one balancer knows, from Admin.GetState.

The state is read page by page (GetState's page_token) and put together again,
so any number of backends can be shown; the document is the same either way.

`--json` prints one document with snake_case keys; every key is always present
(null when unknown), and services and backends keep the balancer's order::

    {
      "balancer": "127.0.0.1:11810",      # the address asked
      "version": "0.1.0",                 # the balancer's version
      "now": "2024-05-01T12:00:00Z",      # the balancer's clock (RFC 3339) or null
      "services": [
        {
          "name": "oap",
          "clients": 3,                   # open BalanceLoad streams
          "list_length": 12,              # server list entries, drops included
          "drop_entries": 0,              # overload shedding
          "client_stats": {
            "calls_started": 0,
            "calls_finished": 0,
            "calls_finished_with_client_failed_to_send": 0,
            "calls_finished_known_received": 0,
            "calls_dropped_by_token": {"<token>": 0}
          },
          "backends": [
            {
              "instance_id": "10.0.0.7:11800",
              "address": "10.0.0.7:11800",  # [ip]:port for IPv6
              "ip": "10.0.0.7",
              "port": 11800,
              "zone": "",
              "labels": {},
              "state": "serving",           # serving | draining | unspecified
              "weight": 1,                  # static weight it registered with
              "effective_weight": 333.3,    # load-aware, clamped, ramped; 0 = no calls
              "list_entries": 4,
              "share": 0.333,               # 0..1
              "load": {
                "cpu_utilization": 0.4,     # each null when not reported
                "requests_per_second": null,
                "errors_per_second": null,
                "in_flight": null
              },
              "load_balance_token": "<token>",
              "last_heartbeat": "2024-05-01T11:59:58Z",   # or null
              "last_heartbeat_age_seconds": 2.0,          # against "now", or null
              "ttl_seconds": 9.0                          # or null
            }
          ]
        }
      ]
    }
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from lbserver.addresses import DEFAULT_BALANCER_PORT, join_host_port
from lbserver.cli._credentials import (
    TokenFile,
    add_credential_options,
    channel_credentials,
    token_source,
)
from lbserver.cli.options import add_command, balancer_address, positive_seconds
from lbserver.proto.v1 import lbserver_pb2, lbserver_pb2_grpc

DEFAULT_BALANCER = f"127.0.0.1:{DEFAULT_BALANCER_PORT}"

# Exit codes.
OK = 0
FAILED = 1  # the balancer is unreachable or the call failed
BAD_OPTIONS = 2  # also argparse's
NO_SUCH_SERVICE = 3

# Answers that mean "not with this token": the next token is tried.
_DENIED_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

_STATE_NAMES = {
    lbserver_pb2.BACKEND_STATE_UNSPECIFIED: "unspecified",
    lbserver_pb2.BACKEND_STATE_SERVING: "serving",
    lbserver_pb2.BACKEND_STATE_DRAINING: "draining",
}


HELP = "show a balancer's services, backends, weights, load and clients"
DESCRIPTION = "Shows what one balancer knows, read through its Admin API."
STATUS_EPILOG = (
    "Exit codes: 0 ok, 1 balancer unreachable or call failed, 2 bad options, "
    "3 no such service (--service names a service the balancer does not know; the "
    "known ones are listed on stderr)."
)


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "status", run, HELP, DESCRIPTION, epilog=STATUS_EPILOG)
    parser.add_argument(
        "--balancer",
        type=balancer_address,
        default=DEFAULT_BALANCER,
        metavar="HOST[:PORT]",
        help=f"balancer to ask; port {DEFAULT_BALANCER_PORT} if omitted (default: %(default)s)",
    )
    parser.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help="show only this service (default: all); exit code 3 if the balancer does not know it",
    )
    # Added next to each other so that usage shows [--json | --watch [S]].
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        action="store_true",
        help="print a JSON document (layout in `pydoc lbserver.cli.status`) instead of tables",
    )
    output.add_argument(
        "--watch",
        type=positive_seconds,
        nargs="?",
        const=2.0,
        default=None,
        metavar="S",
        help="redraw the tables every S seconds (default 2) until Ctrl-C",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=5.0,
        metavar="S",
        help="seconds to wait for each reply of the balancer (default: %(default)s)",
    )
    add_credential_options(parser)


# A reply larger than gRPC's default 4 MB receive limit is still read (the
# balancer pages its state far below that; older balancers send it whole).
MAX_RECEIVE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
)


def fetch_state(
    balancer: str,
    service: str,
    timeout: float,
    *,
    token: str | Sequence[str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    page_size: int = 0,
) -> lbserver_pb2.GetStateResponse:
    """Admin.GetState from `balancer`, every page of it, merged into one
    response (a service split across pages becomes one entry again; `now`
    and `version` are the first page's). Each page gets `timeout` seconds;
    `page_size` 0 lets the balancer choose. With several tokens, a call
    refused with UNAUTHENTICATED or PERMISSION_DENIED is made again with the
    next one; the last refusal is raised."""
    tokens = [token] if isinstance(token, str) else list(token or ())
    candidates: list[str | None] = [t for t in tokens if t] or [None]
    channel = (
        grpc.secure_channel(balancer, credentials, options=CHANNEL_OPTIONS)
        if credentials is not None
        else grpc.insecure_channel(balancer, options=CHANNEL_OPTIONS)
    )
    with channel:
        stub = lbserver_pb2_grpc.AdminStub(channel)
        first = lbserver_pb2.GetStateRequest(service=service, page_size=page_size)
        for attempt, candidate in enumerate(candidates):
            metadata = (("authorization", f"Bearer {candidate}"),) if candidate else None
            try:
                response: lbserver_pb2.GetStateResponse = stub.GetState(
                    first, timeout=timeout, metadata=metadata
                )
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                if code in _DENIED_CODES and attempt + 1 < len(candidates):
                    continue
                raise
            seen = {""}
            while response.next_page_token not in seen:
                seen.add(response.next_page_token)
                page: lbserver_pb2.GetStateResponse = stub.GetState(
                    lbserver_pb2.GetStateRequest(
                        service=service,
                        page_size=page_size,
                        page_token=response.next_page_token,
                    ),
                    timeout=timeout,
                    metadata=metadata,
                )
                merge_page(response, page)
            response.next_page_token = ""
            return response
    raise AssertionError("no token candidates")  # pragma: no cover - never empty


def merge_page(state: lbserver_pb2.GetStateResponse, page: lbserver_pb2.GetStateResponse) -> None:
    """Appends `page` to `state`: a `continued` service's backends join the
    entry they continue."""
    for service in page.services:
        if service.continued and state.services and state.services[-1].name == service.name:
            state.services[-1].backends.extend(service.backends)
        else:
            state.services.append(service)
            state.services[-1].continued = False
    state.next_page_token = page.next_page_token


Tokens = TokenFile | str | None


def _tokens(source: Tokens) -> Sequence[str]:
    """The tokens to try now (a token file is re-read when it changed)."""
    if source is None:
        return ()
    return (source,) if isinstance(source, str) else source()


def run(args: argparse.Namespace) -> int:
    try:
        token = token_source(args.token_file)
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as err:
        print(f"lbserver status: {err}", file=sys.stderr)
        return BAD_OPTIONS
    if args.watch is not None:
        return _watch(args, token, credentials)
    try:
        state = fetch_state(
            args.balancer, args.service, args.timeout, token=_tokens(token), credentials=credentials
        )
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else None
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        reason = (
            "cannot reach balancer"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            else "balancer refused GetState"
        )
        code_name = code.name if code is not None else "UNKNOWN"
        print(
            f"lbserver status: {reason} at {args.balancer}: {code_name}: {details}",
            file=sys.stderr,
        )
        return FAILED
    if _lacks_service(state, args.service):
        message = _no_such_service(args, token, credentials)
        print(f"lbserver status: {message}", end="", file=sys.stderr)
        return NO_SUCH_SERVICE
    if args.json:
        print(json.dumps(state_to_dict(state, args.balancer), indent=2))
    else:
        print(render_tables(state, args.balancer), end="")
    return OK


def _lacks_service(state: lbserver_pb2.GetStateResponse, service: str) -> bool:
    """--service names a service the balancer does not know."""
    return bool(service) and not any(known.name == service for known in state.services)


def _no_such_service(
    args: argparse.Namespace, token: Tokens, credentials: grpc.ChannelCredentials | None
) -> str:
    """Says that --service is unknown, and which services the balancer knows."""
    try:
        everything = fetch_state(
            args.balancer, "", args.timeout, token=_tokens(token), credentials=credentials
        )
        known = ", ".join(service.name for service in everything.services) or "none"
    except grpc.RpcError as err:
        code = err.code().name if isinstance(err, grpc.Call) else "UNKNOWN"
        known = f"cannot list them ({code})"
    return f"no service {args.service!r} on {args.balancer}\nknown services: {known}\n"


def _watch(
    args: argparse.Namespace, token: Tokens, credentials: grpc.ChannelCredentials | None
) -> int:
    """Redraws the tables until Ctrl-C; an unreachable balancer or a service
    it does not know (yet) is shown, not fatal."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            try:
                state = fetch_state(
                    args.balancer,
                    args.service,
                    args.timeout,
                    token=_tokens(token),
                    credentials=credentials,
                )
                if _lacks_service(state, args.service):
                    body = _no_such_service(args, token, credentials)
                else:
                    body = render_tables(state, args.balancer)
            except grpc.RpcError as err:
                code = err.code().name if isinstance(err, grpc.Call) else "UNKNOWN"
                body = f"balancer {args.balancer}: unreachable ({code}); retrying\n"
            print(clear + body, end="", flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return OK


def _timestamp(value: timestamp_pb2.Timestamp) -> str | None:
    return value.ToJsonString() if value.seconds or value.nanos else None


def _duration(value: duration_pb2.Duration) -> float | None:
    return value.ToNanoseconds() / 1e9 if value.seconds or value.nanos else None


def _age(now: timestamp_pb2.Timestamp, then: timestamp_pb2.Timestamp) -> float | None:
    # The balancer's own clock, so skew between it and this machine does not matter.
    if not (now.seconds or now.nanos) or not (then.seconds or then.nanos):
        return None
    return max(0.0, (now.ToNanoseconds() - then.ToNanoseconds()) / 1e9)


def _load_dict(load: lbserver_pb2.LoadReport) -> dict[str, float | int | None]:
    return {
        "cpu_utilization": load.cpu_utilization if load.HasField("cpu_utilization") else None,
        "requests_per_second": (
            load.requests_per_second if load.HasField("requests_per_second") else None
        ),
        "errors_per_second": (
            load.errors_per_second if load.HasField("errors_per_second") else None
        ),
        "in_flight": load.in_flight if load.HasField("in_flight") else None,
    }


def _backend_dict(
    backend: lbserver_pb2.BackendStatus, now: timestamp_pb2.Timestamp
) -> dict[str, Any]:
    return {
        "instance_id": backend.instance_id,
        "address": join_host_port(backend.ip, backend.port),
        "ip": backend.ip,
        "port": backend.port,
        "zone": backend.zone,
        "labels": dict(sorted(backend.labels.items())),
        "state": _STATE_NAMES.get(backend.state, str(backend.state)),
        "weight": backend.weight,
        "effective_weight": backend.effective_weight,
        "list_entries": backend.list_entries,
        "share": backend.share,
        "load": _load_dict(backend.load),
        "load_balance_token": backend.load_balance_token,
        "last_heartbeat": _timestamp(backend.last_heartbeat),
        "last_heartbeat_age_seconds": _age(now, backend.last_heartbeat),
        "ttl_seconds": _duration(backend.ttl),
    }


def state_to_dict(state: lbserver_pb2.GetStateResponse, balancer: str) -> dict[str, Any]:
    """The `--json` document (layout in the module docstring)."""
    return {
        "balancer": balancer,
        "version": state.version,
        "now": _timestamp(state.now),
        "services": [
            {
                "name": service.name,
                "clients": service.clients,
                "list_length": service.list_length,
                "drop_entries": service.drop_entries,
                "client_stats": {
                    "calls_started": service.client_stats.calls_started,
                    "calls_finished": service.client_stats.calls_finished,
                    "calls_finished_with_client_failed_to_send": (
                        service.client_stats.calls_finished_with_client_failed_to_send
                    ),
                    "calls_finished_known_received": (
                        service.client_stats.calls_finished_known_received
                    ),
                    "calls_dropped_by_token": dict(
                        sorted(service.client_stats.calls_dropped_by_token.items())
                    ),
                },
                "backends": [_backend_dict(b, state.now) for b in service.backends],
            }
            for service in state.services
        ],
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _number(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_COLUMNS = (
    "BACKEND",
    "ZONE",
    "STATE",
    "WEIGHT",
    "EFFECTIVE",
    "ENTRIES",
    "SHARE",
    "CPU",
    "REQ/S",
    "ERR/S",
    "IN-FLIGHT",
    "LAST HB",
    "TOKEN",
    "INSTANCE",
)


def _backend_row(backend: dict[str, Any]) -> list[str]:
    load = backend["load"]
    cpu = load["cpu_utilization"]
    age = backend["last_heartbeat_age_seconds"]
    return [
        backend["address"],
        backend["zone"] or "-",
        backend["state"],
        str(backend["weight"]),
        f"{backend['effective_weight']:.4g}",
        str(backend["list_entries"]),
        f"{backend['share'] * 100:.1f}%",
        "-" if cpu is None else f"{cpu * 100:.0f}%",
        _number(load["requests_per_second"], ".1f"),
        _number(load["errors_per_second"], ".1f"),
        _number(load["in_flight"], "d"),
        "-" if age is None else f"{age:.1f}s ago",
        backend["load_balance_token"] or "-",
        backend["instance_id"],
    ]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render_tables(state: lbserver_pb2.GetStateResponse, balancer: str) -> str:
    """The human-readable form: one table per service."""
    document = state_to_dict(state, balancer)
    lines = [
        f"balancer {balancer}  version {document['version'] or '?'}  now {document['now'] or '?'}"
    ]
    if not document["services"]:
        lines.append("no services")
    for message, service in zip(state.services, document["services"], strict=True):
        stats = service["client_stats"]
        lines.append("")
        lines.append(
            f"service {service['name']}: {_count(len(service['backends']), 'backend')}, "
            f"{_count(service['clients'], 'client')}, list length {service['list_length']}"
        )
        if service["backends"]:
            rows = [list(_COLUMNS), *(_backend_row(b) for b in service["backends"])]
            lines.extend("  " + line for line in _table(rows))
        else:
            lines.append("  (no backends)")
        dropped = stats["calls_dropped_by_token"]
        lines.append(
            f"  client stats: {stats['calls_started']} started, "
            f"{stats['calls_finished']} finished, "
            f"{stats['calls_finished_known_received']} known received, "
            f"{stats['calls_finished_with_client_failed_to_send']} failed to send, "
            f"{sum(dropped.values())} dropped"
            + (
                " (" + ", ".join(f"{tok}: {n}" for tok, n in dropped.items()) + ")"
                if dropped
                else ""
            )
        )
        refused = _refused_stats(message.client_stats)
        if refused:
            lines.append(f"  client stats refused: {refused}")
    return "\n".join(lines) + "\n"


def _refused_stats(stats: lbserver_pb2.ClientCallStats) -> str:
    """What the balancer did not take from clients' reports as they were
    (empty when it took everything)."""
    parts = []
    if stats.calls_dropped_other_tokens or stats.drop_tokens_ignored:
        parts.append(
            f"{stats.calls_dropped_other_tokens} dropped under tokens not in the list "
            f"({_count(stats.drop_tokens_ignored, 'token')} ignored)"
        )
    if stats.counters_clamped:
        parts.append(f"{_count(stats.counters_clamped, 'counter')} clamped to the per-report bound")
    return ", ".join(parts)
