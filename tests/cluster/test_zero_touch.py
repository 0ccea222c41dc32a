"""Zero-touch SkyWalking in the cluster (issue 16): the official chart's OAP
with docs/skywalking-helm-values.yaml (its own Prometheus telemetry, no
registrar sidecar: manifests/skywalking-oap-telemetry.yaml), the lbserver
chart installed with charts/lbserver/examples/zero-touch-values.yaml as is,
and the chart README's application (my-app.yaml: the SkyWalking Python agent
behind the agent-shim sidecar).

Nothing registers: each balancer replica learns the OAP pods from the
EndpointSlices of skywalking-oap, read through the harness API server under
the chart's RBAC, and their load from its own scrapes of each pod's port
1234. Every segment the agents sent arrives exactly once, spread over the
OAP pods (a shim in fallback would reach one pod through kube-proxy)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.cluster import support as s
from tests.cluster.harness import ClusterHarness
from tests.support.eventually import eventually

pytestmark = pytest.mark.timeout(300)

APP_NS = "my-app"
ZERO_TOUCH_VALUES = "charts/lbserver/examples/zero-touch-values.yaml"
SKYWALKING_VALUES = s.ROOT / "docs" / "skywalking-helm-values.yaml"
OAP_MANIFEST = "skywalking-oap-telemetry.yaml"
# Per application pod (my-app.yaml has two): 20 s of sending, two scrape
# intervals of the zero-touch values (10 s), so every replica scrapes every
# OAP pod while segments arrive.
SEGMENTS = 300
RATE = 15.0


def _manifest(name: str) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in yaml.safe_load_all((s.MANIFESTS / name).read_text())}


def test_the_oap_manifest_is_the_official_chart_with_the_docs_values() -> None:
    """manifests/skywalking-oap-telemetry.yaml is skywalking-oap.yaml plus
    what the SkyWalking chart renders from docs/skywalking-helm-values.yaml,
    nothing else; and the zero-touch values scrape that port of that Service."""
    oap = yaml.safe_load(SKYWALKING_VALUES.read_text())["oap"]
    plain, telemetry = _manifest("skywalking-oap.yaml"), _manifest(OAP_MANIFEST)
    (container,) = telemetry["Deployment"]["spec"]["template"]["spec"]["containers"]
    (plain_container,) = plain["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    plain_env = {e["name"]: e.get("value") for e in plain_container["env"]}
    assert env == {**plain_env, **{k: str(v) for k, v in oap["env"].items()}}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == oap["ports"]
    assert {p["name"]: p["port"] for p in telemetry["Service"]["spec"]["ports"]} == oap["ports"]
    for obj in (container, plain_container):
        del obj["env"], obj["ports"]
    del telemetry["Service"]["spec"]["ports"], plain["Service"]["spec"]["ports"]
    assert telemetry == plain

    (watched,) = yaml.safe_load((s.ROOT / ZERO_TOUCH_VALUES).read_text())["config"][
        "kubernetes_services"
    ]
    assert (watched["namespace"], watched["kubernetes_service"]) == (s.NS, "skywalking-oap")
    assert watched["mode"] == "kubernetes"
    assert str(watched["scrape"]["port"]) == oap["env"]["SW_TELEMETRY_PROMETHEUS_PORT"]


async def test_zero_touch_delivers_every_segment_once(k8s: ClusterHarness) -> None:
    s.push_images(k8s, app_segments=SEGMENTS, app_rate=RATE)
    await s.install_skywalking(k8s, manifest=OAP_MANIFEST)
    await s.install_lbserver(k8s, f"-f {ZERO_TOUCH_VALUES}")
    oap = [p for p in k8s.cluster.deployment_pods(s.NS, "skywalking-oap") if p.ready]
    assert len(oap) == 3
    for pod in oap:
        assert [c["name"] for c in pod.spec["containers"]] == ["oap"], pod.describe()
    expected = {f"{p.ip}:11800" for p in oap}

    # Members from the EndpointSlices alone: every replica lists every OAP
    # pod, having watched them through the API server (the chart's Role).
    views = await s.wait_backends(k8s, expected)
    assert len(views) == 2
    api = k8s.cluster.api
    assert api is not None
    assert [r for r in api.requests if r.watch and "/namespaces/skywalking/" in r.path]

    await k8s.sh(f"kubectl create namespace {APP_NS}")
    app = yaml.safe_load(s.named_files(s.CHART_README)["my-app.yaml"])
    await k8s.cluster.apply(app, APP_NS)
    await k8s.cluster.wait_rollout(APP_NS, "my-app", limit=60)

    # Load from the scrapes: nothing else reports any (no registrar), so a
    # CPU and a request rate above zero are the scrapes' rates of the
    # segments arriving. Collected over polls: a rate shows until the next
    # scrape of that pod.
    loads: dict[str, dict[str, dict[str, Any]]] = {}

    async def loaded() -> bool:
        for replica, backends in (await s.balancer_backends(k8s)).items():
            for backend in backends:
                load = backend["load"]
                if load["cpu_utilization"] and load["requests_per_second"]:
                    loads.setdefault(replica, {})[backend["address"]] = load
        return len(loads) == 2 and all(set(seen) == expected for seen in loads.values())

    await eventually(
        loaded,
        "every replica to scrape a load off every OAP pod",
        within=60,
        interval=1.0,
        detail=lambda: f"{loads}\n{k8s.cluster.describe()}",
    )

    apps = k8s.cluster.deployment_pods(APP_NS, "my-app")
    assert len(apps) == 2

    def produced() -> list[str]:
        return [seg for pod in apps for seg in s.produced_segments(pod)]

    def delivered() -> bool:
        drained = all("segment queue drained" in p.container("my-app").all_logs() for p in apps)
        return drained and set(produced()) <= set(s.arrived_segments(k8s))

    await eventually(
        delivered,
        "every produced segment to reach an OAP pod",
        within=60,
        interval=1.0,
        detail=lambda: (
            f"produced {len(produced())}, arrived {sum(s.arrived_segments(k8s).values())}"
        ),
    )
    sent = produced()
    assert len(sent) == len(set(sent)) == 2 * SEGMENTS
    arrived = s.arrived_segments(k8s)
    assert set(arrived) == set(sent), sorted(set(arrived) ^ set(sent))[:5]
    duplicates = {seg: n for seg, n in arrived.items() if n > 1}
    assert not duplicates, f"segments delivered more than once: {list(duplicates)[:5]}"
    per_pod = {name: sum(c.values()) for name, c in s.segments_by_pod(s.oap_records(k8s)).items()}
    # Every OAP pod took its share (more than one pod: not the fallback).
    assert {name for name, n in per_pod.items() if n} == {p.name for p in oap}, per_pod
    assert s.balancer_refusals(k8s) == []
