"""envoy.service.discovery.v3.AggregatedDiscoveryService: the balancer's
lists over xDS (state of the world, v3), beside BalanceLoad on the same port.

Thin: admission and limits (shared with BalanceLoad: one StreamAdmission,
so `max_streams`, `max_streams_per_peer`, `max_pending_streams` and
`initial_request_timeout` bound both protocols together), the stream loop,
and the mapping of refusals to status codes. What exists and what a client
is sent are lbserver.xds (resources, protocol); the answers come from the
same Watch slots BalanceLoad streams watch, so a list change reaches xDS and
grpclb clients from one publish.

Besides the shared limits, a stream may subscribe to at most
`xds_max_resource_names` names per type, and send at most
`xds_request_rate_per_stream` requests per second that are not the verdict
(ACK or NACK) on the response it was last sent; more ends it with
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from lbserver import __version__, metrics
from lbserver.balancer import Balancer, Watch
from lbserver.domain.validation import check_balance_name
from lbserver.errors import InvalidArgumentError
from lbserver.grpc_compat import EOF_MARKER
from lbserver.logs import LogLimiter, clip
from lbserver.security import RefusedMessage, request_decoder
from lbserver.services._streams import (
    MessageRate,
    RefusedError,
    StreamAdmission,
    StreamEnds,
    Ticket,
    admitted,
    first_message,
    serialize_response,
)
from lbserver.xds import Localities, resources
from lbserver.xds.protocol import AdsState, Received, Response

log = structlog.get_logger("lbserver.xds")

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
METHOD = f"/{SERVICE}/StreamAggregatedResources"
# The burst of xds_request_rate_per_stream: a client subscribing its
# channels' names one by one at startup sends a few requests at once.
REQUEST_BURST = 50.0
# Serialized resources kept for the streams still to be answered (one
# serialization per list, not one per stream), by what they are built from.
RESOURCES_KEPT = 4096
_CONTROL_PLANE = base_pb2.ControlPlane(identifier=f"lbserver/{__version__}")

Context = grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]


class AggregatedDiscoveryService:
    def __init__(
        self,
        balancer: Balancer,
        admission: StreamAdmission,
        *,
        initial_request_timeout: float,
        max_resource_names: int = 1000,
        request_rate_per_stream: float = 10.0,
        localities: Localities = "backend",
        log_limiter: LogLimiter | None = None,
    ) -> None:
        self._balancer = balancer
        self.admission = admission
        self._initial_request_timeout = initial_request_timeout
        self._max_names = max_resource_names
        self._rate = request_rate_per_stream
        self._localities: Localities = localities
        self._log_limiter = log_limiter or LogLimiter()
        self._ends = StreamEnds(
            "StreamAggregatedResources", metrics.XDS_STREAM_ERRORS, self._log_limiter
        )
        # (type_url, name, service, id(list)) -> (the list, serialized resource)
        self._built: dict[tuple[str, str, str, int], tuple[object, bytes]] = {}
        # (type_url, version) -> a DiscoveryResponse without its nonce
        self._bodies: dict[tuple[str, str], bytes] = {}

    def add_to_server(self, server: grpc.aio.Server, max_message_bytes: int = 4 * 1024**2) -> None:
        """Registers StreamAggregatedResources with a request deserializer
        that refuses (rather than fails on) messages over `max_message_bytes`
        or that do not decode, and DeltaAggregatedResources as UNIMPLEMENTED
        with a message saying which variant is served."""
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                request_deserializer=request_decoder(
                    discovery_pb2.DiscoveryRequest, METHOD, max_message_bytes
                ),
                response_serializer=serialize_response,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=lambda data: data,
                response_serializer=lambda data: data,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "lbserver serves state-of-the-world ADS (StreamAggregatedResources), not delta xDS",
        )

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Context
    ) -> None:
        metrics.XDS_STREAMS_OPENED.inc()
        await admitted(
            self.admission,
            context,
            self._ends,
            lambda peer, ticket: self._stream(context, peer, ticket),
        )

    async def _stream(self, context: Context, peer: str, ticket: Ticket) -> None:
        try:
            first = await first_message(
                asyncio.ensure_future(context.read()), ticket, self._initial_request_timeout
            )
            if first is EOF_MARKER:
                return
            if type(first) is RefusedMessage:
                await self._ends.refuse(context, first, peer)
                return
            self.admission.establish(ticket)
        except RefusedError as refusal:
            await self._ends.refuse(context, refusal, peer)
            return
        assert isinstance(first, discovery_pb2.DiscoveryRequest)
        logger = log.bind(
            peer=peer, node=clip(first.node.id), client=clip(first.node.user_agent_name)
        )
        self._log_limiter.info(logger, "xds client connected")
        stream = _Stream(self, context, logger)
        ended: RefusedError | RefusedMessage | None = None
        try:
            ended = await stream.run(first)
        finally:
            stream.close()
            self._log_limiter.info(logger, "xds client disconnected")
        if ended is not None:
            await self._ends.refuse(context, ended, peer)

    def encoded(self, response: Response) -> bytes:
        """`response` serialized: everything but the nonce once per content
        (every stream told the same thing shares it), then a message of the
        stream's nonce alone appended (concatenated messages parse as their
        merge)."""
        key = (response.type_url, response.version)
        body = self._bodies.get(key)
        if body is None:
            body = discovery_pb2.DiscoveryResponse(
                version_info=response.version,
                type_url=response.type_url,
                resources=[
                    any_pb2.Any(type_url=response.type_url, value=value)
                    for _, value in response.resources
                ],
                control_plane=_CONTROL_PLANE,
            ).SerializeToString()
            if len(self._bodies) >= RESOURCES_KEPT:
                self._bodies.clear()
            self._bodies[key] = body
        nonce: bytes = discovery_pb2.DiscoveryResponse(nonce=response.nonce).SerializeToString()
        return body + nonce

    def resource(self, type_url: str, name: str, watch: Watch) -> bytes | None:
        """The serialized resource `name` of `type_url` as `watch` answers it
        now, or None when it does not exist (the caller handles `pending`)."""
        _, answer = watch.current()
        service = answer.service
        if service is None:
            return None
        servers = watch.servers(answer) if type_url == resources.ENDPOINT else None
        key = (type_url, name, service, id(servers))
        kept = self._built.get(key)
        if kept is not None and kept[0] is servers:
            return kept[1]
        if type_url == resources.LISTENER:
            message = resources.listener(name, service)
        elif type_url == resources.ROUTE:
            message = resources.route_configuration(name, service)
        elif type_url == resources.CLUSTER:
            message = resources.cluster(name)
        else:
            message = resources.load_assignment(name, servers, self._localities)
        value: bytes = message.SerializeToString(deterministic=True)
        if len(self._built) >= RESOURCES_KEPT:
            self._built.clear()
        self._built[key] = (servers, value)
        return value


class _Stream:
    """One ADS stream: its subscriptions, one Watch per name it asked for
    (shared by the types that name it), and the loop that answers requests
    and list changes."""

    def __init__(
        self,
        service: AggregatedDiscoveryService,
        context: Context,
        logger: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._service = service
        self._balancer = service._balancer
        self._context = context
        self._logger = logger
        self._limiter = service._log_limiter
        self._state = AdsState()
        self._watches: dict[str, Watch] = {}
        # Each watch's answer version when the resources were last built.
        self._seen: dict[str, int] = {}
        rate = service._rate
        self._bucket = MessageRate(rate, max(REQUEST_BURST, rate))

    async def run(
        self, first: discovery_pb2.DiscoveryRequest
    ) -> RefusedError | RefusedMessage | None:
        """Serves the stream until the client half-closes or the call ends
        (None), or returns why it must end."""
        request: discovery_pb2.DiscoveryRequest | None = first
        read: asyncio.Future[Any] | None = None
        try:
            while not self._balancer.closed:
                if request is not None:
                    refusal = self._receive(request)
                    if refusal is not None:
                        return refusal
                # An ACK, a NACK or a stale request asks for nothing new:
                # only first requests, new names and list changes do.
                if request is None or any(
                    subscription.due for subscription in self._state.subscriptions.values()
                ):
                    await self._answer(on_change=request is None)
                if read is None:
                    read = asyncio.ensure_future(self._context.read())
                waits: list[asyncio.Future[Any]] = [read]
                for name, watch in self._watches.items():
                    changed = watch.changed(self._seen.get(name, -1))
                    if changed is None:
                        waits = []
                        break
                    waits.append(changed)
                if waits:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                request = None
                if read.done():
                    message = read.result()
                    read = None
                    if message is EOF_MARKER:
                        return None
                    if type(message) is RefusedMessage:
                        return message
                    request = message
            return None
        finally:
            if read is not None and not read.done():
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await read

    def _receive(self, request: discovery_pb2.DiscoveryRequest) -> RefusedError | None:
        type_url = request.type_url
        names = request.resource_names
        nack = request.HasField("error_detail")
        if type_url not in resources.SHORT_NAMES:
            self._limiter.warning(
                self._logger, "ignoring a request for an unserved xds type", type_url=clip(type_url)
            )
            return self._charge("unserved type")
        if len(names) > self._service._max_names:
            return RefusedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a {resources.SHORT_NAMES[type_url].upper()} request names {len(names)} "
                f"resources; xds_max_resource_names={self._service._max_names}",
                "xds_max_resource_names",
            )
        received = self._state.receive(
            type_url, request.version_info, request.response_nonce, names, nack
        )
        if received.kind not in ("ack", "nack"):
            refusal = self._charge(received.kind)
            if refusal is not None:
                return refusal
        if received.kind == "nack":
            self._nacked(type_url, received, request)
        if received.names_changed:
            self._sync_watches()
        return None

    def _charge(self, what: str) -> RefusedError | None:
        if self._bucket.allow():
            return None
        rate = self._service._rate
        return RefusedError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many requests on this xds stream ({what}): "
            f"xds_request_rate_per_stream={rate:g}/s (bursts of {max(REQUEST_BURST, rate):g}; "
            "ACKs and NACKs of the last response are not counted)",
            "xds_request_rate_per_stream",
        )

    def _nacked(
        self, type_url: str, received: Received, request: discovery_pb2.DiscoveryRequest
    ) -> None:
        short = resources.SHORT_NAMES[type_url]
        metrics.XDS_NACKS.labels(short).inc()
        self._limiter.warning(
            self._logger,
            "xds client rejected a response",
            type=short,
            version=received.version,
            kept_version=clip(request.version_info),
            error=clip(request.error_detail.message),
        )

    def _sync_watches(self) -> None:
        wanted = self._state.names()
        for name in [name for name in self._watches if name not in wanted]:
            self._watches.pop(name).close()
            self._seen.pop(name, None)
        invalid = 0
        for name in wanted:
            if name in self._watches:
                continue
            try:
                check_balance_name(name)
            except InvalidArgumentError:
                invalid += 1
                continue
            self._watches[name] = self._balancer.watch(name)
        if invalid:
            self._limiter.info(self._logger, "xds names that cannot exist", count=invalid)

    async def _answer(self, *, on_change: bool) -> None:
        """Builds each subscribed type's resources and writes the responses
        that are due (first, names changed, or content changed)."""
        for name, watch in self._watches.items():
            self._seen[name] = watch.current()[0]
        for type_url, subscription in list(self._state.subscriptions.items()):
            found: dict[str, bytes] = {}
            unsure = False
            for name in subscription.names:
                named = self._watches.get(name)
                if named is None:
                    continue
                if named.current()[1].kind == "pending":
                    # Startup grace or `hold`: send it as it was sent. If it
                    # never was on this stream and the client reconnected
                    # holding resources of this type, say nothing of the
                    # type yet: a response without a listener or cluster it
                    # holds deletes it. A new client loses nothing by its
                    # absence (nor is it kept waiting by one unknown name).
                    kept = subscription.sent.get(name)
                    if kept is not None:
                        found[name] = kept
                    elif subscription.resumed:
                        unsure = True
                        break
                    continue
                value = self._service.resource(type_url, name, named)
                if value is not None:
                    found[name] = value
            if unsure:
                continue
            response = self._state.respond(type_url, found)
            if response is None:
                continue
            await self._context.write(self._service.encoded(response))
            short = resources.SHORT_NAMES[type_url]
            metrics.XDS_RESPONSES.labels(short).inc()
            if on_change:
                newest = max(
                    (watch.published_at for watch in self._watches.values()),
                    default=time.monotonic(),
                )
                metrics.PUSH_LATENCY.observe(time.monotonic() - newest)
            self._logger.debug(
                "xds response",
                type=short,
                version=response.version,
                nonce=response.nonce,
                resources=len(response.resources),
            )

    def close(self) -> None:
        for watch in self._watches.values():
            watch.close()
        self._watches.clear()
