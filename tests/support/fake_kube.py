"""A loopback fake of the Kubernetes API server, for EndpointSlice list/watch.

It speaks enough of the real protocol for the official `kubernetes` client:

- `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=k=v`
  answers an `EndpointSliceList` whose `metadata.resourceVersion` is the current
  one;
- the same with `watch=true` answers 200 with a chunked stream of
  newline-delimited JSON watch events: first every recorded change after the
  request's `resourceVersion` (all current objects as ADDED when it is missing
  or "0"; an ERROR 410 "Expired" event when it is older than the last
  compaction), then live changes until `timeoutSeconds` runs out (a clean end)
  or the test ends, drops or expires the watch.

A test changes the objects through `add_slice`, `modify_slice`, `set_conditions`
and `delete_slice` (each bumps the resourceVersion, records the change and pushes
it to every open watch that selects it) and injects trouble: `send_bookmark`,
`expire` (an ERROR 410 on open watches and a compacted history), `fail_next`
(HTTP error responses), `drop_watches` (connections cut mid-stream),
`end_watches` (clean ends), `set_down` (connections closed without an answer),
and `FakeKubeApiServer(serving=False)` + `start_serving()` (connections refused
until then). Every request is recorded with its query parameters.

Pods (for the load scraper's named ports and CPU limits): `add_pod` /
`delete_pod` keep Pod objects (built with `pod`), served by
`GET /api/v1/namespaces/{ns}/pods/{name}` (404 when there is none); no list or
watch of pods.

With `ssl_context` it serves HTTPS (as in-cluster clients expect), and with
`authorize` every request is first checked as the API server's authn/authz
would: the callback gets the Authorization header, the namespace and the verb
(`list` or `watch`) and returns None (allowed) or an HTTP status (401, 403).

    with FakeKubeApiServer() as kube:
        kube.add_slice("ns", endpoint_slice("oap-1", "oap", [endpoint("10.0.0.1")]))
        api = kube.api_client()
"""

from __future__ import annotations

import contextlib
import copy
import json
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

import kubernetes.client

from tests.support.started import Started

JsonObject = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_PATH = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices$")
_POD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")


# ---------------------------------------------------------------------------
# object builders


def endpoint(
    *addresses: str,
    ready: bool | None = True,
    serving: bool | None = True,
    terminating: bool | None = False,
    zone: str | None = None,
    pod: str | None = None,
    node: str | None = None,
) -> JsonObject:
    """One EndpointSlice endpoint; a condition given as None is left out (nil)."""
    conditions: JsonObject = {}
    for name, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            conditions[name] = value
    result: JsonObject = {"addresses": list(addresses), "conditions": conditions}
    if zone is not None:
        result["zone"] = zone
    if pod is not None:
        result["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "default"}
    if node is not None:
        result["nodeName"] = node
    return result


def endpoint_slice(
    name: str,
    service: str,
    endpoints: Sequence[JsonObject],
    *,
    ports: Sequence[tuple[str | None, int]] = (("grpc", 11800),),
    address_type: str = "IPv4",
    labels: Mapping[str, str] | None = None,
) -> JsonObject:
    """An EndpointSlice of `service` (a port given a None name has no name)."""
    port_list = _ports(ports, "port")
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "labels": {SERVICE_NAME_LABEL: service, **(labels or {})},
        },
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": port_list,
    }


def pod(
    name: str,
    *,
    uid: str | None = None,
    containers: Sequence[JsonObject] = (),
) -> JsonObject:
    """A Pod with the given containers (see `container`)."""
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": uid or f"uid-{name}"},
        "spec": {"containers": list(containers)},
    }


def container(
    name: str,
    *,
    ports: Sequence[tuple[str | None, int]] = (),
    cpu_limit: str | None = None,
) -> JsonObject:
    """A pod's container: its ports (a None name: unnamed) and CPU limit."""
    result: JsonObject = {"name": name, "image": "oap"}
    port_list = _ports(ports, "containerPort")
    if port_list:
        result["ports"] = port_list
    if cpu_limit is not None:
        result["resources"] = {"limits": {"cpu": cpu_limit}}
    return result


def _ports(ports: Sequence[tuple[str | None, int]], key: str) -> list[JsonObject]:
    """TCP ports with the number under `key`, named unless the name is None."""
    result: list[JsonObject] = []
    for port_name, number in ports:
        port: JsonObject = {key: number, "protocol": "TCP"}
        if port_name is not None:
            port["name"] = port_name
        result.append(port)
    return result


# ---------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: Mapping[str, str]
    at: float = field(default_factory=time.monotonic)

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")

    @property
    def resource_version(self) -> str | None:
        return self.query.get("resourceVersion")

    @property
    def label_selector(self) -> str | None:
        return self.query.get("labelSelector")


@dataclass(frozen=True)
class _Change:
    resource_version: int
    namespace: str
    type: str  # ADDED / MODIFIED / DELETED
    obj: JsonObject


@dataclass
class _Failure:
    status: int
    remaining: int
    watch: bool | None  # only watch requests, only lists, or both (None)


@dataclass
class _OpenWatch:
    namespace: str
    selector: Callable[[JsonObject], bool]
    bookmarks: bool
    events: queue.Queue[tuple[str, JsonObject | None]] = field(default_factory=queue.Queue)


def _selector(text: str | None) -> Callable[[JsonObject], bool]:
    """Equality-based label selectors: `k=v`, `k==v`, `k!=v`, comma-separated."""
    terms: list[tuple[str, str, bool]] = []
    for term in (text or "").split(","):
        term = term.strip()
        if not term:
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), value.strip(), False))
        else:
            key, value = re.split(r"==?", term, maxsplit=1)
            terms.append((key.strip(), value.strip(), True))

    def matches(obj: JsonObject) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all((labels.get(k) == v) == equal for k, v, equal in terms)

    return matches


def _status(code: int, reason: str, message: str) -> JsonObject:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


_REASONS = {400: "BadRequest", 404: "NotFound", 410: "Expired", 429: "TooManyRequests"}


# ---------------------------------------------------------------------------
# the server


class FakeKubeApiServer(Started):
    """See the module docstring. Thread-safe; use as a context manager (it is
    bound, and serving unless `serving=False`, from construction on)."""

    def __init__(
        self,
        *,
        serving: bool = True,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        authorize: Callable[[str | None, str, str], int | None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._authorize = authorize
        self._scheme = "https" if ssl_context is not None else "http"
        self._rv = 100
        self._compacted = 0  # watches from a resourceVersion below this get 410
        self._objects: dict[tuple[str, str], JsonObject] = {}
        self._pods: dict[tuple[str, str], JsonObject] = {}
        self._history: list[_Change] = []
        self._watches: list[_OpenWatch] = []
        self._failures: list[_Failure] = []
        self._requests: list[RecordedRequest] = []
        self._down = False
        self._closed = False
        self._handler_threads: set[threading.Thread] = set()
        self._clients: list[Any] = []
        self._httpd = _Server((host, 0), _Handler, bind_and_activate=False)
        self._httpd.fake = self
        # Bound but not listening: connections are refused until start_serving().
        self._httpd.server_bind()
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None
        if serving:
            self.start_serving()

    # -- lifecycle

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}"

    def start_serving(self) -> None:
        if self._thread is not None:
            return
        self._httpd.server_activate()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for w in self._watches:
                w.events.put(("drop", None))
            self._watches.clear()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()
        for t in list(self._handler_threads):
            t.join(2)
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()

    def start(self) -> Self:
        return self

    def stop(self) -> None:
        self.close()

    def configuration(self) -> kubernetes.client.Configuration:
        configuration = kubernetes.client.Configuration(host=self.url)
        configuration.no_proxy = "127.0.0.1,localhost"
        return configuration

    def api_client(self) -> kubernetes.client.ApiClient:
        """A client for this server, closed with the server."""
        client = kubernetes.client.ApiClient(self.configuration())
        self._clients.append(client)
        return client

    def kubeconfig(self) -> JsonObject:
        """A kubeconfig (as a dict; dump it as YAML or JSON) pointing here."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }

    # -- objects

    @property
    def resource_version(self) -> str:
        with self._lock:
            return str(self._rv)

    def slices(self, namespace: str) -> list[JsonObject]:
        with self._lock:
            return [copy.deepcopy(o) for (ns, _), o in self._objects.items() if ns == namespace]

    def add_slice(self, namespace: str, obj: JsonObject) -> str:
        """Create (ADDED) an EndpointSlice; returns the new resourceVersion."""
        name = obj["metadata"]["name"]
        with self._lock:
            if (namespace, name) in self._objects:
                raise ValueError(f"slice {namespace}/{name} exists")
            return self._change_locked(namespace, "ADDED", obj)

    def modify_slice(
        self,
        namespace: str,
        name: str,
        change: Callable[[JsonObject], None] | JsonObject,
    ) -> str:
        """Replace (a dict) or mutate in place (a function) a slice: MODIFIED."""
        with self._lock:
            current = self._objects[(namespace, name)]
            if callable(change):
                updated = copy.deepcopy(current)
                change(updated)
            else:
                updated = copy.deepcopy(change)
                updated["metadata"]["name"] = name
            return self._change_locked(namespace, "MODIFIED", updated)

    def set_conditions(
        self,
        namespace: str,
        slice_name: str,
        address: str,
        **conditions: bool | None,
    ) -> str:
        """Set (None: remove) conditions of the endpoint with `address`."""

        def update(obj: JsonObject) -> None:
            for ep in obj.get("endpoints") or []:
                if address in ep.get("addresses", []):
                    conds = ep.setdefault("conditions", {})
                    for key, value in conditions.items():
                        if value is None:
                            conds.pop(key, None)
                        else:
                            conds[key] = value
                    return
            raise KeyError(f"no endpoint {address} in {namespace}/{slice_name}")

        return self.modify_slice(namespace, slice_name, update)

    def delete_slice(self, namespace: str, name: str) -> str:
        with self._lock:
            obj = self._objects[(namespace, name)]
            return self._change_locked(namespace, "DELETED", obj)

    def _change_locked(self, namespace: str, kind: str, obj: JsonObject) -> str:
        self._rv += 1
        stored = copy.deepcopy(obj)
        metadata = stored.setdefault("metadata", {})
        metadata["namespace"] = namespace
        metadata["resourceVersion"] = str(self._rv)
        metadata.setdefault("uid", f"uid-{namespace}-{metadata['name']}")
        key = (namespace, metadata["name"])
        if kind == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = stored
        self._history.append(_Change(self._rv, namespace, kind, stored))
        for w in self._watches:
            if w.namespace == namespace and w.selector(stored):
                w.events.put(("event", {"type": kind, "object": copy.deepcopy(stored)}))
        return str(self._rv)

    # -- trouble

    def send_bookmark(self) -> str:
        """A BOOKMARK with the current resourceVersion to every open watch that
        allowed bookmarks; returns that resourceVersion."""
        with self._lock:
            rv = str(self._rv)
            for w in self._watches:
                if w.bookmarks:
                    w.events.put(("event", _bookmark(rv)))
            return rv

    def bump(self, n: int = 1) -> str:
        """Advance the resourceVersion as changes to unwatched objects would."""
        with self._lock:
            self._rv += n
            return str(self._rv)

    def compact(self) -> None:
        """Forget history: a watch from any older resourceVersion gets 410."""
        with self._lock:
            self._compacted = self._rv
            self._history.clear()

    def expire(self) -> None:
        """Compact, then send ERROR 410 "Expired" to every open watch and end it
        (as an API server does when a watch falls too far behind)."""
        with self._lock:
            self._compacted = self._rv
            self._history.clear()
            for w in self._watches:
                w.events.put(("event", _expired_event(self._rv)))
                w.events.put(("end", None))
            self._watches.clear()

    def fail_next(self, status: int, count: int = 1, *, watch: bool | None = None) -> None:
        """Answer the next `count` requests (only watches, only lists, or any)
        with HTTP `status` and a Status body."""
        with self._lock:
            self._failures.append(_Failure(status, count, watch))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream (no final chunk)."""
        with self._lock:
            return self._close_watches_locked("drop")

    def end_watches(self) -> int:
        """End every open watch cleanly, as a server-side timeout does."""
        with self._lock:
            return self._close_watches_locked("end")

    def _close_watches_locked(self, how: str) -> int:
        n = len(self._watches)
        for w in self._watches:
            w.events.put((how, None))
        self._watches.clear()
        return n

    def set_down(self, down: bool) -> None:
        """Down: open watches are cut and every new request is answered by
        closing the connection."""
        with self._lock:
            self._down = down
            if down:
                self._close_watches_locked("drop")

    # -- records

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def list_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if not r.watch and not _POD_PATH.match(r.path)]

    def pod_requests(self) -> list[RecordedRequest]:
        """The GETs of single pods."""
        return [r for r in self.requests if _POD_PATH.match(r.path)]

    # -- pods

    def add_pod(self, namespace: str, obj: JsonObject) -> None:
        """Keeps (or replaces) a Pod, served to GETs by name."""
        with self._lock:
            self._pods[(namespace, obj["metadata"]["name"])] = copy.deepcopy(obj)

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            self._pods.pop((namespace, name), None)

    def watch_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.watch]

    @property
    def open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    # -- request handling (handler threads)

    def _handle(self, h: _Handler) -> None:
        self._handler_threads.add(threading.current_thread())
        try:
            self._serve(h)
        except (BrokenPipeError, ConnectionResetError, OSError):
            h.close_connection = True
        finally:
            self._handler_threads.discard(threading.current_thread())

    def _serve(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        request = RecordedRequest(h.command, url.path, query)
        with self._lock:
            self._requests.append(request)
            down = self._down or self._closed
            failure = None if down else self._take_failure_locked(request.watch)
        if down:
            _cut(h)
            return
        if failure is not None:
            reason = _REASONS.get(failure, "InternalError")
            _send_json(h, failure, _status(failure, reason, f"injected HTTP {failure}"))
            return
        pod_match = _POD_PATH.match(url.path)
        if h.command == "GET" and pod_match is not None:
            self._get_pod(h, pod_match.group(1), pod_match.group(2))
            return
        match = _PATH.match(url.path)
        if h.command != "GET" or match is None:
            _send_json(h, 404, _status(404, "NotFound", f"no route for {h.command} {url.path}"))
            return
        namespace = match.group(1)
        if self._authorize is not None:
            verb = "watch" if request.watch else "list"
            denied = self._authorize(h.headers.get("Authorization"), namespace, verb)
            if denied is not None:
                reason = "Unauthorized" if denied == 401 else "Forbidden"
                _send_json(
                    h,
                    denied,
                    _status(
                        denied,
                        reason,
                        f"endpointslices.discovery.k8s.io is forbidden: cannot {verb} resource "
                        f'"endpointslices" in API group "discovery.k8s.io" in the namespace '
                        f'"{namespace}"',
                    ),
                )
                return
        selector = _selector(query.get("labelSelector"))
        if request.watch:
            self._watch(h, namespace, selector, query)
        else:
            self._list(h, namespace, selector)

    def _get_pod(self, h: _Handler, namespace: str, name: str) -> None:
        if self._authorize is not None:
            denied = self._authorize(h.headers.get("Authorization"), namespace, "get")
            if denied is not None:
                reason = "Unauthorized" if denied == 401 else "Forbidden"
                message = f'pods "{name}" is forbidden: cannot get resource "pods"'
                _send_json(h, denied, _status(denied, reason, message))
                return
        with self._lock:
            obj = copy.deepcopy(self._pods.get((namespace, name)))
        if obj is None:
            _send_json(h, 404, _status(404, "NotFound", f'pods "{name}" not found'))
            return
        obj["metadata"]["namespace"] = namespace
        _send_json(h, 200, obj)

    def _take_failure_locked(self, watch: bool) -> int | None:
        for failure in self._failures:
            if failure.watch is None or failure.watch == watch:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                return failure.status
        return None

    def _list(self, h: _Handler, namespace: str, selector: Callable[[JsonObject], bool]) -> None:
        with self._lock:
            items = [
                copy.deepcopy(o)
                for (ns, name), o in sorted(self._objects.items())
                if ns == namespace and selector(o)
            ]
            rv = str(self._rv)
        _send_json(
            h,
            200,
            {
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": rv},
                "items": items,
            },
        )

    def _watch(
        self,
        h: _Handler,
        namespace: str,
        selector: Callable[[JsonObject], bool],
        query: Mapping[str, str],
    ) -> None:
        since = query.get("resourceVersion", "")
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        w = _OpenWatch(namespace, selector, bookmarks)
        with self._lock:
            initial: list[JsonObject] = []
            register = True
            if since in ("", "0"):
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(o)}
                    for (ns, _), o in sorted(self._objects.items())
                    if ns == namespace and selector(o)
                ]
            elif int(since) < self._compacted:
                initial = [_expired_event(self._rv, since)]
                register = False
            else:
                initial = [
                    {"type": c.type, "object": copy.deepcopy(c.obj)}
                    for c in self._history
                    if c.resource_version > int(since)
                    and c.namespace == namespace
                    and selector(c.obj)
                ]
            if register:
                self._watches.append(w)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            for event in initial:
                _write_chunk(h, event)
            if not register:
                _end_chunks(h)
                return
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _end_chunks(h)
                    return
                try:
                    what, pushed = w.events.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
                if what == "event" and pushed is not None:
                    _write_chunk(h, pushed)
                elif what == "end":
                    _end_chunks(h)
                    return
                else:  # drop
                    _cut(h)
                    return
        finally:
            with self._lock:
                if w in self._watches:
                    self._watches.remove(w)


def _bookmark(rv: str) -> JsonObject:
    return {
        "type": "BOOKMARK",
        "object": {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": rv},
        },
    }


def _expired_event(current: int, since: str | None = None) -> JsonObject:
    message = (
        f"too old resource version: {since} ({current})"
        if since is not None
        else "The resourceVersion for the provided watch is too old."
    )
    return {"type": "ERROR", "object": _status(410, "Expired", message)}


def _send_json(h: _Handler, status: int, body: JsonObject) -> None:
    data = json.dumps(body).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
    h.wfile.flush()


def _write_chunk(h: _Handler, event: JsonObject) -> None:
    data = json.dumps(event).encode() + b"\n"
    h.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
    h.wfile.flush()


def _end_chunks(h: _Handler) -> None:
    h.wfile.write(b"0\r\n\r\n")
    h.wfile.flush()


def _cut(h: _Handler) -> None:
    """Close the connection abruptly, whatever was sent so far."""
    h.close_connection = True
    with contextlib.suppress(OSError):
        h.wfile.flush()
    with contextlib.suppress(OSError):
        h.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeKubeApiServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def describe_requests(kube: FakeKubeApiServer) -> str:
    """The recorded requests, one a line (for assertion messages)."""
    return "\n".join(
        f"{r.method} {r.path} {'watch ' if r.watch else ''}rv={r.resource_version}"
        for r in kube.requests
    )
