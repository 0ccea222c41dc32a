"""Hostile BalanceLoad and Registry clients against a real server: streams
that never send their initial request, per-peer caps, floods, oversized and
undecodable messages. Every refusal names its limit and the limit's value."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from lbserver.grpc_compat import EOF_MARKER
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.server import RunningServer
from tests.service.harness import Harness
from tests.support.eventually import eventually

WAIT = 10.0
BALANCE_LOAD = "/grpc.lb.v1.LoadBalancer/BalanceLoad"
HEARTBEAT = pb.HeartbeatRequest(service="oap", instance_id="a", ip="10.0.0.1", port=11800)
# Not a protobuf message: a field tag whose varint never ends.
UNDECODABLE = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"

RawStream = grpc.aio.StreamStreamCall[bytes, bytes]


def initial(name: str = "oap") -> lb.LoadBalanceRequest:
    return lb.LoadBalanceRequest(initial_request=lb.InitialLoadBalanceRequest(name=name))


def same(data: bytes) -> bytes:
    return data


def balance_load(channel: grpc.aio.Channel) -> RawStream:
    """A BalanceLoad call that sends and receives bytes, nothing sent yet."""
    call: RawStream = channel.stream_stream(BALANCE_LOAD, same, same)(None)
    return call


def streams_opened() -> float:
    return REGISTRY.get_sample_value("lbserver_balance_streams_opened_total") or 0.0


async def read_response(call: RawStream) -> lb.LoadBalanceResponse:
    data = await asyncio.wait_for(call.read(), WAIT)
    assert isinstance(data, bytes), data
    return lb.LoadBalanceResponse.FromString(data)


async def served_list(channel: grpc.aio.Channel) -> list[str]:
    """What a well-behaved client gets: initial_response, then its list."""
    call = balance_load(channel)
    await call.write(initial().SerializeToString())
    first = await read_response(call)
    assert first.HasField("initial_response"), first
    second = await read_response(call)
    call.cancel()
    return [
        f"{socket.inet_ntoa(server.ip_address)}:{server.port}"
        for server in second.server_list.servers
    ]


async def ended(call: Any) -> None:
    """Awaits a unary call, or reads a stream to its end."""
    if isinstance(call, grpc.aio.StreamStreamCall):
        while await asyncio.wait_for(call.read(), WAIT) is not EOF_MARKER:
            pass
    else:
        await asyncio.wait_for(call, WAIT)


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    """The error a call ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ended(call)
    return error.value


async def start_with_backend(harness: Harness, **changes: Any) -> tuple[RunningServer, Any]:
    running = await harness.start(**changes)
    channel = harness.channel(running)
    await pb_grpc.RegistryStub(channel).Heartbeat(HEARTBEAT)
    return running, channel


# ---------------------------------------------------------------------------
# Streams that never send their initial request


async def test_silent_streams_of_one_peer_do_not_lock_out_a_client(harness: Harness) -> None:
    """60 streams from one peer that never send an initial request, against
    max_streams=50: a well-behaved client (same address) still gets its list.
    Before, every waiting stream held a max_streams slot."""
    _, channel = await start_with_backend(harness, max_streams=50, initial_request_timeout=60.0)
    opened = streams_opened()
    silent = [balance_load(channel) for _ in range(60)]
    await eventually(lambda: streams_opened() - opened >= 60, "60 streams opened")
    assert await served_list(channel) == ["10.0.0.1:11800"]
    for call in silent:
        call.cancel()


async def test_waiting_streams_past_the_budget_end_oldest_first(harness: Harness) -> None:
    running, channel = await start_with_backend(
        harness, max_pending_streams=10, max_streams_per_peer=20, initial_request_timeout=60.0
    )
    assert running.balance_load is not None
    admission = running.balance_load.admission
    silent = [balance_load(channel) for _ in range(60)]
    await eventually(lambda: admission.pending == 10, "10 streams waiting")
    assert await served_list(channel) == ["10.0.0.1:11800"]
    # The 50 oldest were ended to make room, naming the budget they exceeded.
    await eventually(lambda: sum(call.done() for call in silent) >= 50, "50 ended")
    for call in silent:
        if call.done():
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_pending_streams=10" in (await call.details() or "")
    assert admission.pending <= 10
    assert admission.streams_of("127.0.0.1") <= 20
    for call in silent:
        call.cancel()
    await eventually(lambda: admission.streams_of("127.0.0.1") == 0, "every stream released")
    assert admission.pending == 0 and admission.established == 0


async def test_a_peer_over_its_cap_is_refused_naming_it(harness: Harness) -> None:
    running, channel = await start_with_backend(harness, max_streams_per_peer=2)
    assert running.balance_load is not None
    first, second = balance_load(channel), balance_load(channel)
    for call in (first, second):
        await call.write(initial().SerializeToString())
        assert (await read_response(call)).HasField("initial_response")
    third = balance_load(channel)
    error = await refusal(third)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams_per_peer=2" in (error.details() or "")
    first.cancel()
    admission = running.balance_load.admission
    await eventually(lambda: admission.streams_of("127.0.0.1") == 1, "the first released")
    assert await served_list(channel) == ["10.0.0.1:11800"]
    second.cancel()


async def test_heartbeat_streams_per_peer_are_capped(harness: Harness) -> None:
    running = await harness.start(max_streams_per_peer=1)
    registry = pb_grpc.RegistryStub(harness.channel(running))
    first = registry.HeartbeatStream(None)
    await first.write(pb.HeartbeatRequest(reply_token=1, **_fields(HEARTBEAT)))
    reply = await asyncio.wait_for(first.read(), WAIT)
    assert isinstance(reply, pb.HeartbeatStreamResponse) and reply.HasField("accepted")
    error = await refusal(registry.HeartbeatStream(None))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams_per_peer=1" in (error.details() or "")
    first.cancel()


def _fields(message: pb.HeartbeatRequest) -> dict[str, Any]:
    return {field.name: value for field, value in message.ListFields()}


# ---------------------------------------------------------------------------
# Refusals name their limit and its value


async def test_max_streams_refusal_names_the_value(harness: Harness) -> None:
    _, channel = await start_with_backend(harness, max_streams=1)
    first = balance_load(channel)
    await first.write(initial().SerializeToString())
    assert (await read_response(first)).HasField("initial_response")
    second = balance_load(channel)
    await second.write(initial().SerializeToString())
    error = await refusal(second)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams=1" in (error.details() or "")
    first.cancel()


async def test_a_missing_initial_request_names_the_timeout(harness: Harness) -> None:
    running = await harness.start(initial_request_timeout=0.2)
    error = await refusal(balance_load(harness.channel(running)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "initial_request_timeout=0.2s" in (error.details() or "")


async def test_the_heartbeat_rate_refusal_names_the_value(harness: Harness) -> None:
    running = await harness.start(heartbeat_rate_per_peer=1.0)
    registry = pb_grpc.RegistryStub(harness.channel(running))
    await registry.Heartbeat(HEARTBEAT)
    error = await refusal(registry.Heartbeat(HEARTBEAT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "heartbeat_rate_per_peer=1/s" in (error.details() or "")


def flood_balance_load(port: int, reports: int) -> grpc.RpcError:
    """A client that sends its initial request, then `reports` ClientStats at
    once; the error its stream ends with. grpcio's blocking client: the aio
    one reports INTERNAL for a call whose next write failed because the
    server had ended it, hiding the server's status."""
    report = lb.LoadBalanceRequest(client_stats=lb.ClientStats(num_calls_started=1))
    stop = threading.Event()

    def requests() -> Iterator[bytes]:
        yield initial().SerializeToString()
        for _ in range(reports):
            yield report.SerializeToString()
        stop.wait(WAIT)

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(BALANCE_LOAD, same, same)(requests(), timeout=WAIT)
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            return error
        finally:
            stop.set()
    raise AssertionError("the stream ended without an error")


async def test_a_client_stats_flood_ends_the_stream_naming_the_limit(harness: Harness) -> None:
    running, _ = await start_with_backend(harness, client_stats_rate_per_stream=1.0)
    error = await asyncio.to_thread(flood_balance_load, running.port, 500)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "client_stats_rate_per_stream=1/s" in (error.details() or "")
    refused = REGISTRY.get_sample_value(
        "lbserver_streams_refused_total",
        {"rpc": "BalanceLoad", "limit": "client_stats_rate_per_stream"},
    )
    assert refused is not None and refused >= 1


# ---------------------------------------------------------------------------
# Message size and decoding

MAX_BYTES = 4096
BIG_NAME = "x" * (MAX_BYTES + 100)  # over max_message_bytes, under twice it


async def test_messages_over_max_message_bytes_name_the_option(harness: Harness) -> None:
    running = await harness.start(max_message_bytes=MAX_BYTES)
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    big = pb.HeartbeatRequest(service=BIG_NAME, ip="10.0.0.1", port=1)
    calls: list[Any] = [registry.Heartbeat(big)]
    stream = registry.HeartbeatStream(None)
    await stream.write(big)
    calls.append(stream)
    calls.append(registry.Deregister(pb.DeregisterRequest(service=BIG_NAME, instance_id="a")))
    calls.append(pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest(service=BIG_NAME)))
    balance = balance_load(channel)
    await balance.write(initial(BIG_NAME).SerializeToString())
    calls.append(balance)
    for call in calls:
        error = await refusal(call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert f"max_message_bytes={MAX_BYTES}" in (error.details() or ""), error
    # Beyond twice the option gRPC itself refuses, before reading the message.
    error = await refusal(
        registry.Heartbeat(pb.HeartbeatRequest(service="x" * (3 * MAX_BYTES), ip="10.0.0.1"))
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def raw_unary(
    channel: grpc.aio.Channel, method: str
) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(method, same, same)


@pytest.mark.parametrize(
    ("method", "message_type"),
    [
        ("/lbserver.v1.Registry/Heartbeat", "lbserver.v1.HeartbeatRequest"),
        ("/lbserver.v1.Registry/Deregister", "lbserver.v1.DeregisterRequest"),
        ("/lbserver.v1.Admin/GetState", "lbserver.v1.GetStateRequest"),
    ],
)
async def test_undecodable_unary_requests_are_invalid_argument(
    harness: Harness, method: str, message_type: str
) -> None:
    running = await harness.start()
    error = await refusal(raw_unary(harness.channel(running), method)(UNDECODABLE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message_type in (error.details() or "")


async def test_undecodable_stream_messages_are_invalid_argument(harness: Harness) -> None:
    _, channel = await start_with_backend(harness)
    first = balance_load(channel)
    await first.write(UNDECODABLE)
    later = balance_load(channel)
    await later.write(initial().SerializeToString())
    assert (await read_response(later)).HasField("initial_response")
    await later.write(UNDECODABLE)
    heartbeats: RawStream = channel.stream_stream(
        "/lbserver.v1.Registry/HeartbeatStream", same, same
    )(None)
    await heartbeats.write(UNDECODABLE)
    for call, message_type in (
        (first, "grpc.lb.v1.LoadBalanceRequest"),
        (later, "grpc.lb.v1.LoadBalanceRequest"),
        (heartbeats, "lbserver.v1.HeartbeatRequest"),
    ):
        error = await refusal(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert message_type in (error.details() or ""), error


async def test_an_undecodable_call_is_checked_for_credentials_first(harness: Harness) -> None:
    running = await harness.start(auth_token="t0ken")
    channel = harness.channel(running)
    for method in ("/lbserver.v1.Registry/Heartbeat", "/lbserver.v1.Admin/GetState"):
        error = await refusal(raw_unary(channel, method)(UNDECODABLE))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        error = await refusal(
            raw_unary(channel, method)(UNDECODABLE, metadata=(("authorization", "Bearer t0ken"),))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
