"""The sync side of balanced_channel without a balancer: ended calls, the
loop thread and reading a sync request iterator for the asyncio channel."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest

from agent_shim._sync_call import ChannelClosedError, EndedCall, LoopThread, pulled


def test_an_ok_ended_call_gives_its_response_and_ends_iteration() -> None:
    call = EndedCall(grpc.StatusCode.OK, "", trailing_metadata=(("k", "v"),), response="r")
    assert call.result() == "r"
    assert call.exception() is None
    assert not call.cancelled() and call.done() and not call.is_active()
    assert dict(call.trailing_metadata()) == {"k": "v"}
    assert list(call) == []
    assert call.outcome() is call


def test_a_cancelled_ended_call_says_so() -> None:
    call = EndedCall(grpc.StatusCode.CANCELLED, "Locally cancelled")
    assert call.cancelled()
    assert call.exception() is call


def test_the_loop_thread_runs_work_until_shut_down_then_refuses_it() -> None:
    loop = LoopThread("test-loop")

    async def where() -> str:
        return threading.current_thread().name

    assert loop.run(where()) == "test-loop"
    assert loop.call(lambda: threading.current_thread().name) == "test-loop"
    loop.shutdown()
    loop.shutdown()
    assert "test-loop" not in {t.name for t in threading.enumerate()}
    with pytest.raises(ChannelClosedError):
        loop.run(where())


def test_a_sync_request_iterator_is_read_off_the_loop_thread() -> None:
    readers: list[str] = []

    def requests() -> Iterator[int]:
        for i in range(3):
            readers.append(threading.current_thread().name)
            yield i

    async def read() -> list[int]:
        return [item async for item in pulled(requests())]

    loop_thread = threading.current_thread().name
    assert asyncio.run(read()) == [0, 1, 2]
    assert readers and loop_thread not in readers
