"""The agent-shim gateway (ci/gateway-values.yaml): the chart installed with
`agentShimGateway.enabled`, the official chart's OAP with the chart README's
registrar patch, and clients in another namespace whose collector is the
gateway's Service, as the chart README tells agents to set it.

Each client keeps one connection (one gRPC channel), so kube-proxy sends all
of it to one gateway pod; the gateway must still spread the calls over every
OAP pod, call by call. A client of the OAP's own Service, for contrast, lands
every call on one pod. Then the gateway is rolled while clients send: its
pods leave the endpoints, keep serving through their preStop sleep, finish
their calls within the grace period and exit cleanly; the clients reconnect
to the new pods and no call fails."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from tests.cluster import support as s
from tests.cluster.harness import ClusterHarness
from tests.cluster.harness.kubelet import Pod
from tests.cluster.harness.objects import strategic_merge
from tests.support.eventually import eventually

pytestmark = pytest.mark.timeout(300)

APP_NS = "my-app"
GATEWAY = "lbserver-agent-shim"
GATEWAY_ADDRESS = f"{GATEWAY}.{s.NS}.svc:11800"
OAP_SERVICE_ADDRESS = f"skywalking-oap.{s.NS}.svc:11800"
CALLS = 150
ROLL_CALLS = 900


async def _install_registered_oap(k8s: ClusterHarness, replicas: int = 3) -> None:
    """The official chart's OAP with the README's registrar patch merged
    before the first rollout (the patch itself is exercised by test_docs)."""
    patch = yaml.safe_load(s.snippet(s.CHART_README, "oap-registrar"))
    for obj in yaml.safe_load_all((s.MANIFESTS / "skywalking-oap.yaml").read_text()):
        if obj["kind"] == "Deployment":
            obj["spec"]["replicas"] = replicas
            obj = strategic_merge(obj, patch)
        await k8s.cluster.apply(obj, s.NS)
    await k8s.cluster.wait_rollout(s.NS, "skywalking-oap", limit=60)


async def _start_client(k8s: ClusterHarness, name: str, collector: str, calls: int = CALLS) -> Pod:
    """A client sending `calls` calls (50 a second) over one channel to `collector`."""
    snippet = (
        "# One channel, so one connection: the agent's view of its collector.\n"
        f"channel = grpc.insecure_channel({collector!r})\n"
    )
    return await s.start_client(k8s, APP_NS, name, calls, 50, f"{name}-client", snippet)


async def _wait_gateways_listed(k8s: ClusterHarness, count: int, limit: float = 30.0) -> None:
    """Until the balancer replicas together have `count` BalanceLoad streams
    for service oap: every gateway pod has its list (a gateway that started
    before the balancer could answer may still be in fallback, retrying)."""
    streams = 0

    async def listed() -> bool:
        nonlocal streams
        streams = 0
        for pod in k8s.cluster.deployment_pods(s.NS, "lbserver"):
            if not pod.ready:
                continue
            code, out = await pod.container("lbserver").exec(
                ["lbserver", "status", "--token-file", s.TOKEN_FILE, "--json"], limit=30
            )
            assert code == 0, out
            services = json.loads(out)["services"]
            streams += sum(service["clients"] for service in services if service["name"] == "oap")
        return streams == count

    await eventually(
        listed,
        f"{count} gateway streams",
        within=limit,
        interval=0.5,
        detail=lambda: f"{streams} gateway streams\n{_gateways(k8s)}",
    )


def _gateways(k8s: ClusterHarness) -> str:
    """Every gateway pod (gone ones too), for failure messages."""
    pods = [p for p in k8s.cluster.all_pods if p.name.startswith(f"{GATEWAY}-")]
    return "\n".join(p.describe() for p in pods)


def test_the_chart_readme_points_agents_at_the_gateway() -> None:
    """The address the clients below use is the one the README gives agents
    (its my-gateway-app.yaml, which test_docs runs)."""
    app = yaml.safe_load(s.named_files(s.CHART_README)["my-gateway-app.yaml"])
    pod = app["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SW_AGENT_COLLECTOR_BACKEND_SERVICES"] == GATEWAY_ADDRESS
    text = s.CHART_README.read_text()
    assert "agentShimGateway.enabled=true" in text
    assert "**Sizing** (bench/proxy" in text and "docs/benchmarks.md" in text


async def test_the_gateway_balances_every_call_over_the_oap_pods(k8s: ClusterHarness) -> None:
    s.push_images(k8s)
    await k8s.sh(f"kubectl create namespace {s.NS} && kubectl create namespace {APP_NS}")
    # The registrars mount the chart's token Secret: the chart goes first.
    await s.install_lbserver(k8s, "-f charts/lbserver/ci/gateway-values.yaml")
    await k8s.sh(f"kubectl -n {s.NS} rollout status deployment {GATEWAY}")
    gateways = k8s.cluster.deployment_pods(s.NS, GATEWAY)
    assert len(gateways) == 2 and all(p.ready for p in gateways)
    await _install_registered_oap(k8s)
    oap = [p for p in k8s.cluster.deployment_pods(s.NS, "skywalking-oap") if p.ready]
    assert len(oap) == 3
    await s.wait_backends(k8s, {f"{p.ip}:11800" for p in oap})
    await _wait_gateways_listed(k8s, len(gateways))

    clients = {
        "gateway-a": GATEWAY_ADDRESS,
        "gateway-b": GATEWAY_ADDRESS,
        "direct": OAP_SERVICE_ADDRESS,
    }
    pods = await asyncio.gather(
        *(_start_client(k8s, name, collector) for name, collector in clients.items())
    )
    await k8s.cluster.wait_for(
        "the clients to finish",
        lambda: all(p.phase in ("Succeeded", "Failed") for p in pods),
        60,
    )
    for pod in pods:
        assert pod.phase == "Succeeded", pod.describe()
        assert s.client_result(pod) == {"ok": CALLS, "failed": {}}, pod.describe()

    # Through the gateway: every OAP pod gets its share of each client's
    # calls, although each client has one connection to one gateway pod.
    for name in ("gateway-a", "gateway-b"):
        counts = s.calls_by_oap_pod(k8s, name)
        assert sum(counts.values()) == CALLS, (name, counts)
        assert set(counts) == {p.name for p in oap}, (name, counts)
        for n in counts.values():
            assert abs(n / CALLS - 1 / 3) <= 0.1, f"{name}: {counts}\n{_gateways(k8s)}"
    # Straight to the OAP Service: kube-proxy balances the connection, so
    # one pod gets every call.
    direct = s.calls_by_oap_pod(k8s, "direct")
    assert sum(direct.values()) == CALLS and len(direct) == 1, direct

    # The gateway pods kept running: no restarts, still ready.
    old = k8s.cluster.deployment_pods(s.NS, GATEWAY)
    for pod in old:
        assert pod.ready and pod.restarts == 0, pod.describe()

    # A rolling update of the gateway while two clients send (each on one
    # connection to an old gateway pod, for 18 s).
    rolling = await asyncio.gather(
        *(_start_client(k8s, name, GATEWAY_ADDRESS, ROLL_CALLS) for name in ("roll-a", "roll-b"))
    )
    # Both are sending through the old pods before the restart begins.
    await eventually(
        lambda: all(s.calls_by_oap_pod(k8s, pod.name) for pod in rolling),
        "calls from both rolling clients",
        within=60,
        interval=0.5,
    )
    await k8s.sh(
        f"kubectl -n {s.NS} rollout restart deployment {GATEWAY} && "
        f"kubectl -n {s.NS} rollout status deployment {GATEWAY}"
    )
    new = k8s.cluster.deployment_pods(s.NS, GATEWAY)
    assert len(new) == 2 and not {p.name for p in new} & {p.name for p in old}
    await k8s.cluster.wait_for(
        "the old gateway pods to stop", lambda: all(p.gone.is_set() for p in old), 40
    )
    # The clients were still sending: their later calls went through the new pods.
    assert all(p.phase == "Running" for p in rolling), [p.describe() for p in rolling]
    await k8s.cluster.wait_for(
        "the rolling clients to finish",
        lambda: all(p.phase in ("Succeeded", "Failed") for p in rolling),
        60,
    )
    for pod in rolling:
        assert pod.phase == "Succeeded", pod.describe()
        result = s.client_result(pod)
        assert result == {"ok": ROLL_CALLS, "failed": {}}, f"{pod.describe()}\n{_gateways(k8s)}"
        assert set(s.calls_by_oap_pod(k8s, pod.name)) == {p.name for p in oap}
    for pod in old:
        # Stopped by SIGTERM within the grace period (137 would be SIGKILL).
        ended = pod.container("agent-shim").last_termination
        assert ended is not None and ended.exit_code == 0, pod.describe()
        assert not [e for e in pod.events if "SIGKILL" in e], pod.describe()
