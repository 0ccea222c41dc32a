"""`agent_shim.aio_balanced_channel` with a generated-style stub, against the
real lbserver balancer and real backends: all four call types (iterator and
write() styles) spread by weight, metadata, deadlines, status codes and
trailing metadata, retry on another backend, drops, fallback, connectivity
and close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

import agent_shim
from tests.service.conftest import Harness
from tests.support.eventually import eventually
from tests.support.shim_echo import EchoBackend, EchoStub, values
from tests.support.shim_fixtures import CALL_TIMEOUT, from_first_entry, ordered, share, weighted
from tests.support.shim_lb import (
    SERVICE,
    Unreachable,
    balancer_address,
    service_state,
    tokens_by_name,
)

pytestmark = pytest.mark.timeout(60)


Opener = Callable[..., grpc.aio.Channel]


@pytest.fixture
async def channels() -> AsyncIterator[Opener]:
    opened: list[grpc.aio.Channel] = []

    def open_channel(*args: Any, **kwargs: Any) -> grpc.aio.Channel:
        channel = agent_shim.aio_balanced_channel(*args, **kwargs)
        opened.append(channel)
        return channel

    try:
        yield open_channel
    finally:
        for channel in opened:
            await channel.close(None)


async def agen(items: list[StringValue]) -> AsyncIterator[StringValue]:
    for item in items:
        yield item


def unary_calls(echoes: list[EchoBackend]) -> int:
    """Unary calls the backends have begun: a call counted is in flight."""
    return sum(echo.counts()["Unary"] for echo in echoes)


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code()


async def test_generated_stub_all_four_call_types_work_and_follow_the_weights(
    harness: Harness, echoes: list[EchoBackend], channels: Opener
) -> None:
    running = await weighted(harness, echoes)
    length = (await service_state(harness.channel(running))).list_length
    channel = channels(balancer_address(running), SERVICE)
    assert isinstance(channel, grpc.aio.Channel)
    stub = EchoStub(channel)
    n = 10 * length
    third = [n // 3, 2 * n // 3]

    for _ in range(n):
        reply = await stub.Unary(StringValue(value="hi"), timeout=CALL_TIMEOUT)
        assert reply.value in {"e0:hi", "e1:hi"}
    assert share(echoes, "Unary") == third

    for _ in range(n):
        replies = [r.value async for r in stub.ServerStream(StringValue(value="3"))]
        name = replies[0].split(":")[0]
        assert replies == [f"{name}:0", f"{name}:1", f"{name}:2"]
    assert share(echoes, "ServerStream") == third

    for i in range(n):
        if i % 2:
            reply = await stub.ClientStream(agen(values(4)), timeout=CALL_TIMEOUT)
        else:
            call = stub.ClientStream(timeout=CALL_TIMEOUT)
            for value in values(4):
                await call.write(value)
            await call.done_writing()
            reply = await call
        assert reply.value.split(":", 1)[1] == "4:m0,m1,m2,m3"
    assert share(echoes, "ClientStream") == third

    for i in range(n):
        if i % 2:
            replies = [r.value async for r in stub.Bidi(iter(values(3)), timeout=CALL_TIMEOUT)]
        else:
            call = stub.Bidi(timeout=CALL_TIMEOUT)
            replies = []
            for value in values(3):  # ping-pong: one reply per request
                await call.write(value)
                replies.append((await call.read()).value)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
        name = replies[0].split(":")[0]
        assert replies == [f"{name}:m0", f"{name}:m1", f"{name}:m2"]
    assert share(echoes, "Bidi") == third


async def test_metadata_token_and_deadline_reach_the_backend(
    harness: Harness, echoes: list[EchoBackend], channels: Opener
) -> None:
    running = await weighted(harness, echoes)
    tokens = await tokens_by_name(harness.channel(running))
    stub = EchoStub(channels(balancer_address(running), SERVICE))
    metadata = (("x-trace", "abc"), ("lb-token", "forged"))
    for _ in range(3):
        await stub.Unary(StringValue(value="x"), timeout=5.0, metadata=metadata)
        [r async for r in stub.ServerStream(StringValue(value="1"), timeout=5.0, metadata=metadata)]
        await stub.ClientStream(agen(values(1)), timeout=5.0, metadata=metadata)
        [r async for r in stub.Bidi(agen(values(1)), timeout=5.0, metadata=metadata)]
    seen = [(e, call) for e in echoes for call in e.calls()]
    assert len(seen) == 12
    for echo, call in seen:
        assert call.metadata["x-trace"] == "abc"
        assert call.metadata["lb-token"] == tokens[echo.name]
        # grpc rounds the deadline it sends up a little.
        assert call.time_remaining is not None and 0 < call.time_remaining < 6.0


async def test_status_codes_details_and_trailing_metadata_come_back(
    harness: Harness, echoes: list[EchoBackend], channels: Opener
) -> None:
    running = await weighted(harness, echoes)
    stub = EchoStub(channels(balancer_address(running), SERVICE))

    async def server_stream() -> None:
        async for _ in stub.ServerStream(StringValue(value="fail:PERMISSION_DENIED"), timeout=5):
            pass

    async def bidi() -> None:
        async for _ in stub.Bidi(agen([StringValue(value="fail:OUT_OF_RANGE")]), timeout=5):
            pass

    failing: list[Awaitable[object]] = [
        stub.Unary(StringValue(value="fail:NOT_FOUND"), timeout=5),
        server_stream(),
        stub.ClientStream(agen([*values(2), StringValue(value="fail:ABORTED")]), timeout=5),
        bidi(),
    ]
    errors = []
    for call in failing:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        errors.append(raised.value)
    assert [e.code() for e in errors] == [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
    ]
    for error in errors:
        assert error.details() == "asked to fail"
        trailing: Any = error.trailing_metadata()
        assert dict(trailing)["why"] == "asked"

    unary = stub.Unary(StringValue(value="fail:NOT_FOUND"), timeout=5)
    assert await unary.code() is grpc.StatusCode.NOT_FOUND
    assert await unary.details() == "asked to fail"
    assert dict(await unary.trailing_metadata())["why"] == "asked"

    ok_calls: list[Any] = [stub.Unary(StringValue(value="ok"), timeout=5)]
    await ok_calls[0]
    stream = stub.ServerStream(StringValue(value="2"), timeout=5)
    assert len([r async for r in stream]) == 2
    ok_calls.append(stream)
    client = stub.ClientStream(agen(values(2)), timeout=5)
    await client
    ok_calls.append(client)
    for call in ok_calls:
        assert await call.code() is grpc.StatusCode.OK
        assert dict(await call.trailing_metadata())["served-by"] in {"e0", "e1"}
        assert call.done() and not call.cancelled()


async def test_deadline_exceeded_and_cancel(
    harness: Harness, echoes: list[EchoBackend], channels: Opener
) -> None:
    running = await weighted(harness, echoes)
    stub = EchoStub(channels(balancer_address(running), SERVICE))
    code = await code_of(stub.Unary(StringValue(value="hang"), timeout=0.3))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED

    call = stub.Bidi(timeout=CALL_TIMEOUT)
    await call.write(StringValue(value="a"))
    assert (await call.read()).value.endswith(":a")
    assert call.cancel()
    assert await call.code() is grpc.StatusCode.CANCELLED
    assert call.cancelled()

    done = asyncio.Event()
    before = unary_calls(echoes)
    unary = stub.Unary(StringValue(value="hang"), timeout=CALL_TIMEOUT)
    unary.add_done_callback(lambda _: done.set())
    await eventually(lambda: unary_calls(echoes) > before, "the call at a backend")
    unary.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unary
    await asyncio.wait_for(done.wait(), CALL_TIMEOUT)


async def test_a_call_that_cannot_reach_its_backend_is_retried_on_another(
    harness: Harness, echoes: list[EchoBackend], channels: Opener
) -> None:
    dead = Unreachable("dead")
    running = await ordered(harness, ["dead", "e0"], dead, echoes[0])

    async def written(stub: EchoStub) -> str:
        call = stub.ClientStream(timeout=CALL_TIMEOUT)
        for value in values(3):
            await call.write(value)
        await call.done_writing()
        return str((await call).value)

    async def bidi_written(stub: EchoStub) -> str:
        call = stub.Bidi(timeout=CALL_TIMEOUT)
        await call.write(StringValue(value="b"))
        reply = await call.read()
        await call.done_writing()
        return str(reply.value)

    async def first_of(stream: Any) -> str:
        async for reply in stream:
            return str(reply.value)
        raise AssertionError("no reply")

    kinds: dict[str, Callable[[EchoStub], Awaitable[str]]] = {
        "unary": lambda stub: _value(stub.Unary(StringValue(value="u"), timeout=CALL_TIMEOUT)),
        "server_stream": lambda stub: first_of(
            stub.ServerStream(StringValue(value="1"), timeout=CALL_TIMEOUT)
        ),
        "client_stream": lambda stub: _value(stub.ClientStream(agen(values(2)))),
        "client_stream_written": written,
        "bidi": lambda stub: first_of(stub.Bidi(iter(values(1)), timeout=CALL_TIMEOUT)),
        "bidi_written": bidi_written,
    }
    for kind, call in kinds.items():
        # A fresh channel with its own connections, starting at the list's
        # first entry (the dead one), and trying it even if a connection
        # attempt made ahead of the call already failed.
        channel = channels(
            balancer_address(running),
            SERVICE,
            **from_first_entry(connection_failing=lambda _: False),
        )
        assert (await call(EchoStub(channel))).startswith("e0:"), kind
        assert channel.selector.failing() == [dead.address], kind  # type: ignore[attr-defined]
    assert sum(echoes[0].counts().values()) == len(kinds)
    assert [c.method for c in echoes[0].calls()][2:4] == ["ClientStream", "ClientStream"]


async def _value(call: Awaitable[StringValue]) -> str:
    return (await call).value


async def test_client_stream_beyond_the_retry_buffer_is_not_replayed(
    harness: Harness, channels: Opener
) -> None:
    running = await ordered(harness, ["dead"], Unreachable("dead"))
    stub = EchoStub(channels(balancer_address(running), SERVICE, retry_buffer_messages=1))
    code = await code_of(stub.ClientStream(agen(values(5)), timeout=CALL_TIMEOUT))
    assert code is grpc.StatusCode.UNAVAILABLE


async def test_dropped_calls_fail_with_unavailable(
    harness: Harness, echoes: list[EchoBackend], channels: Opener
) -> None:
    running = await ordered(harness, ["drop", "e0"], echoes[0], drops=["shed"])
    stub = EchoStub(channels(balancer_address(running), SERVICE))
    outcomes = []
    for _ in range(10):
        call = stub.Unary(StringValue(value="d"), timeout=CALL_TIMEOUT)
        try:
            outcomes.append((await call).value)
        except grpc.aio.AioRpcError as error:
            outcomes.append(f"{error.code().name}: {error.details()}")
    assert outcomes.count("e0:d") == 5
    assert outcomes.count("UNAVAILABLE: call dropped by the load balancer (token 'shed')") == 5


async def test_fallback_when_the_balancer_is_unreachable(
    echoes: list[EchoBackend], channels: Opener
) -> None:
    channel = channels(
        Unreachable("balancer").address,
        SERVICE,
        fallback=[echoes[1].address],
        fallback_timeout=0.5,
    )
    reply = await EchoStub(channel).Unary(StringValue(value="fb"), timeout=CALL_TIMEOUT)
    assert reply.value == "e1:fb"
    assert "lb-token" not in echoes[1].calls()[0].metadata


async def test_without_a_list_calls_fail_after_the_fallback_timeout(channels: Opener) -> None:
    stub = EchoStub(channels(Unreachable("balancer").address, SERVICE, fallback_timeout=0.2))
    code = await code_of(stub.Unary(StringValue(value="x"), timeout=CALL_TIMEOUT))
    assert code is grpc.StatusCode.UNAVAILABLE
    # wait_for_ready waits for a list until the deadline.
    code = await code_of(stub.Unary(StringValue(value="x"), timeout=0.3, wait_for_ready=True))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_connectivity_and_close(harness: Harness, echoes: list[EchoBackend]) -> None:
    running = await weighted(harness, echoes)
    channel = agent_shim.aio_balanced_channel(balancer_address(running), SERVICE)
    assert channel.get_state() is grpc.ChannelConnectivity.CONNECTING
    await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT)
    assert channel.get_state() is grpc.ChannelConnectivity.READY
    stub = EchoStub(channel)
    before = unary_calls(echoes)
    hanging = stub.Unary(StringValue(value="hang"), timeout=CALL_TIMEOUT)
    await eventually(lambda: unary_calls(echoes) > before, "the call at a backend")
    async with channel:
        assert (await stub.Unary(StringValue(value="c"), timeout=CALL_TIMEOUT)).value
    assert channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    # close() cancelled the call still running.
    with pytest.raises(asyncio.CancelledError):
        await hanging
    with pytest.raises(grpc.aio.UsageError):
        stub.Unary(StringValue(value="closed"), timeout=1)


async def test_a_channel_made_outside_a_loop_starts_on_first_use(
    harness: Harness, echoes: list[EchoBackend]
) -> None:
    running = await weighted(harness, echoes)
    channel = await asyncio.to_thread(
        agent_shim.aio_balanced_channel, balancer_address(running), SERVICE
    )
    try:
        assert channel.get_state() is grpc.ChannelConnectivity.IDLE
        reply = await EchoStub(channel).Unary(StringValue(value="late"), timeout=CALL_TIMEOUT)
        assert reply.value.endswith(":late")
    finally:
        await channel.close(None)
