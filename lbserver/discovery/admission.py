"""Admission: which backends a service's discovery mode lets into its list.

Per service, `heartbeat` (the default) takes every registrar's heartbeat;
`kubernetes` takes its members from the Service's ready endpoints and refuses
heartbeats; `both` takes heartbeats only from addresses that are ready,
non-terminating endpoints, and lists only those. This holds the endpoints last
reported per service and answers those questions; the Balancer applies them.
No I/O and no clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import TypeVar

from lbserver.discovery import DiscoveryMode, Endpoint
from lbserver.domain.model import Backend, Registration
from lbserver.domain.validation import parse_registration
from lbserver.errors import RegistrationRefusedError

_B = TypeVar("_B", bound=Backend)


class Admission:
    def __init__(self, modes: Mapping[str, DiscoveryMode] | None = None) -> None:
        self._modes = dict(modes or {})
        # The endpoints last reported per service (absent: not known yet).
        self._endpoints: dict[str, frozenset[Endpoint]] = {}

    def mode(self, service: str) -> DiscoveryMode:
        return self._modes.get(service, "heartbeat")

    def check_heartbeat(self, registration: Registration) -> None:
        """RegistrationRefusedError when the service's mode refuses this
        heartbeat."""
        mode = self.mode(registration.service)
        if mode == "heartbeat":
            return
        if mode == "kubernetes":
            raise RegistrationRefusedError(
                "failed_precondition",
                f"service {registration.service!r} takes its members from Kubernetes "
                "(discovery mode 'kubernetes'); heartbeats are not accepted",
            )
        endpoints = self._endpoints.get(registration.service)
        if endpoints is None:
            raise RegistrationRefusedError(
                "unavailable",
                f"the Kubernetes endpoints of service {registration.service!r} are not known "
                "yet; retry",
            )
        if (str(registration.ip), registration.port) not in _ready_addresses(endpoints):
            raise RegistrationRefusedError(
                "permission_denied",
                f"{registration.address} is not a ready endpoint of the Kubernetes Service "
                f"behind {registration.service!r}",
            )

    def set_endpoints(self, service: str, endpoints: frozenset[Endpoint] | None) -> bool:
        """Records a service's endpoints; whether they matter to its list.
        None (the API cannot tell) keeps what was known: a control-plane
        outage must not empty lists. A heartbeat-mode service ignores them."""
        if endpoints is None or self.mode(service) == "heartbeat":
            return False
        self._endpoints[service] = endpoints
        return True

    def members(self, service: str) -> dict[str, Registration]:
        """In `kubernetes` mode, the registrations its ready, non-terminating
        endpoints stand for, by instance id (the pod's name)."""
        wanted: dict[str, Registration] = {}
        for endpoint in self._endpoints.get(service, frozenset()):
            if not endpoint.ready or endpoint.terminating:
                continue
            registration = parse_registration(
                service=service,
                instance_id=endpoint.pod or "",
                ip=endpoint.ip,
                port=endpoint.port,
                zone=endpoint.zone,
            )
            wanted[registration.instance_id] = registration
        return wanted

    def eligible(self, service: str, backends: Sequence[_B]) -> list[_B]:
        """In `both` mode only heartbeating backends that are also ready,
        non-terminating endpoints get calls."""
        if self.mode(service) != "both":
            return list(backends)
        ready = _ready_addresses(self._endpoints.get(service, frozenset()))
        return [b for b in backends if (str(b.registration.ip), b.registration.port) in ready]


def _ready_addresses(endpoints: frozenset[Endpoint]) -> set[tuple[str, int]]:
    return {
        (str(ipaddress.ip_address(e.ip)), e.port)
        for e in endpoints
        if e.ready and not e.terminating
    }
