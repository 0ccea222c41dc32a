"""lbserver.v1.Registry: heartbeats and deregistration from backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog
from google.protobuf import duration_pb2

from lbserver import metrics
from lbserver.balancer import Balancer
from lbserver.domain.model import Registration
from lbserver.domain.validation import (
    MAX_INSTANCE_ID_BYTES,
    MAX_SERVICE_BYTES,
    check_text,
    parse_load,
    parse_registration,
)
from lbserver.errors import InvalidArgumentError, LimitExceededError, RegistrationRefusedError
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.security import Authorizer, PeerRateLimiter, require

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


_RATE_LIMITED = "too many Registry calls from this address; slow down (heartbeat_rate_per_peer)"


class _RefusedError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refusal(code: grpc.StatusCode, message: str) -> pb.HeartbeatStreamResponse:
    number = code.value[0]
    assert isinstance(number, int)
    return pb.HeartbeatStreamResponse(code=number, message=message)


def _registration(request: pb.HeartbeatRequest) -> Registration:
    in_flight = request.load.in_flight if request.load.HasField("in_flight") else None
    return parse_registration(
        service=request.service,
        instance_id=request.instance_id,
        ip=request.ip,
        port=request.port,
        weight=request.weight,
        zone=request.zone,
        labels=dict(request.labels),
        load=parse_load(
            cpu_utilization=_optional(request.load, "cpu_utilization"),
            requests_per_second=_optional(request.load, "requests_per_second"),
            errors_per_second=_optional(request.load, "errors_per_second"),
            in_flight=in_flight,
        ),
        state=request.state,
        requested_ttl=(
            request.requested_ttl.ToNanoseconds() / 1e9
            if request.HasField("requested_ttl")
            else None
        ),
    )


class RegistryService(pb_grpc.RegistryServicer):
    def __init__(
        self,
        balancer: Balancer,
        authorizer: Authorizer | None = None,
        rate_limiter: PeerRateLimiter | None = None,
    ) -> None:
        self._balancer = balancer
        self._authorizer = authorizer or Authorizer()
        self._rate_limiter = rate_limiter or PeerRateLimiter(0)

    async def _admit(
        self,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
        what: str,
    ) -> None:
        await require(self._authorizer, context, what)
        if not self._rate_limiter.allow(context.peer()):
            metrics.HEARTBEATS.labels("rate_limited").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _RATE_LIMITED)

    def _accept(self, request: pb.HeartbeatRequest, peer: str) -> pb.HeartbeatResponse:
        """Validates and applies one heartbeat; _RefusedError (counted and logged)
        when the balancer will not take it."""
        try:
            registration = _registration(request)
        except InvalidArgumentError as exc:
            metrics.HEARTBEATS.labels("invalid_argument").inc()
            log.warning("heartbeat rejected", peer=peer, service=request.service, error=str(exc))
            raise _RefusedError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            # The balancer's events (joined, state changed) name the peer too.
            with structlog.contextvars.bound_contextvars(peer=peer):
                backend = self._balancer.heartbeat(registration)
        except RegistrationRefusedError as exc:
            metrics.HEARTBEATS.labels(exc.status).inc()
            log.warning("heartbeat refused", peer=peer, service=request.service, error=str(exc))
            raise _RefusedError(_REFUSAL_CODES[exc.status], str(exc)) from None
        except LimitExceededError as exc:
            metrics.HEARTBEATS.labels("limit_exceeded").inc()
            log.warning("heartbeat refused", peer=peer, service=request.service, error=str(exc))
            raise _RefusedError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        metrics.HEARTBEATS.labels("accepted").inc()
        return pb.HeartbeatResponse(
            granted_ttl=_duration(backend.ttl),
            heartbeat_interval=_duration(min(self._balancer.heartbeat_interval, backend.ttl / 3)),
        )

    async def Heartbeat(
        self,
        request: pb.HeartbeatRequest,
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatResponse],
    ) -> pb.HeartbeatResponse:
        await self._admit(context, "heartbeat")
        try:
            return self._accept(request, context.peer())
        except _RefusedError as refused:
            await context.abort(refused.code, refused.message)

    async def HeartbeatStream(
        self,
        request_iterator: AsyncIterator[pb.HeartbeatRequest],
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatStreamResponse],
    ) -> AsyncIterator[pb.HeartbeatStreamResponse]:
        await require(self._authorizer, context, "heartbeat")
        peer = context.peer()
        async for request in request_iterator:
            if not self._rate_limiter.allow(peer):
                metrics.HEARTBEATS.labels("rate_limited").inc()
                yield _refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, _RATE_LIMITED)
                continue
            try:
                yield pb.HeartbeatStreamResponse(accepted=self._accept(request, peer))
            except _RefusedError as refused:
                yield _refusal(refused.code, refused.message)

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
