"""Helpers for the agent_shim service tests: registering counting backends with
an in-process lbserver, reading its Admin state (or a scripted balancer's,
for lists in a fixed order), and bounded polling."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import grpc

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.support.eventually import eventually
from tests.support.processes import free_port
from tests.support.scripted_lb import Named as Named
from tests.support.scripted_lb import ScriptedBalancer

SERVICE = "svc"
T = TypeVar("T")


class Listening(Protocol):
    """A balancer on 127.0.0.1: lbserver's RunningServer or a ScriptedBalancer."""

    @property
    def port(self) -> int: ...


def balancer_address(running: Listening) -> str:
    return f"127.0.0.1:{running.port}"


async def register(
    channel: grpc.aio.Channel,
    backend: Named,
    weight: int = 0,
    *,
    service: str = SERVICE,
    instance_id: str | None = None,
) -> None:
    host, port = backend.address.rsplit(":", 1)
    await pb_grpc.RegistryStub(channel).Heartbeat(
        pb.HeartbeatRequest(
            service=service,
            instance_id=instance_id or backend.name,
            ip=host,
            port=int(port),
            weight=weight,
        )
    )


async def deregister(channel: grpc.aio.Channel, backend: Named, *, service: str = SERVICE) -> None:
    await pb_grpc.RegistryStub(channel).Deregister(
        pb.DeregisterRequest(service=service, instance_id=backend.name)
    )


async def service_state(
    source: grpc.aio.Channel | ScriptedBalancer, service: str = SERVICE
) -> pb.ServiceStatus:
    """The service as Admin.GetState shows it, through a channel to lbserver,
    or as a scripted balancer shows it."""
    if isinstance(source, ScriptedBalancer):
        return source.service_state()
    state = await pb_grpc.AdminStub(source).GetState(pb.GetStateRequest(service=service))
    return state.services[0]


async def tokens_by_name(
    source: grpc.aio.Channel | ScriptedBalancer, service: str = SERVICE
) -> dict[str, str]:
    return {
        b.instance_id: b.load_balance_token for b in (await service_state(source, service)).backends
    }


async def settled(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    within: float = 20.0,
) -> T:
    """The first result of `probe` that `done` accepts (AssertionError with
    the last one seen after `within` seconds)."""
    seen: list[T] = []

    async def accepted() -> bool:
        seen[:] = [await probe()]
        return done(seen[0])

    await eventually(
        accepted, "a result the test accepts", within=within, interval=0.05, detail=lambda: seen
    )
    return seen[0]


class Unreachable:
    """A backend address where nothing listens (connections are refused)."""

    def __init__(self, name: str = "unreachable") -> None:
        self.name = name
        self.address = f"127.0.0.1:{free_port()}"
