"""The relay's connections to backends: h2c connections shared by streams,
pooled per backend address (the Selector's "channel" for that address).

They see streams as `BackendStream`s and the proxy as a `BackendHost`: this
module imports neither `_relay_stream` nor `proxy`, which import it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Final, Protocol

from agent_shim import _h2
from agent_shim._grpc_wire import RESOURCE_EXHAUSTED
from agent_shim._h2 import NO_ERROR, H2ProtocolError
from agent_shim._hpack import Header
from agent_shim._relay_connection import StreamConnection
from lbserver.backoff import Backoff
from lbserver.keepalive import KEEPALIVE_TIME, KEEPALIVE_TIMEOUT
from lbserver.logs import get_logger

log = get_logger("agent_shim.proxy")

CONNECT_TIMEOUT: Final = 5.0
# Client-initiated stream ids are odd and below 2^31.
_LAST_STREAM_ID: Final = 2**31 - 1
# A backend whose connection was refused is skipped for a while (the
# Selector's connection_failing), with gRPC's reconnect backoff.
CONNECT_BACKOFF: Final = Backoff(initial=1.0, multiplier=1.6, maximum=30.0, jitter=0.2)


class BackendStream(Protocol):
    """What a backend connection needs of the streams it carries (the
    proxy's `agent_shim._relay_stream.Stream`)."""

    backend: BackendConnection | None  # set while routed here
    bsid: int  # its stream id on `backend`, 0 before it opens or after a reset
    b_send: int  # what it may send the backend (the stream's send window)
    b_recv: int  # what the backend may send it

    @property
    def headers(self) -> list[Header]: ...

    @property
    def closed(self) -> bool: ...

    def opened(self, conn: BackendConnection, stream_id: int) -> None: ...

    def pump_request(self) -> None: ...

    def on_response_headers(self, headers: list[Header], end: bool) -> None: ...

    def on_response_data(self, data: bytes, flow: int, end: bool) -> None: ...

    def backend_reset(self, code: int) -> None: ...

    def backend_lost(self, reason: str) -> None: ...

    def not_taken(self, reason: str) -> None: ...

    def fail(self, code: int, message: str) -> None: ...


class BackendHost(Protocol):
    """What backend pools and connections need of the proxy."""

    @property
    def backends(self) -> set[BackendConnection]: ...  # the connected ones

    def spawn(self, coro: Coroutine[object, object, None]) -> None: ...


class BackendConnection(StreamConnection[BackendStream]):
    """One h2c connection to a backend, shared by many streams."""

    is_client = True

    def __init__(self, pool: BackendPool) -> None:
        super().__init__()
        self.pool = pool
        self.waiting: list[BackendStream] = []  # routed here while connecting
        self.next_stream = 1
        self.ready = False
        self.draining = False  # GOAWAY received or sent: no new streams
        self.ping_sent: float | None = None  # an unanswered keepalive PING
        self.last_ping = time.monotonic()
        self.send(
            _h2.PREFACE
            + _h2.settings_frame(
                {
                    _h2.SETTINGS_ENABLE_PUSH: 0,
                    _h2.SETTINGS_INITIAL_WINDOW_SIZE: _h2.STREAM_WINDOW,
                    _h2.SETTINGS_MAX_FRAME_SIZE: _h2.MAX_FRAME,
                    _h2.SETTINGS_MAX_HEADER_LIST_SIZE: _h2.MAX_HEADER_BLOCK,
                }
            )
            + _h2.window_update(0, _h2.CONNECTION_WINDOW - _h2.DEFAULT_WINDOW)
        )

    @property
    def load(self) -> int:
        return len(self.streams) + len(self.waiting)

    def has_room(self) -> bool:
        if self.next_stream > _LAST_STREAM_ID:
            # Stream ids are spent (2^31 of them): new streams go to a new
            # connection, this one ends when its streams do.
            self.draining = True
            self.pool.draining(self)
            self.stream_done()
            return False
        return not self.draining and not self.closed and self.load < self.peer_max_streams

    def attach(self, stream: BackendStream) -> None:
        if self.ready:
            self._open(stream)
        else:
            self.waiting.append(stream)
            stream.backend = self

    def _open(self, stream: BackendStream) -> None:
        size = _h2.header_list_size(stream.headers)
        if size > self.peer_max_header_list:
            stream.backend = None
            stream.fail(
                RESOURCE_EXHAUSTED,
                f"agent-shim: request headers of {size} bytes exceed the backend's "
                f"limit of {self.peer_max_header_list} (SETTINGS_MAX_HEADER_LIST_SIZE)",
            )
            return
        stream_id = self.next_stream
        self.next_stream += 2
        self.streams[stream_id] = stream
        stream.opened(self, stream_id)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.ready = True
        self.pool.connected(self)
        self.pool.proxy.backends.add(self)
        waiting, self.waiting = self.waiting, []
        for stream in waiting:
            if not stream.closed and stream.backend is self:
                self._open(stream)

    def connect_failed(self, reason: str) -> None:
        self.closed = True
        self.pool.lost(self, failed_to_connect=True)
        waiting, self.waiting = self.waiting, []
        for stream in waiting:
            if stream.backend is self:
                stream.backend = None
                stream.not_taken(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ready = False
        self.pool.lost(self, failed_to_connect=False)
        self.pool.proxy.backends.discard(self)
        reason = f"the connection to backend {self.pool.address} was lost"
        if exc is not None:
            reason += f" ({exc})"
        for stream in list(self.streams.values()):
            stream.backend_lost(reason)
        self.streams.clear()
        self.blocked.clear()

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.on_response_headers(headers, end_stream)

    def on_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            self.credit(flow)
            return
        stream.b_recv -= flow
        if stream.b_recv < 0:
            self.credit(flow)
            stream.backend_reset(_h2.FLOW_CONTROL_ERROR)
            return
        stream.on_response_data(data, flow, end_stream)

    def on_rst_stream(self, stream_id: int, code: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.blocked.pop(stream_id, None)
            stream.bsid = 0  # nothing to reset: the backend did
            stream.backend_reset(code)

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        # Streams above the last id were not processed (RFC 9113 6.8): they
        # go elsewhere; the others finish here.
        self.draining = True
        self.pool.draining(self)
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last_stream_id:
                stream.not_taken(f"backend {self.pool.address} is going away (GOAWAY code {code})")
        self.stream_done()

    def _grow(self, stream: BackendStream, amount: int) -> None:
        stream.b_send += amount

    def _pump(self, stream: BackendStream) -> None:
        stream.pump_request()

    def keepalive(self, now: float) -> None:
        if self.ping_sent is not None:
            if now - self.ping_sent > KEEPALIVE_TIMEOUT and self.transport is not None:
                log.warning(
                    "backend did not answer a keepalive ping: closing its connection",
                    backend=self.pool.address,
                    streams=len(self.streams),
                )
                self.transport.abort()
            return
        if self.streams and now - self.last_ping >= KEEPALIVE_TIME:
            self.ping_sent = self.last_ping = now
            self.send(_h2.frame(_h2.PING, 0, 0, b"keepaliv"))

    def on_ping_ack(self, payload: bytes) -> None:
        self.ping_sent = None

    def on_protocol_error(self, error: H2ProtocolError) -> None:
        log.warning(
            "backend broke the HTTP/2 protocol: closing its connection",
            backend=self.pool.address,
            error=str(error),
        )

    def stream_done(self) -> None:
        if self.draining and not self.streams and not self.waiting:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            if not self.goaway_sent:
                self.send_goaway(0, NO_ERROR)
            self.write_out()
            self.transport.close()


class BackendPool:
    """The connections to one backend address (the Selector's "channel")."""

    def __init__(self, proxy: BackendHost, address: str) -> None:
        self.proxy = proxy
        self.address = address
        host, _, port = address.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self.connections: list[BackendConnection] = []
        self._failures = 0
        self._failing_until = 0.0
        self.closed = False

    def failing(self) -> bool:
        """Its last connection attempt failed and the backoff has not passed."""
        return time.monotonic() < self._failing_until and not any(c.ready for c in self.connections)

    def route(self, stream: BackendStream) -> None:
        for conn in self.connections:
            if conn.has_room():
                conn.attach(stream)
                return
        conn = BackendConnection(self)
        self.connections.append(conn)
        conn.attach(stream)
        self.proxy.spawn(self._connect(conn))

    async def _connect(self, conn: BackendConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: conn, self._host, self._port)
        except (OSError, TimeoutError) as err:
            conn.connect_failed(f"cannot connect to backend {self.address} ({err})")

    def connected(self, conn: BackendConnection) -> None:
        self._failures = 0
        self._failing_until = 0.0
        if self.closed:
            conn.draining = True

    def lost(self, conn: BackendConnection, *, failed_to_connect: bool) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)
        if failed_to_connect:
            self._failing_until = time.monotonic() + CONNECT_BACKOFF.delay(self._failures)
            self._failures += 1

    def draining(self, conn: BackendConnection) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)

    def close(self) -> None:
        """The backend left the list and no stream uses it any more."""
        self.closed = True
        for conn in list(self.connections):
            conn.draining = True
            conn.stream_done()
