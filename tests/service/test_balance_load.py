"""BalanceLoad against a real grpc.aio server, with raw stubs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbserver.balancer import Balancer, ListSettings
from lbserver.domain.weights import SheddingSettings
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb
from lbserver.proto.grpclb.v1 import load_balancer_pb2_grpc as lb_grpc
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.service.conftest import TEST_CONFIG, Harness
from tests.support.eventually import eventually

# How long read_nothing() looks: a glance, as the marker after it is the proof.
QUIET = 0.05


class Stream:
    """A BalanceLoad stream driven by hand."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.requests: asyncio.Queue[lb.LoadBalanceRequest | None] = asyncio.Queue()
        self.call = lb_grpc.LoadBalancerStub(channel).BalanceLoad(self._requests())
        # A read left waiting by read_nothing() must deliver the next message.
        self._pending: asyncio.Future[object] | None = None

    async def _requests(self) -> AsyncIterator[lb.LoadBalanceRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    async def send_initial(self, name: str) -> None:
        await self.requests.put(
            lb.LoadBalanceRequest(initial_request=lb.InitialLoadBalanceRequest(name=name))
        )

    def _read(self) -> asyncio.Future[object]:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.call.read())
        return self._pending

    async def read(self, within: float = 5.0) -> lb.LoadBalanceResponse:
        response = await asyncio.wait_for(asyncio.shield(self._read()), within)
        self._pending = None
        assert isinstance(response, lb.LoadBalanceResponse), response
        return response

    async def read_nothing(self) -> None:
        """Nothing is waiting to be read. Alone it proves little (a push may
        be late), so each test follows it with a change whose push must be
        the next message read: the balancer pushes in order, so a push the
        test did not want would come first."""
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._read()), QUIET)


def heartbeat(
    service: str,
    n: int,
    *,
    weight: int = 0,
    state: pb.BackendState.ValueType = pb.BACKEND_STATE_UNSPECIFIED,
    instance: str = "",
) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(
        service=service,
        instance_id=instance or f"pod-{n}",
        ip=f"10.0.0.{n}",
        port=11800,
        weight=weight,
        state=state,
    )


def addresses(response: lb.LoadBalanceResponse) -> list[str]:
    return [
        f"{socket.inet_ntoa(server.ip_address)}:{server.port}"
        for server in response.server_list.servers
    ]


async def open_stream(
    harness: Harness, name: str, **changes: Any
) -> tuple[Stream, grpc.aio.Channel]:
    running = await harness.start(**changes)
    channel = harness.channel(running)
    stream = Stream(channel)
    await stream.send_initial(name)
    return stream, channel


async def test_first_message_must_be_initial_request(harness: Harness) -> None:
    running = await harness.start()
    stream = Stream(harness.channel(running))
    await stream.requests.put(lb.LoadBalanceRequest(client_stats=lb.ClientStats()))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream.read()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "initial_request" in (error.value.details() or "")


@pytest.mark.parametrize(("name", "problem"), [("", "empty"), ("x" * 257, "257 bytes")])
async def test_bad_names_are_rejected(harness: Harness, name: str, problem: str) -> None:
    stream, _ = await open_stream(harness, name)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream.read()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "initial_request.name" in (error.value.details() or "")
    assert problem in (error.value.details() or "")


async def test_initial_response_comes_first_with_the_stats_interval(harness: Harness) -> None:
    stream, _ = await open_stream(harness, "oap", client_stats_interval=2.5)
    first = await stream.read()
    assert first.WhichOneof("load_balance_response_type") == "initial_response"
    interval = first.initial_response.client_stats_report_interval
    assert interval.ToMilliseconds() == 2500


async def test_zero_stats_interval_disables_reports(harness: Harness) -> None:
    stream, _ = await open_stream(harness, "oap", client_stats_interval=0.0)
    first = await stream.read()
    assert first.initial_response.client_stats_report_interval.ToNanoseconds() == 0


async def test_unknown_service_gets_fallback_once(harness: Harness) -> None:
    stream, channel = await open_stream(harness, "nobody:11800")
    assert (await stream.read()).HasField("initial_response")
    assert (await stream.read()).HasField("fallback_response")
    await stream.read_nothing()
    # The marker: once the service appears, its list is the next message, so
    # no second fallback came before it.
    await pb_grpc.RegistryStub(channel).Heartbeat(heartbeat("nobody", 3))
    assert addresses(await stream.read()) == ["10.0.0.3:11800"]


async def test_startup_grace_withholds_fallback(harness: Harness) -> None:
    running = await harness.start(startup_grace=60.0)
    registry = pb_grpc.RegistryStub(harness.channel(running))
    stream = Stream(harness.channel(running))
    await stream.send_initial("oap")
    assert (await stream.read()).HasField("initial_response")
    await stream.read_nothing()
    # A registration arriving during the grace is sent at once (and, as the
    # next message, shows no fallback was sent before it).
    await registry.Heartbeat(heartbeat("oap", 1))
    assert addresses(await stream.read()) == ["10.0.0.1:11800"]


async def test_vanilla_list_then_updates_and_no_identical_pushes(harness: Harness) -> None:
    running = await harness.start()
    registry = pb_grpc.RegistryStub(harness.channel(running))
    await registry.Heartbeat(heartbeat("oap", 1))
    await registry.Heartbeat(heartbeat("oap", 2))
    stream = Stream(harness.channel(running))
    await stream.send_initial("oap.skywalking.svc.cluster.local:11800")
    assert (await stream.read()).HasField("initial_response")
    first = await stream.read()
    assert sorted(addresses(first)) == ["10.0.0.1:11800", "10.0.0.2:11800"]
    tokens = [server.load_balance_token for server in first.server_list.servers]
    assert len(set(tokens)) == 2 and all(0 < len(t.encode()) < 50 for t in tokens)

    # A refresh that changes nothing pushes nothing.
    await registry.Heartbeat(heartbeat("oap", 1))
    await stream.read_nothing()

    # A weight change pushes a new list; tokens stay stable. (Being the next
    # message, it shows the refresh pushed nothing, even late.)
    await registry.Heartbeat(heartbeat("oap", 2, weight=3))
    second = await stream.read()
    assert addresses(second).count("10.0.0.2:11800") == 3
    assert {s.load_balance_token for s in second.server_list.servers} == set(tokens)


async def test_same_backend_listed_by_weight_interleaved(harness: Harness) -> None:
    running = await harness.start()
    registry = pb_grpc.RegistryStub(harness.channel(running))
    for n, weight in ((1, 1), (2, 1), (3, 2)):
        await registry.Heartbeat(heartbeat("oap", n, weight=weight))
    stream = Stream(harness.channel(running))
    await stream.send_initial("oap")
    await stream.read()
    listed = addresses(await stream.read())
    assert listed == ["10.0.0.3:11800", "10.0.0.1:11800", "10.0.0.2:11800", "10.0.0.3:11800"]


async def test_draining_and_deregistered_backends_leave_at_once(harness: Harness) -> None:
    running = await harness.start()
    registry = pb_grpc.RegistryStub(harness.channel(running))
    await registry.Heartbeat(heartbeat("oap", 1))
    await registry.Heartbeat(heartbeat("oap", 2))
    stream = Stream(harness.channel(running))
    await stream.send_initial("oap")
    await stream.read()
    assert len(addresses(await stream.read())) == 2
    await registry.Heartbeat(heartbeat("oap", 2, state=pb.BACKEND_STATE_DRAINING))
    assert addresses(await stream.read()) == ["10.0.0.1:11800"]
    reply = await registry.Deregister(pb.DeregisterRequest(service="oap", instance_id="pod-1"))
    assert reply.removed
    # Nobody left to call: the client is told to use its fallback addresses.
    assert (await stream.read()).HasField("fallback_response")
    again = await registry.Deregister(pb.DeregisterRequest(service="oap", instance_id="pod-1"))
    assert not again.removed


async def test_hold_policy_keeps_clients_on_their_last_list(harness: Harness) -> None:
    running = await harness.start(empty_service="hold")
    registry = pb_grpc.RegistryStub(harness.channel(running))
    await registry.Heartbeat(heartbeat("oap", 1))
    stream = Stream(harness.channel(running))
    await stream.send_initial("oap")
    await stream.read()
    await stream.read()
    await registry.Deregister(pb.DeregisterRequest(service="oap", instance_id="pod-1"))
    await stream.read_nothing()
    # The marker: the list of a backend registered after the deregistration
    # comes next, so no fallback was pushed for the empty service, late or not.
    await registry.Heartbeat(heartbeat("oap", 2))
    assert addresses(await stream.read()) == ["10.0.0.2:11800"]


async def test_initially_empty_then_backends_arrive(harness: Harness) -> None:
    running = await harness.start()
    registry = pb_grpc.RegistryStub(harness.channel(running))
    stream = Stream(harness.channel(running))
    await stream.send_initial("oap:11800")
    await stream.read()
    assert (await stream.read()).HasField("fallback_response")
    await registry.Heartbeat(heartbeat("oap", 7))
    assert addresses(await stream.read()) == ["10.0.0.7:11800"]


async def test_client_stats_are_summed_per_service(harness: Harness) -> None:
    running = await harness.start()
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    await registry.Heartbeat(heartbeat("oap", 1))
    stream = Stream(channel)
    await stream.send_initial("oap")
    await stream.read()
    await stream.read()
    for started in (5, 7):
        await stream.requests.put(
            lb.LoadBalanceRequest(
                client_stats=lb.ClientStats(
                    num_calls_started=started,
                    num_calls_finished=started,
                    num_calls_finished_known_received=started - 1,
                    num_calls_finished_with_client_failed_to_send=1,
                    calls_finished_with_drop=[
                        lb.ClientStatsPerToken(load_balance_token="lbserver-drop", num_calls=2)
                    ],
                )
            )
        )
    admin = pb_grpc.AdminStub(channel)

    async def both_reports() -> pb.GetStateResponse | None:
        state = await admin.GetState(pb.GetStateRequest(service="oap"))
        return state if state.services[0].client_stats.calls_started == 12 else None

    state = await eventually(both_reports, "both reports summed")
    stats = state.services[0].client_stats
    assert stats.calls_started == 12
    assert stats.calls_finished == 12
    assert stats.calls_finished_known_received == 10
    assert stats.calls_finished_with_client_failed_to_send == 2
    assert dict(stats.calls_dropped_by_token) == {"lbserver-drop": 4}
    assert state.services[0].clients == 1


async def test_shutdown_ends_streams_and_reports_not_serving(harness: Harness) -> None:
    running = await harness.start()
    stream = Stream(harness.channel(running))
    await stream.send_initial("oap")
    await stream.read()
    assert (await stream.read()).HasField("fallback_response")
    health = health_pb2_grpc.HealthStub(harness.channel(running))
    serving = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert serving.status == health_pb2.HealthCheckResponse.SERVING
    await running.health.enter_graceful_shutdown()
    draining = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert draining.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.stop(grace=30)
    # The stream ends by itself with OK, long before the grace would cancel it.
    assert await asyncio.wait_for(stream.call.read(), 3) is grpc.aio.EOF  # type: ignore[attr-defined]
    assert await asyncio.wait_for(stream.call.code(), 3) == grpc.StatusCode.OK


async def test_shedding_sends_drop_entries(harness: Harness) -> None:
    # The backend over the shedding threshold (0.75 for 0.5: a third of the
    # calls dropped), in a list of 3 entries: two for it and one drop.
    shedding = ListSettings(max_length=3, shedding=SheddingSettings(utilization=0.5))
    balancer = Balancer(list_settings=shedding)
    running = await harness.start(balancer=balancer)
    registry = pb_grpc.RegistryStub(harness.channel(running))
    overloaded = heartbeat("oap", 1)
    overloaded.load.cpu_utilization = 0.75
    await registry.Heartbeat(overloaded)
    stream = Stream(harness.channel(running))
    await stream.send_initial("oap")
    await stream.read()
    servers = (await stream.read()).server_list.servers
    assert [server.drop for server in servers].count(True) == 1
    assert TEST_CONFIG.startup_grace == 0
