"""Raw HTTP/2 peers for the relay's protocol tests, built on `h2` (python-hyper).

`RawBackend` is an h2c server whose every event is recorded and whose answers
a test scripts (`on_request`); `RawClient` is an h2c client a test drives
frame by frame. Both use the `h2` state machine, an implementation
independent of the relay's, so a frame the relay gets wrong is an error here.
Flow control is manual on both: nothing is acknowledged unless the test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

from tests.support.eventually import eventually
from tests.support.probe import FakeBalancer

Headers = list[tuple[bytes, bytes]]


class _Peer:
    def __init__(self, client_side: bool) -> None:
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.events: list[Any] = []
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def feed(self, data: bytes) -> list[Any]:
        events = self.conn.receive_data(data)
        self.events.extend(events)
        self.flush()
        return events

    async def wait(self, predicate: Callable[[], Any], limit: float = 5.0) -> Any:
        return await eventually(
            predicate, "the peer's events", within=limit, detail=lambda: self.events[-20:]
        )

    def of(self, kind: type, stream_id: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (stream_id is None or getattr(e, "stream_id", None) == stream_id)
        ]

    def received(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, stream_id))


class _Protocol(asyncio.Protocol):
    def __init__(self, peer: _Peer, on_events: Callable[[list[Any]], None]) -> None:
        self.peer = peer
        self.on_events = on_events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.peer.transport = transport
        self.peer.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.peer.feed(data)
        except Exception as err:  # a protocol error by the relay is a test failure
            self.peer.events.append(err)
            return
        self.on_events(events)
        self.peer.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.closed.set()


class RawBackend:
    """An h2c server; `on_request(peer, stream_id, headers, end_stream)` answers."""

    def __init__(
        self, name: str, *, initial_window: int = 65_535, max_header_list: int | None = None
    ) -> None:
        self.name = name
        self.initial_window = initial_window
        self.max_header_list = max_header_list
        self.peers: list[_Peer] = []
        self.on_request: Callable[[_Peer, int, Headers, bool], None] = self.echo_headers
        self.server: asyncio.Server | None = None
        self.port = 0

    @staticmethod
    def echo_headers(peer: _Peer, stream_id: int, headers: Headers, end: bool) -> None:
        """Answers at once: one message ("ok") and status OK."""
        peer.conn.send_headers(
            stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
        )
        peer.conn.send_data(stream_id, b"\x00\x00\x00\x00\x02ok")
        peer.conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)

    def entry(self, token: str | None = None) -> tuple[str, int, str]:
        return ("127.0.0.1", self.port, self.name if token is None else token)

    async def start(self) -> RawBackend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def _protocol(self) -> _Protocol:
        peer = _Peer(client_side=False)
        values = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.initial_window}
        if self.max_header_list is not None:
            values[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] = self.max_header_list
        peer.conn.local_settings = h2.settings.Settings(client=False, initial_values=values)
        peer.conn.initiate_connection()
        self.peers.append(peer)

        def on_events(events: list[Any]) -> None:
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    end = event.stream_ended is not None
                    self.on_request(peer, event.stream_id, list(event.headers), end)

        return _Protocol(peer, on_events)

    def requests(self) -> list[tuple[_Peer, Any]]:
        return [(p, e) for p in self.peers for e in p.of(h2.events.RequestReceived)]

    async def stop(self) -> None:
        for peer in self.peers:
            if peer.transport is not None:
                peer.transport.abort()
        if self.server is not None:
            self.server.close()


class RawClient(_Peer):
    """An h2c client of the relay."""

    def __init__(self) -> None:
        super().__init__(client_side=True)

    async def connect(self, port: int) -> RawClient:
        loop = asyncio.get_running_loop()
        self.conn.initiate_connection()
        await loop.create_connection(
            lambda: _Protocol(self, lambda _events: None), "127.0.0.1", port
        )
        return self

    def request(
        self,
        path: bytes = b"/test.Echo/Unary",
        extra: Sequence[tuple[bytes, bytes]] = (),
        end_stream: bool = False,
    ) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path),
                (b":authority", b"relay.test"),
                (b"te", b"trailers"),
                (b"content-type", b"application/grpc"),
                *extra,
            ],
            end_stream=end_stream,
        )
        self.flush()
        return stream_id

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


__all__ = ["FakeBalancer", "RawBackend", "RawClient"]
