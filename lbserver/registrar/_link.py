"""One balancer as the registrar sees it: its channel, the open
HeartbeatStream, the token it accepted and what it last answered.

A heartbeat goes out on the stream; a balancer without HeartbeatStream (an
older lbserver) gets unary Heartbeat calls instead. A balancer that answers
UNAUTHENTICATED or PERMISSION_DENIED is asked again at once with the next
token (each at most once per heartbeat); a stream is authorized once, when
it opens, so a stream refused at its opening is reopened with the next
token, and one whose token has left the sequence with a current one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio

from lbserver.logs import Logger
from lbserver.proto.v1 import lbserver_pb2, lbserver_pb2_grpc
from lbserver.registrar._channel import reconnect_options
from lbserver.registrar._stream import HeartbeatStream, refusal
from lbserver.registrar._tokens import Metadata, Tokens, bearer, candidates, offered

# The RPC deadline follows the interval, but one shorter than a slow network's
# round trip would fail every heartbeat.
_MIN_RPC_TIMEOUT = 0.5
# A balancer answering with a tiny interval must not turn the loop into a busy loop.
_MIN_INTERVAL = 0.05
# On a HeartbeatStream every this many heartbeats wait for an answer: proof,
# end to end, that the balancer still takes them (a hung balancer is noticed
# within this many intervals); the others are only written.
_CONFIRM_EVERY = 5
# Codes that mean "could not talk to the balancer" rather than "it said no".
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Codes that mean "not with this token": the next token is tried.
_DENIED_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

_T = TypeVar("_T")
RequestBuilder = Callable[[], Awaitable[lbserver_pb2.HeartbeatRequest]]


class Link:
    """One balancer address and the heartbeat exchange with it."""

    def __init__(
        self,
        address: str,
        *,
        interval: float,
        tokens: Tokens,
        log: Logger,
        credentials: grpc.ChannelCredentials | None = None,
        tls_name: str | None = None,
    ) -> None:
        # A restarted balancer must get the registration back within one interval.
        options = reconnect_options(interval)
        if credentials is not None and tls_name is not None:
            # Connected by IP, verified by the name that resolved to it.
            options += [
                ("grpc.ssl_target_name_override", tls_name),
                ("grpc.default_authority", tls_name),
            ]
        self.address = address
        self.channel = (
            grpc.aio.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=options)
        )
        self._stub: lbserver_pb2_grpc.RegistryAsyncStub = lbserver_pb2_grpc.RegistryStub(
            self.channel
        )
        self.interval = interval
        self._tokens = tokens
        self._log = log
        # "" before the first attempt, then "ok", "unreachable", "rejected:CODE"
        # or "error"; logs are written only when it changes.
        self.status = ""
        # The open Registry.HeartbeatStream, if any; unary Heartbeat calls once
        # the balancer said it has no such method (an older lbserver).
        self._stream: HeartbeatStream | None = None
        self._unary_only = False
        # The state last written on the stream, and heartbeats since the last
        # answer: a state change, a new stream and every _CONFIRM_EVERY-th
        # heartbeat ask for an answer, the others are only written.
        self._sent_state: int | None = None
        self._unanswered = 0
        # One heartbeat at a time, so states are written in order.
        self._exchange = asyncio.Lock()
        # The token this balancer last accepted (the open stream's, if any);
        # tried first while the registrar's tokens still include it.
        self._token: str | None = None

    async def heartbeat(
        self, build: RequestBuilder, *, confirm: bool = False
    ) -> lbserver_pb2.HeartbeatResponse | None:
        """Sends the heartbeat `build` makes; returns the balancer's answer,
        or None when it went out on the stream without asking for one
        (`confirm` asks)."""
        timeout = max(self.interval, _MIN_RPC_TIMEOUT)
        request = None
        if not self._unary_only:
            async with self._exchange:
                # Built under the lock: a drain's DRAINING must not be
                # overtaken by a SERVING heartbeat built before it.
                request = await build()
                try:
                    return await self._stream_heartbeat(request, timeout, confirm)
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._unary_only = True
                    self._log.info(
                        "balancer has no HeartbeatStream; using unary heartbeats",
                        balancer=self.address,
                    )
                    # Sent again unary, without building it (and reading the
                    # load) twice.
                    request.ClearField("reply_token")
        unary = request if request is not None else await build()
        return await self._with_tokens(
            lambda metadata, remaining: self._stub.Heartbeat(
                unary, timeout=remaining, metadata=metadata
            ),
            timeout,
        )

    async def deregister(self, request: lbserver_pb2.DeregisterRequest, within: float) -> None:
        """Deregisters within `within` seconds; a failure is logged, not raised."""
        try:
            reply = await self._with_tokens(
                lambda metadata, remaining: self._stub.Deregister(
                    request, timeout=remaining, metadata=metadata
                ),
                within,
            )
        except grpc.aio.AioRpcError as err:
            self.log_error("deregister failed", err)
        else:
            self._log.info("deregistered", balancer=self.address, removed=reply.removed)

    def close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def close(self) -> None:
        self.close_stream()
        await self.channel.close(None)

    def log_error(self, event: str, err: grpc.aio.AioRpcError) -> None:
        self._log.warning(event, balancer=self.address, code=err.code().name, error=err.details())

    def note_success(self, reply: lbserver_pb2.HeartbeatResponse) -> None:
        interval = reply.heartbeat_interval.ToNanoseconds() / 1e9
        if interval > 0:
            self.interval = max(interval, _MIN_INTERVAL)
        if self.status != "ok":
            self._log.info(
                "registered with balancer" if not self.status else "balancer reachable again",
                balancer=self.address,
                granted_ttl=reply.granted_ttl.ToNanoseconds() / 1e9,
                interval=self.interval,
            )
            self.status = "ok"

    def note_failure(self, err: grpc.aio.AioRpcError) -> None:
        code = err.code()
        status = "unreachable" if code in _UNREACHABLE_CODES else f"rejected:{code.name}"
        if status == self.status:
            return
        self.status = status
        self.log_error(
            "balancer unreachable" if status == "unreachable" else "balancer rejected heartbeat",
            err,
        )

    def note_error(self) -> None:
        """A heartbeat failed with a bug (logged once, with its traceback)."""
        if self.status != "error":
            self._log.exception("heartbeat failed", balancer=self.address)
            self.status = "error"

    def _note_news(self, news: lbserver_pb2.HeartbeatStreamResponse) -> None:
        """An answer the balancer volunteered: the outcome of this backend's
        heartbeats changed (refused now, or accepted again, or a new TTL)."""
        refused = refusal(news)
        if refused is not None:
            self.note_failure(refused)
        else:
            self.note_success(news.accepted)

    async def _stream_heartbeat(
        self, request: lbserver_pb2.HeartbeatRequest, reply_within: float, confirm: bool
    ) -> lbserver_pb2.HeartbeatResponse | None:
        tokens = self._tokens.current()
        stream = self._stream
        if stream is not None and not stream.ended and offered(self._token, tokens):
            ask = (
                confirm
                or self._sent_state != request.state
                or self._unanswered + 1 >= _CONFIRM_EVERY
            )
            try:
                reply = await stream.send(request, reply_within=reply_within if ask else None)
            except BaseException:
                self.close_stream()
                raise
        else:
            # A new stream (the token travels when it opens), also when the
            # open one's token is no longer offered (rotated out).
            self.close_stream()
            reply = await self._open_stream(request, reply_within, tokens)
        self._sent_state = request.state
        if reply is None:
            self._unanswered += 1
            return None
        self._unanswered = 0
        refused = refusal(reply)
        if refused is not None:
            raise refused
        return reply.accepted

    async def _open_stream(
        self,
        request: lbserver_pb2.HeartbeatRequest,
        reply_within: float,
        tokens: tuple[str, ...],
    ) -> lbserver_pb2.HeartbeatStreamResponse:
        """Opens a HeartbeatStream with the first token the balancer takes
        and sends `request` on it, asking for the answer. An answer, even a
        refusal of the heartbeat, means the stream's token was accepted."""
        tried = candidates(self._token, tokens)
        for attempt, token in enumerate(tried):
            stream = self._stream = HeartbeatStream(self._stub, bearer(token), self._note_news)
            try:
                reply = await stream.send(request, reply_within=reply_within)
            except grpc.aio.AioRpcError as err:
                self.close_stream()
                if err.code() in _DENIED_CODES and attempt + 1 < len(tried):
                    continue
                raise
            except BaseException:
                self.close_stream()
                raise
            assert reply is not None  # asked for
            self._accepted(token, tokens)
            return reply
        raise AssertionError("no token candidates")  # pragma: no cover - never empty

    async def _with_tokens(
        self, call: Callable[[Metadata, float], Awaitable[_T]], within: float
    ) -> _T:
        """A unary call (given its metadata and timeout), made again with the
        next token while the balancer answers UNAUTHENTICATED or
        PERMISSION_DENIED; all attempts within `within` seconds."""
        tokens = self._tokens.current()
        tried = candidates(self._token, tokens)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        for attempt, token in enumerate(tried):
            try:
                result = await call(bearer(token), max(deadline - loop.time(), 0.0))
            except grpc.aio.AioRpcError as err:
                if err.code() in _DENIED_CODES and attempt + 1 < len(tried):
                    continue
                raise
            self._accepted(token, tokens)
            return result
        raise AssertionError("no token candidates")  # pragma: no cover - never empty

    def _accepted(self, token: str | None, tokens: tuple[str, ...]) -> None:
        previous, self._token = self._token, token
        if token == previous or token is None:
            return
        if previous is None and token == tokens[0]:
            return  # the first token, from the start: nothing to say
        # The token's place in the sequence, never the token.
        self._log.info(
            "switched registration token",
            balancer=self.address,
            token_number=tokens.index(token) + 1,
            tokens=len(tokens),
        )
