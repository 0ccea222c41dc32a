"""xDS ADS (state of the world) against a real grpc.aio server, with a raw
stream: resources, versions and nonces, ACK and NACK, unknown names,
removal, reconnects and the stream limits it shares with BalanceLoad."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from lbserver.balancer import Balancer, ListSettings
from lbserver.domain.weights import SheddingSettings
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.server import RunningServer
from lbserver.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.service.conftest import Harness
from tests.service.test_balance_load import Stream, heartbeat
from tests.support.ads import AdsStream, decoded, endpoint_weights

PORT = 11800  # every heartbeat() backend's port; backends differ by IP


def _weights_by_ip(response: discovery_pb2.DiscoveryResponse) -> dict[str, int]:
    found = {}
    for locality in decoded(response)["oap"].endpoints:
        for lb_endpoint in locality.lb_endpoints:
            address = lb_endpoint.endpoint.address.socket_address
            assert address.port_value == PORT
            found[address.address] = locality.load_balancing_weight.value
    return found


async def _started(
    harness: Harness, **changes: Any
) -> tuple[RunningServer, pb_grpc.RegistryAsyncStub]:
    running = await harness.start(**changes)
    registry: pb_grpc.RegistryAsyncStub = pb_grpc.RegistryStub(harness.channel(running))
    return running, registry


async def _oap(registry: pb_grpc.RegistryAsyncStub, weights: tuple[int, ...] = (1, 1, 2)) -> None:
    for n, weight in enumerate(weights, start=1):
        await registry.Heartbeat(heartbeat("oap", n, weight=weight))


def _nacks(type_name: str) -> float:
    return REGISTRY.get_sample_value("lbserver_xds_nacks_total", {"type": type_name}) or 0.0


async def test_a_client_gets_listener_cluster_and_weighted_endpoints(harness: Harness) -> None:
    running, registry = await _started(harness)
    await _oap(registry)
    stream = AdsStream(harness.channel(running))
    lds = await stream.subscribe(LISTENER, ["oap"])
    manager = hcm_pb2.HttpConnectionManager()
    assert decoded(lds)["oap"].api_listener.api_listener.Unpack(manager)
    cluster = manager.route_config.virtual_hosts[0].routes[0].route.cluster
    assert cluster == "oap"
    cds = await stream.subscribe(CLUSTER, [cluster])
    assert decoded(cds)["oap"].eds_cluster_config.service_name == "oap"
    eds = await stream.subscribe(ENDPOINT, ["oap"])
    assert _weights_by_ip(eds) == {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 2}
    assert len({lds.nonce, cds.nonce, eds.nonce}) == 3
    # ACKed: nothing more until something changes.
    await stream.read_nothing()
    await registry.Heartbeat(heartbeat("oap", 3, weight=1))
    changed = await stream.read()
    assert changed.type_url == ENDPOINT
    assert changed.version_info != eds.version_info
    assert changed.nonce not in {lds.nonce, cds.nonce, eds.nonce}
    assert _weights_by_ip(changed) == {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1}


async def test_rds_serves_the_listeners_route(harness: Harness) -> None:
    running, registry = await _started(harness)
    await _oap(registry)
    stream = AdsStream(harness.channel(running))
    rds = await stream.subscribe(ROUTE, ["oap:11800"])
    (host,) = decoded(rds)["oap:11800"].virtual_hosts
    assert list(host.domains) == ["oap:11800"]
    assert host.routes[0].route.cluster == "oap"


async def test_a_nack_is_counted_and_its_content_not_sent_again(harness: Harness) -> None:
    running, registry = await _started(harness)
    await _oap(registry)
    stream = AdsStream(harness.channel(running))
    accepted = await stream.subscribe(ENDPOINT, ["oap"])
    await registry.Heartbeat(heartbeat("oap", 3, weight=1))
    rejected = await stream.read()
    before = _nacks("eds")
    # The client keeps the version it accepted and says why.
    await stream.send(
        ENDPOINT,
        ["oap"],
        version=accepted.version_info,
        nonce=rejected.nonce,
        error="locality weights must not be equal",
    )
    await stream.read_nothing()
    # The marker: a change is sent, and it is the next message.
    await registry.Heartbeat(heartbeat("oap", 3, weight=4))
    after = await stream.read()
    assert _nacks("eds") == before + 1
    assert after.version_info not in {accepted.version_info, rejected.version_info}
    assert _weights_by_ip(after)["10.0.0.3"] == 4


async def test_unknown_names_are_left_out_until_their_service_exists(harness: Harness) -> None:
    running, registry = await _started(harness)
    await _oap(registry)
    stream = AdsStream(harness.channel(running))
    invalid = "x" * 300
    first = await stream.subscribe(LISTENER, ["zipkin", invalid])
    assert decoded(first) == {}
    await registry.Heartbeat(heartbeat("zipkin", 9))
    appeared = await stream.read()
    assert appeared.type_url == LISTENER
    assert list(decoded(appeared)) == ["zipkin"]


async def test_removed_backends_and_services_leave_the_resources(harness: Harness) -> None:
    running, registry = await _started(harness)
    await _oap(registry, (1, 1))
    stream = AdsStream(harness.channel(running))
    await stream.subscribe(LISTENER, ["oap"])
    await stream.subscribe(ENDPOINT, ["oap"])
    await registry.Heartbeat(heartbeat("oap", 2, state=pb.BACKEND_STATE_DRAINING))
    drained = await stream.read()
    assert _weights_by_ip(drained) == {"10.0.0.1": 1}
    await stream.ack(drained)
    await registry.Deregister(pb.DeregisterRequest(service="oap", instance_id="pod-1"))
    # Only a draining backend left: the service is there, with no endpoints.
    empty = await stream.read()
    assert empty.type_url == ENDPOINT
    assert not decoded(empty)["oap"].endpoints
    await registry.Deregister(pb.DeregisterRequest(service="oap", instance_id="pod-2"))
    # The service is gone: its listener is left out (a client deletes it),
    # then its endpoints (one pass answers the types in subscription order).
    gone = await stream.read()
    assert (gone.type_url, decoded(gone)) == (LISTENER, {})
    gone = await stream.read()
    assert (gone.type_url, decoded(gone)) == (ENDPOINT, {})


async def test_names_a_client_drops_are_no_longer_sent(harness: Harness) -> None:
    running, registry = await _started(harness)
    await _oap(registry)
    await registry.Heartbeat(heartbeat("zipkin", 9))
    stream = AdsStream(harness.channel(running))
    both = await stream.subscribe(CLUSTER, ["oap", "zipkin"])
    assert sorted(decoded(both)) == ["oap", "zipkin"]
    await stream.ack(both, ["oap"])
    one = await stream.read()
    assert list(decoded(one)) == ["oap"]
    assert one.version_info != both.version_info


async def test_a_request_with_a_stale_nonce_is_ignored(harness: Harness) -> None:
    running, registry = await _started(harness)
    await _oap(registry)
    stream = AdsStream(harness.channel(running))
    first = await stream.subscribe(ENDPOINT, ["oap"])
    await registry.Heartbeat(heartbeat("oap", 3, weight=1))
    second = await stream.read()
    # Sent before the client saw `second`: neither a verdict nor a change.
    await stream.send(ENDPOINT, ["oap", "zipkin"], version=first.version_info, nonce=first.nonce)
    await stream.read_nothing()
    await stream.ack(second)
    await registry.Heartbeat(heartbeat("oap", 3, weight=5))
    marker = await stream.read()
    assert list(decoded(marker)) == ["oap"]


async def test_a_reconnect_gets_the_names_it_asks_for_again(harness: Harness) -> None:
    running, registry = await _started(harness)
    await _oap(registry)
    channel = harness.channel(running)
    before = AdsStream(channel)
    held = {t: await before.subscribe(t, ["oap"]) for t in (LISTENER, CLUSTER, ENDPOINT)}
    await before.close()
    # A client that reconnects (to this replica or another) sends the
    # versions it holds; unchanged content comes back under the same ones.
    after = AdsStream(channel)
    for type_url, response in held.items():
        await after.send(type_url, ["oap"], version=response.version_info)
        again = await after.read()
        assert again.type_url == type_url
        assert again.version_info == response.version_info
        assert decoded(again).keys() == {"oap"}


async def test_during_startup_grace_a_reconnect_is_told_nothing_until_it_is_known(
    harness: Harness,
) -> None:
    # A restarted balancer does not know the services yet: a response without
    # the listener the client holds would delete it, so none is sent, until
    # a registrar is back (then the listener, under the version it held).
    first, registry = await _started(harness)
    await _oap(registry, (1,))
    before = AdsStream(harness.channel(first))
    held = {t: await before.subscribe(t, ["oap"]) for t in (LISTENER, ENDPOINT)}
    restarted, registry = await _started(harness, startup_grace=60.0)
    stream = AdsStream(harness.channel(restarted))
    for type_url, response in held.items():
        await stream.send(type_url, ["oap"], version=response.version_info)
    # A new client (no version held) is answered at once, without it.
    fresh = AdsStream(harness.channel(restarted))
    await fresh.send(LISTENER, ["oap"])
    assert decoded(await fresh.read()) == {}
    await stream.read_nothing()
    await _oap(registry, (1,))
    for type_url, response in held.items():
        again = await stream.read()
        assert (again.type_url, again.version_info) == (type_url, response.version_info)


async def test_zones_become_locality_zones(harness: Harness) -> None:
    running, registry = await _started(harness)
    for n, zone in ((1, "eu-1a"), (2, "eu-1b")):
        request = heartbeat("oap", n)
        request.zone = zone
        await registry.Heartbeat(request)
    stream = AdsStream(harness.channel(running))
    eds = await stream.subscribe(ENDPOINT, ["oap"])
    zones = sorted(loc.locality.zone for loc in decoded(eds)["oap"].endpoints)
    assert zones == ["eu-1a", "eu-1b"]


async def test_zone_layout_puts_a_zone_in_one_locality(harness: Harness) -> None:
    running, registry = await _started(harness, xds_localities="zone")
    await _oap(registry)
    stream = AdsStream(harness.channel(running))
    eds = await stream.subscribe(ENDPOINT, ["oap"])
    (locality,) = decoded(eds)["oap"].endpoints
    assert locality.load_balancing_weight.value == 4
    assert len(locality.lb_endpoints) == 3


async def test_shedding_becomes_drop_overloads(harness: Harness) -> None:
    # As test_shedding_sends_drop_entries: a list of 3 entries, one a drop.
    shedding = ListSettings(max_length=3, shedding=SheddingSettings(utilization=0.5))
    running = await harness.start(balancer=Balancer(list_settings=shedding))
    registry: pb_grpc.RegistryAsyncStub = pb_grpc.RegistryStub(harness.channel(running))
    overloaded = heartbeat("oap", 1)
    overloaded.load.cpu_utilization = 0.75
    await registry.Heartbeat(overloaded)
    stream = AdsStream(harness.channel(running))
    eds = await stream.subscribe(ENDPOINT, ["oap"])
    (drop,) = decoded(eds)["oap"].policy.drop_overloads
    assert drop.drop_percentage.numerator == 333_333
    assert endpoint_weights(eds, "oap") == {PORT: 2}


async def test_too_many_names_end_the_stream(harness: Harness) -> None:
    running, _ = await _started(harness, xds_max_resource_names=2)
    stream = AdsStream(harness.channel(running))
    await stream.send(ENDPOINT, ["a", "b", "c"])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stream.read()
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "xds_max_resource_names=2" in (raised.value.details() or "")


async def test_requests_beyond_the_rate_end_the_stream(harness: Harness) -> None:
    # A rate that refills nothing while the test runs: the burst (50) is all
    # the stream has, and its first request took one.
    running, registry = await _started(harness, xds_request_rate_per_stream=0.01)
    await _oap(registry)
    stream = AdsStream(harness.channel(running))
    response = await stream.subscribe(CLUSTER, ["oap"])
    # Requests that are no verdict on the last response (here: repeats of an
    # answered nonce). The 50th is one too many; the test sends no more, so
    # the stream's end is not mistaken for a failed send.
    for _ in range(50):
        await stream.send(CLUSTER, ["oap"], version=response.version_info, nonce=response.nonce)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stream.read()
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "xds_request_rate_per_stream=0.01/s" in (raised.value.details() or "")


async def test_xds_and_balance_load_streams_share_max_streams(harness: Harness) -> None:
    running, registry = await _started(harness, max_streams=1)
    await _oap(registry)
    grpclb = Stream(harness.channel(running))
    await grpclb.send_initial("oap")
    await grpclb.read()
    stream = AdsStream(harness.channel(running))
    await stream.send(LISTENER, ["oap"])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stream.read()
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams=1" in (raised.value.details() or "")


async def test_delta_xds_is_refused_by_name(harness: Harness) -> None:
    running, _ = await _started(harness)
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(harness.channel(running))
    call = stub.DeltaAggregatedResources(iter([discovery_pb2.DeltaDiscoveryRequest()]))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "state-of-the-world" in (raised.value.details() or "")


async def test_no_first_request_within_the_timeout_ends_the_stream(harness: Harness) -> None:
    running, _ = await _started(harness, initial_request_timeout=0.2)
    stream = AdsStream(harness.channel(running))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stream.read()
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "initial_request_timeout=0.2s" in (raised.value.details() or "")


async def test_reflection_and_health_know_the_ads_service(harness: Harness) -> None:
    running, _ = await _started(harness)
    channel = harness.channel(running)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    symbol = "envoy.service.discovery.v3.AggregatedDiscoveryService"
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol),
    ]
    responses = [response async for response in stub.ServerReflectionInfo(iter(requests))]
    assert symbol in {s.name for s in responses[0].list_services_response.service}
    assert responses[1].file_descriptor_response.file_descriptor_proto
    health = health_pb2_grpc.HealthStub(channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=symbol))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_undecodable_request_ends_the_stream_naming_the_type(harness: Harness) -> None:
    running, _ = await _started(harness)
    call = harness.channel(running).stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        request_serializer=None,
        response_deserializer=None,
    )(iter([b"\xff\xff\xff"]))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "envoy.service.discovery.v3.DiscoveryRequest" in (raised.value.details() or "")
