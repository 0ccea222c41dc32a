"""The list+watch loop of one Kubernetes Service, on its own daemon thread
(client-go's reflector; the protocol is described in
`lbserver.discovery.kubernetes`)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from lbserver.discovery import Endpoint, WatchedService
from lbserver.discovery._failures import FailureStreak
from lbserver.discovery._kube_client import KubernetesModules, describe_error
from lbserver.discovery._slices import SERVICE_NAME_LABEL, endpoints_from_slices, slice_name
from lbserver.logs import get_logger

__all__ = ["HTTP_GONE", "Report", "Reporter", "ServiceWatcher", "WatchContext", "WatchOptions"]

HTTP_GONE: Final = 410

_log = get_logger("lbserver.discovery.kubernetes")

# A reported endpoint set, or None for "unknown".
Report = frozenset[Endpoint] | None
# How a watcher thread hands a report to the source: (its stop flag, service, report).
Reporter = Callable[[threading.Event, str, Report], None]


@dataclass(frozen=True, slots=True)
class WatchOptions:
    """The tuning of every watcher of a source (see KubernetesEndpointSource)."""

    watch_timeout: int
    read_timeout: float
    connect_timeout: float
    list_timeout: float


@dataclass(frozen=True, slots=True)
class WatchContext:
    """What the watchers of one running source share."""

    kube: KubernetesModules
    api: Any  # kubernetes.client.DiscoveryV1Api
    options: WatchOptions
    stopping: threading.Event
    report: Reporter


class _GoneError(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class ServiceWatcher:
    """The list+watch loop of one Kubernetes Service, on its own daemon thread."""

    def __init__(
        self,
        namespace: str,
        name: str,
        services: Sequence[WatchedService],
        *,
        context: WatchContext,
        failures: FailureStreak,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._services = tuple(services)
        self._kube = context.kube
        self._api = context.api
        self._opts = context.options
        self._stopping = context.stopping
        self._report = context.report
        self._failures = failures
        self._selector = f"{SERVICE_NAME_LABEL}={name}"
        self._log = _log.bind(namespace=namespace, kubernetes_service=name)
        self._slices: dict[str, Mapping[str, Any]] = {}
        self._resource_version: str | None = None
        self._synced = False  # a LIST succeeded since the last unknown report
        self._reported: dict[str, Report] = {}
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
            name = slice_name(item)
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
        watch = self._kube.watch.Watch(return_type="object")
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
        except self._kube.client.ApiException as exc:
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
        self._watch_ended(time.monotonic() - started, events, error, gone)

    def _watch_ended(
        self, lasted: float, events: int, error: BaseException | None, gone: bool
    ) -> None:
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
        name = slice_name(obj)
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

    def _send(self, service: str, value: Report) -> None:
        if service in self._reported and self._reported[service] == value:
            return
        self._reported[service] = value
        self._report(self._stopping, service, value)

    # -- failures and backoff

    def _succeeded(self) -> None:
        failures = self._failures.succeeded()
        if failures:
            self._log.info("kubernetes api reachable again", failures=failures)

    def _failed(self, exc: BaseException, during: str) -> None:
        failure = self._failures.failed(time.monotonic())
        details = {
            "during": during,
            "error": describe_error(exc),
            "backoff_seconds": round(failure.delay, 3),
        }
        if failure.first:
            self._log.warning("kubernetes api error, retrying with backoff", **details)
        else:
            self._log.debug("kubernetes api still failing", failures=failure.number, **details)
        if self._failures.unknown(failure, ever_reported=bool(self._reported)):
            if any(self._reported.get(s.service) is not None for s in self._services):
                self._log.warning(
                    "kubernetes endpoints unknown: api failing",
                    failing_seconds=round(failure.failing_seconds, 1),
                )
            # Relist on recovery: state reported as unknown is re-sent whole.
            self._synced = False
            for svc in self._services:
                self._send(svc.service, None)
        self._stopping.wait(failure.delay)


def _json_object(data: bytes | str) -> Mapping[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value
