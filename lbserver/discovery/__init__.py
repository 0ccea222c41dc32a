"""Membership sources besides heartbeats. The balancer consumes them through
one small interface: a source calls `EndpointsCallback(service, endpoints)`
whenever the endpoints of a watched service change, and `None` when it can no
longer tell (the API server is unreachable), so the balancer can keep what it
knew instead of emptying lists on a control-plane outage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

DiscoveryMode = Literal["heartbeat", "kubernetes", "both"]
DISCOVERY_MODES: tuple[DiscoveryMode, ...] = ("heartbeat", "kubernetes", "both")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of a Kubernetes Service port, from an EndpointSlice."""

    ip: str
    port: int
    # EndpointSlice conditions: ready (serving and not terminating), serving,
    # terminating. A missing condition is reported as Kubernetes documents
    # (ready/serving: unknown → True; terminating: unknown → False).
    ready: bool
    serving: bool
    terminating: bool
    zone: str = ""
    pod: str = ""  # targetRef name when it is a Pod


@dataclass(frozen=True, slots=True)
class ScrapeSettings:
    """How the balancer reads the load of a service's Kubernetes members
    itself: every ready endpoint's Prometheus text endpoint at
    http://IP:port/path, every `interval` seconds, the metrics turned into a
    load report as the registrar's --load-url does (lbserver.registrar's
    PrometheusLoadProbe). For backends that run no registrar sidecar (the
    official SkyWalking chart's OAP pods, with SW_TELEMETRY=prometheus)."""

    port: int
    path: str = "/metrics"
    interval: float = 10.0
    timeout: float = 2.0
    # CPUs each pod may use: utilization = CPU seconds per second / cpus.
    cpus: float = 1.0
    cpu_metric: str | None = "process_cpu_seconds_total"
    requests_metric: str | None = None
    errors_metric: str | None = None
    inflight_metric: str | None = None


@dataclass(frozen=True, slots=True)
class WatchedService:
    """A lbserver service whose membership (also) comes from Kubernetes."""

    service: str  # the lbserver service name clients ask for
    namespace: str
    kubernetes_service: str  # metadata.name of the Kubernetes Service
    port_name: str  # the Service port's name (EndpointSlice ports[].name)
    mode: DiscoveryMode = "both"
    # None: the members' load is unknown (static weights) unless they heartbeat.
    scrape: ScrapeSettings | None = None


# (lbserver service, endpoints or None when unknown)
EndpointsCallback = Callable[[str, frozenset[Endpoint] | None], None]


class EndpointSource(Protocol):
    """Runs until cancelled, calling the callback on every change."""

    async def run(self) -> None: ...
