"""The Prometheus endpoint (`metrics_listen`, 11811): a small HTTP/1.1 server
on the balancer's event loop.

prometheus_client's start_http_server runs a thread per connection with no
timeouts, so a few hundred connections that send half a request line and stall
hold as many threads, and file descriptors shared with gRPC, for as long as
they like. Here a connection is a task with deadlines and a place under a cap:

- `header_timeout`: a request's head (request line and headers) must arrive
  whole within it, counted from the connection's start, or from the first byte
  of a later request on a kept-alive connection; a trickle of bytes does not
  extend it. A connection that misses it gets 408 (if it sent anything) and
  is closed.
- `idle_timeout`: how long a kept-alive connection waits for its next request.
- `write_timeout`: a client must take a response within it.
- `max_request_bytes`: a longer head gets 431 and the connection is closed;
  requests with a body get 413 (nothing here takes one).
- `max_connections`: a connection beyond it is closed as soon as it is
  accepted (accepting it keeps the listen backlog free for the next ones).

GET and HEAD on /metrics serve prometheus_client's exposition, negotiated as
its own server does (text or OpenMetrics by Accept, gzip by Accept-Encoding,
`name[]` filters); / is an index and /healthz says ok; any other path is 404.

The collectors run on the event loop: the balancer's collector reads state
that only the loop may touch (Balancer.view() even refreshes stale lists and
wakes streams), which prometheus_client's server did from its own threads.
The exposition is then serialized in a worker thread (asyncio.to_thread):
for 5,000 backends in 10 services one scrape measured 40-70 ms collecting and
55-65 ms serializing a 1 MB exposition, so the loop is held for the first
part only. Concurrent scrapes share expositions: each gets one whose
collection started after it asked, so 20 at once cost two collections.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from lbserver.errors import InvalidValueError

log = structlog.get_logger("lbserver.metrics_server")

DEFAULT_HEADER_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_WRITE_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_REQUEST_BYTES = 8192

_READ_SIZE = 4096
# The blank line that ends a head (lines may end in CRLF or a bare LF).
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# RFC 9110 token (method, header field name).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_INDEX = b"lbserver: Prometheus metrics at /metrics\n"
_TEXT = "text/plain; charset=utf-8"
# Between two warnings of the same kind (refused connections, failed scrapes).
_WARN_INTERVAL = 60.0
# After a 408 the client may still be sending: its bytes are read and
# dropped for at most this long (or this many bytes) before the socket
# closes. Closing with unread bytes makes the kernel send a reset, which can
# discard the 408 before the client reads it (nginx's lingering close).
_LINGER_SECONDS = 0.5
_LINGER_BYTES = 64 * 1024

Encoder = Callable[[Collector], bytes]


class HttpError(Exception):
    """A request answered with an error status; `close` ends the connection
    after it (the request could not be read to its end, or must not be)."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        *,
        close: bool = True,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    version: tuple[int, int]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version >= (1, 1):
            return "close" not in tokens
        return "keep-alive" in tokens


def parse_head(head: bytes) -> Request:
    """A request head (without the blank line that ends it) as a Request;
    HttpError for one that is malformed, or that has a body."""
    lines = head.split(b"\n")
    text: list[str] = []
    for raw in lines:
        stripped = raw[:-1] if raw.endswith(b"\r") else raw
        if b"\r" in stripped:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bare CR in the request head")
        text.append(stripped.decode("latin-1"))
    parts = text[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version_text = parts
    version = _VERSION.fullmatch(version_text)
    if version is None:
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed HTTP version")
    if version.group(1) != "1":
        raise HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.x is served")
    if not target or _CONTROL.search(target) or "\t" in target:
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request target")
    headers: dict[str, str] = {}
    for line in text[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            # Also obsolete line folding (a line starting with whitespace).
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed header field")
        value = value.strip(" \t")
        if _CONTROL.search(value):
            raise HttpError(HTTPStatus.BAD_REQUEST, "control character in a header field")
        name = name.lower()
        if name in headers:
            if name in ("host", "content-length"):
                raise HttpError(HTTPStatus.BAD_REQUEST, f"more than one {name} header")
            value = f"{headers[name]}, {value}"
        headers[name] = value
    request_version = (1, int(version.group(2)))
    if request_version >= (1, 1) and "host" not in headers:
        raise HttpError(HTTPStatus.BAD_REQUEST, "Host header missing")
    length = headers.get("content-length")
    if length is not None and not length.isdigit():
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed Content-Length")
    if "transfer-encoding" in headers or (length is not None and int(length) > 0):
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request bodies are not accepted")
    if target.startswith("/"):
        path, _, query = target.partition("?")
    else:
        absolute = urlsplit(target)
        if absolute.scheme.lower() not in ("http", "https") or not absolute.netloc:
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request target")
        path, query = absolute.path or "/", absolute.query
    return Request(method, path, query, request_version, headers)


async def read_head(
    reader: asyncio.StreamReader, buffer: bytearray, max_bytes: int
) -> bytes | None:
    """The next request head (without the blank line ending it) from `buffer`,
    then `reader`; what follows it stays in `buffer` (pipelined requests).
    None when the client closed before a whole head; HttpError (431) when
    more than `max_bytes` (blank lines before it included) came without one.
    Each byte is scanned once however it trickles in."""
    start = scanned = 0
    while True:
        if scanned == start:
            # Blank lines before a request line are ignored (RFC 9112).
            while start < len(buffer) and buffer[start] in b"\r\n":
                start += 1
            scanned = start
        found = _HEAD_END.search(buffer, max(start, scanned - 3))
        if found is not None and found.start() <= max_bytes:
            head = bytes(buffer[start : found.start()])
            del buffer[: found.end()]
            return head
        if found is not None or len(buffer) > max_bytes:
            raise HttpError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"the request head is over {max_bytes} bytes",
            )
        scanned = len(buffer)
        chunk = await reader.read(_READ_SIZE)
        if not chunk:
            return None
        buffer += chunk


def _response(
    status: HTTPStatus,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    send_body: bool = True,
    close: bool = False,
) -> bytes:
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Date: {formatdate(usegmt=True)}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if send_body else head


def _error_response(error: HttpError, *, send_body: bool = True) -> bytes:
    body = f"{error.status.value} {error.status.phrase}: {error.message}\n".encode()
    return _response(
        error.status,
        (("Content-Type", _TEXT), *error.headers),
        body,
        send_body=send_body,
        close=error.close,
    )


class _Snapshot:
    """Metrics already collected, for an encoder to serialize in a thread."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


class _Exposition:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self._gzipped: asyncio.Future[bytes] | None = None

    async def gzipped(self) -> bytes:
        if self._gzipped is None:
            self._gzipped = asyncio.ensure_future(asyncio.to_thread(gzip.compress, self.body))
        # Shielded: a waiter that goes away does not cancel it for the others.
        return await asyncio.shield(self._gzipped)


class _Expositions:
    """Renders expositions one at a time. A request is answered with the
    newest exposition of its kind if that one's collection started after the
    request arrived (so a scrape never misses what happened before it), else
    with a new one: any number of concurrent scrapes cost one or two."""

    _KEPT = 8

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._lock = asyncio.Lock()
        self._started = 0
        self._latest: dict[tuple[str, tuple[str, ...]], tuple[int, _Exposition]] = {}

    async def get(self, content_type: str, encoder: Encoder, names: tuple[str, ...]) -> _Exposition:
        key = (content_type, names)
        needed = self._started + 1
        async with self._lock:
            latest = self._latest.get(key)
            if latest is not None and latest[0] >= needed:
                return latest[1]
            self._started += 1
            number = self._started
            source = self._registry.restricted_registry(names) if names else self._registry
            snapshot = _Snapshot(list(source.collect()))
            exposition = _Exposition(await asyncio.to_thread(encoder, snapshot))
            if len(self._latest) >= self._KEPT:
                self._latest.clear()
            self._latest[key] = (number, exposition)
            return exposition


class _Throttle:
    """At most one warning of a kind per interval."""

    def __init__(self, interval: float = _WARN_INTERVAL) -> None:
        self._interval = interval
        self._next = 0.0

    def ready(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self._interval
        return True


class MetricsServer:
    """A listening metrics server; see start_metrics_server."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        header_timeout: float,
        idle_timeout: float,
        write_timeout: float,
        max_connections: int,
        max_request_bytes: int,
    ) -> None:
        self._expositions = _Expositions(registry)
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self._write_timeout = write_timeout
        self._max_connections = max_connections
        self._max_request_bytes = max_request_bytes
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refused_warning = _Throttle()
        self._failure_warning = _Throttle()
        self.host = ""
        self.port = 0
        # Connections closed at accept for the cap; connections closed for
        # missing header_timeout.
        self.refused_connections = 0
        self.timed_out_connections = 0

    @property
    def connections(self) -> int:
        """Connections open now (those under the cap)."""
        return len(self._tasks)

    async def _listen(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._connected,
                host or None,
                port,
                limit=self._max_request_bytes,
                backlog=max(128, self._max_connections),
            )
        except OSError as exc:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            # asyncio rewords the reason ("error while attempting to bind on
            # address ...: address already in use"): give the system's own.
            reason = os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
            raise OSError(exc.errno, reason, address) from None
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stops listening and closes every connection."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        task = asyncio.current_task()
        if task is None or len(self._tasks) >= self._max_connections:
            self.refused_connections += 1
            transport.abort()
            if self._refused_warning.ready(asyncio.get_running_loop().time()):
                log.warning(
                    "metrics connection refused: too many open",
                    max_connections=self._max_connections,
                    refused_so_far=self.refused_connections,
                )
            return
        self._tasks.add(task)
        # drain() then waits until the response is all with the kernel, so
        # closing afterwards never waits on a client that stopped reading.
        transport.set_write_buffer_limits(high=0)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # went away, or did not take its response in time
        finally:
            self._tasks.discard(task)
            transport.abort()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        first = True
        while True:
            if not first and not buffer:
                try:
                    async with asyncio.timeout(self._idle_timeout):
                        chunk = await reader.read(_READ_SIZE)
                except TimeoutError:
                    return
                if not chunk:
                    return
                buffer += chunk
            first = False
            try:
                async with asyncio.timeout_at(loop.time() + self._header_timeout):
                    head = await read_head(reader, buffer, self._max_request_bytes)
            except TimeoutError:
                self.timed_out_connections += 1
                if buffer:
                    error = HttpError(HTTPStatus.REQUEST_TIMEOUT, "request head too slow")
                    writer.write(_error_response(error))  # best effort, no waiting
                    await _linger(reader, writer)
                return
            except HttpError as error:
                await self._send(writer, _error_response(error))
                return
            if head is None:
                return
            try:
                request = parse_head(head)
            except HttpError as error:
                await self._send(writer, _error_response(error))
                return
            reply, close = await self._answer(request)
            await self._send(writer, reply)
            if close:
                return

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(self._write_timeout):
            await writer.drain()

    async def _answer(self, request: Request) -> tuple[bytes, bool]:
        """The response to a request, and whether to close after it."""
        close = not request.keep_alive
        send_body = request.method != "HEAD"
        try:
            if request.path not in ("/metrics", "/", "/healthz"):
                raise HttpError(HTTPStatus.NOT_FOUND, "try /metrics", close=False)
            if request.method not in ("GET", "HEAD"):
                raise HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    "only GET and HEAD",
                    close=False,
                    headers=(("Allow", "GET, HEAD"),),
                )
            if request.path == "/":
                return _response(
                    HTTPStatus.OK,
                    [("Content-Type", _TEXT)],
                    _INDEX,
                    send_body=send_body,
                    close=close,
                ), close
            if request.path == "/healthz":
                return _response(
                    HTTPStatus.OK,
                    [("Content-Type", _TEXT)],
                    b"ok\n",
                    send_body=send_body,
                    close=close,
                ), close
            return await self._metrics(request, send_body=send_body, close=close), close
        except HttpError as error:
            close = close or error.close
            error.close = close
            return _error_response(error, send_body=send_body), close

    async def _metrics(self, request: Request, *, send_body: bool, close: bool) -> bytes:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        names = tuple(parse_qs(request.query).get("name[]", ()))
        try:
            exposition = await self._expositions.get(content_type, encoder, names)
            body = exposition.body
            headers = [("Content-Type", content_type), ("Vary", "Accept, Accept-Encoding")]
            if gzip_accepted(request.headers.get("accept-encoding", "")):
                body = await exposition.gzipped()
                headers.append(("Content-Encoding", "gzip"))
        except Exception as exc:
            if self._failure_warning.ready(asyncio.get_running_loop().time()):
                log.error("metrics scrape failed", error=repr(exc), exc_info=exc)
            raise HttpError(
                HTTPStatus.INTERNAL_SERVER_ERROR, "collecting the metrics failed", close=False
            ) from None
        return _response(HTTPStatus.OK, headers, body, send_body=send_body, close=close)


async def start_metrics_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    *,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> MetricsServer:
    """Serves `registry` on host:port (port 0: any free one, see `.port`)
    from the running event loop until `close()`. `host` may be bracketed
    ("[::1]"); "" listens on every address. OSError naming the address when
    it cannot listen there."""
    for name, value in (
        ("header_timeout", header_timeout),
        ("idle_timeout", idle_timeout),
        ("write_timeout", write_timeout),
    ):
        if not value > 0:
            raise InvalidValueError(f"{name} must be > 0, not {value}")
    if max_connections < 1 or max_request_bytes < 64:
        raise InvalidValueError("max_connections must be >= 1 and max_request_bytes >= 64")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    server = MetricsServer(
        registry,
        header_timeout=header_timeout,
        idle_timeout=idle_timeout,
        write_timeout=write_timeout,
        max_connections=max_connections,
        max_request_bytes=max_request_bytes,
    )
    await server._listen(host, port)
    return server


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-closes (the response, then EOF) and drops what the client still
    sends, within _LINGER_SECONDS and _LINGER_BYTES, so that closing does not
    reset the connection under a response the client has yet to read."""
    if writer.can_write_eof():
        writer.write_eof()
    dropped = 0
    try:
        async with asyncio.timeout(_LINGER_SECONDS):
            while dropped < _LINGER_BYTES:
                chunk = await reader.read(_READ_SIZE)
                if not chunk:
                    return
                dropped += len(chunk)
    except (TimeoutError, ConnectionError):
        return
