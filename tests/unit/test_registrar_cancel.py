"""A registrar's heartbeat loop must end when its task is cancelled, also
when gRPC reports the cancellation as the call's AioRpcError (which the loop
catches to keep heartbeating). Found by the cluster harness: a balancer
replica that left the headless Service during a rolling update kept its loop
alive, and the registrar, waiting for it, never registered with the new
replicas."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from lbserver.registrar import Registrar
from lbserver.registrar._stream import rpc_error


async def _never_resolved(host: str) -> list[str]:
    raise AssertionError("not resolved in this test")


# Without the fix the update never finishes (the loop swallows every cancel).
@pytest.mark.timeout(10)
async def test_a_replica_that_leaves_is_dropped_even_if_its_call_hides_the_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registrar = Registrar(
        ["127.0.0.1:1"], "oap", "10.0.0.7", 11800, interval=0.05, resolve=_never_resolved
    )
    calls: list[str] = []
    first_call = asyncio.Event()

    async def send(link: Any, *, confirm: bool = False) -> None:
        calls.append(link.address)
        first_call.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # What grpc.aio may raise when the awaiting task is cancelled
            # while the call fails.
            raise rpc_error(
                grpc.StatusCode.CANCELLED, "Locally cancelled by application!"
            ) from None

    monkeypatch.setattr(registrar, "_send_heartbeat", send)
    await registrar._update_links(["127.0.0.1:1"])
    (task,) = registrar._tasks
    await first_call.wait()
    # The replica left: its loop is cancelled and the update must finish.
    await asyncio.wait_for(registrar._update_links(["127.0.0.1:2"]), 2)
    assert task.cancelled()
    assert calls.count("127.0.0.1:1") == 1
    assert [link.address for link in registrar._links] == ["127.0.0.1:2"]
    for other in registrar._tasks:
        other.cancel()
    await asyncio.gather(*registrar._tasks, return_exceptions=True)
    for link in registrar._links:
        await link.channel.close(None)
