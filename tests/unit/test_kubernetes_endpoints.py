"""EndpointSlices -> endpoints, and where the Kubernetes API client comes from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes.config import incluster_config

from lbserver.discovery import Endpoint
from lbserver.discovery.kubernetes import (
    KubernetesConfigError,
    endpoints_from_slices,
    make_api_client,
)
from lbserver.errors import ConfigError
from tests.support.fake_kube import FakeKubeApiServer, endpoint, endpoint_slice


def ep(ip: str, port: int = 11800, **kw: object) -> Endpoint:
    conditions = {"ready": True, "serving": True, "terminating": False}
    conditions.update({k: bool(v) for k, v in kw.items() if k in conditions})
    zone = str(kw.get("zone", ""))
    pod = str(kw.get("pod", ""))
    return Endpoint(ip, port, zone=zone, pod=pod, **conditions)


def test_every_address_of_every_endpoint() -> None:
    s = endpoint_slice(
        "a",
        "oap",
        [endpoint("10.0.0.1", "10.0.0.2", zone="z1", pod="oap-0"), endpoint("10.0.0.3")],
    )
    assert endpoints_from_slices([s], "grpc") == {
        ep("10.0.0.1", zone="z1", pod="oap-0"),
        ep("10.0.0.2", zone="z1", pod="oap-0"),
        ep("10.0.0.3"),
    }


def test_nil_conditions_use_kubernetes_defaults() -> None:
    s = endpoint_slice(
        "a", "oap", [endpoint("10.0.0.1", ready=None, serving=None, terminating=None)]
    )
    assert endpoints_from_slices([s], "grpc") == {ep("10.0.0.1")}
    s["endpoints"][0].pop("conditions")
    assert endpoints_from_slices([s], "grpc") == {ep("10.0.0.1")}


def test_conditions_are_kept_as_given() -> None:
    s = endpoint_slice(
        "a",
        "oap",
        [
            endpoint("10.0.0.1", ready=False, serving=True, terminating=True),
            endpoint("10.0.0.2", ready=False, serving=False, terminating=False),
        ],
    )
    assert endpoints_from_slices([s], "grpc") == {
        ep("10.0.0.1", ready=False, serving=True, terminating=True),
        ep("10.0.0.2", ready=False, serving=False),
    }


def test_port_by_name_and_unnamed_port() -> None:
    two = endpoint_slice("a", "oap", [endpoint("10.0.0.1")], ports=[("grpc", 1), ("http", 2)])
    assert {e.port for e in endpoints_from_slices([two], "http")} == {2}
    assert endpoints_from_slices([two], "") == frozenset()
    assert endpoints_from_slices([two], "other") == frozenset()
    unnamed = endpoint_slice("b", "oap", [endpoint("10.0.0.1")], ports=[(None, 80)])
    assert {e.port for e in endpoints_from_slices([unnamed], "")} == {80}
    empty_name = endpoint_slice("c", "oap", [endpoint("10.0.0.1")], ports=[("", 81)])
    assert {e.port for e in endpoints_from_slices([empty_name], "")} == {81}


def test_non_tcp_and_portless_entries_are_skipped() -> None:
    s = endpoint_slice("a", "oap", [endpoint("10.0.0.1")], ports=[("grpc", 1)])
    s["ports"][0]["protocol"] = "UDP"
    assert endpoints_from_slices([s], "grpc") == frozenset()
    s["ports"] = [{"name": "grpc"}]  # port unset
    assert endpoints_from_slices([s], "grpc") == frozenset()
    s["ports"] = None
    assert endpoints_from_slices([s], "grpc") == frozenset()


def test_ipv6_is_normalized_and_fqdn_skipped() -> None:
    v6 = endpoint_slice("a", "oap", [endpoint("fd00:0:0::0001")], address_type="IPv6")
    fqdn = endpoint_slice("b", "oap", [endpoint("oap.example.com")], address_type="FQDN")
    bad = endpoint_slice("c", "oap", [endpoint("not-an-ip", "10.0.0.7")])
    assert endpoints_from_slices([v6, fqdn, bad], "grpc") == {ep("fd00::1"), ep("10.0.0.7")}


def test_target_ref_other_than_pod_gives_no_pod() -> None:
    s = endpoint_slice("a", "oap", [endpoint("10.0.0.1")])
    s["endpoints"][0]["targetRef"] = {"kind": "Node", "name": "node-1"}
    assert endpoints_from_slices([s], "grpc") == {ep("10.0.0.1")}


def test_null_endpoints_and_empty_slices() -> None:
    s = endpoint_slice("a", "oap", [])
    s["endpoints"] = None
    assert endpoints_from_slices([s], "grpc") == frozenset()
    assert endpoints_from_slices([], "grpc") == frozenset()


def test_address_in_two_slices_listed_once_most_available() -> None:
    old = endpoint_slice("a", "oap", [endpoint("10.0.0.1", ready=False, serving=False)])
    new = endpoint_slice("b", "oap", [endpoint("10.0.0.1", ready=True, pod="oap-0")])
    for order in ([old, new], [new, old]):
        assert endpoints_from_slices(order, "grpc") == {ep("10.0.0.1", pod="oap-0")}
    # Same address, different ports: two endpoints.
    other_port = endpoint_slice("c", "oap", [endpoint("10.0.0.1")], ports=[("grpc", 9)])
    assert len(endpoints_from_slices([new, other_port], "grpc")) == 2


# -- make_api_client


def _close(client: Any) -> None:  # typed or not, depending on the client's release
    client.close()


def _write_kubeconfig(path: Path, server: FakeKubeApiServer) -> Path:
    path.write_text(json.dumps(server.kubeconfig()))  # JSON is YAML
    return path


def test_kubeconfig_file(tmp_path: Path) -> None:
    with FakeKubeApiServer() as kube:
        client = make_api_client(str(_write_kubeconfig(tmp_path / "config", kube)))
        try:
            assert client.configuration.host == kube.url
        finally:
            _close(client)


def test_missing_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(KubernetesConfigError, match="cannot load the kubeconfig") as info:
        make_api_client(str(missing))
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_no_cluster_no_kubeconfig_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubernetesConfigError, match="not running in a cluster"):
        make_api_client(None)


def test_default_kubeconfig_outside_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with FakeKubeApiServer() as kube:
        monkeypatch.setenv("KUBECONFIG", str(_write_kubeconfig(tmp_path / "kc", kube)))
        client = make_api_client(None)
        try:
            assert client.configuration.host == kube.url
        finally:
            _close(client)


def test_in_cluster_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token")
    ca = tmp_path / "ca.crt"
    ca.write_text("not really a certificate")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    client = make_api_client(None)
    try:
        assert client.configuration.host == "https://10.96.0.1:443"
        assert client.configuration.ssl_ca_cert == str(ca)
    finally:
        _close(client)
