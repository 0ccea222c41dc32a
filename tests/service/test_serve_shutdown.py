"""Stopping a balancer with Registry.HeartbeatStreams open: the streams end
at once (registrars reconnect elsewhere) while open unary calls keep the
shutdown grace."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.registrar._stream import HeartbeatStream
from lbserver.services.registry import RegistryService
from tests.service.conftest import Harness
from tests.service.test_heartbeat_stream import exchange
from tests.service.test_registry_admin import valid

# Far longer than any step below takes; far shorter than the grace.
WAIT = 5.0
GRACE = 60.0


async def test_stop_ends_heartbeat_streams_and_gives_unary_calls_the_grace(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    deregister = RegistryService.Deregister

    async def held_deregister(
        self: RegistryService,
        request: pb.DeregisterRequest,
        context: grpc.aio.ServicerContext[pb.DeregisterRequest, pb.DeregisterResponse],
    ) -> pb.DeregisterResponse:
        entered.set()
        await release.wait()
        return await deregister(self, request, context)

    monkeypatch.setattr(RegistryService, "Deregister", held_deregister)
    running = await harness.start(shutdown_grace=GRACE)
    stub = pb_grpc.RegistryStub(harness.channel(running))
    stream = stub.HeartbeatStream(None)
    assert (await exchange(stream, valid())).code == 0
    unary = asyncio.ensure_future(
        stub.Deregister(pb.DeregisterRequest(service="oap", instance_id="pod-1"))
    )
    await asyncio.wait_for(entered.wait(), WAIT)

    stopping = asyncio.create_task(running.stop())
    # The stream ends long before the grace...
    assert await asyncio.wait_for(stream.code(), WAIT) == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in await stream.details()
    # ...while the unary call still holds the stop, and finishes unharmed.
    assert not stopping.done()
    release.set()
    assert (await asyncio.wait_for(unary, WAIT)).removed
    await asyncio.wait_for(stopping, WAIT)


async def test_the_registrars_stream_sees_the_stop_as_unavailable(harness: Harness) -> None:
    running = await harness.start(shutdown_grace=GRACE)
    news: list[pb.HeartbeatStreamResponse] = []
    stream = HeartbeatStream(pb_grpc.RegistryStub(harness.channel(running)), (), news.append)
    try:
        reply = await stream.send(valid(), reply_within=WAIT)
        assert reply is not None and reply.code == 0
        await asyncio.wait_for(running.stop(), WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream.send(valid(), reply_within=WAIT)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stream.ended
        assert news == []
    finally:
        stream.close()
