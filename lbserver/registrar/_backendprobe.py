"""Is the backend next to the registrar alive? A registrar keeps a backend in
the lists only while it answers: a crashed or hung OAP whose sidecar still
heartbeats must not keep receiving calls.

- `grpc` (default): calls grpc.health.v1 Health/Check on the backend with a
  deadline. SERVING, or any answer from a server without the health service
  (UNIMPLEMENTED), means alive; NOT_SERVING, no answer within the deadline
  (hung) or no connection (crashed) means not.
- `tcp`: a TCP connect within the deadline (catches crashes, not hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbserver.addresses import join_host_port
from lbserver.errors import InvalidArgumentError
from lbserver.registrar._channel import reconnect_options

BackendProbe = Callable[[], Awaitable[bool]]
PROBE_KINDS = ("grpc", "tcp", "none")

_ALIVE_CODES = {grpc.StatusCode.UNIMPLEMENTED}
_DOWN_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class GrpcProbe:
    """Health/Check over one long-lived channel to the backend."""

    def __init__(self, address: str, timeout: float = 1.0) -> None:
        self._address = address
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    async def __call__(self) -> bool:
        if self._channel is None:
            # A backend that restarted is seen alive again within a second.
            self._channel = grpc.aio.insecure_channel(self._address, options=reconnect_options(1.0))
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() in _ALIVE_CODES:
                return True
            return err.code() not in _DOWN_CODES
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None


class TcpProbe:
    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        self._host, self._port, self._timeout = host, port, timeout

    async def __call__(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), self._timeout
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


def make_probe(kind: str, host: str, port: int, timeout: float) -> BackendProbe | None:
    if kind == "none":
        return None
    if kind == "grpc":
        return GrpcProbe(join_host_port(host, port), timeout)
    if kind == "tcp":
        return TcpProbe(host, port, timeout)
    raise InvalidArgumentError("probe", f"must be one of {', '.join(PROBE_KINDS)}, not {kind!r}")
