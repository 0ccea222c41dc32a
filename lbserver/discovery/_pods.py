"""What the load scraper needs to know of a member's pod: the scrape port when
it is given by name, and the CPU limit of the container that serves it.

A pod is read once, when the scraper first sees it (a member is a pod name and
its IP: a new pod, or a pod re-created under the same name with a new IP, is a
new target and is read again). Container ports and resource limits cannot
change in a running pod, so one GET per pod is all the API load this adds: it
needs RBAC `get` on `pods` in the watched namespaces, and only when a scrape
block names its port or asks for `cpus: limit`.

Ports are looked up in the pod's containers, not in the EndpointSlice: the
Service in front of OAP (apache/skywalking-helm) exposes the gRPC and REST
ports, while the telemetry port is a container port only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lbserver.discovery._kube_client import load_kubernetes, make_api_client
from lbserver.registrar import parse_cpus

__all__ = ["PodReader", "PodScrapeFacts", "PodSource", "scrape_facts"]

# Seconds to connect and to read one pod: a slow API server delays that pod's
# first scrape, never the others (each read runs in its own task).
_CONNECT_TIMEOUT = 5.0
_READ_TIMEOUT = 10.0


class PodSource(Protocol):
    """Reads one pod as the API's JSON object (blocking; run in a thread)."""

    def read(self, namespace: str, name: str) -> Mapping[str, Any]: ...


class PodReader:
    """A `PodSource` over the Kubernetes API: GET /api/v1/namespaces/NS/pods/NAME.

    The API client is made on first use (in the reading thread), from
    `kubeconfig` or the in-cluster configuration as discovery makes it."""

    def __init__(self, api_client: Any = None, *, kubeconfig: str | None = None) -> None:
        self._api_client = api_client
        self._kubeconfig = kubeconfig
        # Pods are read from several threads at once: one client for them all.
        self._lock = threading.Lock()

    def read(self, namespace: str, name: str) -> Mapping[str, Any]:
        kube = load_kubernetes()
        with self._lock:
            if self._api_client is None:
                self._api_client = make_api_client(self._kubeconfig)
            api_client = self._api_client
        response = kube.client.CoreV1Api(api_client).read_namespaced_pod(
            name,
            namespace,
            # The raw JSON: the few fields read here need no model objects.
            _preload_content=False,
            _request_timeout=(_CONNECT_TIMEOUT, _READ_TIMEOUT),
        )
        pod: Mapping[str, Any] = json.loads(response.data)
        return pod


@dataclass(frozen=True, slots=True)
class PodScrapeFacts:
    uid: str
    # The scrape port's number; None when a named port is not in the pod.
    port: int | None
    # The chosen container's CPU limit in CPUs; None when it has none.
    cpu_limit: float | None
    container: str


def scrape_facts(pod: Mapping[str, Any], port: int | str) -> PodScrapeFacts:
    """The container serving `port` (a number or a container port's name),
    else the pod's first container; its port number and CPU limit."""
    metadata = pod.get("metadata") or {}
    containers: Sequence[Mapping[str, Any]] = (pod.get("spec") or {}).get("containers") or ()
    number = port if isinstance(port, int) else None
    chosen: Mapping[str, Any] | None = None
    for container in containers:
        found = _port_in(container, port)
        if found is not None:
            chosen, number = container, found
            break
    if chosen is None and containers:
        chosen = containers[0]
    limits = ((chosen or {}).get("resources") or {}).get("limits") or {}
    return PodScrapeFacts(
        uid=str(metadata.get("uid") or ""),
        port=number,
        cpu_limit=_cpus(limits.get("cpu")),
        container=str((chosen or {}).get("name") or ""),
    )


def _port_in(container: Mapping[str, Any], port: int | str) -> int | None:
    for entry in container.get("ports") or ():
        number = entry.get("containerPort")
        if not isinstance(number, int) or (entry.get("protocol") or "TCP") != "TCP":
            continue
        if (entry.get("name") == port) if isinstance(port, str) else (number == port):
            return number
    return None


def _cpus(quantity: Any) -> float | None:
    if quantity is None:
        return None
    try:
        return parse_cpus(str(quantity))
    except ValueError:
        # A quantity the parser does not read ("2000000n"): as if unlimited.
        return None
