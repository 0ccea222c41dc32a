"""The BalanceLoad stream as the Selector sees it, and its grpc.aio transport.

The Selector only writes LoadBalanceRequests, reads LoadBalanceResponses and
cancels; a `BalancerConnector` opens such a call to a balancer address. Two
connectors exist: `GrpcBalancerConnector` (grpc.aio channels, the default, for
`balanced_channel` and code that runs grpc anyway) and the proxy's
`agent_shim._balancer_h2.H2BalancerConnector`, which speaks the same stream
over the relay's own HTTP/2 code so that the proxy process never loads grpcio
(about 20 MiB of a sidecar's memory, and grpc.aio cannot run on uvloop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from lbserver.keepalive import CLIENT_CHANNEL_OPTIONS
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb_pb2

if TYPE_CHECKING:
    import grpc.aio

# gRPC status code names by number (the HTTP/2 transport reads numbers).
STATUS_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

BALANCE_LOAD_PATH = "/grpc.lb.v1.LoadBalancer/BalanceLoad"


class BalancerCallError(Exception):
    """The BalanceLoad call failed or ended with a non-OK status."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class BalancerCall(Protocol):
    async def write(self, request: lb_pb2.LoadBalanceRequest) -> None:
        """Sends one request; BalancerCallError if the call has ended."""

    async def read(self) -> lb_pb2.LoadBalanceResponse | None:
        """The next response, None once the balancer ended the stream with
        OK; BalancerCallError when it failed."""

    def cancel(self) -> None: ...


class BalancerConnector(Protocol):
    def call(self, address: str) -> BalancerCall: ...

    async def close(self) -> None: ...


GRPC_CHANNEL_OPTIONS = CLIENT_CHANNEL_OPTIONS


class GrpcBalancerConnector:
    """BalanceLoad over grpc.aio channels, one per balancer address."""

    def __init__(self, channel_factory: Callable[[str], grpc.aio.Channel] | None = None) -> None:
        import grpc.aio

        self._factory = channel_factory or (
            lambda address: grpc.aio.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS)
        )
        self._channels: dict[str, grpc.aio.Channel] = {}

    def call(self, address: str) -> BalancerCall:
        from lbserver.proto.grpclb.v1 import load_balancer_pb2_grpc as lb_grpc

        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._factory(address)
        return _GrpcCall(lb_grpc.LoadBalancerStub(channel).BalanceLoad(None))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()


class _GrpcCall:
    def __init__(self, call: Any) -> None:
        import grpc.aio

        from lbserver.grpc_compat import EOF_MARKER

        self._call = call
        self._eof = EOF_MARKER
        self._errors = (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError)

    def _error(self, exc: BaseException) -> BalancerCallError:
        code = getattr(exc, "code", None)
        details = getattr(exc, "details", None)
        if callable(code) and callable(details):
            return BalancerCallError(code().name, str(details()))
        return BalancerCallError("CANCELLED", repr(exc))

    async def write(self, request: lb_pb2.LoadBalanceRequest) -> None:
        try:
            await self._call.write(request)
        except self._errors as exc:
            raise self._error(exc) from None

    async def read(self) -> lb_pb2.LoadBalanceResponse | None:
        try:
            message = await self._call.read()
        except self._errors as exc:
            raise self._error(exc) from None
        if message is self._eof:
            return None
        assert isinstance(message, lb_pb2.LoadBalanceResponse)
        return message

    def cancel(self) -> None:
        self._call.cancel()
