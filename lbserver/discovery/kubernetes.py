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
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from lbserver.discovery import Endpoint, EndpointsCallback, WatchedService
from lbserver.errors import ConfigError

__all__ = [
    "SERVICE_NAME_LABEL",
    "KubernetesConfigError",
    "KubernetesEndpointSource",
    "endpoints_from_slices",
    "make_api_client",
]

SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
HTTP_GONE: Final = 410

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

# The kubernetes package is typed in some releases and not in others; go through
# Any so that `mypy --strict` reads this module the same way against either.
_config: Any = k8s_config
_watch: Any = k8s_watch

# A reported endpoint set, or None for "unknown".
_Report = frozenset[Endpoint] | None
# How a watcher thread hands a report to the source: (its stop flag, service, report).
_Reporter = Callable[[threading.Event, str, _Report], None]


class KubernetesConfigError(ConfigError):
    """No usable Kubernetes API configuration (in-cluster or kubeconfig)."""


# ---------------------------------------------------------------------------
# API client configuration


def make_api_client(kubeconfig: str | None) -> k8s_client.ApiClient:
    """An ApiClient for the Kubernetes API.

    With `kubeconfig`, that file (its current context). Without, the in-cluster
    configuration (the pod's service account); outside a cluster, the default
    kubeconfig (`$KUBECONFIG`, else `~/.kube/config`) when one exists, as kubectl
    does. Raises `KubernetesConfigError` saying what was tried when nothing works.
    """
    if kubeconfig is not None:
        try:
            loaded: k8s_client.ApiClient = _config.new_client_from_config(config_file=kubeconfig)
            return loaded
        except (_config.ConfigException, OSError, ValueError, TypeError) as exc:
            raise KubernetesConfigError(
                f"cannot load the kubeconfig {kubeconfig!r}: {exc}"
            ) from exc
    configuration = k8s_client.Configuration()
    try:
        _config.load_incluster_config(client_configuration=configuration)
    except _config.ConfigException as incluster_exc:
        default = _default_kubeconfig()
        if default is None:
            raise KubernetesConfigError(
                "no Kubernetes API configuration: not running in a cluster "
                f"({incluster_exc}) and no kubeconfig given (set the kubeconfig "
                "option, or $KUBECONFIG)"
            ) from incluster_exc
        try:
            fallback: k8s_client.ApiClient = _config.new_client_from_config(config_file=default)
            return fallback
        except (_config.ConfigException, OSError, ValueError, TypeError) as exc:
            raise KubernetesConfigError(
                f"not running in a cluster ({incluster_exc}), and the default "
                f"kubeconfig {default!r} cannot be loaded: {exc}"
            ) from exc
    return k8s_client.ApiClient(configuration)


def _default_kubeconfig() -> str | None:
    env = os.environ.get("KUBECONFIG", "")
    candidates = [p for p in env.split(os.pathsep) if p] or [os.path.expanduser("~/.kube/config")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------------------
# EndpointSlices -> endpoints (pure)


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
    ordered = sorted(slices, key=lambda s: str((s.get("metadata") or {}).get("name", "")))
    for slice_ in ordered:
        if slice_.get("addressType") not in ("IPv4", "IPv6"):
            continue
        port = _port_of(slice_, port_name)
        if port is None:
            continue
        for raw in slice_.get("endpoints") or ():
            conditions = raw.get("conditions") or {}
            target = raw.get("targetRef") or {}
            pod = str(target.get("name") or "") if target.get("kind") == "Pod" else ""
            for address in raw.get("addresses") or ():
                try:
                    ip = str(ipaddress.ip_address(address))
                except ValueError:
                    continue
                endpoint = Endpoint(
                    ip=ip,
                    port=port,
                    ready=_condition(conditions, "ready", True),
                    serving=_condition(conditions, "serving", True),
                    terminating=_condition(conditions, "terminating", False),
                    zone=str(raw.get("zone") or ""),
                    pod=pod,
                )
                key = (ip, port)
                current = chosen.get(key)
                if current is None or _rank(endpoint) > _rank(current):
                    chosen[key] = endpoint
    return frozenset(chosen.values())


# ---------------------------------------------------------------------------
# The source


class _GoneError(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class KubernetesEndpointSource:
    """Watches the EndpointSlices of `services` and reports their endpoints.

    Implements `EndpointSource`: `await run()` runs until cancelled (or until
    `stop()`), calling `callback(service, endpoints | None)` on the event loop
    thread that runs it. The API client is `api_client`, else one made from
    `kubeconfig`, else the in-cluster configuration (see `make_api_client`; a
    missing configuration raises `KubernetesConfigError` here, at construction).

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
            raise ValueError("watch_timeout must be at least 1 second")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("backoff_initial must be > 0 and <= backoff_max")
        seen: set[str] = set()
        for svc in services:
            if svc.service in seen:
                raise ValueError(f"service {svc.service!r} is watched twice")
            seen.add(svc.service)
        self._callback = callback
        self._owns_client = api_client is None
        self._api_client = api_client if api_client is not None else make_api_client(kubeconfig)
        self._stop_timeout = stop_timeout
        self._options = _Options(
            watch_timeout=watch_timeout,
            read_timeout=watch_timeout + read_slack,
            connect_timeout=connect_timeout,
            list_timeout=list_timeout,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            unknown_after=unknown_after,
            rng=rng or random.Random(),
        )
        groups: dict[tuple[str, str], list[WatchedService]] = {}
        for svc in services:
            groups.setdefault((svc.namespace, svc.kubernetes_service), []).append(svc)
        self._groups = groups
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._watchers: list[_ServiceWatcher] = []
        self._wake: asyncio.Event | None = None

    @property
    def api_client(self) -> k8s_client.ApiClient:
        return self._api_client

    async def run(self) -> None:
        if self._loop is not None:
            raise RuntimeError("KubernetesEndpointSource.run() is already running")
        self._loop = asyncio.get_running_loop()
        self._stopping = threading.Event()
        self._wake = asyncio.Event()
        api = k8s_client.DiscoveryV1Api(self._api_client)
        self._watchers = [
            _ServiceWatcher(
                namespace=namespace,
                name=name,
                services=services,
                api=api,
                options=self._options,
                stopping=self._stopping,
                report=self._report_threadsafe,
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

    def _report_threadsafe(self, stopping: threading.Event, service: str, value: _Report) -> None:
        loop = self._loop
        if loop is None or stopping.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(self._deliver, stopping, service, value)

    def _deliver(self, stopping: threading.Event, service: str, value: _Report) -> None:
        if stopping.is_set():
            return
        try:
            self._callback(service, value)
        except Exception:
            _log.exception("kubernetes endpoints callback failed", service=service)


@dataclass(frozen=True, slots=True)
class _Options:
    watch_timeout: int
    read_timeout: float
    connect_timeout: float
    list_timeout: float
    backoff_initial: float
    backoff_max: float
    unknown_after: float
    rng: random.Random


class _ServiceWatcher:
    """The list+watch loop of one Kubernetes Service, on its own daemon thread."""

    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        services: Sequence[WatchedService],
        api: Any,  # k8s_client.DiscoveryV1Api
        options: _Options,
        stopping: threading.Event,
        report: _Reporter,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._services = tuple(services)
        self._api = api
        self._opts = options
        self._stopping = stopping
        self._report = report
        self._selector = f"{SERVICE_NAME_LABEL}={name}"
        self._log = _log.bind(namespace=namespace, kubernetes_service=name)
        self._slices: dict[str, Mapping[str, Any]] = {}
        self._resource_version: str | None = None
        self._synced = False  # a LIST succeeded since the last unknown report
        self._reported: dict[str, _Report] = {}
        self._failures = 0
        self._failing_since = 0.0
        self._gone_in_a_row = 0
        self._watch_lock = threading.Lock()
        self._watch: Any = None
        self._thread = threading.Thread(
            target=self._main, name=f"k8s-watch-{namespace}/{name}", daemon=True
        )

    @property
    def resource_version(self) -> str | None:
        return self._resource_version

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def interrupt(self) -> None:
        """Unblock a thread reading a watch (called from another thread)."""
        with self._watch_lock:
            active = self._watch
        if active is not None:
            with contextlib.suppress(Exception):
                active.stop()

    # -- the loop

    def _main(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._synced and not self._list():
                    continue
                self._watch_once()
        except Exception:  # a bug: say so; the service stays as last reported
            self._log.exception("kubernetes watcher crashed")

    def _list(self) -> bool:
        try:
            response = self._api.list_namespaced_endpoint_slice(
                self.namespace,
                label_selector=self._selector,
                _preload_content=False,
                _request_timeout=(self._opts.connect_timeout, self._opts.list_timeout),
            )
            try:
                body = _json_object(response.data)
            finally:
                with contextlib.suppress(Exception):
                    response.release_conn()
            items = body.get("items") or []
            metadata = body.get("metadata") or {}
            resource_version = metadata.get("resourceVersion")
            if not isinstance(items, list) or not resource_version:
                raise ValueError("EndpointSliceList without items or resourceVersion")
        except Exception as exc:
            if self._stopping.is_set():
                return False
            self._failed(exc, "list")
            return False
        slices: dict[str, Mapping[str, Any]] = {}
        for item in items:
            name = _slice_name(item)
            if name:
                slices[name] = item
        self._slices = slices
        self._resource_version = str(resource_version)
        self._synced = True
        self._succeeded()
        endpoints = self._publish()
        self._log.info(
            "kubernetes list done",
            slices=len(slices),
            endpoints=endpoints,
            resource_version=self._resource_version,
        )
        return True

    def _watch_once(self) -> None:
        watch = _watch.Watch(return_type="object")
        with self._watch_lock:
            self._watch = watch
        started = time.monotonic()
        events = 0
        error: BaseException | None = None
        gone = False
        try:
            if self._stopping.is_set():
                return
            stream = watch.stream(
                self._api.list_namespaced_endpoint_slice,
                self.namespace,
                label_selector=self._selector,
                resource_version=self._resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._opts.watch_timeout,
                _request_timeout=(self._opts.connect_timeout, self._opts.read_timeout),
            )
            for event in stream:
                if self._stopping.is_set():
                    break
                events += 1
                if events == 1:
                    self._succeeded()
                    self._gone_in_a_row = 0
                self._apply(event)
        except k8s_client.ApiException as exc:
            if exc.status == HTTP_GONE:
                gone = True
            else:
                error = exc
        except _GoneError:
            gone = True
        except Exception as exc:  # urllib3 ProtocolError, timeouts, bad JSON, ...
            error = exc
        finally:
            with self._watch_lock:
                self._watch = None
            with contextlib.suppress(Exception):
                watch.stop()
        if self._stopping.is_set():
            return
        lasted = time.monotonic() - started
        if gone:
            self._gone_in_a_row += 1
            self._synced = False
            self._log.info(
                "kubernetes watch expired (410 Gone), relisting",
                resource_version=self._resource_version,
            )
            if self._gone_in_a_row > 1:  # list, watch, 410 again: don't spin
                self._failed(_GoneError("410 Gone right after a list"), "watch")
            return
        if events == 0 and lasted >= 1.0:
            self._succeeded()  # the watch was open and simply quiet
        if error is not None:
            self._failed(error, "watch")
            return
        if events == 0 and lasted < 1.0:
            # Ended at once with nothing: a misbehaving server or proxy. Back
            # off instead of spinning.
            self._failed(RuntimeError("watch closed immediately"), "watch")
            return
        self._log.debug("kubernetes watch restarted", resource_version=self._resource_version)

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("raw_object", event.get("object"))
        if not isinstance(obj, Mapping):
            raise ValueError(f"watch event {kind!r} without an object")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if version:
                self._resource_version = str(version)
            return
        if kind == "ERROR":  # the client raises for these; kept for safety
            if obj.get("code") == HTTP_GONE:
                raise _GoneError()
            raise RuntimeError(f"watch error event: {obj.get('reason')}: {obj.get('message')}")
        name = _slice_name(obj)
        if not name:
            raise ValueError(f"watch event {kind!r} for an object without a name")
        if kind in ("ADDED", "MODIFIED"):
            self._slices[name] = obj
        elif kind == "DELETED":
            self._slices.pop(name, None)
        else:
            raise ValueError(f"unknown watch event type {kind!r}")
        if version:
            self._resource_version = str(version)
        self._publish()

    # -- reporting

    def _publish(self) -> int:
        total = 0
        slices = list(self._slices.values())
        for svc in self._services:
            endpoints = endpoints_from_slices(slices, svc.port_name)
            total += len(endpoints)
            self._send(svc.service, endpoints)
        return total

    def _send(self, service: str, value: _Report) -> None:
        if service in self._reported and self._reported[service] == value:
            return
        self._reported[service] = value
        self._report(self._stopping, service, value)

    # -- failures and backoff

    def _succeeded(self) -> None:
        if self._failures:
            self._log.info("kubernetes api reachable again", failures=self._failures)
        self._failures = 0

    def _failed(self, exc: BaseException, during: str) -> None:
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1:
            self._failing_since = now
        opts = self._opts
        nominal = min(opts.backoff_max, opts.backoff_initial * 2 ** min(self._failures - 1, 30))
        delay = nominal * (0.5 + 0.5 * opts.rng.random())
        if self._failures == 1:
            self._log.warning(
                "kubernetes api error, retrying with backoff",
                during=during,
                error=_describe(exc),
                backoff_seconds=round(delay, 3),
            )
        else:
            self._log.debug(
                "kubernetes api still failing",
                during=during,
                error=_describe(exc),
                failures=self._failures,
                backoff_seconds=round(delay, 3),
            )
        never_reported = not self._reported
        if never_reported or now - self._failing_since >= opts.unknown_after:
            if any(self._reported.get(s.service) is not None for s in self._services):
                self._log.warning(
                    "kubernetes endpoints unknown: api failing",
                    failing_seconds=round(now - self._failing_since, 1),
                )
            # Relist on recovery: state reported as unknown is re-sent whole.
            self._synced = False
            for svc in self._services:
                self._send(svc.service, None)
        self._stopping.wait(delay)


def _slice_name(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("name") or "")


def _json_object(data: bytes | str) -> Mapping[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _describe(exc: BaseException) -> str:
    if isinstance(exc, k8s_client.ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
