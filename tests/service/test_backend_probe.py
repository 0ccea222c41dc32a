"""The registrar's backend probe: a crashed or hung backend is reported
DRAINING while its sidecar keeps heartbeating, and SERVING once it answers."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from lbserver.grpc_compat import AsyncHealthServicer
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.registrar import BackendProbe, GrpcProbe, Registrar, TcpProbe, make_probe
from tests.service.test_registrar import FakeRegistry, running, start_registry
from tests.support.eventually import eventually


async def plain_server() -> tuple[grpc.aio.Server, int]:
    """A gRPC server without the health service, like many backends."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
def hung_port() -> Iterator[int]:
    """Accepts TCP connections and never says a word: a hung process."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return int(probe_socket.getsockname()[1])


async def test_grpc_probe_outcomes(hung_port: int) -> None:
    server, port = await plain_server()
    health_server = grpc.aio.server()
    health = AsyncHealthServicer()
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
    health_port = health_server.add_insecure_port("127.0.0.1:0")
    await health_server.start()
    try:
        assert await GrpcProbe(f"127.0.0.1:{port}", timeout=1)()  # UNIMPLEMENTED: alive
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        assert await GrpcProbe(f"127.0.0.1:{health_port}", timeout=1)()
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not await GrpcProbe(f"127.0.0.1:{health_port}", timeout=1)()
        assert not await GrpcProbe(f"127.0.0.1:{hung_port}", timeout=0.3)()
        assert not await GrpcProbe(f"127.0.0.1:{free_port()}", timeout=0.3)()
        assert await TcpProbe("127.0.0.1", hung_port, timeout=0.3)()  # tcp cannot see a hang
        assert not await TcpProbe("127.0.0.1", free_port(), timeout=0.3)()
        assert make_probe("none", "127.0.0.1", 1, 1.0) is None
    finally:
        await server.stop(0)
        await health_server.stop(0)


class CountingProbe:
    """A GrpcProbe that counts the probes begun: once the n-th has begun,
    the registrar has acted on every earlier answer."""

    def __init__(self, address: str, timeout: float) -> None:
        self._probe = GrpcProbe(address, timeout=timeout)
        self.begun = 0

    async def __call__(self) -> bool:
        self.begun += 1
        return await self._probe()

    async def close(self) -> None:
        await self._probe.close()


@contextlib.asynccontextmanager
async def probing(
    port: int, probe_timeout: float, probe: BackendProbe | None = None, **options: Any
) -> AsyncIterator[tuple[FakeRegistry, Registrar]]:
    """A running registrar of the backend at `port`, which it probes over
    gRPC (or with `probe`), heartbeating to a fake registry."""
    registry = FakeRegistry(interval=0.1)
    registry_server, registry_address = await start_registry(registry)
    registrar = Registrar(
        [registry_address],
        "oap",
        "127.0.0.1",
        port,
        interval=0.1,
        probe=probe or GrpcProbe(f"127.0.0.1:{port}", timeout=probe_timeout),
        **options,
    )
    try:
        async with running(registrar):
            yield registry, registrar
    finally:
        await registry_server.stop(0)


async def test_crashed_backend_is_drained_then_serves_again() -> None:
    backend, port = await plain_server()
    try:
        async with probing(port, 0.3, probe_failures=2) as (registry, registrar):

            def last_state() -> int:
                return registry.heartbeats[-1].state if registry.heartbeats else -1

            await eventually(lambda: last_state() == pb.BACKEND_STATE_SERVING, "serving")
            await backend.stop(0)
            await eventually(lambda: last_state() == pb.BACKEND_STATE_DRAINING, "drained")
            assert registrar.backend_down
            backend = grpc.aio.server()
            backend.add_insecure_port(f"127.0.0.1:{port}")
            await backend.start()
            await eventually(lambda: last_state() == pb.BACKEND_STATE_SERVING, "serving again")
            assert not registrar.backend_down
    finally:
        await backend.stop(0)


async def test_hung_backend_is_drained(hung_port: int) -> None:
    async with probing(hung_port, 0.2) as (registry, _):
        await eventually(
            lambda: any(h.state == pb.BACKEND_STATE_DRAINING for h in registry.heartbeats),
            "drained",
        )
        # The backend is still registered (heartbeats go on), just out of the lists.
        count = len(registry.heartbeats)
        await eventually(lambda: len(registry.heartbeats) > count, "later heartbeats")
        assert len(registry.heartbeats) > count


async def test_an_explicit_drain_is_never_undone_by_the_probe() -> None:
    backend, port = await plain_server()
    try:
        probe = CountingProbe(f"127.0.0.1:{port}", 0.3)
        async with probing(port, 0.3, probe) as (registry, registrar):
            await eventually(lambda: bool(registry.heartbeats), "registered")
            await registrar.drain()
            # Several healthy probes answered after the drain and acted on,
            # then a heartbeat that would carry any state they changed.
            probed = probe.begun
            await eventually(lambda: probe.begun > probed + 3, "several healthy probes")
            count = len(registry.heartbeats)
            await eventually(lambda: len(registry.heartbeats) > count, "a later heartbeat")
            assert registry.heartbeats[-1].state == pb.BACKEND_STATE_DRAINING
    finally:
        await backend.stop(0)
