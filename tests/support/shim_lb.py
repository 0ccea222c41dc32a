"""Helpers for the agent_shim service tests: registering counting backends with
an in-process lbserver, reading its Admin state, balancer list builders with a
fixed order, and bounded polling."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import grpc

from lbserver.domain.model import Backend
from lbserver.domain.serverlist import Entry, ServerList
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.server import RunningServer
from tests.support.eventually import eventually
from tests.support.processes import free_port

SERVICE = "svc"
T = TypeVar("T")


class Named(Protocol):
    """A test backend: CountingBackend, EchoBackend, or just a name and an address."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...


def balancer_address(running: RunningServer) -> str:
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


async def service_state(channel: grpc.aio.Channel, service: str = SERVICE) -> pb.ServiceStatus:
    state = await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest(service=service))
    return state.services[0]


async def tokens_by_name(channel: grpc.aio.Channel, service: str = SERVICE) -> dict[str, str]:
    return {
        b.instance_id: b.load_balance_token
        for b in (await service_state(channel, service)).backends
    }


def ordered_list(
    order: Sequence[str], drops: Sequence[str] = ()
) -> Callable[[str, list[Backend], float], ServerList]:
    """A Balancer list_builder listing the backends by instance id in exactly
    `order` (a name may repeat; "drop" places a drop entry with the token from
    `drops`, in turn). Names not registered yet are left out."""

    def build(service: str, backends: list[Backend], now: float) -> ServerList:
        by_name = {b.instance_id: b for b in backends}
        drop_tokens = iter(drops)
        entries = []
        for name in order:
            if name == "drop":
                entries.append(Entry.for_drop(next(drop_tokens)))
            elif name in by_name:
                backend = by_name[name]
                entries.append(
                    Entry(
                        ip=ipaddress.ip_address(backend.registration.ip).packed,
                        port=backend.registration.port,
                        token=backend.token,
                    )
                )
        return ServerList(entries=tuple(entries))

    return build


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
