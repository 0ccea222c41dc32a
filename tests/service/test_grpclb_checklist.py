"""gRPC's own grpclb test checklist, balancer side: grpcio's C-core grpclb
policy (discovering the balancer through a DNS SRV record) against a real
in-process lbserver."""

from __future__ import annotations

import asyncio

import grpc

from lbserver.balancer import Balancer, ListSettings
from lbserver.domain.serverlist import DROP_TOKEN
from lbserver.domain.weights import SheddingSettings
from lbserver.proto.v1 import lbserver_pb2 as pb
from tests.service.conftest import Harness
from tests.service.grpclb_client import Client, admin_state, balancer_for, register
from tests.support.backends import BackendFleet, CountingBackend
from tests.support.dns import DnsServer
from tests.support.eventually import eventually
from tests.support.log_capture import captured_logs, logged


async def test_vanilla_every_backend_gets_calls_with_its_token(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    running = await balancer_for(harness, dns, fallback_backend)
    for backend in fleet:
        await register(running, harness, backend)
    await client.until_served(*fleet)
    fleet.reset()
    assert await client.calls(30) == [grpc.StatusCode.OK] * 30
    assert fleet.counts() == [10, 10, 10]
    tokens = {
        b.instance_id: b.load_balance_token for b in (await admin_state(harness, running)).backends
    }
    for backend in fleet:
        assert set(backend.tokens()) == {tokens[backend.name]}
    assert fallback_backend.count == 0


async def test_same_backend_listed_twice_gets_twice_the_calls(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    running = await balancer_for(harness, dns, fallback_backend)
    await register(running, harness, fleet[0], weight=1)
    await register(running, harness, fleet[1], weight=2)
    await client.until_served(fleet[0], fleet[1])
    fleet.reset()
    await client.calls(60)
    assert (fleet[0].count, fleet[1].count) == (20, 40)


async def test_initially_empty_then_backends_arrive(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    # A balancer that just started says nothing for unknown services, so the
    # client waits instead of falling back.
    running = await balancer_for(harness, dns, fallback_backend, startup_grace=30.0)
    with captured_logs() as capture:
        pending = asyncio.ensure_future(client.calls(1))
        # The balancer logs the connection after taking the stream's answer
        # and before writing it, on this test's loop: once the line shows,
        # whatever it had to say (a fallback, were it wrong) is on its way.
        await eventually(lambda: logged(capture, "client connected"), "the client's stream")
    # What C-core's grpclb client does with an answer shows nowhere until it
    # calls a backend: no marker can prove it received none, so it gets a
    # second, counted from the answer, to make a fallback call that must not
    # come (and the fallback backend's count below would show a late one).
    await asyncio.sleep(1.0)
    assert not pending.done()
    await register(running, harness, fleet[0])
    assert await pending == [grpc.StatusCode.OK]
    assert fleet[0].count == 1 and fallback_backend.count == 0


async def test_drops_are_honoured_and_reported(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    # Both backends over the shedding threshold (mean 0.75 for 0.5: a third
    # of the calls dropped) in a list of 3 entries: one each and one drop.
    shedding = ListSettings(max_length=3, shedding=SheddingSettings(utilization=0.5))
    running = await balancer_for(
        harness,
        dns,
        fallback_backend,
        balancer=Balancer(list_settings=shedding, startup_grace=0),
        client_stats_interval=1.0,
    )
    overloaded = pb.LoadReport(cpu_utilization=0.75)
    await register(running, harness, fleet[0], load=overloaded)
    await register(running, harness, fleet[1], load=overloaded)
    await client.until_served(fleet[0], fleet[1])
    fleet.reset()
    codes = await client.calls(60)
    assert codes.count(grpc.StatusCode.UNAVAILABLE) == 20
    assert fleet.total() == 40

    async def drops_reported() -> pb.ClientCallStats | None:  # stats arrive every second
        stats = (await admin_state(harness, running)).client_stats
        return stats if stats.calls_dropped_by_token.get(DROP_TOKEN, 0) >= 20 else None

    stats = await eventually(drops_reported, "20 drops reported")
    assert stats.calls_dropped_by_token[DROP_TOKEN] >= 20


async def test_client_load_reporting(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    running = await balancer_for(harness, dns, fallback_backend, client_stats_interval=1.0)
    await register(running, harness, fleet[0])
    await client.until_served(fleet[0])
    assert await client.calls(25) == [grpc.StatusCode.OK] * 25
    expected = fleet[0].count

    async def calls_reported() -> pb.ClientCallStats | None:
        stats = (await admin_state(harness, running)).client_stats
        return stats if stats.calls_finished >= expected else None

    stats = await eventually(calls_reported, f"{expected} finished calls reported")
    assert stats.calls_started == expected
    assert stats.calls_finished == expected
    assert stats.calls_finished_known_received == expected
    assert stats.calls_finished_with_client_failed_to_send == 0


async def test_balancer_restart_keeps_calls_flowing(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    running = await balancer_for(harness, dns, fallback_backend)
    await register(running, harness, fleet[0])
    await client.until_served(fleet[0])
    await running.stop(grace=0)
    # The client keeps its last list while the balancer is gone.
    assert await client.calls(20) == [grpc.StatusCode.OK] * 20
    restarted = await harness.start(listen=f"127.0.0.1:{running.port}", startup_grace=5.0)
    await register(restarted, harness, fleet[0])
    await register(restarted, harness, fleet[1])
    await client.until_served(fleet[1])
    assert fallback_backend.count == 0


async def test_unknown_service_gets_explicit_fallback(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    await balancer_for(harness, dns, fallback_backend)
    assert await client.calls(5) == [grpc.StatusCode.OK] * 5
    assert fallback_backend.count == 5 and fleet.total() == 0
