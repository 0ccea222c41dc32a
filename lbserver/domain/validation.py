"""Validation of what clients and backends send. Each check raises
InvalidArgumentError naming the offending field, before any state is touched.

The registrar (lbserver.registrar) runs the same checks on what it will send,
so a registration the balancer would refuse fails at construction instead."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from types import MappingProxyType

from lbserver.domain.model import BackendState, IPAddress, LoadReport, Registration, format_address
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


def parse_ip(field: str, value: str) -> IPAddress:
    """An address something can connect to: not unspecified, not multicast
    (nor the IPv4-mapped IPv6 form of either). Whether the balancer lets
    clients connect to it is check_backend_address's business."""
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise InvalidArgumentError(field, f"{value!r} is not an IPv4 or IPv6 address") from None
    _check_connectable(field, ip)
    return ip


def _unmapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped IPv6 one (::ffff:a.b.c.d, which a
    dual-stack socket connects to as a.b.c.d); any other address as it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _connectable(ip: IPAddress) -> bool:
    target = _unmapped(ip)
    return not (target.is_unspecified or target.is_multicast)


def _check_connectable(field: str, ip: IPAddress) -> None:
    if not _connectable(ip):
        raise InvalidArgumentError(field, f"{ip} cannot be connected to")


# Where a balancer must never send clients (check_backend_address), beyond
# what nothing can connect to at all (_connectable).
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
# ::a.b.c.d, deprecated by RFC 4291 (the IPv4-mapped form replaced it); :: and
# ::1 are in it too, and are refused or allowed for their own reasons.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# RFC 6052's well-known NAT64 prefix: 64:ff9b::a.b.c.d reaches a.b.c.d through
# the network's NAT64 gateway, so the IPv4 address inside is what is checked.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Instance metadata services outside link-local: AWS's IPv6 endpoint (Nitro)
# and Alibaba Cloud's. 169.254.169.254 (AWS, GCP, Azure, OCI...) and AWS ECS's
# 169.254.170.2 are link-local already.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {ipaddress.IPv6Address("fd00:ec2::254"), ipaddress.IPv4Address("100.100.100.200")}
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches (IPv4-mapped, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _refusal(ip: IPAddress, allow_loopback: bool) -> str | None:
    """Why clients must not be sent to `ip`; None when they may."""
    if not _connectable(ip):
        return "cannot be connected to"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            return "has a zone index (%zone), which names an interface of one host"
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner = _refusal(embedded, allow_loopback)
            return None if inner is None else f"reaches {embedded}, which {inner}"
        if ip in _IPV4_COMPATIBLE and not ip.is_loopback:
            return "is a deprecated IPv4-compatible address (RFC 4291)"
    if ip.is_link_local:
        return (
            "is link-local (169.254.0.0/16, fe80::/10): each client would reach "
            "a host on its own link, such as the cloud metadata service 169.254.169.254"
        )
    if ip in METADATA_ADDRESSES:
        return "is a cloud instance metadata service"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip == _BROADCAST:
            return "is the broadcast address"
        if ip in _THIS_NETWORK:
            return 'is in 0.0.0.0/8 ("this network", RFC 1122), never a destination'
    if ip.is_loopback and not allow_loopback:
        return (
            "is a loopback address: each client would connect to itself "
            "(this balancer does not allow loopback backends)"
        )
    return None


def check_backend_address(ip: IPAddress, *, allow_loopback: bool, field: str = "ip") -> None:
    """The balancer's policy for the address of a backend it will list: the
    address every client is sent to. InvalidArgumentError naming `field`
    unless it is one clients may be sent to; refused are addresses nothing can
    connect to (unspecified, multicast: parse_ip's own check), link-local
    (169.254.0.0/16 with the cloud metadata service, fe80::/10), 0.0.0.0/8,
    the broadcast address, the metadata services outside link-local
    (METADATA_ADDRESSES), loopback (127.0.0.0/8, ::1) unless `allow_loopback`
    (tests and single-host setups), and the IPv4-mapped (::ffff:a.b.c.d) and
    NAT64 (64:ff9b::a.b.c.d) forms of all of these.

    Accepted: private (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7),
    public, and 240.0.0.0/4 but 255.255.255.255 (GKE can give pods those).

    The registrar does not run this (parse_registration stays the same on
    both sides): only the balancer knows whether it allows loopback. Pure
    and cheap; the balancer runs it on every heartbeat."""
    _check_connectable(field, ip)  # parse_ip's check, with its message
    reason = _refusal(ip, allow_loopback)
    if reason is not None:
        raise InvalidArgumentError(field, f"{ip} {reason}")


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
