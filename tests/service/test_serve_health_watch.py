"""grpc.health.v1.Health/Watch across a stop: an open Watch (Envoy, Consul,
gRPC clients with health checking) is told NOT_SERVING and then ended with
UNAVAILABLE at once, instead of holding the stop for the whole grace and
being cancelled at its end."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbserver.proto.v1 import lbserver_pb2
from tests.service.harness import Harness

# Far longer than any step below takes; far shorter than the grace.
WAIT = 5.0
GRACE = 60.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
REGISTRY_SERVICE = lbserver_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


async def next_status(call: grpc.aio.UnaryStreamCall) -> int:  # type: ignore[type-arg]
    reply = await asyncio.wait_for(call.read(), WAIT)
    assert isinstance(reply, health_pb2.HealthCheckResponse)
    status: int = reply.status
    return status


@pytest.mark.parametrize("service", ["", REGISTRY_SERVICE])
async def test_stop_ends_open_watch_streams_at_once(harness: Harness, service: str) -> None:
    running = await harness.start(shutdown_grace=GRACE)
    health = health_pb2_grpc.HealthStub(harness.channel(running))
    call = health.Watch(health_pb2.HealthCheckRequest(service=service))
    assert await next_status(call) == SERVING

    # Nothing but the Watch is open: the stop takes none of the grace.
    await asyncio.wait_for(running.stop(), WAIT)
    assert await next_status(call) == NOT_SERVING
    assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in await call.details()


async def test_a_watch_of_an_unknown_service_ends_too(harness: Harness) -> None:
    running = await harness.start(shutdown_grace=GRACE)
    health = health_pb2_grpc.HealthStub(harness.channel(running))
    call = health.Watch(health_pb2.HealthCheckRequest(service="not-a-service"))
    assert await next_status(call) == SERVICE_UNKNOWN
    await asyncio.wait_for(running.stop(), WAIT)
    assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.UNAVAILABLE


async def test_a_watch_opened_while_shutting_down_ends_at_once(harness: Harness) -> None:
    running = await harness.start(shutdown_grace=GRACE)
    health = health_pb2_grpc.HealthStub(harness.channel(running))
    await running.health.enter_graceful_shutdown()
    call = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert await next_status(call) == NOT_SERVING
    assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.UNAVAILABLE
    # Setting a status has no effect any more.
    await running.health.set("", SERVING)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)
    assert reply.status == NOT_SERVING


async def test_watch_and_check_follow_status_changes(harness: Harness) -> None:
    running = await harness.start()
    health = health_pb2_grpc.HealthStub(harness.channel(running))
    call = health.Watch(health_pb2.HealthCheckRequest(service="extra"))
    assert await next_status(call) == SERVICE_UNKNOWN
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service="extra"), timeout=WAIT)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    await running.health.set("extra", SERVING)
    assert await next_status(call) == SERVING
    await running.health.set("extra", SERVING)  # unchanged: no message
    await running.health.set("extra", NOT_SERVING)
    assert await next_status(call) == NOT_SERVING
    reply = await health.Check(health_pb2.HealthCheckRequest(service="extra"), timeout=WAIT)
    assert reply.status == NOT_SERVING
    call.cancel()
