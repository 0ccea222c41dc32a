"""docs/xds: the bootstrap file gRPC clients copy and the Envoy config are
what lbserver serves and what their readers accept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2

# The typed configs envoy.yaml names must be in the descriptor pool to parse.
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _envoy() -> Any:
    # ParseDict refuses unknown fields and wrong types: Envoy's own check.
    return json_format.ParseDict(
        yaml.safe_load((DOCS / "xds" / "envoy.yaml").read_text()), bootstrap_pb2.Bootstrap()
    )


def test_the_bootstrap_file_names_lbserver_as_its_only_xds_server() -> None:
    bootstrap = json.loads((DOCS / "xds" / "bootstrap.json").read_text())
    (server,) = bootstrap["xds_servers"]
    assert server["server_uri"].endswith(":11810")
    assert server["channel_creds"] == [{"type": "insecure"}]
    assert "xds_v3" in server["server_features"]
    assert bootstrap["node"]["id"]


def test_the_docs_show_the_bootstrap_file_as_it_is() -> None:
    shown = (DOCS / "xds.md").read_text().split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(shown) == json.loads((DOCS / "xds" / "bootstrap.json").read_text())


def test_the_envoy_config_takes_the_oap_endpoints_from_lbserver_over_ads() -> None:
    config = _envoy()
    clusters = {cluster.name: cluster for cluster in config.static_resources.clusters}
    oap = clusters["oap"]
    assert oap.type == cluster_pb2.Cluster.EDS
    assert oap.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert oap.eds_cluster_config.service_name == "oap"
    assert oap.eds_cluster_config.eds_config.HasField("ads")
    (ads,) = config.dynamic_resources.ads_config.grpc_services
    lbserver = clusters[ads.envoy_grpc.cluster_name]
    address = lbserver.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert address.socket_address.port_value == 11810
    # The listener routes every call to the EDS cluster.
    (listener,) = config.static_resources.listeners
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.route_config.virtual_hosts[0].routes[0].route.cluster == "oap"
