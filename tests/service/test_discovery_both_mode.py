"""`both` mode end to end in one process: a real balancer, the real
kubernetes client, a fake API server. Only ready endpoints may register, and a
terminating endpoint leaves the list at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lbserver.discovery import WatchedService
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.server import RunningServer
from tests.service.harness import Harness
from tests.support.eventually import eventually
from tests.support.fake_kube import FakeKubeApiServer, endpoint, endpoint_slice


@pytest.fixture
def apiserver() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server:
        yield server


def heartbeat(ip: str, instance: str) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(service="oap", instance_id=instance, ip=ip, port=11800)


async def listed(harness: Harness, running: RunningServer) -> set[str]:
    state = await pb_grpc.AdminStub(harness.channel(running)).GetState(pb.GetStateRequest())
    return {b.instance_id for s in state.services for b in s.backends if b.list_entries}


async def test_both_mode_admits_only_ready_endpoints(
    harness: Harness, apiserver: FakeKubeApiServer, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig.json"
    kubeconfig.write_text(json.dumps(apiserver.kubeconfig()))
    apiserver.add_slice(
        "skywalking",
        endpoint_slice(
            "oap-abc",
            "skywalking-oap",
            [endpoint("10.1.0.1", pod="oap-0"), endpoint("10.1.0.2", pod="oap-1")],
        ),
    )
    running = await harness.start(
        kubeconfig=str(kubeconfig),
        kubernetes_services=(
            WatchedService(
                service="oap",
                namespace="skywalking",
                kubernetes_service="skywalking-oap",
                port_name="grpc",
                mode="both",
            ),
        ),
    )
    registry = pb_grpc.RegistryStub(harness.channel(running))

    async def accepted(request: pb.HeartbeatRequest) -> bool:
        try:
            await registry.Heartbeat(request)
        except grpc.aio.AioRpcError as error:
            # UNAVAILABLE until the balancer knows the endpoints; anything else fails.
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return False
        return True

    await eventually(lambda: accepted(heartbeat("10.1.0.1", "oap-0")), "endpoints to be known")
    await registry.Heartbeat(heartbeat("10.1.0.2", "oap-1"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await registry.Heartbeat(heartbeat("10.9.9.9", "intruder"))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a ready endpoint" in (error.value.details() or "")
    assert await listed(harness, running) == {"oap-0", "oap-1"}

    apiserver.set_conditions(
        "skywalking", "oap-abc", "10.1.0.2", ready=False, serving=True, terminating=True
    )

    async def only_ready_listed() -> bool:
        return await listed(harness, running) == {"oap-0"}

    await eventually(only_ready_listed, "the terminating pod to leave the list")
