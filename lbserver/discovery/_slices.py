"""EndpointSlices (raw JSON objects) -> endpoints: pure, no `kubernetes` import."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any, Final

from lbserver.discovery import Endpoint

__all__ = ["SERVICE_NAME_LABEL", "endpoints_from_slices", "slice_name"]

# The label an EndpointSlice names its Service with (the list's selector).
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"


def slice_name(obj: Mapping[str, Any]) -> str:
    """metadata.name of an object, "" when it has none."""
    metadata = obj.get("metadata") or {}
    return str(metadata.get("name") or "")


def endpoints_from_slices(
    slices: Iterable[Mapping[str, Any]], port_name: str
) -> frozenset[Endpoint]:
    """The endpoints of the port `port_name` across the EndpointSlices (raw JSON
    dicts) of one Service.

    Every IPv4/IPv6 address of every endpoint is one `Endpoint` (FQDN slices are
    skipped). Conditions default as Kubernetes documents for nil: ready and
    serving true, terminating false. An address listed by two slices (a slice
    being replaced) appears once, with its most available conditions (ready,
    then serving, then not terminating), as kube-proxy merges them.
    """
    chosen: dict[tuple[str, int], Endpoint] = {}
    for slice_ in sorted(slices, key=slice_name):
        if slice_.get("addressType") not in ("IPv4", "IPv6"):
            continue
        port = _port_of(slice_, port_name)
        if port is None:
            continue
        for raw in slice_.get("endpoints") or ():
            for endpoint in _endpoints_of(raw, port):
                key = (endpoint.ip, port)
                current = chosen.get(key)
                if current is None or _rank(endpoint) > _rank(current):
                    chosen[key] = endpoint
    return frozenset(chosen.values())


def _endpoints_of(raw: Mapping[str, Any], port: int) -> Iterable[Endpoint]:
    """One `Endpoint` per valid IP address of one slice endpoint."""
    conditions = raw.get("conditions") or {}
    target = raw.get("targetRef") or {}
    pod = str(target.get("name") or "") if target.get("kind") == "Pod" else ""
    for address in raw.get("addresses") or ():
        try:
            ip = str(ipaddress.ip_address(address))
        except ValueError:
            continue
        yield Endpoint(
            ip=ip,
            port=port,
            ready=_condition(conditions, "ready", True),
            serving=_condition(conditions, "serving", True),
            terminating=_condition(conditions, "terminating", False),
            zone=str(raw.get("zone") or ""),
            pod=pod,
        )


def _condition(conditions: Mapping[str, Any], name: str, default: bool) -> bool:
    value = conditions.get(name)
    return default if value is None else bool(value)


def _port_of(slice_: Mapping[str, Any], port_name: str) -> int | None:
    """The port number named `port_name` in a slice ("" matches an unnamed port)."""
    for port in slice_.get("ports") or ():
        if (port.get("name") or "") != port_name:
            continue
        if (port.get("protocol") or "TCP") != "TCP":
            continue
        number = port.get("port")
        if isinstance(number, int) and 0 < number < 65536:
            return number
    return None


def _rank(endpoint: Endpoint) -> tuple[bool, bool, bool]:
    return (endpoint.ready, endpoint.serving, not endpoint.terminating)
