"""`agent-shim proxy`: a local gRPC proxy that balances every call it forwards.

An agent that cannot use the grpclb policy (SkyWalking's Java, Python, Go and
Node agents create plain channels) points its collector address at this proxy;
the proxy forwards each call to a backend the Selector chooses from the
balancer's server list, so load is balanced per *call* instead of per
connection.

The proxy knows no protos. A generic handler serves every method as a
stream-stream call over raw bytes, which is wire-compatible with all four call
types: a unary call is a stream of one request and one response. For each call
it forwards to the chosen backend:

- request metadata, minus hop-by-hop and transport headers (`HOP_BY_HOP`,
  pseudo headers, `grpc-*`) and any `lb-token` the client sent; the chosen
  backend's `lb-token` is added;
- the deadline (the time the caller has left);
- cancellation: when the caller cancels, the backend call is cancelled;
- the backend's initial metadata, messages, status code, details and trailing
  metadata, unchanged (minus the same hop-by-hop headers).

Two upstream call shapes. A call whose request stream turns out to be one
message and the end (unary and server-streaming calls: the client sends both
at once) is forwarded as a unary-stream call, which costs gRPC fewer
operations; any other stream is forwarded as a stream-stream call, message by
message as they come. A call waits at most `SETTLE_WAIT` (20 ms) to see which
it is: a stream with two messages goes at once, and one whose client sends
nothing until the server speaks (bidi) goes after that wait, never deadlocks.

Replay. Requests are kept, up to `max_buffer_bytes` per call, until the
backend *accepts* the call (sends its initial metadata or a first message).
If the backend call ends before that with UNAVAILABLE (connection refused,
backend gone, trailers-only UNAVAILABLE) or CANCELLED (a backend shutting
down), or breaks while the proxy sends, the kept requests are replayed on
another backend, the failed one excluded and reported to the Selector as not
reached (at most `MAX_ATTEMPTS` tries; then the last backend's status is passed
on). Delivery is at least once: a backend that read a stream and died before
answering gets it again elsewhere. SkyWalking's
`TraceSegmentReportService/collect` is client-streaming and answers only at
the end of the stream, so a whole stream of segments is kept until then and
none is lost when a collector dies. A stream that grows
past the bound before it is accepted can no longer be replayed: its messages
are dropped from the buffer as soon as they are sent, and a later failure is
passed to the caller.

When no backend can take a call (no list yet, every backend failing), the call
waits up to `no_backend_wait` seconds (bounded by its deadline) for one before
failing with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Final, Protocol

import grpc

from agent_shim._selector import (
    LB_TOKEN_METADATA_KEY,
    Choice,
    DroppedCallError,
    NoBackendError,
)
from lbserver._logging import get_logger

log = get_logger("agent_shim.proxy")

DEFAULT_MAX_BUFFER_BYTES: Final = 4 * 1024 * 1024
DEFAULT_NO_BACKEND_WAIT: Final = 5.0
DEFAULT_SHUTDOWN_GRACE: Final = 10.0
# Tries of one call before its error is passed on (gRPC's retry policy allows 5).
MAX_ATTEMPTS: Final = 5
# How long a call waits to see whether its request stream is one message and
# the end (a unary or server-streaming call: the upstream call is then a
# cheaper unary-stream one). Only a stream still open after its first message
# waits this long, once, before it is forwarded as a stream.
SETTLE_WAIT: Final = 0.02

# Returned by ServicerContext.read() / Call.read() once the peer half-closed.
_EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]

# HTTP/1.1 hop-by-hop headers (RFC 9110 7.6.1), HTTP/2 connection headers and
# the ones gRPC itself sets on every call. Pseudo headers (":authority") and
# reserved `grpc-*` headers are dropped as well, and `lb-token` is replaced.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-type",
        "content-length",
        "user-agent",
        LB_TOKEN_METADATA_KEY,
    }
)

_UNLIMITED_MESSAGES: Final = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)

# Agents keep their connection for hours and may ping it; never answer with
# GOAWAY too_many_pings (the same settings as lbserver's own server).
SERVER_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    *_UNLIMITED_MESSAGES,
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Two proxies on one port would silently split the agents between them.
    ("grpc.so_reuseport", 0),
)

CHANNEL_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    *_UNLIMITED_MESSAGES,
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)

Metadata = tuple[tuple[str, str | bytes], ...]
_Upstream = grpc.aio.StreamStreamCall[bytes, bytes] | grpc.aio.UnaryStreamCall[bytes, bytes]


def backend_channel(address: str) -> grpc.aio.Channel:
    """The channel the proxy uses for one backend (no message size limits)."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


class BackendSelector(Protocol):
    """What the proxy needs of `agent_shim._selector.Selector`."""

    async def wait_ready(self, timeout: float | None = None) -> bool: ...  # noqa: ASYNC109

    def choose(self, exclude: Collection[str] = ()) -> Choice[grpc.aio.Channel]: ...

    def finished(
        self, choice: Choice[grpc.aio.Channel], *, reached_backend: bool, failed: bool = False
    ) -> None: ...


def forwardable(metadata: Any) -> Metadata:
    """`metadata` (pairs, or a grpc.aio.Metadata) without hop-by-hop, pseudo,
    `grpc-*` and `lb-token` entries."""
    if not metadata:
        return ()
    return tuple(
        (key, value)
        for key, value in metadata
        if key not in HOP_BY_HOP and not key.startswith((":", "grpc-"))
    )


class _ProxyAbortError(Exception):
    """Ends a call with a status the proxy made itself."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Requests:
    """The request messages of one call, read from the caller by one task and
    written to the current backend call by another (`pump`).

    Messages stay in `_items` while the call may still be replayed (until the
    backend accepts it, within `limit` bytes); after that each message is
    dropped once sent, and reading waits while `limit` bytes are unsent, so a
    slow backend slows the caller down instead of filling memory.
    """

    __slots__ = (
        "_base",
        "_changed",
        "_context",
        "_items",
        "_limit",
        "_owner",
        "_reader",
        "_sent",
        "_settle",
        "_size",
        "eof",
        "replayable",
        "send_failed",
    )

    def __init__(self, context: grpc.aio.ServicerContext[bytes, bytes], limit: int) -> None:
        self._context = context
        self._owner = asyncio.current_task()  # the call's handler
        self._limit = limit
        self._items: list[bytes] = []
        self._base = 0  # absolute index of _items[0]
        self._sent = 0  # absolute index of the next message the current pump sends
        self._size = 0  # bytes in _items
        self._changed = asyncio.Event()
        self._settle: asyncio.Future[None] | None = None
        self.eof = False
        self.replayable = True
        self.send_failed = False
        self._reader: asyncio.Task[None] = asyncio.create_task(self._read())

    async def single_message(self, wait: float) -> bytes | None:
        """The request if the stream is exactly one message and the end, as a
        unary or server-streaming client sends it (message and half-close come
        together); None for any other stream, or when that is not known within
        `wait` seconds (a client stream still being written, or a bidi stream
        whose client waits for the server first)."""
        if not self.eof and len(self._items) < 2:
            loop = asyncio.get_running_loop()
            settle = self._settle = loop.create_future()
            timer = loop.call_later(wait, _resolve, settle)
            try:
                await settle
            finally:
                timer.cancel()
                self._settle = None
        if self.eof and self._base == 0 and len(self._items) == 1:
            return self._items[0]
        return None

    async def _read(self) -> None:
        try:
            await self._read_all()
        except Exception as err:  # the call or the server ended under us
            log.debug("reading a request stream failed", error=repr(err))

    async def _read_all(self) -> None:
        context, changed = self._context, self._changed
        while True:
            message = await context.read()
            if message is _EOF:
                # A caller's cancellation also ends its stream like this, and
                # the handler's cancellation follows at once: give it that
                # moment, so a cancelled stream is cancelled upstream rather
                # than half-closed as if complete.
                await asyncio.sleep(0)
                if self._owner is not None and self._owner.cancelling():
                    return
                self.eof = True
                changed.set()
                if self._settle is not None:
                    _resolve(self._settle)
                return
            self._items.append(message)
            self._size += len(message)
            if self.replayable and self._size > self._limit:
                self.replayable = False
                self._trim()
            changed.set()
            if self._settle is not None and len(self._items) >= 2:
                _resolve(self._settle)
            # Back-pressure once nothing is kept for replay.
            while not self.replayable and self._size > self._limit:
                changed.clear()
                await changed.wait()

    def _trim(self) -> None:
        """Drops messages the current pump has sent (no replay any more)."""
        drop = self._sent - self._base
        if drop > 0:
            self._size -= sum(len(m) for m in self._items[:drop])
            del self._items[:drop]
            self._base = self._sent

    def accepted(self) -> None:
        """The backend accepted the call: nothing needs keeping for a replay."""
        if self.replayable:
            self.replayable = False
            self._trim()
            self._changed.set()

    async def pump(self, call: grpc.aio.StreamStreamCall[bytes, bytes]) -> None:
        """Writes every message (from the first one kept) to `call`, then half-closes.

        A write that fails because the stream broke under it (the backend
        went away) makes grpcio end the call with a local INTERNAL status
        instead of the transport's UNAVAILABLE: `send_failed` records that,
        so the handler still knows the backend never took the call."""
        self._sent = self._base
        self.send_failed = False
        changed = self._changed
        try:
            while True:
                index = self._sent - self._base
                if index < len(self._items):
                    message = self._items[index]
                    self._sent += 1
                    if not self.replayable:
                        self._trim()  # sent and not needed again
                        changed.set()  # wakes a reader held back by the bound
                    await call.write(message)
                elif self.eof:
                    await call.done_writing()
                    return
                else:
                    changed.clear()
                    await changed.wait()
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            return  # the backend call had ended; the handler reads its status
        except grpc.aio.AioRpcError as err:
            self.send_failed = err.code() is grpc.StatusCode.INTERNAL
        except Exception as err:  # grpcio's InternalError: the stream broke
            log.debug("writing to a backend failed", error=repr(err))
            self.send_failed = True

    def close(self) -> None:
        self._reader.cancel()


class Proxy:
    """Forwards every call the server receives to a backend the selector picks."""

    def __init__(
        self,
        selector: BackendSelector,
        *,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        no_backend_wait: float = DEFAULT_NO_BACKEND_WAIT,
    ) -> None:
        if max_buffer_bytes < 0:
            raise ValueError("max_buffer_bytes must be >= 0")
        self._selector = selector
        self._max_buffer_bytes = max_buffer_bytes
        self._no_backend_wait = no_backend_wait
        self._ready = False
        self._replay_logged: dict[str, float] = {}  # backend -> when a replay was last logged
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        self.calls = 0  # calls received
        self.replays = 0  # attempts repeated on another backend

    # ---- the generic handler -------------------------------------------------

    def generic_handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        return _GenericHandler(self)

    def method_handler(self, method: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        handler = self._handlers.get(method)
        if handler is None:

            async def behavior(
                _requests: object, context: grpc.aio.ServicerContext[bytes, bytes]
            ) -> None:
                await self.forward(method, context)

            handler = grpc.stream_stream_rpc_method_handler(behavior)
            if len(self._handlers) < 4096:  # bounded: method names come from clients
                self._handlers[method] = handler
        return handler

    # ---- one call ----------------------------------------------------------------

    async def forward(self, method: str, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        self.calls += 1
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        metadata = forwardable(context.invocation_metadata())
        requests = _Requests(context, self._max_buffer_bytes)
        single = await requests.single_message(SETTLE_WAIT)
        call: _Upstream | None = None
        choice: Choice[grpc.aio.Channel] | None = None
        pump: asyncio.Task[None] | None = None
        exclude: set[str] = set()
        refused: _Upstream | None = None  # the last call a backend did not take
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    choice = await self._choose(exclude, deadline)
                except _ProxyAbortError:
                    if refused is None:
                        raise
                    await self._relay_responses(refused, (), context)  # its status
                    return
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                call_metadata = metadata + choice.metadata if choice.token else metadata
                if single is not None:
                    call = choice.channel.unary_stream(method, None, None)(
                        single, metadata=call_metadata, timeout=timeout
                    )
                else:
                    streaming = choice.channel.stream_stream(method, None, None)(
                        None, metadata=call_metadata, timeout=timeout
                    )
                    pump = asyncio.create_task(requests.pump(streaming))
                    call = streaming
                headers = await call.initial_metadata()
                if call.done() and not headers and self._not_taken(await call.code(), requests):
                    # UNAVAILABLE with no response headers (a trailers-only
                    # answer, no connection, the backend went away while we
                    # sent): the backend did not take the call.
                    self._selector.finished(choice, reached_backend=False, failed=True)
                    address, choice = choice.address, None
                    if requests.replayable and attempt < MAX_ATTEMPTS:
                        exclude.add(address)
                        self._note_replay(method, address, await call.details())
                        if pump is not None:
                            pump.cancel()
                        refused = call
                        continue
                requests.accepted()
                await self._relay_responses(call, headers, context)
                if choice is not None:
                    code = await call.code()
                    self._selector.finished(
                        choice, reached_backend=True, failed=code is not grpc.StatusCode.OK
                    )
                    choice = None
                return
        except _ProxyAbortError as abort:
            context.set_code(abort.code)
            context.set_details(abort.details)
        finally:
            requests.close()
            if pump is not None:
                pump.cancel()
            if call is not None and not call.done():
                call.cancel()  # the caller cancelled, or its deadline passed
            if choice is not None:  # a call cut short (cancelled) still counts
                self._selector.finished(choice, reached_backend=True, failed=True)

    @staticmethod
    def _not_taken(code: grpc.StatusCode, requests: _Requests) -> bool:
        """For a backend call that ended without response headers: did the
        backend not take it? UNAVAILABLE (no connection, refused, GOAWAY),
        CANCELLED (the proxy cancels a backend call only after deciding, so
        this came from a backend stopping), or the local INTERNAL grpcio
        reports when a send fails because the stream broke."""
        return (
            code is grpc.StatusCode.UNAVAILABLE
            or code is grpc.StatusCode.CANCELLED
            or (code is grpc.StatusCode.INTERNAL and requests.send_failed)
        )

    def _note_replay(self, method: str, backend: str, details: str | None) -> None:
        self.replays += 1
        now = time.monotonic()
        if now - self._replay_logged.get(backend, -1e9) >= 1.0:  # at most 1/s per backend
            if len(self._replay_logged) > 1024:
                self._replay_logged.clear()
            self._replay_logged[backend] = now
            log.info(
                "call not accepted: replaying it on another backend",
                method=method,
                backend=backend,
                details=details,
                replays=self.replays,
            )

    async def _relay_responses(
        self,
        call: _Upstream,
        headers: Any,
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> None:
        """Initial metadata, messages, then status, details and trailing metadata."""
        if headers:
            headers = forwardable(headers)
            if headers:
                await context.send_initial_metadata(headers)
        try:
            while True:
                message = await call.read()
                if message is _EOF:
                    break
                await context.write(message)  # type: ignore[arg-type]
        except grpc.aio.AioRpcError:
            pass  # a non-OK status: passed on below
        code = await call.code()
        trailing = forwardable(await call.trailing_metadata())
        if trailing:
            context.set_trailing_metadata(trailing)
        details = await call.details()
        if details:
            context.set_details(details)
        context.set_code(code)

    async def _choose(self, exclude: set[str], deadline: float | None) -> Choice[grpc.aio.Channel]:
        """A backend for the next attempt; waits (within the call's deadline and
        `no_backend_wait`) while none is available."""
        selector = self._selector
        if self._ready:
            try:
                return selector.choose(exclude)
            except NoBackendError:
                pass
            except DroppedCallError as err:
                raise _ProxyAbortError(grpc.StatusCode.UNAVAILABLE, str(err)) from None
        give_up = time.monotonic() + self._no_backend_wait
        if deadline is not None:
            give_up = min(give_up, deadline)
        delay = 0.02
        reason = "no backend is available"
        while True:
            if not self._ready:
                ready = await selector.wait_ready(max(0.0, give_up - time.monotonic()))
                self._ready = self._ready or ready
                if not ready:
                    raise _ProxyAbortError(
                        grpc.StatusCode.UNAVAILABLE,
                        "agent-shim: no server list from the balancer yet and no fallback",
                    )
            try:
                return selector.choose(exclude)
            except NoBackendError as err:
                reason = str(err) or reason
            except DroppedCallError as err:
                raise _ProxyAbortError(grpc.StatusCode.UNAVAILABLE, str(err)) from None
            now = time.monotonic()
            if now >= give_up:
                raise _ProxyAbortError(grpc.StatusCode.UNAVAILABLE, f"agent-shim: {reason}")
            await asyncio.sleep(min(delay, give_up - now))
            delay = min(delay * 2, 0.5)
            exclude.clear()  # backends that failed may be back; the selector skips failing ones


if TYPE_CHECKING:
    _GenericHandlerBase = grpc.GenericRpcHandler[bytes, bytes]
else:  # grpcio's class is not generic at run time
    _GenericHandlerBase = grpc.GenericRpcHandler


class _GenericHandler(_GenericHandlerBase):
    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = handler_call_details.method
        if isinstance(method, bytes):  # pragma: no cover - older grpcio
            method = method.decode()
        return self._proxy.method_handler(method)


class ProxyServer:
    """A `grpc.aio` server running a `Proxy` on one address."""

    def __init__(self, proxy: Proxy, listen: str) -> None:
        self.proxy = proxy
        self.listen = listen
        self.port = 0
        self._server = grpc.aio.server(options=SERVER_OPTIONS)
        self._server.add_generic_rpc_handlers((proxy.generic_handler(),))

    async def start(self) -> int:
        """Binds and serves; returns the bound port. OSError if it cannot listen."""
        try:
            self.port = self._server.add_insecure_port(self.listen)
        except RuntimeError as err:
            raise OSError(f"cannot listen on {self.listen}: {err}") from err
        if not self.port:  # pragma: no cover - older grpcio returns 0
            raise OSError(f"cannot listen on {self.listen}")
        await self._server.start()
        return self.port

    async def stop(self, grace: float | None = DEFAULT_SHUTDOWN_GRACE) -> None:
        """Stops taking calls; calls in flight get `grace` seconds to finish."""
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.stop(grace)
