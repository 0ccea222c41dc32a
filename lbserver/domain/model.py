"""Value types shared by the domain modules."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class BackendState(enum.Enum):
    SERVING = "serving"
    # Alive and finishing its calls, but must receive no new ones.
    DRAINING = "draining"


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def format_address(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class LoadReport:
    """Load as a backend reports it; None means unknown (never zero)."""

    cpu_utilization: float | None = None
    requests_per_second: float | None = None
    errors_per_second: float | None = None
    in_flight: int | None = None


UNKNOWN_LOAD = LoadReport()


@dataclass(frozen=True, slots=True)
class Registration:
    """One validated heartbeat: what a backend says about itself."""

    service: str
    instance_id: str
    ip: IPAddress
    port: int
    weight: int = 1
    zone: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    load: LoadReport = UNKNOWN_LOAD
    state: BackendState = BackendState.SERVING
    # None asks for the balancer's default TTL.
    requested_ttl: float | None = None

    @property
    def address(self) -> str:
        return format_address(self.ip, self.port)


def with_load(registration: Registration, load: LoadReport) -> Registration:
    """`registration` with another load report (dataclasses.replace, at a
    fraction of its cost: this runs on every heartbeat)."""
    r = registration
    return Registration(
        r.service,
        r.instance_id,
        r.ip,
        r.port,
        r.weight,
        r.zone,
        r.labels,
        load,
        r.state,
        r.requested_ttl,
    )


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the load reports say a backend can take: requests per second per
    unit of utilization (gRFC A58), smoothed over reports."""

    value: float
    # Monotonic seconds of the newest report that fed it (expiry) and of the
    # first report of the current unbroken run (blackout).
    updated_at: float
    since: float


@dataclass(frozen=True, slots=True)
class Backend:
    """A member of a service, as the balancer tracks it."""

    registration: Registration
    token: str
    # Monotonic seconds: when the last heartbeat arrived and when it runs out.
    last_heartbeat: float
    expires_at: float
    # Wall-clock seconds of the last heartbeat, for operators only.
    last_heartbeat_wall: float
    ttl: float
    # Monotonic seconds this instance first registered (slow start).
    first_seen: float = 0.0
    capacity: Capacity | None = None

    @property
    def instance_id(self) -> str:
        return self.registration.instance_id

    @property
    def serving(self) -> bool:
        return self.registration.state is BackendState.SERVING
