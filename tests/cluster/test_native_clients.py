"""A native grpcio client with the grpclb policy, in a pod, built by the
README's own code block (the target and options the docs give, executed as
written): balanced per call over the OAP pods by the balancer's list, and
what happens in fallback — when the balancer answers "fallback" and when no
balancer can be reached at all — both of which must still reach the OAP pods
(the `lbserver-oap` Service's address)."""

from __future__ import annotations

import pytest

from tests.cluster import support as s
from tests.cluster.harness import ClusterHarness
from tests.cluster.harness.kubelet import Pod

pytestmark = pytest.mark.timeout(300)

APP_NS = "my-app"
CALLS = 150


async def _run_client(k8s: ClusterHarness, name: str, calls: int = CALLS) -> Pod:
    pod = await s.start_readme_client(k8s, APP_NS, name, calls, rate=40)
    await k8s.cluster.wait_for(
        f"client {name} to finish", lambda: pod.phase in ("Succeeded", "Failed"), 90
    )
    assert pod.phase == "Succeeded", pod.describe()
    return pod


async def test_the_readme_client_balances_per_call_and_falls_back_to_the_oap_pods(
    k8s: ClusterHarness,
) -> None:
    s.push_images(k8s)
    await s.install_skywalking(k8s)
    await s.install_lbserver(k8s)
    oap = await s.registered_oap_pods(k8s)
    await k8s.sh(f"kubectl create namespace {APP_NS}")
    # 1. Balanced: the client found the balancer through the SRV record of
    #    the name it dials, and spreads its calls over every OAP pod.
    balanced = await _run_client(k8s, "balanced")
    assert s.client_result(balanced) == {"ok": CALLS, "failed": {}}, balanced.describe()
    counts = s.calls_by_oap_pod(k8s, "balanced")
    assert sum(counts.values()) == CALLS
    assert set(counts) == {p.name for p in oap}
    for pod_name, n in counts.items():
        assert abs(n / CALLS - 1 / 3) <= 0.07, (pod_name, counts)

    # 2. The balancer answers "fallback" (the name maps to a service it does
    #    not know): the client uses the name's address, the OAP pods, through
    #    kube-proxy (one connection, so one pod).
    await k8s.sh(
        f"helm upgrade lbserver charts/lbserver -n {s.NS} --reuse-values "
        "--set nativeClients.service=unknown --set nativeClients.backendService.name=lbserver-oap"
    )
    await k8s.cluster.wait_rollout(s.NS, "lbserver")
    told = await _run_client(k8s, "told-fallback")
    assert s.client_result(told) == {"ok": CALLS, "failed": {}}, told.describe()
    counts = s.calls_by_oap_pod(k8s, "told-fallback")
    assert sum(counts.values()) == CALLS and len(counts) == 1, counts

    # 3. No balancer at all: the balancer's Service has no endpoints; the
    #    client falls back on its own and still reaches the OAP pods.
    await k8s.sh(f"kubectl -n {s.NS} delete deployment lbserver")
    alone = await _run_client(k8s, "no-balancer")
    result = s.client_result(alone)
    assert result == {"ok": CALLS, "failed": {}}, alone.describe()
    counts = s.calls_by_oap_pod(k8s, "no-balancer")
    assert sum(counts.values()) == CALLS, counts
