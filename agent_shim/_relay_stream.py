"""One relayed stream: a client stream and the backend stream it goes to
(see `agent_shim.proxy` for the whole relay).

It sees the proxy only as a `StreamHost`, so the relay's imports point one
way: `proxy` -> `_relay_stream` -> `_relay_backends` -> `_relay_connection`."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Final, Protocol

from agent_shim import _h2
from agent_shim._grpc_wire import (
    _LB_TOKEN,
    _NOT_TAKEN,
    _TIMEOUT,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    _status_of,
    format_timeout,
    forwardable,
    parse_timeout,
    trailers_only,
)
from agent_shim._h2 import CANCEL, NO_ERROR, REFUSED_STREAM
from agent_shim._hpack import Header
from agent_shim._relay_backends import BackendConnection, BackendPool
from agent_shim._relay_connection import StreamConnection
from agent_shim._selector import Choice

# Tries of one stream before its error is passed on (gRPC's retry policy allows 5).
MAX_ATTEMPTS: Final = 5


class AttemptOutcomes(Protocol):
    """What a stream tells the selector (`agent_shim._selector.Selector`)."""

    def finished(
        self, choice: Choice[BackendPool], *, reached_backend: bool, failed: bool = False
    ) -> None: ...


class StreamHost(Protocol):
    """What a stream needs of the proxy (`agent_shim.proxy.Proxy`): its
    limits, the counters a stream keeps up to date, and routing."""

    kept_total: int  # request bytes kept for replays, of all streams
    active: int  # streams running

    @property
    def selector(self) -> AttemptOutcomes: ...

    @property
    def max_buffer_bytes(self) -> int: ...

    @property
    def max_buffer_total(self) -> int: ...

    @property
    def max_message_bytes(self) -> int: ...

    @property
    def drained(self) -> asyncio.Event | None: ...  # set by the last stream when stopping

    def route(self, stream: Stream) -> None: ...

    def note_replay(self, stream: Stream, backend: str, reason: str) -> None: ...


class Stream:
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
        self,
        proxy: StreamHost,
        client: StreamConnection[Stream],
        csid: int,
        headers: list[Header],
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
        if not (self.req_end or self.closed):
            self._c_unacked, self.c_recv = _acknowledge(
                client, self.csid, self._c_unacked + amount, self.c_recv
            )

    def no_replay(self) -> None:
        """From now on the stream cannot be replayed: what was sent is dropped."""
        if not self.replayable:
            return
        self.replayable = False
        self.proxy.kept_total -= self.kept
        self.kept = 0
        self._drop_sent()

    def _drop_sent(self) -> None:
        """Forgets the request chunks already written to the backend."""
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
        if not self.replayable:
            self._drop_sent()
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
        if not (self.resp_end or self.closed):
            self._b_unacked, self.b_recv = _acknowledge(
                conn, self.bsid, self._b_unacked + amount, self.b_recv
            )

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
        if not proxy.active and proxy.drained is not None:
            proxy.drained.set()
        client.stream_done()


class _Sender(Protocol):
    def send(self, data: bytes) -> None: ...


def _acknowledge(conn: _Sender, stream_id: int, unacked: int, window: int) -> tuple[int, int]:
    """Bytes of one side's stream written to the other side are acknowledged
    (WINDOW_UPDATE) once they reach a quarter of the stream window, not one
    frame at a time; the (unacked, window) that follow."""
    if unacked >= _h2.STREAM_WINDOW // 4:
        conn.send(_h2.window_update(stream_id, unacked))
        return 0, window + unacked
    return unacked, window
