"""A grpcio client using the grpclb policy (C-core), and helpers to drive an
in-process balancer for it: the balancer is found through the in-test DNS
server's SRV record, as in production."""

from __future__ import annotations

from typing import Any

import grpc

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.server import RunningServer
from tests.service.harness import Harness
from tests.support.backends import CountingBackend, aio_call_stub, grpclb_aio_channel
from tests.support.dns import DnsServer
from tests.support.eventually import eventually

NAME = "svc.test"  # maps to service "svc" by the first-label rule


class Client:
    def __init__(self, dns: DnsServer, fallback: CountingBackend) -> None:
        self.channel = grpclb_aio_channel(dns.target(NAME, fallback.port))
        self.call = aio_call_stub(self.channel)

    async def calls(self, n: int) -> list[grpc.StatusCode]:
        codes = []
        for _ in range(n):
            try:
                await self.call(b"x", timeout=5, wait_for_ready=True)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
        return codes

    async def until_served(self, *backends: CountingBackend, within: float = 20.0) -> None:
        async def served() -> bool:
            if all(b.count for b in backends):
                return True
            await self.calls(1)
            return False

        await eventually(
            served,
            "a call at every backend",
            within=within,
            interval=0.01,
            detail=lambda: [(b.name, b.count) for b in backends],
        )


async def register(
    running: RunningServer,
    harness: Harness,
    backend: CountingBackend,
    weight: int = 0,
    load: pb.LoadReport | None = None,
) -> None:
    host, port = backend.address.rsplit(":", 1)
    await pb_grpc.RegistryStub(harness.channel(running)).Heartbeat(
        pb.HeartbeatRequest(
            service="svc",
            instance_id=backend.name,
            ip=host,
            port=int(port),
            weight=weight,
            load=load,
        )
    )


async def balancer_for(
    harness: Harness, dns: DnsServer, fallback: CountingBackend, **config: Any
) -> RunningServer:
    running = await harness.start(**config)
    dns.set_balancers(NAME, [("127.0.0.1", running.port)])
    dns.set_addresses(NAME, ["127.0.0.1"])
    return running


async def admin_state(harness: Harness, running: RunningServer) -> pb.ServiceStatus:
    state = await pb_grpc.AdminStub(harness.channel(running)).GetState(
        pb.GetStateRequest(service="svc")
    )
    return state.services[0]
