"""xDS resources for one service, built from the same lists grpclb serves.

A client asks for a listener by the name it dialed (`xds:///oap` asks for
`oap`); the name maps to a service by the grpclb naming rules. What the
client is then told, each a pure function of the name, the service and its
list:

- Listener `<name>`: an HTTP API listener (what gRPC clients use) whose
  HttpConnectionManager carries the RouteConfiguration inline (one round trip
  less than RDS) and the router filter.
- RouteConfiguration `<name>` (also served over RDS, for clients that ask):
  one virtual host whose domain is the name, every path to cluster `<service>`.
- Cluster `<service>`: an EDS cluster, endpoints over ADS, ROUND_ROBIN.
- ClusterLoadAssignment `<service>`: the service's list as endpoints.

Why a locality per backend: gRPC's xDS round_robin ignores an endpoint's
`load_balancing_weight` but honours locality weights (weighted_target over
localities, gRFC A28/A52), so with one backend per locality whose weight is
the backend's entries in the grpclb list, gRPC clients reproduce the list's
shares (docs/benchmarks.md, "xDS weights", measures both layouts). The same
weight is also set on the endpoint, which is what Envoy's ROUND_ROBIN weighs
by. The locality's zone is the backend's registration zone; its sub-zone the
backend's token, which keeps localities distinct. `localities="zone"` groups
a zone's backends into one locality instead (weight: their sum), for
zone-aware Envoy routing; gRPC clients then split a zone's share evenly.

Drops (shedding) become `drop_overloads` with the list's drop share.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from typing import Any, Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, wrappers_pb2

from lbserver.domain.serverlist import DROP_TOKEN, Entry, ServerList
from lbserver.xds import Localities

_PREFIX = "type.googleapis.com/"
LISTENER: Final = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SHORT_NAMES: Final = {LISTENER: "lds", ROUTE: "rds", CLUSTER: "cds", ENDPOINT: "eds"}

# drop_overloads' category: the token grpclb's drop entries carry.
DROP_CATEGORY: Final = DROP_TOKEN
_ROUTER_FILTER: Final = "envoy.filters.http.router"
_MILLION = 1_000_000


def pack(message: Any) -> any_pb2.Any:
    """`message` as an Any, serialized deterministically (equal resources,
    equal bytes: versions are hashes of them)."""
    return any_pb2.Any(
        type_url=_PREFIX + message.DESCRIPTOR.full_name,
        value=message.SerializeToString(deterministic=True),
    )


def route_configuration(name: str, cluster: str) -> Any:
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=""),
        route=route_components_pb2.RouteAction(cluster=cluster),
    )
    host = route_components_pb2.VirtualHost(name=name, domains=[name], routes=[route])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[host])


def listener(name: str, cluster: str) -> Any:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        route_config=route_configuration(name, cluster),
        http_filters=[
            hcm_pb2.HttpFilter(name=_ROUTER_FILTER, typed_config=pack(router_pb2.Router()))
        ],
    )
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(manager))
    )


def cluster(name: str) -> Any:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
            service_name=name,
        ),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )


def _endpoint(entry: Entry, weight: int) -> Any:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=str(ipaddress.ip_address(entry.ip)), port_value=entry.port
                )
            )
        ),
        health_status=health_check_pb2.HEALTHY,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
    )


def _backend_localities(backends: Iterable[tuple[Entry, int]]) -> list[Any]:
    return [
        endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(zone=entry.zone, sub_zone=entry.token),
            lb_endpoints=[_endpoint(entry, weight)],
            load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
        )
        for entry, weight in backends
    ]


def _zone_localities(backends: Iterable[tuple[Entry, int]]) -> list[Any]:
    zones: dict[str, list[tuple[Entry, int]]] = {}
    for entry, weight in backends:
        zones.setdefault(entry.zone, []).append((entry, weight))
    return [
        endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(zone=zone),
            lb_endpoints=[_endpoint(entry, weight) for entry, weight in members],
            load_balancing_weight=wrappers_pb2.UInt32Value(value=sum(w for _, w in members)),
        )
        for zone, members in sorted(zones.items())
    ]


def load_assignment(
    name: str, servers: ServerList | None, localities: Localities = "backend"
) -> Any:
    """The ClusterLoadAssignment of `servers` (None: no endpoints). A
    backend's weight is its number of entries in the list; drop entries
    become one drop_overloads category with their share of the list."""
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if servers is None or not servers.entries:
        return assignment
    counts = Counter(entry.token for entry in servers.entries if not entry.drop)
    first: dict[str, Entry] = {}
    for entry in servers.entries:
        if not entry.drop:
            first.setdefault(entry.token, entry)
    backends = [(first[token], counts[token]) for token in sorted(first)]
    build = _backend_localities if localities == "backend" else _zone_localities
    assignment.endpoints.extend(build(backends))
    drops = len(servers.entries) - sum(counts.values())
    if drops:
        share = round(drops * _MILLION / len(servers.entries))
        assignment.policy.drop_overloads.append(
            endpoint_pb2.ClusterLoadAssignment.Policy.DropOverload(
                category=DROP_CATEGORY,
                drop_percentage=percent_pb2.FractionalPercent(
                    numerator=share, denominator=percent_pb2.FractionalPercent.MILLION
                ),
            )
        )
    return assignment
