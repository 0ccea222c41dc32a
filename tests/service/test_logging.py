"""Operator-facing log events carry the service and the peer."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import grpc
import pytest
from structlog.testing import LogCapture

from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb
from lbserver.proto.grpclb.v1 import load_balancer_pb2_grpc as lb_grpc
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.service.harness import Harness
from tests.support.eventually import eventually
from tests.support.log_capture import captured_logs, logged


@pytest.fixture
def events() -> Iterator[LogCapture]:
    with captured_logs() as capture:
        yield capture


def find(capture: LogCapture, event: str) -> MutableMapping[str, Any]:
    matches = logged(capture, event)
    assert matches, f"no {event!r} in {[e['event'] for e in capture.entries]}"
    return matches[0]


async def test_events_name_service_and_peer(harness: Harness, events: LogCapture) -> None:
    running = await harness.start(auth_token="t")
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    token = (("authorization", "Bearer t"),)
    await registry.Heartbeat(
        pb.HeartbeatRequest(service="oap", ip="10.0.0.1", port=1), metadata=token
    )
    await registry.Heartbeat(
        pb.HeartbeatRequest(service="oap", ip="10.0.0.1", port=1, state=pb.BACKEND_STATE_DRAINING),
        metadata=token,
    )
    await registry.Deregister(
        pb.DeregisterRequest(service="oap", instance_id="10.0.0.1:1"), metadata=token
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await registry.Heartbeat(pb.HeartbeatRequest(service="oap", ip="10.0.0.1", port=1))
    call = lb_grpc.LoadBalancerStub(channel).BalanceLoad(
        iter([lb.LoadBalanceRequest(initial_request=lb.InitialLoadBalanceRequest(name="oap"))])
    )
    async for _ in call:
        pass
    # The balancer logs the disconnection after the call has ended for us.
    await eventually(lambda: logged(events, "client disconnected"), "the disconnection logged")
    for event in ("backend joined", "backend state changed", "backend left"):
        entry = find(events, event)
        assert entry["service"] == "oap", entry
        assert str(entry["peer"]).startswith("ipv4:127.0.0.1:"), entry
    assert find(events, "auth failure")["peer"]
    for event in ("client connected", "client disconnected"):
        entry = find(events, event)
        assert entry["name"] == "oap" and str(entry["peer"]).startswith("ipv4:"), entry
