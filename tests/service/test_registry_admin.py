"""Registry and Admin against a real grpc.aio server."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.service.conftest import Harness


def valid(**changes: object) -> pb.HeartbeatRequest:
    request = pb.HeartbeatRequest(service="oap", instance_id="pod-1", ip="10.1.2.3", port=11800)
    for field, value in changes.items():
        if field in ("load", "requested_ttl"):
            getattr(request, field).CopyFrom(value)
        elif field == "labels":
            request.labels.update(value)  # type: ignore[call-overload]
        else:
            setattr(request, field, value)
    return request


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


INVALID = [
    ("ip", {"ip": "10.1.2"}, "ip"),
    ("ip-hostname", {"ip": "oap.local"}, "ip"),
    ("ip-unspecified", {"ip": "0.0.0.0"}, "ip"),
    ("port-zero", {"port": 0}, "port"),
    ("port-high", {"port": 70000}, "port"),
    ("service-empty", {"service": ""}, "service"),
    ("service-long", {"service": "s" * 300}, "service"),
    ("service-space", {"service": "o a p"}, "service"),
    ("instance-long", {"instance_id": "i" * 200}, "instance_id"),
    ("weight", {"weight": 20_000}, "weight"),
    ("cpu-nan", {"load": pb.LoadReport(cpu_utilization=math.nan)}, "load.cpu_utilization"),
    ("rps-negative", {"load": pb.LoadReport(requests_per_second=-1)}, "load.requests_per_second"),
    ("eps-inf", {"load": pb.LoadReport(errors_per_second=math.inf)}, "load.errors_per_second"),
    ("state", {"state": 7}, "state"),
    ("ttl-negative", {"requested_ttl": duration_pb2.Duration(seconds=-3)}, "requested_ttl"),
]


@pytest.mark.parametrize(("case", "changes", "field"), INVALID, ids=[c[0] for c in INVALID])
async def test_invalid_heartbeats_are_rejected_naming_the_field(
    harness: Harness, case: str, changes: dict[str, object], field: str
) -> None:
    running = await harness.start()
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    await registry.Heartbeat(valid(instance_id="keep", ip="10.9.9.9"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await registry.Heartbeat(valid(**changes))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith(f"{field}:")
    # Nothing changed: only the earlier valid backend is known.
    state = await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest())
    assert [(s.name, [b.instance_id for b in s.backends]) for s in state.services] == [
        ("oap", ["keep"])
    ]


async def test_heartbeat_reply_grants_a_clamped_ttl_and_an_interval(harness: Harness) -> None:
    running = await harness.start(heartbeat_interval=3.0, default_ttl=10.0, max_ttl=30.0)
    registry = pb_grpc.RegistryStub(harness.channel(running))
    default = await registry.Heartbeat(valid())
    assert default.granted_ttl.ToMilliseconds() == 10_000
    assert default.heartbeat_interval.ToMilliseconds() == 3_000
    clamped = await registry.Heartbeat(valid(requested_ttl=seconds(500)))
    assert clamped.granted_ttl.ToMilliseconds() == 30_000
    short = await registry.Heartbeat(valid(requested_ttl=seconds(1.5)))
    assert short.granted_ttl.ToMilliseconds() == 1_500
    # Three heartbeats per TTL: one lost heartbeat does not expire a backend.
    assert short.heartbeat_interval.ToMilliseconds() == 500


async def test_admin_reports_backends_shares_and_defaults(harness: Harness) -> None:
    running = await harness.start()
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    load = pb.LoadReport(cpu_utilization=0.5, requests_per_second=120.0)
    await registry.Heartbeat(
        valid(instance_id="", zone="eu-1", weight=3, load=load, labels={"pod": "oap-0"})
    )
    await registry.Heartbeat(valid(instance_id="b", ip="10.1.2.4"))
    await registry.Heartbeat(valid(service="other", ip="fd00::1", port=8080))
    state = await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest())
    assert [s.name for s in state.services] == ["oap", "other"]
    oap = state.services[0]
    assert oap.list_length == 4
    first = oap.backends[0]
    assert first.instance_id == "10.1.2.3:11800"  # defaults to the address
    assert (first.zone, first.weight, dict(first.labels)) == ("eu-1", 3, {"pod": "oap-0"})
    assert first.load.cpu_utilization == 0.5 and not first.load.HasField("errors_per_second")
    assert (first.list_entries, first.share) == (3, 0.75)
    assert first.state == pb.BACKEND_STATE_SERVING
    assert state.services[1].backends[0].ip == "fd00::1"
    only = await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest(service="other"))
    assert [s.name for s in only.services] == ["other"]


async def test_a_new_instance_at_the_same_address_replaces_the_old(harness: Harness) -> None:
    running = await harness.start()
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    await registry.Heartbeat(valid(instance_id="old"))
    await registry.Heartbeat(valid(instance_id="new"))
    state = await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest())
    assert [b.instance_id for b in state.services[0].backends] == ["new"]


async def test_deregister_validates_its_fields(harness: Harness) -> None:
    running = await harness.start()
    registry = pb_grpc.RegistryStub(harness.channel(running))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await registry.Deregister(pb.DeregisterRequest(service="oap"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("instance_id:")


async def test_reflection_lists_every_service(harness: Harness) -> None:
    running = await harness.start()
    stub = reflection_pb2_grpc.ServerReflectionStub(harness.channel(running))
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = set()
    async for response in responses:
        names = {s.name for s in response.list_services_response.service}
    assert {
        "grpc.lb.v1.LoadBalancer",
        "lbserver.v1.Registry",
        "lbserver.v1.Admin",
        "grpc.health.v1.Health",
    } <= names


async def test_every_field_of_a_repeated_heartbeat_is_taken(harness: Harness) -> None:
    running = await harness.start()
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    admin = pb_grpc.AdminStub(channel)
    await registry.Heartbeat(valid(zone="a", load=pb.LoadReport(cpu_utilization=0.5)))
    await registry.Heartbeat(valid(zone="a", load=pb.LoadReport(cpu_utilization=0.25)))
    first = (await admin.GetState(pb.GetStateRequest())).services[0].backends[0]
    assert (first.zone, first.load.cpu_utilization) == ("a", 0.25)
    await registry.Heartbeat(valid(zone="b", labels={"pool": "x"}))
    second = (await admin.GetState(pb.GetStateRequest())).services[0].backends[0]
    assert (second.zone, dict(second.labels), second.load.HasField("cpu_utilization")) == (
        "b",
        {"pool": "x"},
        False,
    )
