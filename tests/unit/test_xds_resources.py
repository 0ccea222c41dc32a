"""lbserver.xds.resources: the xDS resources built from a service's list."""

from __future__ import annotations

import ipaddress
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2

from lbserver.domain.serverlist import Entry, ServerList
from lbserver.xds import resources


def _entry(n: int, zone: str = "") -> Entry:
    return Entry(
        ip=ipaddress.ip_address(f"10.0.0.{n}").packed, port=11800, token=f"t{n}", zone=zone
    )


def _list(*entries: Entry) -> ServerList:
    return ServerList(entries=entries)


def _weights(assignment: Any) -> dict[str, tuple[int, int]]:
    """address -> (locality weight, endpoint weight)"""
    found = {}
    for locality in assignment.endpoints:
        for lb_endpoint in locality.lb_endpoints:
            address = lb_endpoint.endpoint.address.socket_address
            found[f"{address.address}:{address.port_value}"] = (
                locality.load_balancing_weight.value,
                lb_endpoint.load_balancing_weight.value,
            )
    return found


def test_every_backend_is_a_locality_weighted_by_its_entries() -> None:
    one, two = _entry(1, "a"), _entry(2, "b")
    assignment = resources.load_assignment("oap", _list(one, two, two, one, two))
    assert assignment.cluster_name == "oap"
    assert _weights(assignment) == {"10.0.0.1:11800": (2, 2), "10.0.0.2:11800": (3, 3)}
    localities = [(loc.locality.zone, loc.locality.sub_zone) for loc in assignment.endpoints]
    assert localities == [("a", "t1"), ("b", "t2")]
    assert all(
        e.health_status == health_check_pb2.HEALTHY
        for loc in assignment.endpoints
        for e in loc.lb_endpoints
    )
    assert not assignment.policy.drop_overloads


def test_zone_layout_groups_a_zones_backends() -> None:
    one, two, three = _entry(1, "a"), _entry(2, "a"), _entry(3, "b")
    assignment = resources.load_assignment(
        "oap", _list(one, two, two, three, three, three), localities="zone"
    )
    zones = {loc.locality.zone: loc.load_balancing_weight.value for loc in assignment.endpoints}
    assert zones == {"a": 3, "b": 3}
    assert {k: v[1] for k, v in _weights(assignment).items()} == {
        "10.0.0.1:11800": 1,
        "10.0.0.2:11800": 2,
        "10.0.0.3:11800": 3,
    }


def test_drop_entries_become_a_drop_overload_of_their_share() -> None:
    one = _entry(1)
    assignment = resources.load_assignment("oap", _list(one, Entry.for_drop(), one, one))
    assert _weights(assignment) == {"10.0.0.1:11800": (3, 3)}
    (drop,) = assignment.policy.drop_overloads
    assert drop.category == resources.DROP_CATEGORY
    assert drop.drop_percentage.denominator == percent_pb2.FractionalPercent.MILLION
    assert drop.drop_percentage.numerator == 250_000


def test_no_list_is_an_assignment_without_endpoints() -> None:
    assert not resources.load_assignment("oap", None).endpoints
    assert not resources.load_assignment("oap", _list()).endpoints


def test_an_ipv6_backend_keeps_its_address() -> None:
    entry = Entry(ip=ipaddress.ip_address("fd00::5").packed, port=11800, token="t")
    assert list(_weights(resources.load_assignment("oap", _list(entry)))) == ["fd00::5:11800"]


def test_the_listener_routes_every_call_of_its_name_to_the_cluster() -> None:
    listener = resources.listener("oap.skywalking:11800", "oap")
    assert listener.name == "oap.skywalking:11800"
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(manager)
    (host,) = manager.route_config.virtual_hosts
    assert list(host.domains) == ["oap.skywalking:11800"]
    (route,) = host.routes
    assert (route.match.prefix, route.route.cluster) == ("", "oap")
    (router,) = manager.http_filters
    assert router.typed_config.Is(router_pb2.Router.DESCRIPTOR)
    assert resources.route_configuration("oap", "oap") == resources.route_configuration(
        "oap", "oap"
    )


def test_the_cluster_takes_its_endpoints_over_ads() -> None:
    cluster = resources.cluster("oap")
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert cluster.eds_cluster_config.service_name == "oap"
    assert cluster.eds_cluster_config.eds_config.HasField("ads")


def test_equal_lists_serialize_to_equal_bytes() -> None:
    one, two = _entry(1), _entry(2)
    first = resources.load_assignment("oap", _list(one, two, two))
    again = resources.load_assignment("oap", _list(one, two, two))
    assert first.SerializeToString(deterministic=True) == again.SerializeToString(
        deterministic=True
    )
