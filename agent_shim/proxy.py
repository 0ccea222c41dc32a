"""`agent-shim proxy`: an HTTP/2 stream relay that balances every gRPC call.

An agent that cannot use the grpclb policy (SkyWalking's Java, Python, Go and
Node agents create plain channels) points its collector address at this
proxy. The proxy does not terminate gRPC calls: it accepts HTTP/2 with prior
knowledge (h2c, what gRPC clients speak), and relays each client *stream* to a
backend the Selector chooses from the balancer's list (weighted round robin in
list order, failing backends skipped, drops honoured), over multiplexed h2c
connections it keeps per backend (another one is opened when a connection's
MAX_CONCURRENT_STREAMS is reached). It knows no protos and no call types: a
unary call is a stream like any other.

Per stream it relays:
- the request headers, HPACK-decoded and re-encoded for the backend
  connection: hop-by-hop headers and any `lb-token` the client sent are
  dropped, the chosen backend's `lb-token` is added, everything else
  (`:authority`, `grpc-timeout`, `-bin` metadata, the user agent) is passed
  as is;
- DATA as it arrives, with flow control both ways: a stream's bytes are
  acknowledged to their sender (WINDOW_UPDATE) only once written to the other
  side, so a slow backend throttles its client and a slow client its backend,
  and what the proxy holds is bounded by the windows it grants (see `_h2`);
- the response headers, messages and trailers (or a trailers-only response)
  back, and RST_STREAM both ways: a client's cancel reaches the backend, a
  backend's reset reaches the client.

No loss. A stream's request bytes are kept until the backend sends response
headers (at most `max_buffer_bytes` per stream and `max_buffer_total` for the
process). A stream the backend did not take — refused (RST_STREAM
REFUSED_STREAM or CANCEL before any response, a trailers-only UNAVAILABLE
or CANCELLED), above the
last stream id of the backend's GOAWAY, on a connection that was refused or
lost — is replayed on another backend with what was kept (`grpc-timeout`
reduced by the time spent), at most `MAX_ATTEMPTS` times; beyond the bound,
or once the backend has answered, a failure goes to the client as an
UNAVAILABLE status. Delivery is at least once: a backend that read a stream
and died before answering gets it again elsewhere. SkyWalking's
`TraceSegmentReportService/collect` is client-streaming and answers only at
the end, so up to `max_buffer_bytes` of segments per stream survive a
collector's death.

A request message larger than `max_message_bytes` (read from the gRPC message
prefix as the bytes stream through, nothing buffered for it) ends the stream
with RESOURCE_EXHAUSTED and resets the backend's side.

When no backend can take a stream (no list yet, every backend failing), it
waits up to `no_backend_wait` seconds (bounded by its `grpc-timeout`) for one,
then fails with UNAVAILABLE. On stop, clients get GOAWAY and running streams
`grace` seconds to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Coroutine, Sequence
from typing import Any, Final, Protocol

from agent_shim import _h2
from agent_shim._balancer_h2 import H2BalancerConnector
from agent_shim._errors import DroppedCallError, NoBackendError
from agent_shim._grpc_wire import _PATH, UNAVAILABLE, forwardable
from agent_shim._h2 import NO_ERROR, REFUSED_STREAM, H2ProtocolError
from agent_shim._hpack import Header
from agent_shim._relay_backends import BackendConnection, BackendPool
from agent_shim._relay_connection import StreamConnection
from agent_shim._relay_stream import MAX_ATTEMPTS, AttemptOutcomes, Stream
from agent_shim._selector import Choice, Selector
from lbserver.errors import InvalidValueError
from lbserver.logs import get_logger

__all__ = [
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_MAX_BUFFER_TOTAL",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_NO_BACKEND_WAIT",
    "DEFAULT_SHUTDOWN_GRACE",
    "MAX_ATTEMPTS",
    "BackendPool",
    "Proxy",
    "ProxyServer",
    "attach_selector",
    "forwardable",
]

log = get_logger("agent_shim.proxy")

DEFAULT_MAX_BUFFER_BYTES: Final = 4 * 1024 * 1024
DEFAULT_MAX_BUFFER_TOTAL: Final = 64 * 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_NO_BACKEND_WAIT: Final = 5.0
DEFAULT_SHUTDOWN_GRACE: Final = 10.0
# Streams a client may open at once on one connection (announced in SETTINGS).
MAX_CLIENT_STREAMS: Final = 1000


class BackendSelector(AttemptOutcomes, Protocol):
    """What the proxy (and its streams) need of `agent_shim._selector.Selector`."""

    async def wait_ready(self, timeout: float | None = None) -> bool: ...  # noqa: ASYNC109

    def choose(self, exclude: Collection[str] = ()) -> Choice[BackendPool]: ...


class _NoSelector:
    """Until the proxy gets its selector: no backend yet."""

    async def wait_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        if timeout:
            await asyncio.sleep(timeout)
        return False

    def choose(self, exclude: Collection[str] = ()) -> Choice[BackendPool]:
        raise NoBackendError("the proxy has no selector")

    def finished(
        self, choice: Choice[BackendPool], *, reached_backend: bool, failed: bool = False
    ) -> None:
        pass


# ---- connections from clients------------------------------------------------------------


class ClientConnection(StreamConnection[Stream]):
    """A connection from an agent (the server side of HTTP/2)."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy
        self._last_stream = 0
        self.peer = "?"
        self.send(
            _h2.settings_frame(
                {
                    _h2.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_CLIENT_STREAMS,
                    _h2.SETTINGS_INITIAL_WINDOW_SIZE: _h2.STREAM_WINDOW,
                    _h2.SETTINGS_MAX_FRAME_SIZE: _h2.MAX_FRAME,
                    _h2.SETTINGS_MAX_HEADER_LIST_SIZE: _h2.MAX_HEADER_BLOCK,
                }
            )
            + _h2.window_update(0, _h2.CONNECTION_WINDOW - _h2.DEFAULT_WINDOW)
        )

    def last_peer_stream(self) -> int:
        return self._last_stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.proxy.clients.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.clients.discard(self)
        for stream in list(self.streams.values()):
            stream.client_reset()
        self.streams.clear()
        self.blocked.clear()

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from a client: the end of its request
            stream.on_request_data(b"", 0, end_stream)
            return
        if not stream_id & 1 or stream_id <= self._last_stream:
            if stream_id <= self._last_stream:
                return  # a stream that already ended
            raise H2ProtocolError(_h2.PROTOCOL_ERROR, f"bad client stream id {stream_id}")
        self._last_stream = stream_id
        if self.goaway_sent:
            self.send(_h2.rst_stream(stream_id, REFUSED_STREAM))
            return
        if len(self.streams) >= MAX_CLIENT_STREAMS:
            self.send(_h2.rst_stream(stream_id, REFUSED_STREAM))
            return
        proxy = self.proxy
        stream = Stream(proxy, self, stream_id, forwardable(headers))
        self.streams[stream_id] = stream
        proxy.calls += 1
        proxy.active += 1
        if end_stream:
            stream.req_end = True
        proxy.route(stream)

    def on_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            self.credit(flow)  # a stream that ended: only the connection's window
            return
        stream.c_recv -= flow
        if stream.c_recv < 0:
            self.send(_h2.rst_stream(stream_id, _h2.FLOW_CONTROL_ERROR))
            self.credit(flow)
            stream.client_reset()
            return
        stream.on_request_data(data, flow, end_stream)

    def on_rst_stream(self, stream_id: int, code: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.client_reset()

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        pass  # the client stops opening streams; running ones finish

    def _grow(self, stream: Stream, amount: int) -> None:
        stream.c_send += amount

    def _pump(self, stream: Stream) -> None:
        stream.pump_response()

    def on_protocol_error(self, error: H2ProtocolError) -> None:
        self.proxy.note_protocol_error(self.peer, error)

    def stream_done(self) -> None:
        if self.goaway_sent and not self.streams and self.transport is not None:
            self.write_out()
            self.transport.close()

    def shut_down(self) -> None:
        """GOAWAY: no new streams; the connection closes when its last ends."""
        if not self.goaway_sent:
            self.send_goaway(self._last_stream, NO_ERROR)
        self.stream_done()


# ---- the proxy --------------------------------------------------------------------------


class Proxy:
    """Relays every stream its clients open to a backend the selector picks."""

    def __init__(
        self,
        selector: BackendSelector | None = None,
        *,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        max_buffer_total: int = DEFAULT_MAX_BUFFER_TOTAL,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        no_backend_wait: float = DEFAULT_NO_BACKEND_WAIT,
    ) -> None:
        if max_buffer_bytes < 0 or max_buffer_total < 0 or max_message_bytes < 0:
            raise InvalidValueError("buffer and message limits must be >= 0")
        # Set here or later (the Selector's channel factory is `self.pool`).
        self.selector: BackendSelector = selector or _NoSelector()
        self.max_buffer_bytes = max_buffer_bytes
        self.max_buffer_total = max_buffer_total
        self.max_message_bytes = max_message_bytes
        self.no_backend_wait = no_backend_wait
        self.kept_total = 0
        self.calls = 0  # streams received
        self.replays = 0  # attempts repeated on another backend
        self.active = 0  # streams running
        self.clients: set[ClientConnection] = set()
        self.backends: set[BackendConnection] = set()  # connected ones
        self._keepalive: asyncio.Task[None] | None = None
        self._ready = False
        self.drained: asyncio.Event | None = None  # set when stopping and no stream runs
        self._tasks: set[asyncio.Task[None]] = set()
        self._replay_logged: dict[str, float] = {}
        self._error_logged = 0.0
        self._errors_suppressed = 0

    def pool(self, address: str) -> BackendPool:
        """The Selector's channel factory."""
        return BackendPool(self, address)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- routing a stream to a backend ----------------------------------------------------

    def route(self, stream: Stream) -> None:
        """Chooses a backend for the stream's next attempt, or waits for one."""
        if self._ready and self._try_attach(stream) is None:
            return
        self.spawn(self._wait_for_backend(stream))

    def _try_attach(self, stream: Stream) -> str | None:
        """Attaches the stream to the backend the Selector chooses, or fails
        it when the choice is a drop; else why no backend could be chosen."""
        try:
            choice = self.selector.choose(stream.exclude)
        except NoBackendError as err:
            return str(err) or "no backend is available"
        except DroppedCallError as err:
            stream.fail(UNAVAILABLE, str(err))
        else:
            self._attach(stream, choice)
        return None

    def _attach(self, stream: Stream, choice: Choice[BackendPool]) -> None:
        stream.choice = choice
        stream.attempts += 1
        choice.channel.route(stream)

    async def _wait_for_backend(self, stream: Stream) -> None:
        selector = self.selector
        give_up = time.monotonic() + self.no_backend_wait
        if stream.timeout is not None:
            give_up = min(give_up, stream.started + stream.timeout)
        delay = 0.02
        reason = "no backend is available"
        while not stream.closed:
            if not self._ready:
                ready = await selector.wait_ready(max(0.0, give_up - time.monotonic()))
                self._ready = self._ready or ready
                if stream.closed:
                    return
                if not ready:
                    stream.fail(
                        UNAVAILABLE,
                        "agent-shim: no server list from the balancer yet and no fallback",
                    )
                    return
            why = self._try_attach(stream)
            if why is None:
                return
            reason = why
            now = time.monotonic()
            if now >= give_up:
                stream.fail(UNAVAILABLE, f"agent-shim: {reason}")
                return
            await asyncio.sleep(min(delay, give_up - now))
            delay = min(delay * 2, 0.5)
            # Backends that failed may be back; the selector skips failing ones.
            stream.exclude.clear()

    # ---- notes ------------------------------------------------------------------------------

    def note_replay(self, stream: Stream, backend: str, reason: str) -> None:
        self.replays += 1
        now = time.monotonic()
        if now - self._replay_logged.get(backend, -1e9) >= 1.0:  # at most 1/s per backend
            if len(self._replay_logged) > 1024:
                self._replay_logged.clear()
            self._replay_logged[backend] = now
            path = next((v for n, v in stream.headers if n == _PATH), b"")
            log.info(
                "stream not accepted: replaying it on another backend",
                method=path[:200].decode(errors="replace"),
                backend=backend,
                reason=reason,
                replays=self.replays,
            )

    def note_protocol_error(self, peer: str, error: H2ProtocolError) -> None:
        now = time.monotonic()
        if now - self._error_logged < 6.0:  # at most 10 lines a minute
            self._errors_suppressed += 1
            return
        self._error_logged = now
        log.warning(
            "client broke the HTTP/2 protocol: closing its connection",
            peer=peer,
            error=str(error)[:200],
            suppressed=self._errors_suppressed,
        )
        self._errors_suppressed = 0

    # ---- keepalive ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._keepalive is None:
            self._keepalive = asyncio.ensure_future(self._keep_backends_alive())

    async def _keep_backends_alive(self) -> None:
        """gRPC's client keepalive on backend connections with streams: a PING
        after `KEEPALIVE_TIME` s, and a connection whose answer does not come
        within `KEEPALIVE_TIMEOUT` s is given up (its streams are replayed
        or fail), so a backend whose node vanished does not hold them."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.backends):
                conn.keepalive(now)

    # ---- stopping --------------------------------------------------------------------------

    async def stop(self, grace: float | None) -> None:
        """GOAWAY to every client; running streams get `grace` seconds (None:
        as long as they take), then every connection is closed."""
        for client in list(self.clients):
            client.shut_down()
        _h2.FLUSHER.flush()
        if self.active > 0:
            self.drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.drained.wait()
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for conn in list(self.backends):
            conn.draining = True
            conn.close()


def attach_selector(
    proxy: Proxy,
    balancers: Sequence[str],
    service: str,
    *,
    fallback: Sequence[str] = (),
    fallback_timeout: float = 10.0,
) -> Selector[BackendPool]:
    """A Selector whose backends are `proxy`'s connection pools, set as its selector."""
    selector: Selector[BackendPool] = Selector(
        balancers,
        service,
        fallback=fallback,
        channel_factory=proxy.pool,
        close_channel=BackendPool.close,
        connection_failing=BackendPool.failing,
        fallback_timeout=fallback_timeout,
        balancer_connector=H2BalancerConnector(),
    )
    proxy.selector = selector
    return selector


class ProxyServer:
    """A listening socket running a `Proxy`."""

    def __init__(self, proxy: Proxy, listen: str) -> None:
        self.proxy = proxy
        self.listen = listen
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Binds and serves; returns the bound port. OSError if it cannot listen."""
        host, _, port = self.listen.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: ClientConnection(self.proxy),
                host.strip("[]") or None,
                int(port),
                reuse_address=True,
                backlog=1024,
            )
        except OSError as err:
            raise OSError(err.errno, f"cannot listen on {self.listen}: {err.strerror}") from err
        self.port = self._server.sockets[0].getsockname()[1]
        self.proxy.start()
        return self.port

    async def stop(self, grace: float | None = DEFAULT_SHUTDOWN_GRACE) -> None:
        """Stops taking connections; running streams get `grace` seconds to finish."""
        if self._server is not None:
            self._server.close()
        await self.proxy.stop(grace)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
