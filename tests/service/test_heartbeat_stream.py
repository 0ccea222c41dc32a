"""Registry.HeartbeatStream against a real grpc.aio server: the same
heartbeats as the unary call, many per stream, answered when they ask or
bring news."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.service.conftest import Harness
from tests.service.test_registry_admin import seconds, valid

TOKEN = "stream-token"
WAIT = 5.0

StreamCall = grpc.aio.StreamStreamCall[pb.HeartbeatRequest, pb.HeartbeatStreamResponse]


TOKENS = iter(range(1, 1_000_000))


async def read(call: StreamCall) -> pb.HeartbeatStreamResponse:
    reply = await asyncio.wait_for(call.read(), WAIT)
    assert isinstance(reply, pb.HeartbeatStreamResponse)
    return reply


async def exchange(call: StreamCall, request: pb.HeartbeatRequest) -> pb.HeartbeatStreamResponse:
    """One heartbeat that asks for its answer."""
    request.reply_token = next(TOKENS)
    await call.write(request)
    reply = await read(call)
    assert reply.reply_token == request.reply_token
    assert (reply.service, reply.instance_id) == (request.service, request.instance_id)
    return reply


async def members(channel: grpc.aio.Channel) -> dict[str, list[str]]:
    state = await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest())
    return {s.name: sorted(b.instance_id for b in s.backends) for s in state.services}


async def test_one_stream_carries_many_backends_and_survives_refusals(harness: Harness) -> None:
    running = await harness.start(heartbeat_interval=2.0, default_ttl=9.0)
    channel = harness.channel(running)
    call = pb_grpc.RegistryStub(channel).HeartbeatStream(None)
    replies = []
    for index in range(3):
        replies.append(
            await exchange(call, valid(instance_id=f"pod-{index}", ip=f"10.0.0.{index + 1}"))
        )
    refused = await exchange(call, valid(instance_id="bad", port=0))
    other_service = await exchange(call, valid(service="web", instance_id="web-1", ip="10.0.1.1"))
    assert [r.code for r in replies] == [0, 0, 0]
    assert replies[0].accepted.granted_ttl.ToMilliseconds() == 9_000
    assert replies[0].accepted.heartbeat_interval.ToMilliseconds() == 2_000
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused.message.startswith("port:")
    assert not refused.HasField("accepted")
    assert other_service.code == 0
    assert await members(channel) == {"oap": ["pod-0", "pod-1", "pod-2"], "web": ["web-1"]}
    # Draining through the stream takes the backend out of the list at once.
    drained = await exchange(
        call, valid(instance_id="pod-0", ip="10.0.0.1", state=pb.BACKEND_STATE_DRAINING)
    )
    assert drained.code == 0
    state = await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest(service="oap"))
    entries = {b.instance_id: b.list_entries for b in state.services[0].backends}
    assert entries["pod-0"] == 0
    assert entries["pod-1"] > 0
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), WAIT) is grpc.aio.EOF  # type: ignore[attr-defined]
    assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=["missing", "wrong"],
)
async def test_the_token_is_checked_when_the_stream_opens(
    harness: Harness, metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode
) -> None:
    running = await harness.start(auth_token=TOKEN)
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    call = registry.HeartbeatStream(None, metadata=metadata)
    # Refused as it opens, before any heartbeat: reading gets the status. (A
    # write racing with the refusal may fail locally with INTERNAL instead,
    # which made this test flaky.)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    assert error.value.code() == code
    good = registry.HeartbeatStream(None, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert (await exchange(good, valid())).code == 0
    admin_metadata = (("authorization", f"Bearer {TOKEN}"),)
    state = await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest(), metadata=admin_metadata)
    assert [b.instance_id for s in state.services for b in s.backends] == ["pod-1"]
    good.cancel()


async def test_rate_limit_and_backend_limit_answer_per_heartbeat(harness: Harness) -> None:
    running = await harness.start(heartbeat_rate_per_peer=3.0, max_backends_per_service=2)
    channel = harness.channel(running)
    call = pb_grpc.RegistryStub(channel).HeartbeatStream(None)
    codes = [
        (await exchange(call, valid(instance_id=f"pod-{i}", ip=f"10.0.0.{i + 1}"))).code
        for i in range(3)
    ]
    # The third backend is one too many for the service; the stream goes on.
    assert codes == [0, 0, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    limited = [(await exchange(call, valid(instance_id="pod-0", ip="10.0.0.1"))) for _ in range(5)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] in [r.code for r in limited]
    assert any("heartbeat_rate_per_peer" in r.message for r in limited)
    assert await members(channel) == {"oap": ["pod-0", "pod-1"]}
    call.cancel()


async def test_only_news_and_questions_are_answered(harness: Harness) -> None:
    running = await harness.start(default_ttl=9.0)
    call = pb_grpc.RegistryStub(harness.channel(running)).HeartbeatStream(None)
    # The first heartbeat of a backend is news.
    await call.write(valid())
    first = await read(call)
    assert (first.code, first.reply_token, first.instance_id) == (0, 0, "pod-1")
    assert first.accepted.granted_ttl.ToMilliseconds() == 9_000
    # The same outcome again is not; a heartbeat that asks is answered, and
    # the next read proves the two before it were not.
    await call.write(valid())
    await call.write(valid())
    asked = await exchange(call, valid())
    assert asked.code == 0
    # A changed outcome is news without asking: a refusal, then a new TTL.
    await call.write(valid(port=0))
    refused = await read(call)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused.reply_token == 0
    await call.write(valid(requested_ttl=seconds(4)))
    renewed = await read(call)
    assert (renewed.code, renewed.accepted.granted_ttl.ToMilliseconds()) == (0, 4_000)
    # Each backend has its own "last outcome".
    await call.write(valid(instance_id="pod-2", ip="10.1.2.4"))
    other = await read(call)
    assert other.instance_id == "pod-2"
    call.cancel()
