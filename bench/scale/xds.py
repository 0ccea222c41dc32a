"""What bench/scale's xDS streams say: a raw ADS client's requests and how it
reads the balancer's responses (state of the world, v3).

A stream subscribes as a gRPC xDS client does (gRFC A27): LDS for the name
it dialed; the Listener's HttpConnectionManager names a route (inline, or
RDS for a RouteConfiguration), whose route names a cluster; CDS for that
cluster; its EDS config names the ClusterLoadAssignment (`service_name`, or
the cluster's name); EDS for it. Every response is ACKed: a request with the
response's `version_info` as `version_info`, its `nonce` as `response_nonce`,
the same type and the names subscribed to of that type. The node goes in the
stream's first request only, as gRPC sends it.

The messages are envoy.service.discovery.v3's DiscoveryRequest and
DiscoveryResponse (xds-protos); the stream is the method the generated
AggregatedDiscoveryServiceStub calls, opened with bytes in and out so that
a client process decodes each distinct response once (`decode`) and builds
each distinct request once, however many of its streams get or send it:
the streams of one process follow the same sequence of responses, nonces
included (lbserver numbers each stream's responses from 1), so they get
byte-identical responses. The client CPU that is left is gRPC's own, as for
the BalanceLoad streams beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

# AggregatedDiscoveryServiceStub.StreamAggregatedResources (ads_pb2_grpc).
METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SHORT_NAMES = {LISTENER: "lds", ROUTE: "rds", CLUSTER: "cds", ENDPOINT: "eds"}
# What gRPC's xDS client announces (grpc/src/core/xds/xds_client).
CLIENT_FEATURES = (
    "envoy.lb.does_not_support_overprovisioning",
    "xds.config.resource-in-sotw",
)

Names = tuple[str, ...]
# An EDS response: the sorted distinct ports of its endpoints; any other
# response: its type's short name ("lds", "cds", ...); a response that does
# not decode or that the client cannot follow: "error: ...".
Summary = tuple[int, ...] | str


def node(node_id: str) -> base_pb2.Node:
    return base_pb2.Node(
        id=node_id,
        user_agent_name="bench.scale",
        user_agent_version="1",
        client_features=list(CLIENT_FEATURES),
    )


def request(
    type_url: str,
    names: Names,
    *,
    version: str = "",
    nonce: str = "",
    node_id: str = "",
) -> bytes:
    """A serialized DiscoveryRequest: a subscription (no nonce) or the ACK
    of the response with `version` and `nonce`; with the node when
    `node_id` is given (the stream's first request)."""
    message = discovery_pb2.DiscoveryRequest(
        version_info=version,
        response_nonce=nonce,
        resource_names=list(names),
        type_url=type_url,
    )
    if node_id:
        message.node.CopyFrom(node(node_id))
    data: bytes = message.SerializeToString()
    return data


@dataclass(frozen=True, slots=True)
class Decoded:
    """One DiscoveryResponse, as far as a stream acts on it."""

    type_url: str
    version: str
    nonce: str
    summary: Summary
    # The subscription this response leads to (LDS -> RDS or CDS, RDS -> CDS,
    # CDS -> EDS), or None.
    follow: tuple[str, Names] | None = None


def _route_clusters(route_config: route_pb2.RouteConfiguration) -> Names:
    clusters = {
        route.route.cluster
        for host in route_config.virtual_hosts
        for route in host.routes
        if route.route.cluster
    }
    return tuple(sorted(clusters))


def _listener_follow(listener: listener_pb2.Listener) -> tuple[str, Names]:
    manager = hcm_pb2.HttpConnectionManager()
    if not listener.api_listener.api_listener.Unpack(manager):
        raise ValueError("the listener's api_listener is not an HttpConnectionManager")
    if manager.HasField("rds"):
        return ROUTE, (manager.rds.route_config_name,)
    return CLUSTER, _route_clusters(manager.route_config)


def _cluster_follow(cluster: cluster_pb2.Cluster) -> tuple[str, Names]:
    return ENDPOINT, (cluster.eds_cluster_config.service_name or cluster.name,)


def decode(payload: bytes) -> Decoded:
    """A DiscoveryResponse's version, nonce, summary and follow-up
    subscription (merged over its resources, in name order)."""
    response = discovery_pb2.DiscoveryResponse.FromString(payload)
    type_url = response.type_url
    summary: Summary = SHORT_NAMES.get(type_url, type_url)
    follow: tuple[str, Names] | None = None
    try:
        if type_url == ENDPOINT:
            ports: set[int] = set()
            for resource in response.resources:
                assignment = endpoint_pb2.ClusterLoadAssignment.FromString(resource.value)
                for locality in assignment.endpoints:
                    for endpoint in locality.lb_endpoints:
                        ports.add(endpoint.endpoint.address.socket_address.port_value)
            summary = tuple(sorted(ports))
        elif type_url in (LISTENER, ROUTE, CLUSTER):
            follow_type = ""
            names: set[str] = set()
            for resource in response.resources:
                if type_url == LISTENER:
                    follow_type, more = _listener_follow(
                        listener_pb2.Listener.FromString(resource.value)
                    )
                elif type_url == ROUTE:
                    follow_type, more = (
                        CLUSTER,
                        _route_clusters(route_pb2.RouteConfiguration.FromString(resource.value)),
                    )
                else:
                    follow_type, more = _cluster_follow(
                        cluster_pb2.Cluster.FromString(resource.value)
                    )
                names.update(more)
            if follow_type and names:
                follow = (follow_type, tuple(sorted(names)))
    except (ValueError, DecodeError) as exc:
        summary = f"error: {str(exc)[:80]}"
    return Decoded(type_url, response.version_info, response.nonce, summary, follow)
