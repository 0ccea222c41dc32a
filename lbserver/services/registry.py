"""lbserver.v1.Registry: heartbeats and deregistration from backends."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf import duration_pb2

from lbserver import metrics
from lbserver.balancer import Balancer
from lbserver.domain.model import LoadReport, Registration, with_load
from lbserver.domain.validation import (
    MAX_INSTANCE_ID_BYTES,
    MAX_SERVICE_BYTES,
    check_backend_address,
    check_text,
    parse_load,
    parse_registration,
)
from lbserver.errors import InvalidArgumentError, LimitExceededError, RegistrationRefusedError
from lbserver.grpc_compat import EOF_MARKER
from lbserver.logs import LogLimiter, clip
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.security import (
    Authorizer,
    PeerRateLimiter,
    RefusedMessage,
    abort_refused,
    peer_ip,
    require,
    serve_decoded,
)

log = structlog.get_logger("lbserver.registry")


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _optional(message: pb.LoadReport, field: str) -> float | None:
    return getattr(message, field) if message.HasField(field) else None  # type: ignore[arg-type]


_REFUSAL_CODES = {
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


_SHUTTING_DOWN = "the balancer is shutting down; heartbeat another replica"


# Status messages that may embed what a client sent are clipped to this.
DETAILS_BYTES = 512
# The calls of each method, as security.require and the metrics name them.
_CALLS = {"Heartbeat": "heartbeat", "HeartbeatStream": "heartbeat", "Deregister": "deregister"}


class _RefusedError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = clip(message, DETAILS_BYTES)
        super().__init__(message)
        self.code = code
        self.message = message


def _answered_key(request: pb.HeartbeatRequest) -> tuple[str, str] | bytes:
    """Which backend a streamed heartbeat is about, as the stream remembers
    it: the names themselves while they are no longer than a valid
    registration's, a digest of them otherwise (a refused heartbeat may carry
    a name of max_message_bytes)."""
    service, instance = request.service, request.instance_id
    if len(service) <= MAX_SERVICE_BYTES and len(instance) <= MAX_INSTANCE_ID_BYTES:
        return service, instance
    digest = hashlib.sha256(service.encode())
    digest.update(b"\0")
    digest.update(instance.encode())
    return digest.digest()


# What a heartbeat came to: the reply, or the status and message of a refusal.
_Outcome = pb.HeartbeatResponse | tuple[grpc.StatusCode, str]
# Bounds on per-servicer and per-stream caches (cleared when full).
_GRANTS_KEPT = 64
_ANSWERED_KEPT = 10_000
_ACCEPTED = metrics.HEARTBEATS.labels("accepted")
_PREVIOUS_TOKEN = metrics.AUTH_PREVIOUS_TOKEN.labels("heartbeat")


def _stream_reply(request: pb.HeartbeatRequest, outcome: _Outcome) -> pb.HeartbeatStreamResponse:
    reply = pb.HeartbeatStreamResponse(
        service=request.service,
        instance_id=request.instance_id,
        reply_token=request.reply_token,
    )
    if isinstance(outcome, pb.HeartbeatResponse):
        reply.accepted.CopyFrom(outcome)
    else:
        code, reply.message = outcome
        number = code.value[0]
        assert isinstance(number, int)
        reply.code = number
    return reply


def _load(message: pb.LoadReport) -> LoadReport:
    return parse_load(
        cpu_utilization=_optional(message, "cpu_utilization"),
        requests_per_second=_optional(message, "requests_per_second"),
        errors_per_second=_optional(message, "errors_per_second"),
        in_flight=message.in_flight if message.HasField("in_flight") else None,
    )


def _loopback(peer: str) -> bool:
    """Whether a call came from this host ('ipv4:127.0.0.1:5555',
    'ipv6:[::1]:5555', 'unix:...'). String checks: this runs per heartbeat."""
    if peer.startswith("unix:"):
        return True
    if peer.startswith("ipv4:"):
        return peer.startswith("ipv4:127.")
    if peer.startswith("ipv6:"):
        ip = peer_ip(peer)
        return ip == "::1" or ip.startswith("::ffff:127.")
    return False


class _Registrations:
    """HeartbeatRequest -> Registration, validating each backend's identity
    (everything but the load) once: a backend's heartbeats repeat it, and
    parsing it is a third of a heartbeat's cost in the balancer."""

    def __init__(self, kept: int = 50_000) -> None:
        self._kept = kept
        # identity, and whether its address is loopback (acceptable from a
        # loopback peer only); refused addresses are never kept.
        self._identities: dict[tuple[Any, ...], tuple[Registration, bool]] = {}

    def parse(self, request: pb.HeartbeatRequest, *, loopback_peer: bool) -> Registration:
        """The registration; InvalidArgumentError when it is malformed or its
        address is one clients must not be sent to (check_backend_address:
        link-local, broadcast, ...; loopback only from a loopback peer)."""
        ttl = request.requested_ttl if request.HasField("requested_ttl") else None
        key = (
            request.service,
            request.instance_id,
            request.ip,
            request.port,
            request.weight,
            request.zone,
            request.state,
            (ttl.seconds, ttl.nanos) if ttl is not None else None,
            tuple(sorted(request.labels.items())) if request.labels else (),
        )
        known = self._identities.get(key)
        if known is None:
            identity = parse_registration(
                service=request.service,
                instance_id=request.instance_id,
                ip=request.ip,
                port=request.port,
                weight=request.weight,
                zone=request.zone,
                labels=dict(request.labels),
                state=request.state,
                requested_ttl=ttl.ToNanoseconds() / 1e9 if ttl is not None else None,
            )
            # Everything but loopback is decided by the address alone, once.
            check_backend_address(identity.ip, allow_loopback=True)
            try:
                check_backend_address(identity.ip, allow_loopback=False)
                loopback = False
            except InvalidArgumentError:
                loopback = True  # 127/8, ::1 or a mapped form of them
            known = (identity, loopback)
            if len(self._identities) >= self._kept:
                self._identities.clear()
            self._identities[key] = known
        identity, loopback = known
        if loopback and not loopback_peer:
            # A loopback backend only from the same host: a registrar beside
            # the balancer (tests, a single machine). From anywhere else,
            # 127.0.0.1 would send every client to its own host.
            check_backend_address(identity.ip, allow_loopback=False)
        if not request.HasField("load"):
            return identity
        return with_load(identity, _load(request.load))


class RegistryService(pb_grpc.RegistryServicer):
    def __init__(
        self,
        balancer: Balancer,
        authorizer: Authorizer | None = None,
        rate_limiter: PeerRateLimiter | None = None,
        *,
        max_streams_per_peer: int = 1_000,
    ) -> None:
        self._balancer = balancer
        self._authorizer = authorizer or Authorizer()
        self._log_limiter: LogLimiter = self._authorizer.log_limiter
        self._rate_limiter = rate_limiter or PeerRateLimiter(0)
        self._rate_limited = (
            "too many Registry calls from this address; slow down: "
            f"heartbeat_rate_per_peer={self._rate_limiter.rate:g}/s"
        )
        # Open HeartbeatStreams per peer IP (entries leave with their streams).
        self._max_streams_per_peer = max_streams_per_peer
        self._streams_per_peer: dict[str, int] = {}
        self._grants: dict[float, pb.HeartbeatResponse] = {}
        self._registrations = _Registrations()
        # The tasks serving open HeartbeatStreams, and whether close() ended
        # them (streams opened after it end at once).
        self._streams: set[asyncio.Task[Any]] = set()
        self._closed = False

    def add_to_server(self, server: grpc.aio.Server, max_message_bytes: int) -> None:
        """Registers Registry like add_RegistryServicer_to_server, with
        request deserializers that refuse messages over max_message_bytes or
        that do not decode (security.serve_decoded): a unary call with one is
        checked like any other (credentials, rate) and then refused."""
        serve_decoded(
            server,
            pb_grpc.add_RegistryServicer_to_server,
            self,
            max_message_bytes=max_message_bytes,
            limiter=self._log_limiter,
            gate=lambda context, method: self._admit(context, _CALLS[method]),
        )

    def close(self) -> None:
        """Ends every open HeartbeatStream with UNAVAILABLE, as a balancer
        that is stopping ends its BalanceLoad streams: a stream never ends by
        itself, and a stop would otherwise wait its whole grace for it. The
        registrar opens a new stream at its next heartbeat (to a replica
        that is still up). Unary calls are left to the server's grace."""
        self._closed = True
        for task in self._streams:
            task.cancel(_SHUTTING_DOWN)

    async def _admit(
        self,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
        what: str,
    ) -> None:
        await require(self._authorizer, context, what)
        if not self._rate_limiter.allow(context.peer()):
            metrics.HEARTBEATS.labels("rate_limited").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._rate_limited)

    def _accept(self, request: pb.HeartbeatRequest, peer: str) -> pb.HeartbeatResponse:
        """Validates and applies one heartbeat; _RefusedError (counted and logged)
        when the balancer will not take it. The caller binds the peer for the
        balancer's own events (joined, state changed)."""
        try:
            registration = self._registrations.parse(request, loopback_peer=_loopback(peer))
        except InvalidArgumentError as exc:
            metrics.HEARTBEATS.labels("invalid_argument").inc()
            self._warn("heartbeat rejected", peer, request, exc)
            raise _RefusedError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            backend = self._balancer.heartbeat(registration)
        except RegistrationRefusedError as exc:
            metrics.HEARTBEATS.labels(exc.status).inc()
            self._warn("heartbeat refused", peer, request, exc)
            raise _RefusedError(_REFUSAL_CODES[exc.status], str(exc)) from None
        except LimitExceededError as exc:
            metrics.HEARTBEATS.labels("limit_exceeded").inc()
            self._warn("heartbeat refused", peer, request, exc)
            raise _RefusedError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        _ACCEPTED.inc()
        return self._grant(backend.ttl)

    def _warn(self, event: str, peer: str, request: pb.HeartbeatRequest, error: Exception) -> None:
        """A refused heartbeat's warning: rate-limited, its names clipped."""
        self._log_limiter.warning(
            log,
            event,
            peer=peer,
            service=clip(request.service),
            instance_id=clip(request.instance_id),
            error=clip(error),
        )

    def _grant(self, ttl: float) -> pb.HeartbeatResponse:
        """The (shared, not to be modified) reply for a granted TTL: one per
        distinct TTL instead of one per heartbeat."""
        reply = self._grants.get(ttl)
        if reply is None:
            if len(self._grants) >= _GRANTS_KEPT:
                self._grants.clear()
            reply = self._grants[ttl] = pb.HeartbeatResponse(
                granted_ttl=_duration(ttl),
                heartbeat_interval=_duration(min(self._balancer.heartbeat_interval, ttl / 3)),
            )
        return reply

    async def Heartbeat(
        self,
        request: pb.HeartbeatRequest,
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatResponse],
    ) -> pb.HeartbeatResponse:
        await self._admit(context, "heartbeat")
        peer = context.peer()
        try:
            with structlog.contextvars.bound_contextvars(peer=peer):
                return self._accept(request, peer)
        except _RefusedError as refused:
            await context.abort(refused.code, refused.message)

    async def HeartbeatStream(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.HeartbeatRequest],
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatStreamResponse],
    ) -> None:
        # context.read()/write() rather than the iterator and yield: one
        # generator fewer per message on the balancer's busiest stream.
        generation = self._authorizer.generation
        token = await require(self._authorizer, context, "heartbeat", stream=True)
        if self._closed:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(_SHUTTING_DOWN)
            return
        ip = peer_ip(context.peer())
        open_here = self._streams_per_peer.get(ip, 0)
        if open_here >= self._max_streams_per_peer:
            metrics.STREAMS_REFUSED.labels("HeartbeatStream", "max_streams_per_peer").inc()
            self._log_limiter.warning(
                log, "rejected HeartbeatStream", peer=context.peer(), limit="max_streams_per_peer"
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many HeartbeatStreams from this address: "
                f"max_streams_per_peer={self._max_streams_per_peer}",
            )
        self._streams_per_peer[ip] = open_here + 1
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            await self._heartbeat_stream(context, generation, token)
        except asyncio.CancelledError:
            # Cancelled by close() (not by gRPC, for a call that ended):
            # end the call with a status instead of a cancelled task.
            if not self._closed:
                raise
            task.uncancel()
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(_SHUTTING_DOWN)
        finally:
            self._streams.discard(task)
            left = self._streams_per_peer[ip] - 1
            if left:
                self._streams_per_peer[ip] = left
            else:
                del self._streams_per_peer[ip]

    async def _heartbeat_stream(
        self,
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatStreamResponse],
        generation: int,
        token: int,
    ) -> None:
        """Serves an authenticated stream; `generation`: the authorizer's when
        the stream's credentials were checked, `token`: the index of the token
        it presented (heartbeats with a previous one, index > 0, are counted).
        When the accepted tokens change (a rotation dropped a token), the next
        heartbeat checks them again, and a stream whose token is no longer
        accepted ends with PERMISSION_DENIED, as a new call with it would."""
        authorizer = self._authorizer
        peer = context.peer()
        # The outcome last answered per backend: a heartbeat is answered only
        # when its outcome differs or it asks (reply_token).
        answered: dict[tuple[str, str] | bytes, _Outcome] = {}
        with structlog.contextvars.bound_contextvars(peer=peer):
            while True:
                # HeartbeatRequest, or RefusedMessage (serve_decoded), or EOF.
                request: object = await context.read()
                if request is EOF_MARKER:
                    return
                if type(request) is RefusedMessage:
                    await abort_refused(context, request, self._log_limiter)
                assert isinstance(request, pb.HeartbeatRequest)
                if authorizer.generation != generation:
                    generation = authorizer.generation
                    token = await require(authorizer, context, "heartbeat", stream=True, again=True)
                if token:
                    _PREVIOUS_TOKEN.inc()
                outcome: _Outcome
                if not self._rate_limiter.allow(peer):
                    metrics.HEARTBEATS.labels("rate_limited").inc()
                    outcome = (grpc.StatusCode.RESOURCE_EXHAUSTED, self._rate_limited)
                else:
                    try:
                        outcome = self._accept(request, peer)
                    except _RefusedError as refused:
                        outcome = (refused.code, refused.message)
                key = _answered_key(request)
                if not request.reply_token:
                    last = answered.get(key)
                    # Grants are shared objects: `is` settles most heartbeats.
                    if last is outcome or last == outcome:
                        continue
                if len(answered) >= _ANSWERED_KEPT:
                    answered.clear()
                answered[key] = outcome
                await context.write(_stream_reply(request, outcome))

    async def Deregister(
        self,
        request: pb.DeregisterRequest,
        context: grpc.aio.ServicerContext[pb.DeregisterRequest, pb.DeregisterResponse],
    ) -> pb.DeregisterResponse:
        await self._admit(context, "deregister")
        try:
            check_text("service", request.service, max_bytes=MAX_SERVICE_BYTES)
            check_text("instance_id", request.instance_id, max_bytes=MAX_INSTANCE_ID_BYTES)
        except InvalidArgumentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with structlog.contextvars.bound_contextvars(peer=context.peer()):
            removed = self._balancer.deregister(request.service, request.instance_id)
        if removed:
            metrics.DEREGISTRATIONS.inc()
        return pb.DeregisterResponse(removed=removed)
