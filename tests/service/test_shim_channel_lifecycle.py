"""`balanced_channel` runs the asyncio channel on a thread of its own: an
unclosed channel that is collected stops that thread, and a request iterator
that fails ends its call."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

import agent_shim
from tests.service.conftest import Harness
from tests.support.shim_echo import EchoBackend, EchoStub
from tests.support.shim_fixtures import CALL_TIMEOUT, weighted
from tests.support.shim_lb import SERVICE, balancer_address

pytestmark = pytest.mark.timeout(60)


def loop_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == f"agent-shim-{SERVICE}"]


async def test_an_unclosed_channel_that_is_collected_stops_its_thread(
    harness: Harness, echoes: list[EchoBackend]
) -> None:
    running = await weighted(harness, echoes)

    def use_and_drop() -> str:
        channel = agent_shim.balanced_channel(balancer_address(running), SERVICE)
        reply = EchoStub(channel).Unary(StringValue(value="x"), timeout=CALL_TIMEOUT)
        assert loop_threads()
        return str(reply.value)

    assert (await asyncio.to_thread(use_and_drop)).endswith(":x")
    gc.collect()
    assert loop_threads() == []


async def test_a_failing_request_iterator_cancels_its_call(
    harness: Harness, echoes: list[EchoBackend]
) -> None:
    running = await weighted(harness, echoes)

    def broken() -> Iterator[StringValue]:
        yield StringValue(value="a")
        raise RuntimeError("the application's requests failed")

    def call() -> grpc.StatusCode:
        with agent_shim.balanced_channel(balancer_address(running), SERVICE) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                EchoStub(channel).ClientStream(broken(), timeout=CALL_TIMEOUT)
            assert isinstance(raised.value, grpc.Call)
            code: grpc.StatusCode = raised.value.code()
            return code

    assert await asyncio.to_thread(call) is grpc.StatusCode.CANCELLED
