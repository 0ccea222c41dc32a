"""The chart's zero-touch SkyWalking values (examples/zero-touch-values.yaml):
OAP pods of the official SkyWalking chart, unmodified, found through their
EndpointSlices and weighed by the balancer's own scrapes of their telemetry;
the RBAC that needs; and the values files docs/deploying-with-skywalking.md
shows, for both charts, agreeing with each other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lbserver.discovery import ScrapeSettings

from .conftest import CHART, NAMESPACE, ROOT, Helm, Manifest, find, kube_validate
from .test_chart import FULLNAME, balancer_pod, load_rendered_config

ZERO_TOUCH = CHART / "examples" / "zero-touch-values.yaml"
SKYWALKING_VALUES = ROOT / "docs" / "skywalking-helm-values.yaml"
DEPLOYING = ROOT / "docs" / "deploying-with-skywalking.md"

ENDPOINTSLICES_RULE = {
    "apiGroups": ["discovery.k8s.io"],
    "resources": ["endpointslices"],
    "verbs": ["get", "list", "watch"],
}
PODS_RULE = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}


def render(helm: Helm, *values: Path) -> list[Manifest]:
    args = [arg for path in values for arg in ("-f", str(path))]
    return helm.template(*args)


def roles_by_namespace(objects: list[Manifest]) -> dict[str, list[dict[str, Any]]]:
    return {r["metadata"]["namespace"]: r["rules"] for r in find(objects, "Role")}


def test_lint_strict(helm: Helm) -> None:
    result = helm.run("lint", "--strict", str(CHART), "-f", str(ZERO_TOUCH), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_object_is_valid_kubernetes(helm: Helm) -> None:
    objects = render(helm, ZERO_TOUCH)
    assert objects
    for obj in objects:
        kube_validate(obj)


def test_config_scrapes_the_oap_pods_telemetry(helm: Helm) -> None:
    config = load_rendered_config(render(helm, ZERO_TOUCH))
    (watched,) = config.kubernetes_services
    assert (watched.service, watched.namespace, watched.kubernetes_service) == (
        "oap",
        "skywalking",
        "skywalking-oap",
    )
    assert watched.port_name == "grpc"
    assert watched.mode == "kubernetes"
    assert watched.scrape == ScrapeSettings(
        port=1234,
        path="/metrics",
        interval=10.0,
        timeout=2.0,
        cpus=2.0,
        requests_metric="trace_in_latency_count",
        errors_metric="trace_analysis_error_count",
    )


def test_a_configured_cpu_count_needs_no_pod_access(helm: Helm) -> None:
    objects = render(helm, ZERO_TOUCH)
    assert roles_by_namespace(objects) == {"skywalking": [ENDPOINTSLICES_RULE]}
    (binding,) = find(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == "skywalking"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ]
    assert balancer_pod(objects)["automountServiceAccountToken"] is True
    assert not find(objects, "ClusterRole")


def test_a_named_port_or_cpus_limit_reads_pods_where_scraped(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "config": {
                    "kubernetes_services": [
                        {
                            "service": "oap",
                            "namespace": "skywalking",
                            "kubernetes_service": "skywalking-oap",
                            "port_name": "grpc",
                            "mode": "kubernetes",
                            "scrape": {"port": 1234, "cpus": "limit"},
                        },
                        {
                            "service": "agents",
                            "namespace": "other",
                            "mode": "kubernetes",
                            "scrape": {"port": "monitoring"},
                        },
                        {
                            "service": "plain",
                            "namespace": "plain",
                            "mode": "kubernetes",
                            "scrape": {"port": 1234, "cpus": 2},
                        },
                        {"service": "collector", "mode": "kubernetes"},
                    ]
                }
            }
        )
    )
    objects = render(helm, values)
    assert roles_by_namespace(objects) == {
        "skywalking": [ENDPOINTSLICES_RULE, PODS_RULE],
        "other": [ENDPOINTSLICES_RULE, PODS_RULE],
        "plain": [ENDPOINTSLICES_RULE],
        NAMESPACE: [ENDPOINTSLICES_RULE],
    }
    for obj in objects:
        kube_validate(obj)


def test_no_rbac_when_rbac_create_is_off(helm: Helm) -> None:
    objects = helm.template("-f", str(ZERO_TOUCH), "--set", "rbac.create=false")
    assert not find(objects, "Role") and not find(objects, "RoleBinding")


def yaml_blocks(path: Path) -> list[Any]:
    return [
        yaml.safe_load(body)
        for body in re.findall(r"^```yaml\n(.*?)^```", path.read_text(), re.S | re.M)
    ]


def test_the_deploying_doc_shows_both_values_files() -> None:
    blocks = yaml_blocks(DEPLOYING)
    assert yaml.safe_load(ZERO_TOUCH.read_text()) in blocks
    assert yaml.safe_load(SKYWALKING_VALUES.read_text()) in blocks


def test_skywalking_values_serve_what_the_balancer_scrapes() -> None:
    """The official chart's keys: oap.env (name -> value, the OAP container's
    environment) and oap.ports (name -> number, the OAP Service's ports)."""
    oap = yaml.safe_load(SKYWALKING_VALUES.read_text())["oap"]
    assert set(oap) == {"env", "ports"}
    assert oap["env"]["SW_TELEMETRY"] == "prometheus"
    assert all(isinstance(v, str) for v in oap["env"].values())
    (watched,) = yaml.safe_load(ZERO_TOUCH.read_text())["config"]["kubernetes_services"]
    port = watched["scrape"]["port"]
    assert int(oap["env"]["SW_TELEMETRY_PROMETHEUS_PORT"]) == port
    assert oap["ports"] == {"grpc": 11800, "rest": 12800, "telemetry": port}


def test_values_yaml_points_at_the_example() -> None:
    assert "examples/zero-touch-values.yaml" in (CHART / "values.yaml").read_text()
