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
from collections import deque
from collections.abc import Collection, Coroutine, Sequence
from typing import Any, Final, Protocol

from agent_shim import _h2
from agent_shim._balancer_call import KEEPALIVE_TIME, KEEPALIVE_TIMEOUT
from agent_shim._balancer_h2 import H2BalancerConnector
from agent_shim._errors import DroppedCallError, NoBackendError
from agent_shim._h2 import CANCEL, NO_ERROR, REFUSED_STREAM, Connection, H2ProtocolError
from agent_shim._hpack import Header
from agent_shim._picker import Backoff
from agent_shim._selector import LB_TOKEN_METADATA_KEY, Choice, Selector
from lbserver._logging import get_logger

log = get_logger("agent_shim.proxy")

DEFAULT_MAX_BUFFER_BYTES: Final = 4 * 1024 * 1024
DEFAULT_MAX_BUFFER_TOTAL: Final = 64 * 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_NO_BACKEND_WAIT: Final = 5.0
DEFAULT_SHUTDOWN_GRACE: Final = 10.0
# Streams a client may open at once on one connection (announced in SETTINGS).
MAX_CLIENT_STREAMS: Final = 1000
# Tries of one stream before its error is passed on (gRPC's retry policy allows 5).
MAX_ATTEMPTS: Final = 5
CONNECT_TIMEOUT: Final = 5.0
# Client-initiated stream ids are odd and below 2^31.
_LAST_STREAM_ID: Final = 2**31 - 1
# A backend whose connection was refused is skipped for a while (the
# Selector's connection_failing), with gRPC's reconnect backoff.
CONNECT_BACKOFF: Final = Backoff(initial=1.0, multiplier=1.6, maximum=30.0, jitter=0.2)

# HTTP/1.1 hop-by-hop headers (RFC 9110 7.6.1) and HTTP/2's connection-specific
# ones (RFC 9113 8.2.2); `te` passes only as "trailers" (gRPC requires it).
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        LB_TOKEN_METADATA_KEY.encode(),
    }
)
_LB_TOKEN: Final = LB_TOKEN_METADATA_KEY.encode()
_TE: Final = b"te"
_TIMEOUT: Final = b"grpc-timeout"
_STATUS: Final = b"grpc-status"
_PATH: Final = b":path"
_TIMEOUT_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
# gRPC status codes the proxy sends or reads.
CANCELLED: Final = 1
UNAVAILABLE: Final = 14
RESOURCE_EXHAUSTED: Final = 8
# Trailers-only answers meaning the backend did not take the stream.
_NOT_TAKEN: Final = frozenset({UNAVAILABLE, CANCELLED})


def forwardable(headers: list[Header]) -> list[Header]:
    """`headers` without hop-by-hop headers and `lb-token`."""
    return [h for h in headers if h[0] not in _HOP_BY_HOP and (h[0] != _TE or h[1] == b"trailers")]


def parse_timeout(value: bytes) -> float | None:
    """Seconds of a `grpc-timeout` value ("100m", "5S"), None if malformed."""
    if len(value) < 2 or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


def format_timeout(seconds: float) -> bytes:
    """A `grpc-timeout` value (at most 8 digits) for `seconds`."""
    millis = max(0, int(seconds * 1000))
    if millis < 10**8:
        return b"%dm" % millis
    return b"%dS" % min(int(seconds), 10**8 - 1)


def _percent_encode(text: str) -> bytes:
    out = bytearray()
    for byte in text.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers_only(code: int, message: str) -> list[Header]:
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (_STATUS, b"%d" % code),
        (b"grpc-message", _percent_encode(message)),
    ]


def _status_of(headers: list[Header]) -> int | None:
    for name, value in headers:
        if name == _STATUS:
            return int(value) if value.isdigit() else None
    return None


class BackendSelector(Protocol):
    """What the proxy needs of `agent_shim._selector.Selector`."""

    async def wait_ready(self, timeout: float | None = None) -> bool: ...  # noqa: ASYNC109

    def choose(self, exclude: Collection[str] = ()) -> Choice[BackendPool]: ...

    def finished(
        self, choice: Choice[BackendPool], *, reached_backend: bool, failed: bool = False
    ) -> None: ...


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


# ---- one relayed stream ---------------------------------------------------------------


class _Stream:
    """A client stream and the backend stream it is relayed to (one attempt at
    a time). The request side keeps what may need a replay; the response
    side holds only what the client's windows do not take yet."""

    __slots__ = (
        "_b_unacked",
        "_c_unacked",
        "_msg_head",
        "_msg_left",
        "accepted",
        "attempts",
        "b_end_sent",
        "b_recv",
        "b_send",
        "backend",
        "bsid",
        "c_recv",
        "c_send",
        "choice",
        "client",
        "closed",
        "csid",
        "exclude",
        "headers",
        "kept",
        "proxy",
        "refusal",
        "replayable",
        "req_bytes",
        "req_chunks",
        "req_end",
        "req_off",
        "req_sent",
        "resp_end",
        "resp_pending",
        "resp_trailers",
        "started",
        "timeout",
    )

    def __init__(
        self, proxy: Proxy, client: ClientConnection, csid: int, headers: list[Header]
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.csid = csid
        self.headers = headers  # forwardable request headers, without lb-token
        self.timeout: float | None = None
        for name, value in headers:
            if name == _TIMEOUT:
                self.timeout = parse_timeout(value)
        self.started = time.monotonic()
        self.closed = False
        self.choice: Choice[BackendPool] | None = None
        self.backend: BackendConnection | None = None
        self.bsid = 0
        self.attempts = 0
        self.exclude: set[str] = set()
        # Request: chunks from the client, those before req_sent (and req_off
        # bytes of the next) written to the current backend stream.
        self.req_chunks: list[bytes] = []
        self.req_sent = 0
        self.req_off = 0
        self.req_bytes = 0
        self.req_end = False
        self.b_end_sent = False
        self.replayable = True
        self.kept = 0  # bytes counted in the proxy's replay total
        self.accepted = False
        self.refusal: list[Header] | None = None  # a trailers-only UNAVAILABLE
        # Response: data waiting for the client's windows, then trailers.
        self.resp_pending: deque[bytes] = deque()
        self.resp_trailers: list[Header] | None = None
        self.resp_end = False
        # Flow control: what we may send each way, what each peer may send us.
        self.c_send = client.peer_initial_window
        self.c_recv = _h2.STREAM_WINDOW
        self.b_send = 0
        self.b_recv = 0
        self._c_unacked = 0
        self._b_unacked = 0
        # The gRPC message being streamed: prefix bytes seen, body bytes left.
        self._msg_head = b""
        self._msg_left = 0

    # ---- request: client -> backend --------------------------------------------------

    def on_request_data(self, data: bytes, flow: int, end: bool) -> None:
        if flow > len(data):  # padding: nothing to pass on
            self._credit_client(flow - len(data))
        if data:
            if self.proxy.max_message_bytes and not self._message_sizes_ok(data):
                self.client.credit(len(data))  # dropped: the connection's window back
                return
            self.req_chunks.append(data)
            size = len(data)
            self.req_bytes += size
            if self.replayable:
                # Kept for a replay: acknowledged now (bounded by the
                # buffer limits), so the client keeps streaming while the
                # backend is chosen or connects.
                proxy = self.proxy
                proxy.kept_total += size
                self.kept += size
                self._credit_client(size)
                if (
                    self.req_bytes > proxy.max_buffer_bytes
                    or proxy.kept_total > proxy.max_buffer_total
                ):
                    self.no_replay()
        if end:
            self.req_end = True
        if self.bsid:
            self.pump_request()

    def _message_sizes_ok(self, data: bytes) -> bool:
        """Reads the gRPC message prefixes in the request bytes as they pass;
        False (the stream ended with RESOURCE_EXHAUSTED) on one too large."""
        left = self._msg_left
        size = len(data)
        if left >= size:
            self._msg_left = left - size
            return True
        pos = left
        head = self._msg_head
        limit = self.proxy.max_message_bytes
        while pos < size:
            piece = data[pos : pos + 5 - len(head)]
            head += piece
            pos += len(piece)
            if len(head) < 5:
                break
            length = int.from_bytes(head[1:5], "big")
            head = b""
            if length > limit:
                self.fail(
                    RESOURCE_EXHAUSTED,
                    f"agent-shim: request message of {length} bytes is larger than "
                    f"the limit of {limit} (--max-message-bytes)",
                )
                return False
            pos += length
        self._msg_head = head
        self._msg_left = pos - size if pos > size else 0
        return True

    def _credit_client(self, amount: int) -> None:
        client = self.client
        client.credit(amount)
        if self.req_end or self.closed:
            return
        self._c_unacked += amount
        if self._c_unacked >= _h2.STREAM_WINDOW // 4:
            self.c_recv += self._c_unacked
            client.send(_h2.window_update(self.csid, self._c_unacked))
            self._c_unacked = 0

    def no_replay(self) -> None:
        """From now on the stream cannot be replayed: what was sent is dropped."""
        if not self.replayable:
            return
        self.replayable = False
        self.proxy.kept_total -= self.kept
        self.kept = 0
        if self.req_sent:
            dropped = self.req_chunks[: self.req_sent]
            del self.req_chunks[: self.req_sent]
            self.req_bytes -= sum(len(c) for c in dropped)
            self.req_sent = 0

    def pump_request(self) -> None:
        """Writes request bytes to the backend stream as its windows allow."""
        conn = self.backend
        if conn is None or not self.bsid or self.b_end_sent or self.closed:
            return
        chunks = self.req_chunks
        while self.req_sent < len(chunks):
            window = min(conn.send_window, self.b_send)
            if window <= 0 or conn.paused:
                conn.blocked[self.bsid] = self
                break
            chunk = chunks[self.req_sent]
            offset = self.req_off
            left = len(chunk) - offset
            take = left if left <= window else window
            piece = chunk if take == len(chunk) else chunk[offset : offset + take]
            conn.send_window -= take
            self.b_send -= take
            if take == left:
                self.req_sent += 1
                self.req_off = 0
            else:
                self.req_off += take
            last = self.req_end and self.req_sent == len(chunks)
            conn.send_data(self.bsid, piece, last)
            if last:
                self.b_end_sent = True
            if not self.replayable:
                self._credit_client(take)
        if not self.replayable and self.req_sent:
            dropped = chunks[: self.req_sent]
            del chunks[: self.req_sent]
            self.req_bytes -= sum(len(c) for c in dropped)
            self.req_sent = 0
        if self.req_end and not self.b_end_sent and self.req_sent == len(chunks):
            conn.send_data(self.bsid, b"", True)
            self.b_end_sent = True

    # ---- response: backend -> client ---------------------------------------------------

    def on_response_headers(self, headers: list[Header], end: bool) -> None:
        if not self.accepted:
            if end and _status_of(headers) in _NOT_TAKEN and self.replayable:
                # A trailers-only UNAVAILABLE, or the CANCELLED a grpcio
                # server answers streams that arrive while it stops (its
                # handler never ran): the backend did not take it. If no
                # other backend does, the client gets this answer.
                self.refusal = forwardable(headers)
                self.not_taken("the backend answered UNAVAILABLE without a response")
                return
            self.accepted = True
            self.no_replay()
            self.client.send_headers(self.csid, forwardable(headers), end)
            if end:
                self.finish(_status_of(headers) == 0, reset_client=not self.req_end)
            return
        # Trailers (or, from a non-gRPC backend, more headers).
        fwd = forwardable(headers)
        if not end:
            self.client.send_headers(self.csid, fwd, False)
            return
        self.resp_trailers = fwd
        self.resp_end = True
        self.pump_response()

    def on_response_data(self, data: bytes, flow: int, end: bool) -> None:
        if flow > len(data):
            self._credit_backend(flow - len(data))
        if data:
            self.resp_pending.append(data)
        if end:
            self.resp_end = True
        self.pump_response()

    def _credit_backend(self, amount: int) -> None:
        conn = self.backend
        if conn is None:
            return
        conn.credit(amount)
        if self.resp_end or self.closed:
            return
        self._b_unacked += amount
        if self._b_unacked >= _h2.STREAM_WINDOW // 4:
            self.b_recv += self._b_unacked
            conn.send(_h2.window_update(self.bsid, self._b_unacked))
            self._b_unacked = 0

    def pump_response(self) -> None:
        client = self.client
        pending = self.resp_pending
        while pending:
            window = min(client.send_window, self.c_send)
            if window <= 0 or client.paused:
                client.blocked[self.csid] = self
                return
            chunk = pending[0]
            if len(chunk) <= window:
                pending.popleft()
            else:
                pending[0] = chunk[window:]
                chunk = chunk[:window]
            size = len(chunk)
            client.send_window -= size
            self.c_send -= size
            end = self.resp_end and self.resp_trailers is None and not pending
            client.send_data(self.csid, chunk, end)
            self._credit_backend(size)
            if end:
                self.finish(True, reset_client=not self.req_end)
                return
        if self.resp_end:
            trailers = self.resp_trailers
            if trailers is None:
                client.send_data(self.csid, b"", True)
                self.finish(True, reset_client=not self.req_end)
            else:
                client.send_headers(self.csid, trailers, True)
                self.finish(_status_of(trailers) == 0, reset_client=not self.req_end)

    # ---- attempts, refusals, endings ---------------------------------------------------

    def request_headers(self) -> list[Header]:
        headers = self.headers
        if self.attempts > 1 and self.timeout is not None:
            left = self.timeout - (time.monotonic() - self.started)
            headers = [(n, format_timeout(left)) if n == _TIMEOUT else (n, v) for n, v in headers]
        choice = self.choice
        if choice is not None and choice.token:
            return [*headers, (_LB_TOKEN, choice.token.encode())]
        return headers

    def opened(self, conn: BackendConnection, stream_id: int) -> None:
        """The backend connection gave the stream its id: send the headers."""
        self.backend = conn
        self.bsid = stream_id
        self.b_send = conn.peer_initial_window
        self.b_recv = _h2.STREAM_WINDOW
        self.b_end_sent = False
        self.req_sent = 0
        self.req_off = 0
        self._b_unacked = 0
        only_headers = self.req_end and not self.req_chunks
        conn.send_headers(stream_id, self.request_headers(), only_headers)
        if only_headers:
            self.b_end_sent = True
        else:
            self.pump_request()

    def not_taken(self, reason: str) -> None:
        """The backend did not take the stream: replay it elsewhere if it can be."""
        if self.closed:
            return
        self._detach_backend(reset=False)
        choice, self.choice = self.choice, None
        proxy = self.proxy
        if choice is not None:
            proxy.selector.finished(choice, reached_backend=False, failed=True)
            self.exclude.add(choice.address)
            if self.replayable and self.attempts < MAX_ATTEMPTS:
                proxy.note_replay(self, choice.address, reason)
                proxy.route(self)
                return
        self.fail(UNAVAILABLE, f"agent-shim: {reason}")

    def _detach_backend(self, *, reset: bool, keep_pending: bool = False) -> None:
        conn = self.backend
        if conn is not None:
            if self.resp_pending and not keep_pending:
                # Held and never passed on: the backend counts these bytes
                # against its connection for good unless we credit them.
                if not conn.closed:
                    conn.credit(sum(len(c) for c in self.resp_pending))
                self.resp_pending.clear()
            if self.bsid:
                conn.streams.pop(self.bsid, None)
                conn.blocked.pop(self.bsid, None)
            elif self in conn.waiting:
                conn.waiting.remove(self)
            if reset and self.bsid and not conn.closed:
                conn.send(_h2.rst_stream(self.bsid, CANCEL))
            conn.stream_done()
        self.backend = None
        self.bsid = 0

    def backend_reset(self, code: int) -> None:
        if not self.accepted and code in (REFUSED_STREAM, CANCEL):
            self.not_taken(f"the backend refused the stream (RST_STREAM {code})")
            return
        if not self.accepted:
            self.fail(UNAVAILABLE, f"agent-shim: the backend reset the stream (code {code})")
            return
        self._detach_backend(reset=False)
        self.client.send(_h2.rst_stream(self.csid, code))
        self.finish(False, reset_client=False)

    def backend_lost(self, reason: str) -> None:
        if not self.accepted:
            self.not_taken(reason)
            return
        self._detach_backend(reset=False, keep_pending=True)
        if self.resp_end:
            return  # pending data and trailers still go to the client
        # What the backend sent still goes to the client, then the status.
        self.resp_trailers = trailers_only(UNAVAILABLE, f"agent-shim: {reason}")[2:]
        self.resp_end = True
        self.pump_response()

    def fail(self, code: int, message: str) -> None:
        """Ends the stream with a status the proxy made (trailers-only when the
        client has no response headers yet)."""
        if self.closed:
            return
        if self.accepted:
            headers = trailers_only(code, message)[2:]
        elif self.refusal is not None and code == UNAVAILABLE:
            headers = self.refusal  # the last backend's own answer
        else:
            headers = trailers_only(code, message)
        self.client.send_headers(self.csid, headers, True)
        self._detach_backend(reset=True)
        self.finish(False, reset_client=not self.req_end)

    def client_reset(self) -> None:
        """The client cancelled, or its connection went away."""
        if self.closed:
            return
        self._detach_backend(reset=True)
        self.finish(False, reset_client=False)

    def _release(self) -> None:
        """Gives back the client connection's window for request bytes held
        and never passed on (`_detach_backend` does it for the response)."""
        if not self.replayable and self.req_chunks:
            held = sum(len(c) for c in self.req_chunks[self.req_sent :]) - self.req_off
            if held > 0:
                self.client.credit(held)
        self.req_chunks.clear()
        self.resp_pending.clear()

    def finish(self, ok: bool, *, reset_client: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._release()
        proxy = self.proxy
        client = self.client
        client.streams.pop(self.csid, None)
        client.blocked.pop(self.csid, None)
        if reset_client and not client.closed:
            # The response is complete before the request: tell the client to
            # stop sending (RFC 9113 8.1), as gRPC servers do.
            client.send(_h2.rst_stream(self.csid, NO_ERROR))
        if self.backend is not None:
            self._detach_backend(reset=not self.b_end_sent)
        if self.kept:
            proxy.kept_total -= self.kept
            self.kept = 0
        choice, self.choice = self.choice, None
        if choice is not None:
            proxy.selector.finished(choice, reached_backend=True, failed=not ok)
        proxy.active -= 1
        if not proxy.active and proxy._drained is not None:
            proxy._drained.set()
        client.stream_done()


# ---- the two kinds of connections ---------------------------------------------------------


class ClientConnection(Connection):
    """A connection from an agent (the server side of HTTP/2)."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, _Stream] = {}
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
        stream = _Stream(proxy, self, stream_id, forwardable(headers))
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

    def on_window_update(self, stream_id: int, increment: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.c_send += increment
            stream.pump_response()

    def on_initial_window_change(self, delta: int) -> None:
        for stream in self.streams.values():
            stream.c_send += delta
        self.on_writable()

    def on_writable(self) -> None:
        if self.blocked and not self.paused:
            blocked = list(self.blocked.values())
            self.blocked.clear()
            for stream in blocked:
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


class BackendConnection(Connection):
    """One h2c connection to a backend, shared by many streams."""

    is_client = True

    def __init__(self, pool: BackendPool) -> None:
        super().__init__()
        self.pool = pool
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, _Stream] = {}
        self.waiting: list[_Stream] = []  # routed here while connecting
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

    def attach(self, stream: _Stream) -> None:
        if self.ready:
            self._open(stream)
        else:
            self.waiting.append(stream)
            stream.backend = self

    def _open(self, stream: _Stream) -> None:
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

    def on_window_update(self, stream_id: int, increment: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.b_send += increment
            stream.pump_request()

    def on_initial_window_change(self, delta: int) -> None:
        for stream in self.streams.values():
            stream.b_send += delta
        self.on_writable()

    def on_writable(self) -> None:
        if self.blocked and not self.paused:
            blocked = list(self.blocked.values())
            self.blocked.clear()
            for stream in blocked:
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

    def __init__(self, proxy: Proxy, address: str) -> None:
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

    def route(self, stream: _Stream) -> None:
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
            raise ValueError("buffer and message limits must be >= 0")
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
        self._drained: asyncio.Event | None = None  # set when stopping and no stream runs
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

    def route(self, stream: _Stream) -> None:
        """Chooses a backend for the stream's next attempt, or waits for one."""
        if self._ready:
            try:
                choice = self.selector.choose(stream.exclude)
            except NoBackendError:
                pass
            except DroppedCallError as err:
                stream.fail(UNAVAILABLE, str(err))
                return
            else:
                self._attach(stream, choice)
                return
        self.spawn(self._wait_for_backend(stream))

    def _attach(self, stream: _Stream, choice: Choice[BackendPool]) -> None:
        stream.choice = choice
        stream.attempts += 1
        choice.channel.route(stream)

    async def _wait_for_backend(self, stream: _Stream) -> None:
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
            try:
                choice = selector.choose(stream.exclude)
            except NoBackendError as err:
                reason = str(err) or reason
            except DroppedCallError as err:
                stream.fail(UNAVAILABLE, str(err))
                return
            else:
                self._attach(stream, choice)
                return
            now = time.monotonic()
            if now >= give_up:
                stream.fail(UNAVAILABLE, f"agent-shim: {reason}")
                return
            await asyncio.sleep(min(delay, give_up - now))
            delay = min(delay * 2, 0.5)
            # Backends that failed may be back; the selector skips failing ones.
            stream.exclude.clear()

    # ---- notes ------------------------------------------------------------------------------

    def note_replay(self, stream: _Stream, backend: str, reason: str) -> None:
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
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._drained.wait()
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
