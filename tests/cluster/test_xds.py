"""A gRPC xDS client in a pod, set up by docs/xds.md as written: the
bootstrap file docs/xds/bootstrap.json as it is (server_uri
`lbserver.skywalking.svc:11810`, the chart's Service) in a ConfigMap mounted
into the pod, GRPC_XDS_BOOTSTRAP naming it, and the doc's grpcio code
(`grpc.insecure_channel("xds:///oap")`) executed as written. lbserver comes
from the chart, the OAP pods register with the chart README's registrar
patch.

One client keeps calling throughout: its calls spread evenly over the three
OAP pods by the weights lbserver sends over ADS; then one OAP pod is deleted
(it drains, and keeps serving through its preStop sleep) and the Deployment
replaces it: the same client, never restarted, stops calling the gone pod and
spreads its calls over the remaining one and the new one. No call fails."""

from __future__ import annotations

import json
import re

import pytest

from tests.cluster import support as s
from tests.cluster.harness import ClusterHarness
from tests.cluster.harness.kubelet import Pod
from tests.support.eventually import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

APP_NS = "my-app"
CLIENT = "xds"
# Calls per measured window: grpcio's weighted_target picks a locality at
# random by weight, so a share of 1/3 over 600 calls has a standard deviation
# of 1.9 points; the ±7 points allowed are 3.6 of them.
WINDOW = 600
RATE = 100.0
# A bound on the load loop: the test stops the client once both windows are in.
MAX_CALLS = 6000
_CALL = re.compile(rf"{CLIENT}-(\d+)")


def _calls(k8s: ClusterHarness) -> dict[int, list[str]]:
    """The OAP pods that received each of the client's calls, by call index."""
    received: dict[int, list[str]] = {}
    for pod_name, segments in s.segments_by_pod(s.oap_records(k8s)).items():
        for segment, n in segments.items():
            match = _CALL.fullmatch(segment)
            if match:
                received.setdefault(int(match.group(1)), []).extend([pod_name] * n)
    return received


async def _window(
    k8s: ClusterHarness, first: int, what: str, count: int = WINDOW
) -> dict[int, list[str]]:
    """Waits until calls first..first+count-1 all arrived; returns every call seen."""
    seen: dict[int, list[str]] = {}

    def arrived() -> bool:
        nonlocal seen
        seen = _calls(k8s)
        return all(i in seen for i in range(first, first + count))

    await eventually(
        arrived,
        what,
        within=40,
        interval=0.5,
        detail=lambda: f"{len(seen)} calls arrived, last {max(seen, default=None)}",
    )
    return seen


def _shares(calls: dict[int, list[str]], first: int) -> dict[str, float]:
    shares: dict[str, float] = {}
    for i in range(first, first + WINDOW):
        (pod_name,) = calls[i]
        shares[pod_name] = shares.get(pod_name, 0.0) + 1 / WINDOW
    return shares


def _xds_streams(k8s: ClusterHarness) -> list[dict[str, object]]:
    """The xDS streams the balancer pods logged as connected."""
    streams = []
    for pod in k8s.cluster.all_pods:
        if pod.namespace != s.NS or pod.labels.get("app.kubernetes.io/component") != "balancer":
            continue
        for line in pod.container("lbserver").all_logs().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "xds client connected":
                    streams.append(event)
    return streams


async def test_a_grpc_xds_client_set_up_by_the_docs_follows_the_oap_pods(
    k8s: ClusterHarness,
) -> None:
    s.push_images(k8s)
    await s.install_skywalking(k8s)
    await s.install_lbserver(k8s)
    oap = await s.registered_oap_pods(k8s)
    assert len(oap) == 3
    await k8s.sh(f"kubectl create namespace {APP_NS}")
    client = await s.start_xds_client(k8s, APP_NS, CLIENT, MAX_CALLS, RATE)

    # 1. The bootstrap's server_uri, a name relative to the cluster domain,
    #    resolved through the pod's search path (first tried in the client's
    #    own namespace), and the client subscribed over ADS as the
    #    bootstrap's node.
    calls = await _window(k8s, 0, f"the first {WINDOW} calls to reach the OAP pods")
    dns = k8s.cluster.dns
    assert dns is not None
    queried = {name for _, name, _ in dns.queries}
    assert f"lbserver.skywalking.svc.{APP_NS}.svc.cluster.local" in queried, sorted(queried)
    assert k8s.cluster.dns_records("lbserver.skywalking.svc.cluster.local") is not None
    assert "lbserver.skywalking.svc.cluster.local" in queried
    assert {e["node"] for e in _xds_streams(k8s)} == {"skywalking-agent"}

    #    Every OAP pod gets calls, each about a third.
    shares = _shares(calls, 0)
    assert set(shares) == {p.name for p in oap}, shares
    for pod_name, share in shares.items():
        assert abs(share - 1 / 3) <= 0.07, (pod_name, shares)

    # 2. One OAP pod goes (drained by its registrar, serving through its
    #    preStop sleep); the Deployment replaces it.
    gone = oap[0]
    await k8s.sh(f"kubectl -n {s.NS} delete pod {gone.name} --wait=false")
    new: list[Pod] = []

    def replaced() -> bool:
        nonlocal new
        now = [p for p in k8s.cluster.deployment_pods(s.NS, "skywalking-oap") if p.ready]
        new = [p for p in now if p.name not in {o.name for o in oap}]
        return len(now) == 3 and len(new) == 1

    await k8s.cluster.wait_for("a replacement OAP pod", replaced, 60, 0.5)
    (fresh,) = new
    live = [p for p in oap if p is not gone] + [fresh]
    await s.wait_backends(k8s, {f"{p.ip}:11800" for p in live})

    #    The running client starts calling the new pod; from its first call
    #    there, none goes to the gone pod, and the three live pods share the
    #    calls evenly.
    def first_on_new() -> int | None:
        on_new = [i for i, pods in _calls(k8s).items() if fresh.name in pods]
        return min(on_new) if on_new else None

    first = await eventually(
        first_on_new, "the running client to call the new OAP pod", within=30, interval=0.5
    )
    calls = await _window(k8s, first, f"{WINDOW} calls after the first to the new pod")
    # Stopped here (SIGKILL): its load loop is bounded, not meant to run out.
    await client.kill_now()
    after = [i for i, pods in calls.items() if i >= first and gone.name in pods]
    assert not after, f"calls {after[:5]} went to the gone pod after the new one was used"
    shares = _shares(calls, first)
    assert set(shares) == {p.name for p in live}, shares
    for pod_name, share in shares.items():
        assert abs(share - 1 / 3) <= 0.07, (pod_name, shares)

    # 3. No call failed; every call up to the end of the second window (the
    #    ones between the windows too) arrived exactly once; the client ran
    #    throughout on one xDS stream (never restarted).
    logs = client.container().all_logs()
    assert " failed: " not in logs, logs[-2000:]
    assert client.restarts == 0
    calls = await _window(k8s, 0, f"every call up to {first + WINDOW}", first + WINDOW)
    repeated = [i for i in range(first + WINDOW) if len(calls[i]) != 1]
    assert not repeated, {i: calls[i] for i in repeated[:5]}
    assert len(_xds_streams(k8s)) == 1, _xds_streams(k8s)
