"""BalanceLoad over the relay's own HTTP/2 code (see `_balancer_call`).

One h2c connection per balancer address, reused by the Selector's successive
calls, with gRPC's keepalive: a PING every `KEEPALIVE_TIME` seconds, and the
connection (with its call) given up when no answer comes within
`KEEPALIVE_TIMEOUT`. A call is one HTTP/2 stream carrying length-prefixed
protobuf messages; its status comes from the trailers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import urllib.parse
from typing import Final

from agent_shim import _h2
from agent_shim._balancer_call import (
    BALANCE_LOAD_PATH,
    STATUS_NAMES,
    BalancerCall,
    BalancerCallError,
)
from agent_shim._hpack import Header
from lbserver.keepalive import KEEPALIVE_TIME, KEEPALIVE_TIMEOUT
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb_pb2

CONNECT_TIMEOUT: Final = 20.0  # gRPC's minimum connect timeout
# A balancer's reply is a server list: bounded like gRPC's default receive limit.
MAX_MESSAGE: Final = 4 * 1024 * 1024
_PREFIX: Final = struct.Struct(">BL")


class _Connection(_h2.Connection):
    is_client = True

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.calls: dict[int, _Call] = {}
        self.next_stream = 1
        self.connected = asyncio.get_running_loop().create_future()
        self.error: BalancerCallError | None = None
        self._ping_answered = asyncio.Event()
        self._keepalive: asyncio.Task[None] | None = None
        self.send(
            _h2.PREFACE
            + _h2.settings_frame({_h2.SETTINGS_ENABLE_PUSH: 0})
            + _h2.window_update(0, _h2.CONNECTION_WINDOW - _h2.DEFAULT_WINDOW)
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.connected.done():
            self.connected.set_result(None)
        self._keepalive = asyncio.ensure_future(self._keep_alive())

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(
            BalancerCallError("UNAVAILABLE", f"the connection to the balancer was lost ({exc})")
        )

    def fail(self, error: BalancerCallError) -> None:
        if self.error is None:
            self.error = error
        self.closed = True
        if not self.connected.done():
            self.connected.set_exception(error)
            self.connected.exception()  # retrieved: nobody may be waiting
        for call in list(self.calls.values()):
            call.end(error)
        self.calls.clear()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.transport is not None:
            self.transport.abort()

    async def _keep_alive(self) -> None:
        while not self.closed:
            await asyncio.sleep(KEEPALIVE_TIME)
            self._ping_answered.clear()
            self.send(_h2.frame(_h2.PING, 0, 0, os.urandom(8)))
            try:
                async with asyncio.timeout(KEEPALIVE_TIMEOUT):
                    await self._ping_answered.wait()
            except TimeoutError:
                self.fail(
                    BalancerCallError("UNAVAILABLE", "keepalive: the balancer did not answer")
                )
                return

    def on_ping_ack(self, payload: bytes) -> None:
        self._ping_answered.set()

    def open(self) -> _Call:
        call = _Call(self, self.next_stream)
        self.next_stream += 2
        self.calls[call.stream_id] = call
        return call

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        call = self.calls.get(stream_id)
        if call is not None and end_stream:
            call.trailers(headers)

    def on_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        self.credit(flow)
        call = self.calls.get(stream_id)
        if call is not None:
            call.data(data, flow)

    def on_rst_stream(self, stream_id: int, code: int) -> None:
        call = self.calls.pop(stream_id, None)
        if call is not None:
            call.end(BalancerCallError("UNAVAILABLE", f"the balancer reset the stream ({code})"))

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        # Streams above the last id were not processed; the rest finish. No
        # new calls go here: the connector makes a new connection.
        self.goaway_sent = True
        for stream_id, call in list(self.calls.items()):
            if stream_id > last_stream_id:
                call.end(BalancerCallError("UNAVAILABLE", "the balancer is going away"))

    def on_window_update(self, stream_id: int, increment: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.send_window += increment
            call.writable.set()

    def on_initial_window_change(self, delta: int) -> None:
        for call in self.calls.values():
            call.send_window += delta
        self.on_writable()

    def on_writable(self) -> None:
        for call in self.calls.values():
            call.writable.set()

    def on_protocol_error(self, error: _h2.H2ProtocolError) -> None:
        self.fail(BalancerCallError("INTERNAL", f"HTTP/2 error from the balancer: {error}"))


class _Call:
    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.send_window = conn.peer_initial_window
        self.writable = asyncio.Event()
        self._started = False
        self._buffer = b""
        self._unacked = 0
        self._queue: asyncio.Queue[lb_pb2.LoadBalanceResponse | BalancerCallError | None] = (
            asyncio.Queue()
        )
        self._ended = False

    def _headers(self) -> list[Header]:
        return [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", BALANCE_LOAD_PATH.encode()),
            (b":authority", self.conn.address.encode()),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (b"user-agent", b"agent-shim"),
        ]

    async def write(self, request: lb_pb2.LoadBalanceRequest) -> None:
        conn = self.conn
        try:
            await conn.connected
        except BalancerCallError:
            raise
        if self._ended:
            raise conn.error or BalancerCallError("CANCELLED", "the call has ended")
        if not self._started:
            self._started = True
            conn.send_headers(self.stream_id, self._headers(), False)
        payload = request.SerializeToString()
        message = _PREFIX.pack(0, len(payload)) + payload
        while min(conn.send_window, self.send_window) < len(message):
            self.writable.clear()
            await self.writable.wait()
            if self._ended:
                raise conn.error or BalancerCallError("CANCELLED", "the call has ended")
        conn.send_window -= len(message)
        self.send_window -= len(message)
        conn.send_data(self.stream_id, message, False)

    async def read(self) -> lb_pb2.LoadBalanceResponse | None:
        item = await self._queue.get()
        if isinstance(item, BalancerCallError):
            raise item
        return item

    def cancel(self) -> None:
        if not self._ended:
            self._ended = True
            conn = self.conn
            conn.calls.pop(self.stream_id, None)
            if self._started and not conn.closed:
                conn.send(_h2.rst_stream(self.stream_id, _h2.CANCEL))
        self.writable.set()

    def end(self, item: BalancerCallError | None) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(item)
        self.writable.set()

    def data(self, data: bytes, flow: int) -> None:
        buffer = self._buffer + data if self._buffer else data
        while len(buffer) >= 5:
            flag, length = _PREFIX.unpack_from(buffer)
            if length > MAX_MESSAGE or flag:
                self.end(BalancerCallError("INTERNAL", "a reply too large or compressed"))
                self.cancel()
                return
            if len(buffer) < 5 + length:
                break
            try:
                message = lb_pb2.LoadBalanceResponse.FromString(buffer[5 : 5 + length])
            except Exception:  # protobuf's DecodeError
                self.end(BalancerCallError("INTERNAL", "an undecodable reply"))
                self.cancel()
                return
            buffer = buffer[5 + length :]
            self._queue.put_nowait(message)
        self._buffer = buffer
        self._unacked += flow
        if self._unacked >= _h2.DEFAULT_WINDOW // 4 and not self._ended:
            self.conn.send(_h2.window_update(self.stream_id, self._unacked))
            self._unacked = 0

    def trailers(self, headers: list[Header]) -> None:
        self.conn.calls.pop(self.stream_id, None)
        values = dict(headers)
        status = values.get(b"grpc-status", b"")
        code = int(status) if status.isdigit() else 2
        if code == 0:
            self.end(None)
            return
        name = STATUS_NAMES[code] if code < len(STATUS_NAMES) else str(code)
        message = urllib.parse.unquote(values.get(b"grpc-message", b"").decode(errors="replace"))
        self.end(BalancerCallError(name, message))


class H2BalancerConnector:
    """`BalancerConnector` over HTTP/2 connections the connector keeps."""

    def __init__(self) -> None:
        self._connections: dict[str, _Connection] = {}
        self._connecting: set[asyncio.Task[None]] = set()

    def call(self, address: str) -> BalancerCall:
        conn = self._connections.get(address)
        if conn is None or conn.closed or conn.goaway_sent:
            conn = self._connections[address] = _Connection(address)
            task = asyncio.ensure_future(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        return conn.open()

    @staticmethod
    async def _connect(conn: _Connection) -> None:
        host, _, port = conn.address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: conn, host.strip("[]"), int(port))
        except (OSError, TimeoutError, ValueError) as err:
            conn.fail(BalancerCallError("UNAVAILABLE", f"cannot connect to {conn.address}: {err}"))

    async def close(self) -> None:
        for task in list(self._connecting):
            task.cancel()
        for conn in self._connections.values():
            conn.fail(BalancerCallError("CANCELLED", "the selector is closed"))
        self._connections.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
