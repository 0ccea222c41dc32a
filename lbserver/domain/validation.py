"""Validation of what clients and backends send. Each check raises
InvalidArgumentError naming the offending field, before any state is touched.

The registrar (lbserver.registrar) runs the same checks on what it will send,
so a registration the balancer would refuse fails at construction instead."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from types import MappingProxyType

from lbserver.domain.model import BackendState, LoadReport, Registration, format_address
from lbserver.errors import InvalidArgumentError

# grpclb: "Its length should be less than 256 bytes."
MAX_BALANCE_NAME_BYTES = 256
MAX_SERVICE_BYTES = 253
MAX_INSTANCE_ID_BYTES = 128
MAX_ZONE_BYTES = 64
MAX_LABELS = 32
MAX_LABEL_KEY_BYTES = 63
MAX_LABEL_VALUE_BYTES = 256
MAX_STATIC_WEIGHT = 10_000

# Wire values of lbserver.v1.BackendState.
_STATES = {0: BackendState.SERVING, 1: BackendState.SERVING, 2: BackendState.DRAINING}


def check_text(field: str, value: str, *, max_bytes: int, required: bool = True) -> str:
    """Printable, no whitespace, bounded: these strings end up in lists, logs
    and metric labels."""
    if not value:
        if required:
            raise InvalidArgumentError(field, "must not be empty")
        return value
    size = len(value.encode())
    if size > max_bytes:
        raise InvalidArgumentError(field, f"is {size} bytes long, the limit is {max_bytes}")
    # Every whitespace character but " " is unprintable, so this is
    # any(not ch.isprintable() or ch.isspace() for ch in value), in C.
    if not value.isprintable() or " " in value:
        raise InvalidArgumentError(field, "must not contain whitespace or control characters")
    return value


def check_balance_name(name: str) -> str:
    """The name a grpclb client sends in InitialLoadBalanceRequest."""
    return check_text("initial_request.name", name, max_bytes=MAX_BALANCE_NAME_BYTES)


def parse_ip(field: str, value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise InvalidArgumentError(field, f"{value!r} is not an IPv4 or IPv6 address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidArgumentError(field, f"{ip} cannot be connected to")
    return ip


def check_port(field: str, port: int) -> int:
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidArgumentError(field, f"{port} is outside 1-65535")
    return port


def check_weight(field: str, weight: int, *, unset_allowed: bool = False) -> int:
    """A static weight, 1-MAX_STATIC_WEIGHT; with `unset_allowed` also 0
    (proto3's "unset" in a heartbeat, which means 1)."""
    if unset_allowed and weight == 0 and not isinstance(weight, bool):
        return weight
    if isinstance(weight, bool) or not 1 <= weight <= MAX_STATIC_WEIGHT:
        raise InvalidArgumentError(field, f"{weight} is outside 1-{MAX_STATIC_WEIGHT}")
    return weight


def _check_rate(field: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(field, f"must be a finite number >= 0, not {value}")
    return value


def parse_load(
    *,
    cpu_utilization: float | None,
    requests_per_second: float | None,
    errors_per_second: float | None,
    in_flight: int | None,
) -> LoadReport:
    return LoadReport(
        cpu_utilization=_check_rate("load.cpu_utilization", cpu_utilization),
        requests_per_second=_check_rate("load.requests_per_second", requests_per_second),
        errors_per_second=_check_rate("load.errors_per_second", errors_per_second),
        in_flight=in_flight,
    )


def parse_state(value: int) -> BackendState:
    try:
        return _STATES[value]
    except KeyError:
        raise InvalidArgumentError("state", f"unknown value {value}") from None


def parse_registration(
    *,
    service: str,
    instance_id: str,
    ip: str,
    port: int,
    weight: int = 0,
    zone: str = "",
    labels: Mapping[str, str] | None = None,
    load: LoadReport | None = None,
    state: int = 0,
    requested_ttl: float | None = None,
) -> Registration:
    """Builds a Registration from heartbeat fields; weight 0 and state 0 are
    proto3's "unset" and mean the defaults (1 and SERVING)."""
    check_text("service", service, max_bytes=MAX_SERVICE_BYTES)
    parsed_ip = parse_ip("ip", ip)
    check_port("port", port)
    check_text("instance_id", instance_id, max_bytes=MAX_INSTANCE_ID_BYTES, required=False)
    check_text("zone", zone, max_bytes=MAX_ZONE_BYTES, required=False)
    check_weight("weight", weight, unset_allowed=True)
    labels = dict(labels or {})
    if len(labels) > MAX_LABELS:
        raise InvalidArgumentError(
            "labels", f"has {len(labels)} entries, the limit is {MAX_LABELS}"
        )
    for key, value in labels.items():
        check_text("labels", key, max_bytes=MAX_LABEL_KEY_BYTES)
        if len(value.encode()) > MAX_LABEL_VALUE_BYTES:
            raise InvalidArgumentError(
                f"labels[{key}]", f"value is longer than {MAX_LABEL_VALUE_BYTES} bytes"
            )
    if requested_ttl is not None and (not math.isfinite(requested_ttl) or requested_ttl < 0):
        raise InvalidArgumentError("requested_ttl", f"must be >= 0, not {requested_ttl}")
    parsed_state = parse_state(state)
    return Registration(
        service=service,
        # An instance without an id is identified by its address.
        instance_id=instance_id or format_address(parsed_ip, port),
        ip=parsed_ip,
        port=port,
        weight=weight or 1,
        zone=zone,
        labels=MappingProxyType(labels),
        load=load or LoadReport(),
        state=parsed_state,
        requested_ttl=requested_ttl or None,
    )
