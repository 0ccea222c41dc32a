"""grpc.lb.v1.LoadBalancer/BalanceLoad: streams a name's server lists.

BalanceLoad is open to every client, so what one client can hold is bounded
(docs/operations.md, "Limits"):

- A stream waiting for its initial request is *pending*: it holds no
  `max_streams` slot. At most `max_pending_streams` wait at once; one more
  ends the oldest waiting stream (a grpclb client sends its initial request
  with the call, so the oldest is the likeliest not to send one). Each waits
  at most `initial_request_timeout`.
- A stream holds a `max_streams` slot once its initial request is accepted.
- One peer IP holds at most `max_streams_per_peer` streams, pending or not;
  a new stream over the cap ends that peer's oldest pending stream if it has
  one, else it is refused. Clients behind one NAT or proxy share the cap.
- After the initial request a stream may send `client_stats_rate_per_stream`
  messages per second (bursts of CLIENT_STATS_BURST); a stream that sends
  more is ended.

Every refusal is RESOURCE_EXHAUSTED (DEADLINE_EXCEEDED for the timeout) with
the limit's name and value in the message, counted in
lbserver_streams_refused_total and logged at most LogLimiter's budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf import duration_pb2

from lbserver import metrics
from lbserver.balancer import Balancer, ClientCallStats, Watch
from lbserver.domain.serverlist import ServerList
from lbserver.domain.validation import check_balance_name
from lbserver.errors import InvalidArgumentError
from lbserver.grpc_compat import EOF_MARKER
from lbserver.logs import LogLimiter, clip
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb_pb2
from lbserver.proto.grpclb.v1 import load_balancer_pb2_grpc as lb_grpc
from lbserver.security import RefusedMessage, request_decoder
from lbserver.services._streams import (
    MessageRate,
    RefusedError,
    StreamAdmission,
    StreamEnds,
    StreamLimits,
    Ticket,
    admitted,
    first_message,
    serialize_response,
)

log = structlog.get_logger("lbserver.grpclb")

METHOD = "/grpc.lb.v1.LoadBalancer/BalanceLoad"
# The burst of a stream's message rate limit (client_stats_rate_per_stream).
CLIENT_STATS_BURST = 10.0


def server_list_message(servers: ServerList) -> lb_pb2.LoadBalanceResponse:
    return lb_pb2.LoadBalanceResponse(
        server_list=lb_pb2.ServerList(
            servers=[
                lb_pb2.Server(
                    ip_address=entry.ip,
                    port=entry.port,
                    load_balance_token=entry.token,
                    drop=entry.drop,
                )
                for entry in servers.entries
            ]
        )
    )


FALLBACK = lb_pb2.LoadBalanceResponse(fallback_response=lb_pb2.FallbackResponse())
FALLBACK_BYTES = FALLBACK.SerializeToString()
# Serialized lists kept (by ServerList identity) for the streams still to be
# written: one serialization per list, not one per stream.
ENCODED_LISTS_KEPT = 64


def client_stats_delta(stats: lb_pb2.ClientStats) -> ClientCallStats:
    values = (
        stats.num_calls_started,
        stats.num_calls_finished,
        stats.num_calls_finished_with_client_failed_to_send,
        stats.num_calls_finished_known_received,
    )
    if any(value < 0 for value in values):
        raise InvalidArgumentError("client_stats", "counters are deltas and must not be negative")
    dropped: dict[str, int] = {}
    for per_token in stats.calls_finished_with_drop:
        if per_token.num_calls < 0:
            raise InvalidArgumentError(
                "client_stats.calls_finished_with_drop", "negative num_calls"
            )
        token = per_token.load_balance_token
        dropped[token] = dropped.get(token, 0) + per_token.num_calls
    return ClientCallStats(*values, calls_dropped_by_token=dropped, reports=1)


# metrics.LIST_PUSHES's children, looked up once per kind instead of per push
# (created at the first push of their kind, as labels() would).
_LIST_PUSHES: dict[str, Any] = {}


class LoadBalancerService(lb_grpc.LoadBalancerServicer):
    def __init__(
        self,
        balancer: Balancer,
        *,
        client_stats_interval: float,
        initial_request_timeout: float,
        max_streams: int = 20_000,
        max_streams_per_peer: int = 1_000,
        max_pending_streams: int = 1_000,
        client_stats_rate_per_stream: float = 2.0,
        log_limiter: LogLimiter | None = None,
    ) -> None:
        self._limits = StreamLimits(
            max_streams=max_streams,
            max_streams_per_peer=max_streams_per_peer,
            max_pending_streams=max_pending_streams,
            initial_request_timeout=initial_request_timeout,
            client_stats_rate_per_stream=client_stats_rate_per_stream,
        )
        self.admission = StreamAdmission(self._limits)
        self._log_limiter = log_limiter or LogLimiter()
        self._ends = StreamEnds("BalanceLoad", metrics.STREAM_ERRORS, self._log_limiter)
        self._balancer = balancer
        self._stats_interval = duration_pb2.Duration()
        self._stats_interval.FromNanoseconds(int(client_stats_interval * 1e9))
        self._initial_request_timeout = initial_request_timeout
        self._initial_response = lb_pb2.LoadBalanceResponse(
            initial_response=lb_pb2.InitialLoadBalanceResponse(
                client_stats_report_interval=self._stats_interval
            )
        )
        # Whether writes may be pre-serialized bytes (add_to_server registered
        # BalanceLoad with serialize_response); otherwise messages.
        self._writes_bytes = False
        self._encoded: dict[int, tuple[ServerList, bytes]] = {}

    def add_to_server(self, server: grpc.aio.Server, max_message_bytes: int = 4 * 1024**2) -> None:
        """Registers BalanceLoad like add_LoadBalancerServicer_to_server, but
        with a response serializer that lets the stream write each list
        serialized once for all its clients, and a request deserializer that
        refuses (rather than fails on) messages over `max_message_bytes` or
        that do not decode."""
        handlers = {
            "BalanceLoad": grpc.stream_stream_rpc_method_handler(
                self.BalanceLoad,
                request_deserializer=request_decoder(
                    lb_pb2.LoadBalanceRequest, METHOD, max_message_bytes
                ),
                response_serializer=serialize_response,
            )
        }
        service = "grpc.lb.v1.LoadBalancer"
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]
        self._writes_bytes = True

    def _list_response(self, servers: ServerList) -> bytes | lb_pb2.LoadBalanceResponse:
        if not self._writes_bytes:
            return server_list_message(servers)
        kept = self._encoded.get(id(servers))
        if kept is not None and kept[0] is servers:
            return kept[1]
        encoded = server_list_message(servers).SerializeToString()
        if len(self._encoded) >= ENCODED_LISTS_KEPT:
            self._encoded.clear()
        self._encoded[id(servers)] = (servers, encoded)
        return encoded

    async def BalanceLoad(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[lb_pb2.LoadBalanceRequest],
        context: grpc.aio.ServicerContext[lb_pb2.LoadBalanceRequest, lb_pb2.LoadBalanceResponse],
    ) -> None:
        metrics.STREAMS_OPENED.inc()
        await admitted(
            self.admission,
            context,
            self._ends,
            lambda peer, ticket: self._balance(context, peer, ticket),
        )

    async def _initial_request(
        self,
        context: grpc.aio.ServicerContext[lb_pb2.LoadBalanceRequest, lb_pb2.LoadBalanceResponse],
        ticket: Ticket,
    ) -> object:
        return await first_message(
            asyncio.ensure_future(context.read()), ticket, self._initial_request_timeout
        )

    async def _balance(
        self,
        context: grpc.aio.ServicerContext[lb_pb2.LoadBalanceRequest, lb_pb2.LoadBalanceResponse],
        peer: str,
        ticket: Ticket,
    ) -> None:
        try:
            first = await self._initial_request(context, ticket)
        except RefusedError as refusal:
            await self._ends.refuse(context, refusal, peer)
            return
        if first is EOF_MARKER:
            return
        if type(first) is RefusedMessage:
            await self._ends.refuse(context, first, peer)
            return
        assert isinstance(first, lb_pb2.LoadBalanceRequest)
        if first.WhichOneof("load_balance_request_type") != "initial_request":
            await self._ends.refuse(
                context,
                RefusedError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the first message of a BalanceLoad stream must be initial_request",
                ),
                peer,
            )
            return
        try:
            name = check_balance_name(first.initial_request.name)
            self.admission.establish(ticket)
        except InvalidArgumentError as exc:
            await self._ends.refuse(
                context, RefusedError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)), peer
            )
            return
        except RefusedError as refusal:
            await self._ends.refuse(context, refusal, peer)
            return
        logger = log.bind(peer=peer, name=name)
        await context.write(self._initial_response)
        watch = self._balancer.watch(name)
        self._log_limiter.info(logger, "client connected", service=watch.service)
        reader = asyncio.create_task(self._read_stats(context, watch, logger))
        ended: RefusedError | RefusedMessage | None = None
        try:
            await self._stream_answers(context, watch, reader, logger)
            if reader.done() and not reader.cancelled() and reader.exception() is None:
                ended = reader.result()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            watch.close()
            self._log_limiter.info(logger, "client disconnected")
        if ended is not None:
            await self._ends.refuse(context, ended, peer)

    async def _stream_answers(
        self,
        context: grpc.aio.ServicerContext[lb_pb2.LoadBalanceRequest, lb_pb2.LoadBalanceResponse],
        watch: Watch,
        reader: asyncio.Task[Any],
        logger: structlog.typing.FilteringBoundLogger,
    ) -> None:
        version, answer = watch.current()
        # What this stream last wrote: ("list", servers) or ("fallback", None).
        sent: tuple[str, ServerList | None] | None = None
        # The reader ending (client half-close or call end) wakes the wait below.
        reader.add_done_callback(lambda _: watch.interrupt())
        fallback: Any = FALLBACK_BYTES if self._writes_bytes else FALLBACK
        while not self._balancer.closed and not reader.done():
            if answer.kind != "pending":
                servers = watch.servers(answer)
                reply = ("list", servers) if servers is not None else ("fallback", None)
                if reply != sent:
                    response: Any = (
                        self._list_response(servers) if servers is not None else fallback
                    )
                    await context.write(response)
                    if version:
                        metrics.PUSH_LATENCY.observe(time.monotonic() - watch.published_at)
                    kind = "server_list" if servers is not None else "fallback"
                    pushes = _LIST_PUSHES.get(kind)
                    if pushes is None:
                        pushes = _LIST_PUSHES[kind] = metrics.LIST_PUSHES.labels(kind)
                    pushes.inc()
                    logger.debug(
                        "list pushed",
                        kind=kind,
                        service=answer.service,
                        entries=len(servers) if servers is not None else 0,
                    )
                    sent = reply
            changed = watch.changed(version)
            if changed is not None:
                await changed
                if reader.done():
                    break
            version, answer = watch.current()

    async def _read_stats(
        self,
        context: grpc.aio.ServicerContext[lb_pb2.LoadBalanceRequest, lb_pb2.LoadBalanceResponse],
        watch: Watch,
        logger: structlog.typing.FilteringBoundLogger,
    ) -> RefusedError | RefusedMessage | None:
        """Ends when the client half-closes or the call ends (None), or with
        why the stream must end: a message that was refused, or one message
        too many for client_stats_rate_per_stream."""
        limiter = self._log_limiter
        rate = self._limits.client_stats_rate_per_stream
        bucket = MessageRate(rate, max(CLIENT_STATS_BURST, rate))
        while True:
            # LoadBalanceRequest, or RefusedMessage (request_decoder), or EOF.
            request: object = await context.read()
            if request is EOF_MARKER:
                return None
            if type(request) is RefusedMessage:
                return request
            assert isinstance(request, lb_pb2.LoadBalanceRequest)
            if not bucket.allow():
                return RefusedError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "too many messages on this BalanceLoad stream: "
                    f"client_stats_rate_per_stream={rate:g}/s "
                    f"(bursts of {max(CLIENT_STATS_BURST, rate):g})",
                    "client_stats_rate_per_stream",
                )
            if request.WhichOneof("load_balance_request_type") != "client_stats":
                limiter.warning(logger, "ignoring a second initial_request")
                continue
            metrics.CLIENT_STATS_REPORTS.inc()
            try:
                delta = client_stats_delta(request.client_stats)
            except InvalidArgumentError as exc:
                limiter.warning(logger, "ignoring invalid client stats", error=clip(exc))
                continue
            if watch.service is not None:
                self._balancer.record_client_stats(watch.service, delta)
