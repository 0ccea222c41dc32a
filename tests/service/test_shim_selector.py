"""agent_shim's grpclb client (Selector) against the real lbserver balancer
(or a scripted one, for lists in an exact order): list order and weights,
drops, client stats, losing and regaining the balancer, fallback, and the
per-address channel cache."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import pytest

from agent_shim._errors import DroppedCallError, NoBackendError
from agent_shim._selector import Choice, Selector
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb_pb2
from lbserver.proto.grpclb.v1 import load_balancer_pb2_grpc as lb_grpc
from tests.service.conftest import Harness
from tests.support.backends import BackendFleet, CountingBackend
from tests.support.processes import free_port
from tests.support.scripted_lb import ScriptedBalancer
from tests.support.shim_lb import (
    SERVICE,
    balancer_address,
    deregister,
    register,
    service_state,
    settled,
    tokens_by_name,
)

pytestmark = pytest.mark.timeout(60)


class Channels:
    """A channel factory that records what it created and closed."""

    def __init__(self) -> None:
        self.created: dict[str, grpc.aio.Channel] = {}
        self.closed: list[str] = []
        self._names: dict[int, str] = {}

    def factory(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        self.created[address] = channel
        self._names[id(channel)] = address
        return channel

    async def close(self, channel: grpc.aio.Channel) -> None:
        self.closed.append(self._names[id(channel)])
        await channel.close(None)


class Client:
    def __init__(
        self, balancers: Sequence[str], *, fallback: Sequence[str] = (), **kwargs: Any
    ) -> None:
        self.channels = Channels()
        self.selector: Selector[grpc.aio.Channel] = Selector(
            balancers,
            SERVICE,
            fallback=fallback,
            channel_factory=self.channels.factory,
            close_channel=self.channels.close,
            **kwargs,
        )

    async def __aenter__(self) -> Client:
        await self.selector.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.selector.close()

    def picks(self, n: int) -> list[str]:
        """Addresses chosen for `n` calls that all reached their backend."""
        chosen = []
        for _ in range(n):
            choice = self.selector.choose()
            self.selector.finished(choice, reached_backend=True)
            chosen.append(choice.address)
        return chosen

    async def until_chosen(self, address: str) -> list[str]:
        async def probe() -> list[str]:
            try:
                return self.picks(4)
            except NoBackendError:
                return []

        return await settled(probe, lambda seen: address in seen)


@pytest.fixture
def fleet() -> Iterator[BackendFleet]:
    with BackendFleet(3) as backends:
        yield backends


@pytest.fixture
def fallback_backend() -> Iterator[CountingBackend]:
    with CountingBackend("fallback") as backend:
        yield backend


def is_rotation(seen: Sequence[str], cycle: Sequence[str]) -> bool:
    return any(
        all(seen[i] == cycle[(i + offset) % len(cycle)] for i in range(len(seen)))
        for offset in range(len(cycle))
    )


async def test_choices_follow_the_list_in_order_with_duplicates(fleet: BackendFleet) -> None:
    order = ["backend-0", "backend-1", "backend-0", "backend-2"]
    scripted = ScriptedBalancer().serve(order, list(fleet))
    async with scripted as running, Client([balancer_address(running)]) as client:
        await client.until_chosen(fleet[2].address)
        seen = client.picks(40)
        by_name = {b.name: b.address for b in fleet}
        assert is_rotation(seen, [by_name[name] for name in order])
        assert Counter(seen) == {fleet[0].address: 20, fleet[1].address: 10, fleet[2].address: 10}
        tokens = await tokens_by_name(running)
        choice = client.selector.choose()
        client.selector.finished(choice, reached_backend=True)
        name = next(b.name for b in fleet if b.address == choice.address)
        assert choice.token == tokens[name]
        assert choice.metadata == (("lb-token", tokens[name]),)
        assert choice.from_balancer


async def test_weights_from_lbserver_become_shares(harness: Harness, fleet: BackendFleet) -> None:
    running = await harness.start()
    admin = harness.channel(running)
    await register(admin, fleet[0], weight=1)
    await register(admin, fleet[1], weight=3)
    async with Client([balancer_address(running)]) as client:
        await client.until_chosen(fleet[1].address)
        await client.until_chosen(fleet[0].address)
        length = (await service_state(admin)).list_length
        seen = Counter(client.picks(10 * length))
        assert seen[fleet[1].address] == 3 * seen[fleet[0].address]


async def test_a_backend_whose_call_did_not_reach_it_is_skipped(fleet: BackendFleet) -> None:
    scripted = ScriptedBalancer().serve(["backend-0", "backend-1"], [fleet[0], fleet[1]])
    async with scripted as running, Client([balancer_address(running)]) as client:
        await client.until_chosen(fleet[1].address)
        choice = client.selector.choose()
        client.selector.finished(choice, reached_backend=False, failed=True)
        other = client.selector.choose(exclude={choice.address})
        client.selector.finished(other, reached_backend=True)
        assert other.address != choice.address
        assert choice.address not in client.picks(6)


async def test_drops_raise_and_are_reported_per_token(fleet: BackendFleet) -> None:
    scripted = ScriptedBalancer(client_stats_interval=1.0).serve(
        ["backend-0", "drop", "backend-1"], [fleet[0], fleet[1]], drops=["shed"]
    )
    async with scripted as running, Client([balancer_address(running)]) as client:
        assert await client.selector.wait_ready(10)
        outcomes: Counter[str] = Counter()
        for _ in range(30):
            try:
                choice = client.selector.choose()
            except DroppedCallError as error:
                outcomes[f"drop:{error.token}"] += 1
            else:
                client.selector.finished(choice, reached_backend=True)
                outcomes[choice.address] += 1
        assert outcomes == {"drop:shed": 10, fleet[0].address: 10, fleet[1].address: 10}
        state = await settled(
            lambda: service_state(running),
            lambda s: s.client_stats.calls_dropped_by_token.get("shed", 0) >= 10,
        )
        assert state.client_stats.calls_dropped_by_token["shed"] == 10


async def test_client_stats_deltas_reach_the_balancer(
    harness: Harness, fleet: BackendFleet
) -> None:
    running = await harness.start(client_stats_interval=1.0)
    admin = harness.channel(running)
    await register(admin, fleet[0])
    async with Client([balancer_address(running)]) as client:
        await client.selector.wait_ready(10)
        # The stats of the stream so far (the wait) are zero; from here on:
        client.picks(7)
        failed = client.selector.choose()
        client.selector.finished(failed, reached_backend=False, failed=True)
        running_call = client.selector.choose()  # started, not finished yet

        state = await settled(
            lambda: service_state(admin), lambda s: s.client_stats.calls_started >= 9
        )
        stats = state.client_stats
        assert (stats.calls_started, stats.calls_finished) == (9, 8)
        assert stats.calls_finished_known_received == 7
        assert stats.calls_finished_with_client_failed_to_send == 1

        client.selector.finished(running_call, reached_backend=True)
        client.picks(3)
        state = await settled(
            lambda: service_state(admin), lambda s: s.client_stats.calls_finished >= 12
        )
        # Deltas: the balancer's sums are exact, nothing was reported twice.
        stats = state.client_stats
        assert (stats.calls_started, stats.calls_finished) == (12, 12)
        assert stats.calls_finished_known_received == 11


async def test_keeps_the_last_list_while_the_balancer_is_away_and_reconnects(
    harness: Harness, fleet: BackendFleet
) -> None:
    running = await harness.start()
    await register(harness.channel(running), fleet[0])
    async with Client([balancer_address(running)]) as client:
        await client.until_chosen(fleet[0].address)
        await running.stop(grace=0)
        assert client.picks(10) == [fleet[0].address] * 10
        await asyncio.sleep(0.5)  # let the client notice: still the last list
        assert client.picks(5) == [fleet[0].address] * 5

        restarted = await harness.start(listen=balancer_address(running), startup_grace=5.0)
        admin = harness.channel(restarted)
        await register(admin, fleet[0])
        await register(admin, fleet[1])
        assert fleet[1].address in await client.until_chosen(fleet[1].address)
        assert (await service_state(admin)).clients == 1


async def test_rotates_to_the_next_balancer(harness: Harness, fleet: BackendFleet) -> None:
    running = await harness.start()
    await register(harness.channel(running), fleet[0])
    dead = f"127.0.0.1:{free_port()}"
    async with Client([dead, balancer_address(running)]) as client:
        assert await client.selector.wait_ready(20)
        assert client.picks(2) == [fleet[0].address] * 2


async def test_unknown_service_gets_fallback_then_a_list_ends_it(
    harness: Harness, fleet: BackendFleet, fallback_backend: CountingBackend
) -> None:
    running = await harness.start()
    async with Client([balancer_address(running)], fallback=[fallback_backend.address]) as client:
        assert await client.selector.wait_ready(10)
        choice = client.selector.choose()
        client.selector.finished(choice, reached_backend=True)
        assert (choice.address, choice.token, choice.from_balancer) == (
            fallback_backend.address,
            "",
            False,
        )
        assert choice.metadata == ()

        admin = harness.channel(running)
        await register(admin, fleet[0])
        await client.until_chosen(fleet[0].address)
        assert client.picks(3) == [fleet[0].address] * 3

        # The last backend leaves: lbserver answers fallback_response again.
        await deregister(admin, fleet[0])
        await client.until_chosen(fallback_backend.address)
        assert client.picks(2) == [fallback_backend.address] * 2


async def test_fallback_response_without_fallback_addresses_keeps_the_last_list(
    harness: Harness, fleet: BackendFleet
) -> None:
    running = await harness.start()
    admin = harness.channel(running)
    await register(admin, fleet[0])
    async with Client([balancer_address(running)]) as client:
        await client.until_chosen(fleet[0].address)
        await deregister(admin, fleet[0])  # lbserver answers fallback_response

        async def mode() -> str:
            return client.selector.mode

        assert await settled(mode, lambda m: m == "fallback") == "fallback"
        assert client.picks(3) == [fleet[0].address] * 3


async def test_unreachable_balancer_falls_back_after_the_timeout_and_recovers(
    harness: Harness, fleet: BackendFleet, fallback_backend: CountingBackend
) -> None:
    port = free_port()
    async with Client(
        [f"127.0.0.1:{port}"], fallback=[fallback_backend.address], fallback_timeout=0.5
    ) as client:
        with pytest.raises(NoBackendError):
            client.selector.choose()  # no list, and the timeout is still running
        assert await client.selector.wait_ready(10)
        assert client.picks(3) == [fallback_backend.address] * 3

        running = await harness.start(listen=f"127.0.0.1:{port}")
        await register(harness.channel(running), fleet[0])
        await client.until_chosen(fleet[0].address)
        assert client.picks(2) == [fleet[0].address] * 2


async def test_without_fallback_addresses_calls_fail_until_a_list_arrives() -> None:
    port = free_port()
    async with Client([f"127.0.0.1:{port}"], fallback_timeout=0.2) as client:
        assert await client.selector.wait_settled(10)
        assert not client.selector.ready
        assert client.selector.connectivity() is grpc.ChannelConnectivity.TRANSIENT_FAILURE
        with pytest.raises(NoBackendError, match="no server list"):
            client.selector.choose()


async def test_channels_are_cached_per_address_and_closed_when_gone(
    harness: Harness, fleet: BackendFleet
) -> None:
    running = await harness.start()
    admin = harness.channel(running)
    await register(admin, fleet[0])
    await register(admin, fleet[1])
    async with Client([balancer_address(running)], retire_grace=30.0) as client:

        async def closed() -> list[str]:
            return list(client.channels.closed)

        await client.until_chosen(fleet[1].address)
        first = dict(client.channels.created)
        busy = client.selector.choose()
        if busy.address != fleet[1].address:
            client.selector.finished(busy, reached_backend=True)
            busy = client.selector.choose()
        assert busy.address == fleet[1].address

        await register(admin, fleet[2])
        await client.until_chosen(fleet[2].address)
        # Reused, not re-created, across the update.
        assert client.channels.created[fleet[0].address] is first[fleet[0].address]

        await deregister(admin, fleet[0])
        await deregister(admin, fleet[1])
        await settled(closed, lambda c: fleet[0].address in c)
        # fleet[1] still has a call running: its channel waits for it.
        assert fleet[1].address not in client.channels.closed
        client.selector.finished(busy, reached_backend=True)
        assert fleet[1].address in await settled(closed, lambda c: fleet[1].address in c)
        assert sorted(client.channels.closed) == sorted([fleet[0].address, fleet[1].address])
    assert sorted(client.channels.closed) == sorted(b.address for b in fleet)


class ListFirstBalancer(lb_grpc.LoadBalancerServicer):
    """A broken balancer: sends a server list without initial_response."""

    def __init__(self, backend: CountingBackend) -> None:
        self.backend = backend
        self.streams = 0

    async def BalanceLoad(
        self, request_iterator: AsyncIterator[lb_pb2.LoadBalanceRequest], context: Any
    ) -> AsyncIterator[lb_pb2.LoadBalanceResponse]:
        self.streams += 1
        yield lb_pb2.LoadBalanceResponse(
            server_list=lb_pb2.ServerList(
                servers=[
                    lb_pb2.Server(
                        ip_address=bytes([127, 0, 0, 1]),
                        port=self.backend.port,
                        load_balance_token="t",
                    )
                ]
            )
        )
        await asyncio.sleep(30)


async def test_a_stream_not_starting_with_initial_response_is_dropped(
    fleet: BackendFleet, fallback_backend: CountingBackend
) -> None:
    servicer = ListFirstBalancer(fleet[0])
    server = grpc.aio.server()
    lb_grpc.add_LoadBalancerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Client(
            [f"127.0.0.1:{port}"], fallback=[fallback_backend.address], fallback_timeout=0.5
        ) as client:
            assert await client.selector.wait_ready(10)
            assert client.picks(3) == [fallback_backend.address] * 3
            assert servicer.streams >= 1
    finally:
        await server.stop(0)


async def test_choose_after_close_fails(harness: Harness, fleet: BackendFleet) -> None:
    running = await harness.start()
    await register(harness.channel(running), fleet[0])
    client = Client([balancer_address(running)])
    async with client:
        await client.selector.wait_ready(10)
        assert client.selector.connectivity() is grpc.ChannelConnectivity.READY
    with pytest.raises(NoBackendError, match="closed"):
        client.selector.choose()
    assert client.selector.connectivity() is grpc.ChannelConnectivity.SHUTDOWN


def test_choice_metadata_is_empty_without_a_token() -> None:
    assert Choice("a:1", "", object()).metadata == ()
