"""Rolling updates under load, as the docs set things up: SkyWalking agents
behind the agent-shim sidecar (the chart README's Deployment) and a native
grpclb client (the README's code) keep sending while first the OAP
Deployment (preStop sleep + registrar drain) and then lbserver (maxSurge 1,
maxUnavailable 0, preStop sleep) are rolled. No call may fail and no segment
may be lost or duplicated."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.cluster import support as s
from tests.cluster.harness import ClusterHarness

pytestmark = pytest.mark.timeout(420)

APP_NS = "my-app"
NATIVE_CALLS = 1500


async def test_rolling_updates_of_oap_and_lbserver_lose_nothing(k8s: ClusterHarness) -> None:
    s.push_images(k8s, app_segments=1200, app_rate=20)
    await s.install_skywalking(k8s)
    await s.install_lbserver(k8s)
    oap = await s.registered_oap_pods(k8s)

    view = s.checkout_view(k8s.work, s.named_files(s.CHART_README))
    await k8s.sh(
        f"kubectl create namespace {APP_NS} && kubectl apply -f my-app.yaml && "
        f"kubectl -n {APP_NS} rollout status deployment my-app",
        cwd=view,
    )
    native = await s.start_readme_client(k8s, APP_NS, "native", NATIVE_CALLS, rate=25)

    # Roll every OAP pod (preStop sleep, registrar drain), then every balancer.
    await k8s.sh(
        f"kubectl -n {s.NS} rollout restart deployment skywalking-oap && "
        f"kubectl -n {s.NS} rollout status deployment skywalking-oap"
    )
    await k8s.sh(
        f"helm upgrade lbserver charts/lbserver -n {s.NS} --reuse-values "
        "--set podAnnotations.rolled=once && "
        f"kubectl -n {s.NS} rollout status deployment lbserver"
    )
    new_oap = [p for p in k8s.cluster.deployment_pods(s.NS, "skywalking-oap") if p.ready]
    assert not {p.name for p in new_oap} & {p.name for p in oap}
    await s.wait_backends(k8s, {f"{p.ip}:11800" for p in new_oap})

    await k8s.cluster.wait_for(
        "the native client to finish", lambda: native.phase in ("Succeeded", "Failed"), 120, 1.0
    )
    # The rollouts happened while it was still calling.
    assert s.client_result(native) == {"ok": NATIVE_CALLS, "failed": {}}, native.describe()

    apps = k8s.cluster.deployment_pods(APP_NS, "my-app")
    await k8s.cluster.wait_for(
        "the agents to report every segment",
        lambda: all("segment queue drained" in p.container("my-app").all_logs() for p in apps),
        120,
        1.0,
    )
    produced = [seg for pod in apps for seg in s.produced_segments(pod)]
    assert len(produced) == 2 * 1200 == len(set(produced))

    def arrived() -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in s.segments_by_pod(s.oap_records(k8s)).values():
            total.update(counts)
        return total

    await k8s.cluster.wait_for(
        "every produced segment to arrive", lambda: set(produced) <= set(arrived()), 60, 1.0
    )
    counts = arrived()
    assert [seg for seg in produced if counts[seg] != 1] == []
    native_segments = {seg: n for seg, n in counts.items() if seg.startswith("native-")}
    assert len(native_segments) == NATIVE_CALLS and set(native_segments.values()) == {1}
    assert s.balancer_refusals(k8s) == []
    # Every OAP pod, old and new, got some of the traffic.
    by_pod = {
        name: sum(n for seg, n in c.items() if not seg.startswith("native-"))
        for name, c in s.segments_by_pod(s.oap_records(k8s)).items()
    }
    assert all(by_pod[p.name] > 0 for p in [*oap, *new_oap]), by_pod
