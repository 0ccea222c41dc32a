"""bench/scale's raw ADS client (bench/scale/xds.py) reads what lbserver
serves: from the Listener to the cluster, from the Cluster to the
ClusterLoadAssignment, and the endpoints' ports out of that; its ACKs carry
the response's version and nonce."""

from __future__ import annotations

from typing import Any

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from bench.scale import xds
from lbserver.domain.serverlist import Entry, ServerList
from lbserver.xds import resources


def response(type_url: str, *messages: Any, version: str = "v1", nonce: str = "3") -> bytes:
    data: bytes = discovery_pb2.DiscoveryResponse(
        version_info=version,
        nonce=nonce,
        type_url=type_url,
        resources=[any_pb2.Any(type_url=type_url, value=m.SerializeToString()) for m in messages],
    ).SerializeToString()
    return data


def test_follows_lbservers_listener_to_its_cluster() -> None:
    decoded = xds.decode(response(xds.LISTENER, resources.listener("oap.prod", "oap")))
    assert decoded.type_url == xds.LISTENER
    assert (decoded.version, decoded.nonce, decoded.summary) == ("v1", "3", "lds")
    assert decoded.follow == (xds.CLUSTER, ("oap",))


def test_follows_an_rds_listener_to_its_route_then_the_route_to_its_cluster() -> None:
    manager = hcm_pb2.HttpConnectionManager(rds=hcm_pb2.Rds(route_config_name="routes"))
    listener = listener_pb2.Listener(name="oap")
    listener.api_listener.api_listener.Pack(manager)
    assert xds.decode(response(xds.LISTENER, listener)).follow == (xds.ROUTE, ("routes",))
    route = resources.route_configuration("routes", "oap")
    assert xds.decode(response(xds.ROUTE, route)).follow == (xds.CLUSTER, ("oap",))


def test_follows_lbservers_cluster_to_its_load_assignment() -> None:
    decoded = xds.decode(response(xds.CLUSTER, resources.cluster("oap")))
    assert decoded.summary == "cds"
    assert decoded.follow == (xds.ENDPOINT, ("oap",))


def test_summarizes_a_load_assignment_as_its_ports() -> None:
    servers = ServerList(
        (
            Entry(b"\x0a\x00\x00\x01", 9001, "a", zone="z1"),
            Entry(b"\x0a\x00\x00\x02", 9000, "b", zone="z2"),
            Entry(b"\x0a\x00\x00\x01", 9001, "a", zone="z1"),
            Entry.for_drop(),
        )
    )
    for layout in ("backend", "zone"):
        assignment = resources.load_assignment("oap", servers, layout)
        decoded = xds.decode(response(xds.ENDPOINT, assignment))
        assert decoded.summary == (9000, 9001)
        assert decoded.follow is None
    empty = xds.decode(response(xds.ENDPOINT, resources.load_assignment("oap", None)))
    assert empty.summary == ()


def test_a_response_it_cannot_read_is_an_error_summary() -> None:
    broken = discovery_pb2.DiscoveryResponse(
        type_url=xds.CLUSTER,
        resources=[any_pb2.Any(type_url=xds.CLUSTER, value=b"\xff\xff\xff")],
    ).SerializeToString()
    summary = xds.decode(broken).summary
    assert isinstance(summary, str) and summary.startswith("error:")


def test_an_ack_carries_the_responses_version_nonce_type_and_names() -> None:
    decoded = xds.decode(response(xds.ENDPOINT, version="abc", nonce="7"))
    ack = discovery_pb2.DiscoveryRequest.FromString(
        xds.request(decoded.type_url, ("oap",), version=decoded.version, nonce=decoded.nonce)
    )
    assert ack.version_info == "abc"
    assert ack.response_nonce == "7"
    assert ack.type_url == xds.ENDPOINT
    assert list(ack.resource_names) == ["oap"]
    assert not ack.HasField("node")
    assert not ack.HasField("error_detail")


def test_only_the_first_request_names_the_node() -> None:
    first = discovery_pb2.DiscoveryRequest.FromString(
        xds.request(xds.LISTENER, ("oap",), node_id="bench-1")
    )
    assert first.node.id == "bench-1"
    assert "xds.config.resource-in-sotw" in first.node.client_features
    assert (first.version_info, first.response_nonce) == ("", "")
