"""`FrameTap`: a loopback TCP relay that reads the HTTP/2 frames passing through.

Put between a client and the proxy (the client dials `tap.address`), it
forwards every byte unchanged in both directions and records what it sees:
TCP connections, the streams the client opens, PING frames either way, GOAWAY
frames from the server (with error code and debug data, e.g.
ENHANCE_YOUR_CALM "too_many_pings"), the server's SETTINGS, and per stream the
request headers (HPACK-decoded) and the shape of the response: its HEADERS
and DATA frames in order, with END_STREAM. That is what a test needs to show
"one connection", "200 streams", "pings were sent and answered", "no
GOAWAY", and "a trailers-only answer stayed one HEADERS frame".
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

import hpack

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA: Final = 0x0
HEADERS: Final = 0x1
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PING: Final = 0x6
GOAWAY: Final = 0x7
CONTINUATION: Final = 0x9
ACK: Final = 0x1
END_STREAM: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY: Final = 0x20
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3


OnFrame = Callable[[int, int, int, bytes], None]  # kind, flags, stream id, payload


@dataclass
class Goaway:
    last_stream_id: int
    error_code: int
    debug: bytes


@dataclass
class StreamLog:
    """One stream: the client's request headers, the server's frames."""

    request: list[tuple[str, str]] = field(default_factory=list)
    # "HEADERS", "HEADERS+END", "DATA", "DATA+END", "RST" in the order sent
    response: list[str] = field(default_factory=list)
    response_headers: list[list[tuple[str, str]]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.request if k == name), None)

    @property
    def shape(self) -> list[str]:
        """The response's HEADERS and DATA frames (DATA runs collapsed)."""
        out: list[str] = []
        for event in self.response:
            if event == "RST" or (event == "DATA" and out and out[-1] == "DATA"):
                continue
            out.append(event)
        return out


@dataclass
class TapStats:
    connections: int = 0
    client_frames: Counter[int] = field(default_factory=Counter)
    server_frames: Counter[int] = field(default_factory=Counter)
    client_streams: set[int] = field(default_factory=set)
    client_pings: int = 0  # PING frames the client sent (not acks)
    server_ping_acks: int = 0
    server_pings: int = 0
    server_goaways: list[Goaway] = field(default_factory=list)
    server_settings: dict[int, int] = field(default_factory=dict)
    streams: dict[int, StreamLog] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def stream_of_call(self, call_id: str) -> StreamLog | None:
        """The stream whose request carried `x-call-id: call_id`."""
        return next((s for s in self.streams.values() if s.header("x-call-id") == call_id), None)


class _FrameReader:
    """Splits one direction's byte stream into frames."""

    def __init__(self, on_frame: OnFrame, *, preface: bool) -> None:
        self._buffer = bytearray()
        self._skip = len(PREFACE) if preface else 0
        self._on_frame = on_frame

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._skip:
            dropped = min(self._skip, len(buffer))
            del buffer[:dropped]
            self._skip -= dropped
        offset = 0
        while len(buffer) - offset >= 9:
            length = int.from_bytes(buffer[offset : offset + 3], "big")
            end = offset + 9 + length
            if len(buffer) < end:
                break
            kind, flags = buffer[offset + 3], buffer[offset + 4]
            stream = int.from_bytes(buffer[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
            # DATA payloads are not looked at, only their length.
            payload = b"" if kind == DATA else bytes(buffer[offset + 9 : end])
            self._on_frame(kind, flags, stream, payload)
            offset = end
        del buffer[:offset]


class _HeaderBlocks:
    """Reassembles and HPACK-decodes one direction's header blocks."""

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()
        self._decoder.max_allowed_table_size = 1 << 24  # whatever the peer's SETTINGS
        self._decoder.max_header_list_size = 1 << 24
        self._pending = bytearray()

    def feed(self, kind: int, flags: int, payload: bytes) -> list[tuple[str, str]] | None:
        """The decoded block once complete (END_HEADERS), else None."""
        if kind == HEADERS:
            start, end = 0, len(payload)
            if flags & PADDED:
                start, end = 1, len(payload) - payload[0]
            if flags & PRIORITY:
                start += 5
            self._pending = bytearray(payload[start:end])
        else:
            self._pending += payload
        if not flags & END_HEADERS:
            return None
        block, self._pending = bytes(self._pending), bytearray()
        # Raw: C-core peers that both allow "true binary" metadata (SETTINGS
        # 0xfe03) send -bin values as bytes, not base64.
        return [
            (bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
            for k, v in self._decoder.decode(block, raw=True)
        ]


class FrameTap:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.stats = TapStats()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # accept() wakes up to see close()
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="frame-tap", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def snapshot(self) -> TapStats:
        with self._lock:
            s = self.stats
            return TapStats(
                connections=s.connections,
                client_frames=Counter(s.client_frames),
                server_frames=Counter(s.server_frames),
                client_streams=set(s.client_streams),
                client_pings=s.client_pings,
                server_ping_acks=s.server_ping_acks,
                server_pings=s.server_pings,
                server_goaways=list(s.server_goaways),
                server_settings=dict(s.server_settings),
                streams={
                    k: StreamLog(list(v.request), list(v.response), list(v.response_headers))
                    for k, v in s.streams.items()
                },
                errors=list(s.errors),
            )

    # ---- relaying ------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.stats.connections += 1
                self._sockets += [client, upstream]
            client_blocks, server_blocks = _HeaderBlocks(), _HeaderBlocks()
            readers = (
                _FrameReader(
                    lambda *frame, b=client_blocks: self._client_frame(b, *frame), preface=True
                ),
                _FrameReader(
                    lambda *frame, b=server_blocks: self._server_frame(b, *frame), preface=False
                ),
            )
            for source, sink, reader in (
                (client, upstream, readers[0]),
                (upstream, client, readers[1]),
            ):
                thread = threading.Thread(
                    target=self._pump,
                    args=(source, sink, reader),
                    name="frame-tap-pump",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, reader: _FrameReader) -> None:
        try:
            while True:
                data = source.recv(256 * 1024)
                if not data:
                    break
                with self._lock:  # before the peer can see it
                    reader.feed(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _headers(
        self, blocks: _HeaderBlocks, kind: int, flags: int, payload: bytes
    ) -> list[tuple[str, str]] | None:
        try:
            return blocks.feed(kind, flags, payload)
        except Exception as err:  # recorded: a test reading headers then fails
            self.stats.errors.append(f"HPACK: {err!r}")
            return None

    def _stream(self, stream: int) -> StreamLog:
        return self.stats.streams.setdefault(stream, StreamLog())

    def _client_frame(
        self, blocks: _HeaderBlocks, kind: int, flags: int, stream: int, payload: bytes
    ) -> None:
        s = self.stats
        s.client_frames[kind] += 1
        if kind in (HEADERS, CONTINUATION):
            if kind == HEADERS and stream % 2 == 1:
                s.client_streams.add(stream)
            decoded = self._headers(blocks, kind, flags, payload)
            if decoded is not None and not self._stream(stream).request:
                self._stream(stream).request = decoded
        elif kind == PING and not flags & ACK:
            s.client_pings += 1

    def _server_frame(
        self, blocks: _HeaderBlocks, kind: int, flags: int, stream: int, payload: bytes
    ) -> None:
        s = self.stats
        s.server_frames[kind] += 1
        end = "+END" if flags & END_STREAM else ""
        if kind == HEADERS:
            self._stream(stream).response.append("HEADERS" + end)
        if kind in (HEADERS, CONTINUATION):
            decoded = self._headers(blocks, kind, flags, payload)
            if decoded is not None:
                self._stream(stream).response_headers.append(decoded)
        elif kind == DATA:
            self._stream(stream).response.append("DATA" + end)
        elif kind == RST_STREAM:
            self._stream(stream).response.append("RST")
        elif kind == PING:
            if flags & ACK:
                s.server_ping_acks += 1
            else:
                s.server_pings += 1
        elif kind == GOAWAY and len(payload) >= 8:
            s.server_goaways.append(
                Goaway(
                    int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF,
                    int.from_bytes(payload[4:8], "big"),
                    payload[8:],
                )
            )
        elif kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                s.server_settings[int.from_bytes(payload[i : i + 2], "big")] = int.from_bytes(
                    payload[i + 2 : i + 6], "big"
                )

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv()
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._acceptor.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
