"""Load-aware weights seen from grpcio's own grpclb client: the split of real
calls between backends follows their load reports."""

from __future__ import annotations

from lbserver.proto.v1 import lbserver_pb2 as pb
from tests.service.grpclb_client import Client, admin_state, balancer_for, register
from tests.service.harness import Harness
from tests.support.backends import BackendFleet, CountingBackend
from tests.support.dns import DnsServer


async def test_same_rps_at_cpu_0_9_and_0_3_splits_calls_1_to_3(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    running = await balancer_for(
        harness, dns, fallback_backend, blackout=0.0, min_push_interval=0.0
    )
    busy, idle = fleet[0], fleet[1]
    await register(
        running, harness, busy, load=pb.LoadReport(cpu_utilization=0.9, requests_per_second=200)
    )
    await register(
        running, harness, idle, load=pb.LoadReport(cpu_utilization=0.3, requests_per_second=200)
    )
    await client.until_served(busy, idle)
    fleet.reset()
    await client.calls(400)
    share_busy = busy.count / (busy.count + idle.count)
    assert abs(share_busy - 0.25) <= 0.07, (busy.count, idle.count)
    weights = {
        b.instance_id: b.effective_weight for b in (await admin_state(harness, running)).backends
    }
    assert abs(weights[idle.name] / weights[busy.name] - 3.0) < 1e-9


async def test_equal_load_gives_equal_shares(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    running = await balancer_for(harness, dns, fallback_backend, blackout=0.0)
    for backend in fleet:
        await register(
            running,
            harness,
            backend,
            load=pb.LoadReport(cpu_utilization=0.5, requests_per_second=100),
        )
    await client.until_served(*fleet)
    fleet.reset()
    await client.calls(300)
    assert fleet.counts() == [100, 100, 100]
