"""The relay at the HTTP/2 level: frames, windows, resets and GOAWAY, with raw
h2 peers (`tests.support.h2peers`) on both sides of an in-process proxy."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from functools import partial

import h2.errors
import h2.events
import pytest

from agent_shim import _h2
from tests.support.eventually import eventually
from tests.support.h2peers import RawBackend, RawClient
from tests.support.proxy_rig import ProxyRig

pytestmark = [pytest.mark.timeout(60)]


def _silent(peer: object, stream_id: int, headers: object, end: bool) -> None:
    """A backend that reads nothing and answers nothing."""


def message(payload: bytes) -> bytes:
    return struct.pack(">BL", 0, len(payload)) + payload


class Relay(ProxyRig):
    """Raw h2 backends and clients around an in-process proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.backends: list[RawBackend] = []
        self.clients: list[RawClient] = []

    async def backend(self, name: str, **kwargs: int) -> RawBackend:
        backend = await RawBackend(name, **kwargs).start()
        self.backends.append(backend)
        return backend

    async def start(self, *backends: RawBackend, **proxy_options: int) -> int:
        return await self.start_proxy(
            [b.entry() for b in backends], "relay", no_backend_wait=1.0, **proxy_options
        )

    async def client(self, port: int) -> RawClient:
        client = await RawClient().connect(port)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        await super().close()
        for backend in self.backends:
            await backend.stop()


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    r = Relay()
    try:
        yield r
    finally:
        await r.close()


def _received_at_least(client: RawClient, stream_id: int, size: int) -> bool:
    return len(client.received(stream_id)) >= size


def _resets_at_least(backend: RawBackend, count: int) -> bool:
    return len(backend.peers[0].of(h2.events.StreamReset)) >= count


async def _requested(backend: RawBackend) -> None:
    await eventually(backend.requests, f"a request at backend {backend.name}")


async def _caught_up(client: RawClient) -> None:
    """A PING round trip: the relay answers it after handling every frame the
    client sent before it, so whatever those frames made it send (window
    updates, resets) has arrived by then."""
    payload = struct.pack(">Q", len(client.of(h2.events.PingAckReceived)))
    client.conn.ping(payload)
    client.flush()
    await client.wait(
        lambda: any(e.ping_data == payload for e in client.of(h2.events.PingAckReceived))
    )


def _response_status(client: RawClient, stream_id: int) -> bytes | None:
    for event in client.of(h2.events.TrailersReceived, stream_id) + client.of(
        h2.events.ResponseReceived, stream_id
    ):
        for name, value in event.headers:
            if name == b"grpc-status":
                return bytes(value)
    return None


async def test_headers_are_relayed_with_the_chosen_lb_token_and_without_hop_by_hop(
    relay: Relay,
) -> None:
    a = await relay.backend("a")
    client = await relay.client(await relay.start(a))
    sid = client.request(
        extra=[
            (b"grpc-timeout", b"5S"),
            (b"user-agent", b"grpc-java-netty/1.63"),
            (b"x-blob-bin", b"AAEC"),
            (b"lb-token", b"forged"),
            (b"x-big", b"v" * 30_000),  # several frames: HEADERS + CONTINUATION to the backend
        ],
    )
    client.conn.send_data(sid, message(b"hi"), end_stream=True)
    client.flush()
    await client.wait(lambda: client.of(h2.events.StreamEnded, sid))
    assert _response_status(client, sid) == b"0"
    assert client.received(sid) == message(b"ok")
    [(_, request)] = a.requests()
    headers = [(bytes(n), bytes(v)) for n, v in request.headers]
    assert (b":authority", b"relay.test") in headers
    assert (b"grpc-timeout", b"5S") in headers
    assert (b"user-agent", b"grpc-java-netty/1.63") in headers
    assert (b"x-blob-bin", b"AAEC") in headers
    assert (b"x-big", b"v" * 30_000) in headers
    assert [v for n, v in headers if n == b"lb-token"] == [b"a"]


async def test_a_header_block_split_into_continuation_frames_is_reassembled(
    relay: Relay,
) -> None:
    a = await relay.backend("a")
    client = await relay.client(await relay.start(a))
    value = b"w" * 40_000
    block = client.conn.encoder.encode(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/test.Echo/Unary"),
            (b":authority", b"relay.test"),
            (b"content-type", b"application/grpc"),
            (b"x-long", value),
        ]
    )
    pieces = [block[i : i + 10_000] for i in range(0, len(block), 10_000)]
    raw = _h2.frame(_h2.HEADERS, _h2.END_STREAM, 1, pieces[0])
    for index, piece in enumerate(pieces[1:], 1):
        raw += _h2.frame(
            _h2.CONTINUATION, _h2.END_HEADERS if index == len(pieces) - 1 else 0, 1, piece
        )
    assert client.transport is not None
    client.flush()
    client.transport.write(raw)
    await _requested(a)
    [(_, request)] = a.requests()
    assert (b"x-long", value) in [(bytes(n), bytes(v)) for n, v in request.headers]


async def test_a_ping_is_answered_and_large_responses_respect_the_clients_frame_size(
    relay: Relay,
) -> None:
    a = await relay.backend("a")
    body = message(b"z" * 200_000)

    def big(peer: object, sid: int, headers: object, end: bool) -> None:
        conn = a.peers[-1].conn
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.send_data(sid, body[:60_000])  # within the relay's initial stream window

    a.on_request = big
    client = await relay.client(await relay.start(a))
    client.conn.ping(b"12345678")
    client.flush()
    await client.wait(lambda: client.of(h2.events.PingAckReceived))
    assert client.of(h2.events.PingAckReceived)[0].ping_data == b"12345678"
    sid = client.request(end_stream=True)
    # h2 raises (recorded as an event) on any frame above its 16 KiB default.
    await client.wait(lambda: len(client.received(sid)) >= 60_000)
    assert client.received(sid) == body[:60_000]
    assert not [e for e in client.events if isinstance(e, Exception)]


async def test_a_backend_that_does_not_read_throttles_the_client_within_bounds(
    relay: Relay,
) -> None:
    a = await relay.backend("a")
    a.on_request = _silent  # reads nothing, answers nothing
    port = await relay.start(a, max_buffer_bytes=256 * 1024)
    client = await relay.client(port)
    sid = client.request(path=b"/test.Echo/Upload")
    # With the backend's stream open, the relay credits only as it handles
    # the client's frames (the backend acknowledges nothing).
    await _requested(a)
    sent = 0
    chunk = message(b"d" * 16_379)  # 16 KiB gRPC messages
    # Send while the windows let us; the relay credits what it passed on.
    for _ in range(2000):
        window = client.conn.local_flow_control_window(sid)
        if window < len(chunk):
            await _caught_up(client)  # every credit due for what was sent is in
            if client.conn.local_flow_control_window(sid) < len(chunk):
                break
            continue
        client.conn.send_data(sid, chunk)
        client.flush()
        sent += len(chunk)
        await asyncio.sleep(0)
    backend_peer = a.peers[0]
    got = len(backend_peer.received(1))
    # The backend's own window (64 KiB) stops the relay; the relay holds at
    # most the replay buffer and one stream window more.
    assert got <= 65_535
    assert sent <= 65_535 + 256 * 1024 + _h2.STREAM_WINDOW + len(chunk)
    assert sent > 0
    assert relay.proxy is not None and relay.proxy.kept_total <= 256 * 1024
    # The backend starts reading: everything flows through.
    backend_peer.conn.acknowledge_received_data(got, 1)
    backend_peer.flush()
    acked = got

    def drain() -> bool:
        nonlocal acked
        received = len(backend_peer.received(1))
        if received > acked:
            backend_peer.conn.acknowledge_received_data(received - acked, 1)
            backend_peer.flush()
            acked = received
        return received >= sent

    await backend_peer.wait(drain, limit=10)
    assert backend_peer.received(1) == chunk * (sent // len(chunk))


async def test_a_client_cancel_resets_the_backend_stream(relay: Relay) -> None:
    a = await relay.backend("a")
    a.on_request = _silent
    client = await relay.client(await relay.start(a))
    sid = client.request()
    await _requested(a)
    client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    client.flush()
    peer = a.peers[0]
    await peer.wait(lambda: peer.of(h2.events.StreamReset, 1))
    assert peer.of(h2.events.StreamReset, 1)[0].error_code == h2.errors.ErrorCodes.CANCEL


async def test_a_backend_reset_after_answering_reaches_the_client(relay: Relay) -> None:
    a = await relay.backend("a")

    def answer_then_reset(peer: object, sid: int, headers: object, end: bool) -> None:
        conn = a.peers[-1].conn
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)

    a.on_request = answer_then_reset
    client = await relay.client(await relay.start(a))
    sid = client.request(end_stream=True)
    await client.wait(lambda: client.of(h2.events.StreamReset, sid))
    assert (
        client.of(h2.events.StreamReset, sid)[0].error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
    )


@pytest.mark.parametrize("refusal", ["goaway", "refused_stream"])
async def test_a_stream_the_backend_did_not_take_is_replayed_elsewhere(
    relay: Relay, refusal: str
) -> None:
    a, b = await relay.backend("a"), await relay.backend("b")

    def refuse(peer: object, sid: int, headers: object, end: bool) -> None:
        conn = a.peers[-1].conn
        if refusal == "goaway":
            conn.close_connection(last_stream_id=0)
        else:
            conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)

    a.on_request = refuse
    client = await relay.client(await relay.start(a, b))
    assert relay.proxy is not None
    statuses = []
    for _ in range(4):  # round robin: at least one lands on a first
        sid = client.request(extra=[(b"grpc-timeout", b"10S")])
        client.conn.send_data(sid, message(b"x" * 1000), end_stream=True)
        client.flush()
        await client.wait(partial(client.of, h2.events.StreamEnded, sid))
        statuses.append(_response_status(client, sid))
    assert statuses == [b"0"] * 4
    assert a.requests() and relay.proxy.replays >= 1
    # b got every request body whole, and a stream's replay has a smaller timeout.
    bodies = [p.received(e.stream_id) for p, e in b.requests()]
    assert bodies == [message(b"x" * 1000)] * 4
    timeouts = [dict(e.headers)[b"grpc-timeout"] for _, e in b.requests()]
    assert any(t != b"10S" for t in timeouts)


async def test_a_message_above_the_limit_ends_the_stream_while_streaming(relay: Relay) -> None:
    a = await relay.backend("a")
    a.on_request = _silent
    client = await relay.client(await relay.start(a, max_message_bytes=100_000))
    sid = client.request(path=b"/test.Echo/Upload")
    first = message(b"s" * 50_000)
    for start in range(0, len(first), 16_384):
        client.conn.send_data(sid, first[start : start + 16_384])
    client.flush()
    await _requested(a)
    # A prefix announcing 10 MB: refused before any of its body is buffered.
    client.conn.send_data(sid, struct.pack(">BL", 0, 10_000_000) + b"b" * 1000)
    client.flush()
    await client.wait(lambda: _response_status(client, sid))
    assert _response_status(client, sid) == b"8"  # RESOURCE_EXHAUSTED
    peer = a.peers[0]
    await peer.wait(lambda: peer.of(h2.events.StreamReset, 1))


async def test_a_client_that_is_not_http2_is_told_and_dropped(relay: Relay) -> None:
    port = await relay.start(await relay.backend("a"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    # Our SETTINGS, then GOAWAY PROTOCOL_ERROR, then the connection closes.
    assert struct.pack(">B", _h2.GOAWAY) in data
    assert data.endswith(b"not an HTTP/2 (h2c) client preface")


async def test_an_endless_header_block_ends_the_connection(relay: Relay) -> None:
    port = await relay.start(await relay.backend("a"))
    client = await relay.client(port)
    assert client.transport is not None
    raw = _h2.frame(_h2.HEADERS, 0, 1, b"\x82")
    for _ in range(10):
        raw += _h2.frame(_h2.CONTINUATION, 0, 1, b"\x00" * 16_000)
    client.transport.write(raw)
    await client.wait(lambda: client.of(h2.events.ConnectionTerminated))
    [ended] = client.of(h2.events.ConnectionTerminated)
    assert ended.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_stop_sends_goaway_and_lets_running_streams_finish(relay: Relay) -> None:
    a = await relay.backend("a")
    a.on_request = _silent
    client = await relay.client(await relay.start(a))
    sid = client.request(end_stream=True)
    await _requested(a)
    assert relay.server is not None and relay.proxy is not None
    stopping = asyncio.create_task(relay.server.stop(30))
    await client.wait(lambda: client.of(h2.events.ConnectionTerminated))
    [goaway] = client.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR and goaway.last_stream_id == sid
    # The GOAWAY is the marker: the stop writes it and goes on, in the same
    # step, to wait for the running streams (or, wrongly, to end them), so it
    # was there before this test saw the frame.
    assert not stopping.done() and relay.proxy.active == 1  # the stream still runs
    RawBackend.echo_headers(a.peers[0], 1, [], True)
    a.peers[0].flush()
    # The stop ends when the stream does, long before its 30 s grace.
    await asyncio.wait_for(stopping, 10)
    assert relay.proxy.active == 0


async def test_a_backend_that_stops_answering_pings_is_given_up_and_its_streams_replayed(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend whose node vanished answers nothing, not even a reset: the
    relay's keepalive notices and the stream goes to another backend."""
    monkeypatch.setattr("agent_shim._relay_backends.KEEPALIVE_TIME", 0.2)
    monkeypatch.setattr("agent_shim._relay_backends.KEEPALIVE_TIMEOUT", 0.5)
    a, b = await relay.backend("a"), await relay.backend("b")
    a.on_request = _silent
    client = await relay.client(await relay.start(a, b))
    sid = client.request(extra=[(b"x-n", b"1")], end_stream=True)
    await client.wait(lambda: a.requests() or client.of(h2.events.StreamEnded, sid))
    if not a.requests():  # the first stream went to b: the next one goes to a
        sid = client.request(extra=[(b"x-n", b"2")], end_stream=True)
        await _requested(a)
    replayed_before = len(b.requests())
    assert a.peers[0].transport is not None
    a.peers[0].transport.pause_reading()  # no PING is answered any more
    await client.wait(partial(client.of, h2.events.StreamEnded, sid), limit=10)
    assert _response_status(client, sid) == b"0"
    assert len(b.requests()) == replayed_before + 1  # replayed on b
    assert relay.proxy is not None and relay.proxy.replays == 1


async def test_bytes_held_for_a_stream_that_ends_are_given_back_to_its_connection(
    relay: Relay,
) -> None:
    """Each stream ends (client reset) while the relay holds some of its
    response (the client's window is smaller): those bytes still count
    against the backend connection's window, so the relay must credit them,
    or after ~4 MiB the connection, shared by every stream, would stall."""
    a = await relay.backend("a", initial_window=2**20)
    body = message(b"r" * 200_000)

    def big_answer(peer: object, sid: int, headers: object, end: bool) -> None:
        conn = a.peers[-1].conn
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        room = min(len(body), conn.local_flow_control_window(sid))
        for start in range(0, room, 16_384):
            conn.send_data(sid, body[start : min(room, start + 16_384)])

    a.on_request = big_answer
    client = await relay.client(await relay.start(a))
    await client.wait(lambda: client.of(h2.events.RemoteSettingsChanged))
    for n in range(40):  # 40 x ~135 KiB held: beyond the 4 MiB connection window
        sid = client.request(end_stream=True)
        await client.wait(partial(_received_at_least, client, sid, 65_535))
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        # The client's connection window back (not the stream's: it held
        # the relay to 64 KiB of the response).
        client.conn.increment_flow_control_window(len(client.received(sid)))
        client.flush()
        # The backend's stream is reset before the next one opens.
        await a.peers[0].wait(partial(_resets_at_least, a, n + 1))
    a.on_request = RawBackend.echo_headers
    sid = client.request(end_stream=True)
    await client.wait(partial(client.of, h2.events.StreamEnded, sid), limit=5)
    assert _response_status(client, sid) == b"0"
    assert len(a.peers) == 1  # one connection carried every stream
    assert not [e for e in a.peers[0].events if isinstance(e, Exception)]


async def test_headers_beyond_the_backends_header_list_limit_are_refused_with_a_status(
    relay: Relay,
) -> None:
    a = await relay.backend("a", max_header_list=2_000)
    client = await relay.client(await relay.start(a))
    small = client.request(end_stream=True)
    await client.wait(partial(client.of, h2.events.StreamEnded, small))
    assert _response_status(client, small) == b"0"  # the SETTINGS are known by now
    big = client.request(extra=[(b"x-big", b"b" * 3_000)], end_stream=True)
    await client.wait(partial(client.of, h2.events.StreamEnded, big))
    assert _response_status(client, big) == b"8"  # RESOURCE_EXHAUSTED
    assert len(a.requests()) == 1
