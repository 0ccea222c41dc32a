"""Membership from the Kubernetes API: a list+watch of the EndpointSlices of
configured Services, with the official (synchronous) `kubernetes` client.

One daemon thread per watched Kubernetes Service (namespace + name) does what
client-go's reflector does:

1. LIST `discovery.k8s.io/v1` EndpointSlices with the label selector
   `kubernetes.io/service-name=<svc>`, replace the whole per-slice state with the
   result and remember the list's `metadata.resourceVersion`;
2. WATCH from that resourceVersion (`allowWatchBookmarks`, a server-side
   `timeoutSeconds`), applying ADDED/MODIFIED/DELETED to the per-slice state and
   advancing the resourceVersion on every event, BOOKMARK included;
3. a watch that ends normally (the server's timeout) is reopened from the last
   resourceVersion; so is a broken one (connection dropped, HTTP 5xx, an ERROR
   event), after a jittered exponential backoff; 410 Gone (an ERROR event with
   code 410, or an HTTP 410) means the resourceVersion is too old: LIST again.

After every change the slices of a Service are merged and, for every
`WatchedService` of that Kubernetes Service, reduced to the endpoints of its
port; the callback runs on the event loop thread, and only when a service's
endpoint set differs from the last one reported. `None` is reported when the
source cannot tell: the first LIST failed, or the API has been failing for
`unknown_after` seconds; the next successful LIST reports the endpoints again.

This module is the source the server starts; its parts live beside it:
`_slices` (EndpointSlices -> endpoints, pure), `_watcher` (the loop of one
Service's thread), `_failures` (backoff and when endpoints become unknown) and
`_kube_client` (the optional `kubernetes` package, loaded only here, and the
API client).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lbserver.discovery import EndpointsCallback, WatchedService
from lbserver.discovery._failures import FailureStreak, watch_backoff
from lbserver.discovery._kube_client import (
    INSTALL_HINT,
    KubernetesConfigError,
    load_kubernetes,
    make_api_client,
)
from lbserver.discovery._slices import SERVICE_NAME_LABEL, endpoints_from_slices
from lbserver.discovery._watcher import (
    HTTP_GONE,
    Report,
    ServiceWatcher,
    WatchContext,
    WatchOptions,
)
from lbserver.errors import ConfigError, UsageError
from lbserver.logs import get_logger

if TYPE_CHECKING:
    from kubernetes import client as k8s_client

__all__ = [
    "HTTP_GONE",
    "INSTALL_HINT",
    "SERVICE_NAME_LABEL",
    "KubernetesConfigError",
    "KubernetesEndpointSource",
    "KubernetesSettingsError",
    "endpoints_from_slices",
    "make_api_client",
]

_log = get_logger("lbserver.discovery.kubernetes")


class KubernetesSettingsError(ConfigError, ValueError):
    """An invalid argument of KubernetesEndpointSource (a setting, or a service
    watched twice). Also a ValueError, as it was before the exception tree."""


class KubernetesEndpointSource:
    """Watches the EndpointSlices of `services` and reports their endpoints.

    Implements `EndpointSource`: `await run()` runs until cancelled (or until
    `stop()`), calling `callback(service, endpoints | None)` on the event loop
    thread that runs it. The API client is `api_client`, else one made from
    `kubeconfig`, else the in-cluster configuration (see `make_api_client`; a
    missing configuration, or a missing `kubernetes` package, raises
    `KubernetesConfigError` here, at construction).

    Tuning (defaults suit a real cluster; tests shrink them):
    - `watch_timeout`: the server-side `timeoutSeconds` of each watch, after which
      it is reopened from the last resourceVersion;
    - `connect_timeout`, `list_timeout`: client-side timeouts of requests; a
      watch's read timeout is `watch_timeout + read_slack` (bookmarks and events
      normally arrive well within it), so no thread stays blocked on a dead
      connection;
    - `backoff_initial`, `backoff_max`: retry delays after errors (doubling,
      jittered to between half and all of the nominal delay);
    - `unknown_after`: seconds of uninterrupted failure after which a service that
      was known is reported as `None`.
    """

    def __init__(
        self,
        services: Sequence[WatchedService],
        callback: EndpointsCallback,
        *,
        api_client: k8s_client.ApiClient | None = None,
        kubeconfig: str | None = None,
        watch_timeout: int = 290,
        read_slack: float = 30.0,
        connect_timeout: float = 10.0,
        list_timeout: float = 60.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        unknown_after: float = 60.0,
        stop_timeout: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if watch_timeout < 1:
            raise KubernetesSettingsError("watch_timeout must be at least 1 second")
        try:
            self._backoff = watch_backoff(backoff_initial, backoff_max)
        except ValueError as exc:  # Backoff's own check, in the options' names
            raise KubernetesSettingsError(
                f"backoff_initial={backoff_initial}, backoff_max={backoff_max}: {exc}"
            ) from exc
        seen: set[str] = set()
        for svc in services:
            if svc.service in seen:
                raise KubernetesSettingsError(f"service {svc.service!r} is watched twice")
            seen.add(svc.service)
        # Here, not at import: a balancer without Kubernetes discovery runs
        # without the package, and one configured for it fails at start.
        self._kube = load_kubernetes()
        self._callback = callback
        self._owns_client = api_client is None
        self._api_client = api_client if api_client is not None else make_api_client(kubeconfig)
        self._stop_timeout = stop_timeout
        self._unknown_after = unknown_after
        self._rng = rng or random.Random()
        self._options = WatchOptions(
            watch_timeout=watch_timeout,
            read_timeout=watch_timeout + read_slack,
            connect_timeout=connect_timeout,
            list_timeout=list_timeout,
        )
        groups: dict[tuple[str, str], list[WatchedService]] = {}
        for svc in services:
            groups.setdefault((svc.namespace, svc.kubernetes_service), []).append(svc)
        self._groups = groups
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._watchers: list[ServiceWatcher] = []
        self._wake: asyncio.Event | None = None

    @property
    def api_client(self) -> k8s_client.ApiClient:
        return self._api_client

    async def run(self) -> None:
        if self._loop is not None:
            raise UsageError("KubernetesEndpointSource.run() is already running")
        self._loop = asyncio.get_running_loop()
        self._stopping = threading.Event()
        self._wake = asyncio.Event()
        context = WatchContext(
            kube=self._kube,
            api=self._kube.client.DiscoveryV1Api(self._api_client),
            options=self._options,
            stopping=self._stopping,
            report=self._report_threadsafe,
        )
        self._watchers = [
            ServiceWatcher(
                namespace,
                name,
                services,
                context=context,
                failures=FailureStreak(self._backoff, self._unknown_after, self._rng),
            )
            for (namespace, name), services in self._groups.items()
        ]
        try:
            for watcher in self._watchers:
                watcher.start()
            await self._wake.wait()
        finally:
            await self._shutdown()

    def resource_version(self, namespace: str, kubernetes_service: str) -> str | None:
        """Where the watch of that Service would resume (None before a list,
        or when not running); for status pages and tests."""
        for watcher in self._watchers:
            if (watcher.namespace, watcher.name) == (namespace, kubernetes_service):
                return watcher.resource_version
        return None

    def stop(self) -> None:
        """Make `run()` return (call on the event loop thread)."""
        if self._wake is not None:
            self._wake.set()

    def close(self) -> None:
        """Release the API client if this source made it."""
        if self._owns_client:
            client: Any = self._api_client
            client.close()

    async def _shutdown(self) -> None:
        self._stopping.set()
        deadline = time.monotonic() + self._stop_timeout
        try:
            while True:
                alive = [w for w in self._watchers if w.is_alive()]
                if not alive or time.monotonic() >= deadline:
                    break
                # Repeated: a watch whose response arrived after the last call
                # has a socket to shut down only now.
                for watcher in alive:
                    watcher.interrupt()
                await asyncio.sleep(0.02)
            for watcher in alive:
                _log.warning(
                    "kubernetes watcher still busy after stop",
                    namespace=watcher.namespace,
                    kubernetes_service=watcher.name,
                )
        finally:
            self._watchers = []
            self._loop = None
            self._wake = None

    # -- thread -> loop

    def _report_threadsafe(self, stopping: threading.Event, service: str, value: Report) -> None:
        loop = self._loop
        if loop is None or stopping.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(self._deliver, stopping, service, value)

    def _deliver(self, stopping: threading.Event, service: str, value: Report) -> None:
        if stopping.is_set():
            return
        try:
            self._callback(service, value)
        except Exception:
            _log.exception("kubernetes endpoints callback failed", service=service)
