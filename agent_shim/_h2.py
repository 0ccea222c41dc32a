"""HTTP/2 (RFC 9113) framing for the relay: one connection as an asyncio Protocol.

`Connection` does what every HTTP/2 endpoint must and nothing of the relay's
policy: it parses frames, reassembles header blocks (HEADERS + CONTINUATION)
and decodes them with the connection's HPACK context, answers PING and
SETTINGS, applies the peer's SETTINGS (frame size, initial window, concurrent
streams), keeps the connection-level flow-control windows both ways, enforces
the limits it announced (frame size, header block size, receive windows) and
batches everything it sends: frames are appended to a per-connection list and
written with one `transport.write` per connection when the current read is
processed (or on the next loop turn for writes made outside a read), so a
unary call relayed costs a handful of system calls, not one per frame.

Subclasses (the relay's client and backend connections) receive streams'
events through the `on_*` hooks. Why not `h2` (python-hyper)? It is a complete
and careful state machine, but its event objects and per-frame validation cost
more than the relay's whole budget per call; see docs/architecture.md for the
measurement behind the choice.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final, cast

from agent_shim._hpack import TABLE_SIZE_ZERO, Decoder, Header, HeaderError, encode

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# Flags.
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

# Error codes.
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
ENHANCE_YOUR_CALM: Final = 0xB

# Settings.
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6

DEFAULT_WINDOW: Final = 65_535
DEFAULT_MAX_FRAME: Final = 16_384
MAX_WINDOW: Final = 2**31 - 1

# What this side announces. Windows bound what a peer may send before the
# relay has passed it on: memory per stream and per connection.
STREAM_WINDOW: Final = 1024 * 1024
CONNECTION_WINDOW: Final = 4 * 1024 * 1024
# Larger frames than the default mean fewer frames to parse per byte relayed.
MAX_FRAME: Final = 64 * 1024
# A header block (HEADERS + CONTINUATION, compressed) larger than this ends
# the connection: it bounds the memory of one block and stops CONTINUATION
# floods. gRPC's own default metadata limit is 8 KiB.
MAX_HEADER_BLOCK: Final = 64 * 1024
# Window updates are batched: sent once this much of a window is used.
_CREDIT_FRACTION: Final = 4

_FRAME_HEADER: Final = struct.Struct(">BHBBL")
_PACK_FRAME = _FRAME_HEADER.pack
_UNPACK_FRAME = _FRAME_HEADER.unpack_from
_U32: Final = struct.Struct(">L")


def header_list_size(headers: list[Header]) -> int:
    """The size SETTINGS_MAX_HEADER_LIST_SIZE limits (RFC 9113 6.5.2)."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _PACK_FRAME(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    payload = b"".join(struct.pack(">HL", key, value) for key, value in values.items())
    return frame(SETTINGS, 0, 0, payload)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">LL", last_stream_id, code) + debug)


class H2ProtocolError(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with `code`, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Flusher:
    """Writes every connection's pending frames once per read (or loop turn)."""

    __slots__ = ("depth", "dirty", "scheduled")

    def __init__(self) -> None:
        self.dirty: list[Connection] = []
        self.depth = 0
        self.scheduled = False

    def mark(self, connection: Connection) -> None:
        self.dirty.append(connection)
        if not self.depth and not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        dirty = self.dirty
        while dirty:
            self.dirty = []
            for connection in dirty:
                connection.write_out()
            dirty = self.dirty


FLUSHER: Final = _Flusher()


class Connection(asyncio.Protocol):
    """One HTTP/2 connection; see the module docstring."""

    # The server side waits for the client preface; the client side sends it.
    is_client: bool = False

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False  # the transport's write buffer is full
        self._in = b""
        self._preface_pending = not self.is_client
        self._out: list[bytes] = []
        self._dirty = False
        self._first_block = True
        self._decoder = Decoder()
        self._block: list[bytes] | None = None  # a header block being reassembled
        self._block_stream = 0
        self._block_end_stream = False
        self._block_size = 0
        # The peer's settings.
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_streams = 2**31
        self.peer_max_header_list = 2**31  # SETTINGS_MAX_HEADER_LIST_SIZE: unlimited
        # Connection-level windows: what we may send, what the peer may send.
        self.send_window = DEFAULT_WINDOW
        self.recv_window = CONNECTION_WINDOW
        self._unacked = 0
        self.goaway_sent = False

    # ---- sending ---------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self._out.append(data)
        if not self._dirty:
            self._dirty = True
            FLUSHER.mark(self)

    def write_out(self) -> None:
        self._dirty = False
        out = self._out
        if not out or self.transport is None:
            return  # still connecting: connection_made writes it
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if not self.closed:
            self.transport.write(data)

    def send_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        block = encode(headers)
        if self._first_block:
            self._first_block = False
            block = TABLE_SIZE_ZERO + block
        flags = END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        if len(block) <= limit:
            self.send(frame(HEADERS, flags | END_HEADERS, stream_id, block))
            return
        self.send(frame(HEADERS, flags, stream_id, block[:limit]))
        for start in range(limit, len(block), limit):
            last = start + limit >= len(block)
            piece = block[start : start + limit]
            self.send(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, piece))

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """DATA frames within the peer's frame size; the caller took the
        flow-control windows."""
        limit = self.peer_max_frame
        size = len(data)
        if size <= limit:
            flags = END_STREAM if end_stream else 0
            self.send(_PACK_FRAME(size >> 16, size & 0xFFFF, DATA, flags, stream_id) + data)
            return
        view = memoryview(data)
        for start in range(0, size, limit):
            last = start + limit >= size
            flags = END_STREAM if end_stream and last else 0
            self.send(frame(DATA, flags, stream_id, bytes(view[start : start + limit])))

    def credit(self, amount: int) -> None:
        """`amount` received bytes were passed on (or dropped): the peer may
        send that much more on the connection (batched)."""
        self._unacked += amount
        if self._unacked >= CONNECTION_WINDOW // _CREDIT_FRACTION:
            self.recv_window += self._unacked
            self.send(window_update(0, self._unacked))
            self._unacked = 0

    def send_goaway(self, last_stream_id: int, code: int, debug: bytes = b"") -> None:
        self.goaway_sent = True
        self.send(goaway(last_stream_id, code, debug))

    def abort(self, code: int, message: str) -> None:
        """A connection error: GOAWAY, then close."""
        if self.closed:
            return
        self.send_goaway(self.last_peer_stream(), code, message.encode()[:256])
        self.write_out()
        if self.transport is not None:
            self.transport.close()

    def last_peer_stream(self) -> int:
        return 0

    # ---- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        if self._out:
            self._dirty = True
            FLUSHER.mark(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.on_writable()

    def data_received(self, data: bytes) -> None:
        flusher = FLUSHER
        flusher.depth += 1
        try:
            self._receive(data)
        except H2ProtocolError as err:
            self.on_protocol_error(err)
            self.abort(err.code, str(err))
        except HeaderError as err:
            self.on_protocol_error(H2ProtocolError(COMPRESSION_ERROR, str(err)))
            self.abort(COMPRESSION_ERROR, str(err))
        finally:
            flusher.depth -= 1
            if not flusher.depth:
                flusher.flush()

    def _receive(self, data: bytes) -> None:
        if self._in:
            data = self._in + data
        if self._preface_pending:
            if len(data) < len(PREFACE):
                if not PREFACE.startswith(data):
                    raise H2ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 (h2c) client preface")
                self._in = data
                return
            if not data.startswith(PREFACE):
                raise H2ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 (h2c) client preface")
            self._preface_pending = False
            data = data[len(PREFACE) :]
        size = len(data)
        pos = 0
        while size - pos >= 9 and not self.closed:
            high, low, kind, flags, stream_id = _UNPACK_FRAME(data, pos)
            length = (high << 16) | low
            if length > MAX_FRAME:
                raise H2ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = pos + 9 + length
            if end > size:
                break
            payload = data[pos + 9 : end]
            pos = end
            stream_id &= 0x7FFFFFFF
            if kind == DATA:
                self._data(flags, stream_id, payload)
            elif self._block is not None and kind != CONTINUATION:
                raise H2ProtocolError(PROTOCOL_ERROR, "header block interrupted")
            elif kind == HEADERS:
                self._headers(flags, stream_id, payload)
            elif kind == CONTINUATION:
                self._continuation(flags, stream_id, payload)
            elif kind == WINDOW_UPDATE:
                self._window_update(stream_id, payload)
            elif kind == RST_STREAM:
                if len(payload) != 4 or not stream_id:
                    raise H2ProtocolError(PROTOCOL_ERROR, "bad RST_STREAM")
                self.on_rst_stream(stream_id, _U32.unpack(payload)[0])
            elif kind == PING:
                if len(payload) != 8 or stream_id:
                    raise H2ProtocolError(PROTOCOL_ERROR, "bad PING")
                if not flags & ACK:
                    self.send(frame(PING, ACK, 0, payload))
                else:
                    self.on_ping_ack(payload)
            elif kind == SETTINGS:
                self._settings(flags, stream_id, payload)
            elif kind == GOAWAY:
                if len(payload) < 8 or stream_id:
                    raise H2ProtocolError(PROTOCOL_ERROR, "bad GOAWAY")
                last, code = struct.unpack_from(">LL", payload)
                self.on_goaway(last & 0x7FFFFFFF, code)
            elif kind == PUSH_PROMISE:
                raise H2ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")
            # PRIORITY and unknown frame types are ignored (RFC 9113 5.5).
        self._in = data[pos:] if pos < size else b""
        if len(self._in) > MAX_FRAME + 9:  # pragma: no cover - bounded by the check above
            raise H2ProtocolError(FRAME_SIZE_ERROR, "frame too large")

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise H2ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        self.recv_window -= flow
        if self.recv_window < 0:
            raise H2ProtocolError(FLOW_CONTROL_ERROR, "connection window exceeded")
        if flags & PADDED:
            if not payload or payload[0] >= flow:
                raise H2ProtocolError(PROTOCOL_ERROR, "bad padding")
            payload = payload[1 : flow - payload[0]]
        self.on_data(stream_id, payload, flow, bool(flags & END_STREAM))

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise H2ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & (PADDED | PRIORITY_FLAG):
            start = 0
            pad = 0
            if flags & PADDED:
                if not payload:
                    raise H2ProtocolError(PROTOCOL_ERROR, "bad padding")
                pad = payload[0]
                start = 1
            if flags & PRIORITY_FLAG:
                start += 5
            if start + pad > len(payload):
                raise H2ProtocolError(PROTOCOL_ERROR, "bad padding")
            payload = payload[start : len(payload) - pad]
        end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            if len(payload) > MAX_HEADER_BLOCK:
                raise H2ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
            self.on_headers(stream_id, self._decoder.decode(payload), end_stream)
            return
        self._block = [payload]
        self._block_stream = stream_id
        self._block_end_stream = end_stream
        self._block_size = len(payload)

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is None or stream_id != self._block_stream:
            raise H2ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._block_size += len(payload)
        if self._block_size > MAX_HEADER_BLOCK:
            raise H2ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
        self._block.append(payload)
        if flags & END_HEADERS:
            block = b"".join(self._block)
            self._block = None
            self.on_headers(stream_id, self._decoder.decode(block), self._block_end_stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ProtocolError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise H2ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2ProtocolError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self.on_writable()
            return
        self.on_window_update(stream_id, increment)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise H2ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise H2ProtocolError(FRAME_SIZE_ERROR, "bad SETTINGS")
        window_delta = 0
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ProtocolError(FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                window_delta += value - self.peer_initial_window
                self.peer_initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                    raise H2ProtocolError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif key == SETTINGS_MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list = value
        self.send(frame(SETTINGS, ACK, 0))
        if window_delta:
            self.on_initial_window_change(window_delta)

    # ---- hooks -----------------------------------------------------------------------

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        raise NotImplementedError

    def on_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        raise NotImplementedError

    def on_rst_stream(self, stream_id: int, code: int) -> None:
        raise NotImplementedError

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        raise NotImplementedError

    def on_window_update(self, stream_id: int, increment: int) -> None:
        raise NotImplementedError

    def on_initial_window_change(self, delta: int) -> None:
        raise NotImplementedError

    def on_ping_ack(self, payload: bytes) -> None:
        """The peer answered a PING this side sent."""

    def on_writable(self) -> None:
        """The transport resumed, or the connection window grew."""

    def on_protocol_error(self, error: H2ProtocolError) -> None:
        """Called before the connection is ended for `error`."""
