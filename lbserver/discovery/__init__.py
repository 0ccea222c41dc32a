"""Membership sources besides heartbeats. The balancer consumes them through
one small interface: a source calls `EndpointsCallback(service, endpoints)`
whenever the endpoints of a watched service change, and `None` when it can no
longer tell (the API server is unreachable), so the balancer can keep what it
knew instead of emptying lists on a control-plane outage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

DiscoveryMode = Literal["heartbeat", "kubernetes", "both"]
DISCOVERY_MODES: tuple[DiscoveryMode, ...] = ("heartbeat", "kubernetes", "both")

# ScrapeSettings.cpus: each pod's CPUs are its scraped container's CPU limit.
CPU_LIMIT: Final = "limit"


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
    official SkyWalking chart's OAP pods, with SW_TELEMETRY=prometheus).

    `port` is a number, or the name of a container port of the member's pod;
    `cpus` a number, or CPU_LIMIT for the CPU limit of the container serving
    the port (else the pod's first container). Either of those forms makes
    the scraper read each member's pod once (RBAC get on pods)."""

    port: int | str
    path: str = "/metrics"
    interval: float = 10.0
    timeout: float = 2.0
    # CPUs each pod may use: utilization = CPU seconds per second / cpus.
    cpus: float | Literal["limit"] = 1.0
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
