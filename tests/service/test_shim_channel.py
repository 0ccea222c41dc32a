"""`agent_shim.balanced_channel` with a generated-style stub, against the real
lbserver balancer and real backends: all four call types spread by weight,
metadata, deadlines, status codes and trailing metadata, retry on another
backend, drops, fallback, connectivity and close.

The channel is synchronous; its calls run in worker threads (`asyncio.to_thread`)
so that the in-process balancer on the test's loop keeps serving.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

import agent_shim
from tests.service.conftest import Harness
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

T = TypeVar("T")


async def blocking(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code `call` fails with."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert isinstance(error, grpc.Call)
    code: grpc.StatusCode = error.code()
    return code


@pytest.fixture
def channels() -> Iterator[Callable[..., grpc.Channel]]:
    opened: list[grpc.Channel] = []

    def open_channel(*args: Any, **kwargs: Any) -> grpc.Channel:
        channel = agent_shim.balanced_channel(*args, **kwargs)
        opened.append(channel)
        return channel

    try:
        yield open_channel
    finally:
        for channel in opened:
            channel.close()


async def test_generated_stub_all_four_call_types_work_and_follow_the_weights(
    harness: Harness,
    echoes: list[EchoBackend],
    channels: Callable[..., grpc.Channel],
) -> None:
    running = await weighted(harness, echoes)
    length = (await service_state(harness.channel(running))).list_length
    stub = EchoStub(channels(balancer_address(running), SERVICE))
    n = 10 * length

    def unary() -> list[str]:
        return [stub.Unary(StringValue(value="hi"), timeout=CALL_TIMEOUT).value for _ in range(n)]

    replies = await blocking(unary)
    assert {r.removesuffix(":hi") for r in replies} == {"e0", "e1"}
    assert share(echoes, "Unary") == [n // 3, 2 * n // 3]

    def server_stream() -> list[list[str]]:
        return [
            [r.value for r in stub.ServerStream(StringValue(value="3"), timeout=CALL_TIMEOUT)]
            for _ in range(n)
        ]

    for replies_of_call in await blocking(server_stream):
        name = replies_of_call[0].split(":")[0]
        assert replies_of_call == [f"{name}:0", f"{name}:1", f"{name}:2"]
    assert share(echoes, "ServerStream") == [n // 3, 2 * n // 3]

    def client_stream() -> list[str]:
        return [stub.ClientStream(iter(values(4)), timeout=CALL_TIMEOUT).value for _ in range(n)]

    for reply in await blocking(client_stream):
        assert reply.split(":", 1)[1] == "4:m0,m1,m2,m3"
    assert share(echoes, "ClientStream") == [n // 3, 2 * n // 3]

    def bidi() -> list[list[str]]:
        return [
            [r.value for r in stub.Bidi(iter(values(3)), timeout=CALL_TIMEOUT)] for _ in range(n)
        ]

    for replies_of_call in await blocking(bidi):
        name = replies_of_call[0].split(":")[0]
        assert replies_of_call == [f"{name}:m0", f"{name}:m1", f"{name}:m2"]
    assert share(echoes, "Bidi") == [n // 3, 2 * n // 3]


async def test_metadata_token_and_deadline_reach_the_backend(
    harness: Harness,
    echoes: list[EchoBackend],
    channels: Callable[..., grpc.Channel],
) -> None:
    running = await weighted(harness, echoes)
    tokens = await tokens_by_name(harness.channel(running))
    stub = EchoStub(channels(balancer_address(running), SERVICE))
    metadata = (("x-trace", "abc"), ("lb-token", "forged"))

    def calls() -> None:
        for _ in range(3):
            stub.Unary(StringValue(value="x"), timeout=5.0, metadata=metadata)
            list(stub.ServerStream(StringValue(value="1"), timeout=5.0, metadata=metadata))
            stub.ClientStream(iter(values(1)), timeout=5.0, metadata=metadata)
            list(stub.Bidi(iter(values(1)), timeout=5.0, metadata=metadata))

    await blocking(calls)
    seen = [(e, call) for e in echoes for call in e.calls()]
    assert len(seen) == 12
    for echo, call in seen:
        assert call.metadata["x-trace"] == "abc"
        # The chosen backend's token replaces whatever the caller sent.
        assert call.metadata["lb-token"] == tokens[echo.name]
        # grpc rounds the deadline it sends up a little.
        assert call.time_remaining is not None and 0 < call.time_remaining < 6.0


async def test_status_codes_details_and_trailing_metadata_come_back(
    harness: Harness,
    echoes: list[EchoBackend],
    channels: Callable[..., grpc.Channel],
) -> None:
    running = await weighted(harness, echoes)
    stub = EchoStub(channels(balancer_address(running), SERVICE))

    def outcomes() -> list[grpc.RpcError]:
        errors: list[grpc.RpcError] = []
        attempts: list[Callable[[], object]] = [
            lambda: stub.Unary(StringValue(value="fail:NOT_FOUND"), timeout=5),
            lambda: list(stub.ServerStream(StringValue(value="fail:PERMISSION_DENIED"), timeout=5)),
            lambda: stub.ClientStream(
                iter([*values(2), StringValue(value="fail:ABORTED")]), timeout=5
            ),
            lambda: list(stub.Bidi(iter([StringValue(value="fail:OUT_OF_RANGE")]), timeout=5)),
        ]
        for attempt in attempts:
            with pytest.raises(grpc.RpcError) as raised:
                attempt()
            errors.append(raised.value)
        return errors

    errors = await blocking(outcomes)
    codes = [e.code() for e in errors if isinstance(e, grpc.Call)]
    assert codes == [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
    ]
    for error in errors:
        assert isinstance(error, grpc.Call)
        assert error.details() == "asked to fail"
        assert dict(error.trailing_metadata())["why"] == "asked"

    def successes() -> tuple[Any, Any, Any]:
        reply, call = stub.Unary.with_call(StringValue(value="ok"), timeout=5)
        stream = stub.ServerStream(StringValue(value="2"), timeout=5)
        replies = list(stream)
        _, client_call = stub.ClientStream.with_call(iter(values(2)), timeout=5)
        assert len(replies) == 2 and reply.value.endswith(":ok")
        return call, stream, client_call

    for call in await blocking(successes):
        assert call.code() is grpc.StatusCode.OK
        assert dict(call.trailing_metadata())["served-by"] in {"e0", "e1"}


async def test_deadline_exceeded_and_cancel(
    harness: Harness,
    echoes: list[EchoBackend],
    channels: Callable[..., grpc.Channel],
) -> None:
    running = await weighted(harness, echoes)
    stub = EchoStub(channels(balancer_address(running), SERVICE))

    def hang() -> grpc.StatusCode:
        return code_of(lambda: stub.Unary(StringValue(value="hang"), timeout=0.3))

    assert await blocking(hang) is grpc.StatusCode.DEADLINE_EXCEEDED

    def cancel_stream() -> grpc.StatusCode:
        requests = threading.Event()

        def forever() -> Iterator[StringValue]:
            yield StringValue(value="a")
            requests.wait(10)

        call = stub.Bidi(forever(), timeout=CALL_TIMEOUT)
        assert next(call).value.endswith(":a")
        call.cancel()
        requests.set()
        with pytest.raises(grpc.RpcError):
            next(call)
        code: grpc.StatusCode = call.code()
        return code

    assert await blocking(cancel_stream) is grpc.StatusCode.CANCELLED


async def test_futures_and_callbacks(
    harness: Harness,
    echoes: list[EchoBackend],
    channels: Callable[..., grpc.Channel],
) -> None:
    running = await weighted(harness, echoes)
    stub = EchoStub(channels(balancer_address(running), SERVICE))

    def futures() -> None:
        done = threading.Event()
        future = stub.Unary.future(StringValue(value="f"), timeout=CALL_TIMEOUT)
        future.add_done_callback(lambda f: done.set())
        assert future.result(CALL_TIMEOUT).value.endswith(":f")
        assert done.wait(CALL_TIMEOUT) and future.done() and not future.cancelled()
        assert future.code() is grpc.StatusCode.OK
        failing = stub.ClientStream.future(
            iter([StringValue(value="fail:INTERNAL")]), timeout=CALL_TIMEOUT
        )
        error = failing.exception(CALL_TIMEOUT)
        assert isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.INTERNAL
        with pytest.raises(grpc.RpcError):
            failing.result()

    await blocking(futures)


async def test_a_call_that_cannot_reach_its_backend_is_retried_on_another(
    harness: Harness,
    echoes: list[EchoBackend],
    channels: Callable[..., grpc.Channel],
) -> None:
    dead = Unreachable("dead")
    running = await ordered(harness, ["dead", "e0"], dead, echoes[0])
    kinds: dict[str, Callable[[EchoStub], str]] = {
        "unary": lambda stub: stub.Unary(StringValue(value="u"), timeout=CALL_TIMEOUT).value,
        "with_call": lambda stub: (
            stub.Unary.with_call(StringValue(value="w"), timeout=CALL_TIMEOUT)[0].value
        ),
        "future": lambda stub: (
            stub.Unary.future(StringValue(value="f"), timeout=CALL_TIMEOUT).result().value
        ),
        "server_stream": lambda stub: (
            next(iter(stub.ServerStream(StringValue(value="1"), timeout=CALL_TIMEOUT))).value
        ),
        "client_stream": lambda stub: (
            stub.ClientStream(iter(values(2)), timeout=CALL_TIMEOUT).value
        ),
        "client_stream_future": lambda stub: (
            stub.ClientStream.future(iter(values(1)), timeout=CALL_TIMEOUT).result().value
        ),
        "bidi": lambda stub: next(iter(stub.Bidi(iter(values(1)), timeout=CALL_TIMEOUT))).value,
    }
    for kind, call in kinds.items():
        # A fresh channel starting at the list's first entry: the dead one.
        channel = channels(balancer_address(running), SERVICE, **from_first_entry())
        reply = await blocking(lambda: call(EchoStub(channel)))  # noqa: B023
        assert reply.startswith("e0:"), kind
        assert channel.selector.failing() == [dead.address], kind  # type: ignore[attr-defined]
    assert sum(echoes[0].counts().values()) == len(kinds)


async def test_client_stream_beyond_the_retry_buffer_is_not_replayed(
    harness: Harness,
    echoes: list[EchoBackend],
    channels: Callable[..., grpc.Channel],
) -> None:
    running = await ordered(harness, ["dead"], Unreachable("dead"))
    stub = EchoStub(channels(balancer_address(running), SERVICE, retry_buffer_messages=1))

    def call() -> grpc.StatusCode:
        return code_of(lambda: stub.ClientStream(iter(values(5)), timeout=CALL_TIMEOUT))

    assert await blocking(call) is grpc.StatusCode.UNAVAILABLE


async def test_dropped_calls_fail_with_unavailable(
    harness: Harness,
    echoes: list[EchoBackend],
    channels: Callable[..., grpc.Channel],
) -> None:
    running = await ordered(harness, ["drop", "e0"], echoes[0], drops=["shed"])
    stub = EchoStub(channels(balancer_address(running), SERVICE))

    def calls() -> list[str]:
        out = []
        for _ in range(10):
            try:
                out.append(stub.Unary(StringValue(value="d"), timeout=CALL_TIMEOUT).value)
            except grpc.RpcError as error:
                out.append(f"{error.code().name}: {error.details()}")
        return out

    outcomes = await blocking(calls)
    assert outcomes.count("e0:d") == 5
    assert outcomes.count("UNAVAILABLE: call dropped by the load balancer (token 'shed')") == 5


async def test_fallback_when_the_balancer_is_unreachable(
    channels: Callable[..., grpc.Channel], echoes: list[EchoBackend]
) -> None:
    dead = Unreachable("balancer")
    channel = channels(dead.address, SERVICE, fallback=[echoes[1].address], fallback_timeout=0.5)
    stub = EchoStub(channel)

    def call() -> str:
        # Waits for the fallback timeout, then goes to the fallback address.
        return str(stub.Unary(StringValue(value="fb"), timeout=CALL_TIMEOUT).value)

    assert await blocking(call) == "e1:fb"
    assert "lb-token" not in echoes[1].calls()[0].metadata


async def test_without_a_list_calls_fail_after_the_fallback_timeout(
    channels: Callable[..., grpc.Channel],
) -> None:
    stub = EchoStub(channels(Unreachable("balancer").address, SERVICE, fallback_timeout=0.2))

    def call() -> grpc.StatusCode:
        return code_of(lambda: stub.Unary(StringValue(value="x"), timeout=CALL_TIMEOUT))

    assert await blocking(call) is grpc.StatusCode.UNAVAILABLE


async def test_subscribe_close_and_context_manager(
    harness: Harness, echoes: list[EchoBackend]
) -> None:
    running = await weighted(harness, echoes)
    states: list[grpc.ChannelConnectivity] = []
    ready = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if state is grpc.ChannelConnectivity.READY:
            ready.set()

    with agent_shim.balanced_channel(balancer_address(running), SERVICE) as channel:
        assert isinstance(channel, grpc.Channel)
        channel.subscribe(watch, try_to_connect=True)
        assert await blocking(lambda: ready.wait(CALL_TIMEOUT))
        channel.unsubscribe(watch)
        stub = EchoStub(channel)
        assert await blocking(lambda: stub.Unary(StringValue(value="c"), timeout=CALL_TIMEOUT))
        threads = {t.name for t in threading.enumerate()}
        assert f"agent-shim-{SERVICE}" in threads
    assert states[-1] is grpc.ChannelConnectivity.READY
    assert f"agent-shim-{SERVICE}" not in {t.name for t in threading.enumerate()}
    with pytest.raises(grpc.RpcError):
        stub.Unary(StringValue(value="closed"), timeout=1)
