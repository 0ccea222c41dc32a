"""Every shell command of docs/deploying-with-skywalking.md and
charts/lbserver/README.md, run as written (extracted from their `sh` code
blocks, in order) against the harness cluster, with the files the docs tell
the reader to save (YAML blocks headed `# NAME.yaml:`). The cluster starts as
the docs assume: the official SkyWalking chart's OAP installed as release
`skywalking` in namespace `skywalking`; the lbserver image is built and
pushed by the docs' own commands.

Then what the docs promise is checked: every OAP pod registered with every
balancer replica, the status command shows them, and every segment the
SkyWalking agents produced — behind the agent-shim sidecar, and (chart
README) through the agent-shim gateway — arrived exactly once, through the
rolling updates the commands cause (the OAP patch, the token rotation)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.cluster import support as s
from tests.cluster.harness import ClusterHarness
from tests.cluster.harness.kubelet import Pod

pytestmark = pytest.mark.timeout(420)

DOCS = {"deploying": s.DEPLOYING, "chart-readme": s.CHART_README}


def test_the_docs_have_commands_and_files() -> None:
    for path in DOCS.values():
        assert s.code_blocks(path, "sh"), f"{path} has no sh blocks"
    files = s.named_files(*DOCS.values())
    assert {"oap-registrar.yaml", "my-app.yaml", "my-gateway-app.yaml"} <= set(files)


async def _delivered_exactly_once(k8s: ClusterHarness, limit: float = 120.0) -> Counter[str]:
    """Waits until every segment the agent pods produced reached an OAP pod;
    returns how often each one arrived."""
    apps = [p for p in k8s.cluster.all_pods if p.namespace == "my-app"]
    assert apps, "no application pod ran"

    def arrived() -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in s.segments_by_pod(s.oap_records(k8s)).values():
            total.update(counts)
        return total

    def produced(pod: Pod) -> list[str]:
        # The application container: my-app, or my-gateway-app (no sidecar).
        return s.produced_segments(pod, pod.container().name)

    def done() -> bool:
        wanted = {seg for pod in apps for seg in produced(pod)}
        finished = all("segment queue drained" in p.container().all_logs() for p in apps)
        return finished and wanted <= set(arrived())

    try:
        await k8s.cluster.wait_for("every produced segment to reach an OAP pod", done, limit, 1.0)
    except AssertionError:
        wanted = {seg for pod in apps for seg in produced(pod)}
        got = arrived()
        missing = wanted - set(got)
        raise AssertionError(
            f"produced {len(wanted)}, arrived {len(got)}, missing {len(missing)}: "
            f"{sorted(missing)[:5]}; per pod "
            f"{ {k: sum(v.values()) for k, v in s.segments_by_pod(s.oap_records(k8s)).items()} }"
        ) from None
    every = [seg for pod in apps for seg in produced(pod)]
    assert len(every) == len(set(every)) > 0
    return arrived()


@pytest.mark.parametrize("doc", list(DOCS), ids=list(DOCS))
async def test_every_command_of_the_doc_runs_as_written(k8s: ClusterHarness, doc: str) -> None:
    s.push_images(k8s, lbserver=False, app_segments=600, app_rate=15)
    await s.install_skywalking(k8s)
    view = s.checkout_view(k8s.work, s.named_files(*DOCS.values()))
    outputs = []
    initial_token = ""
    for block in s.code_blocks(DOCS[doc], "sh"):
        if "rotation" in block.text or "OLD=" in block.text:
            secret = k8s.cluster.object_data("Secret", s.NS, "lbserver-token")
            assert secret is not None
            initial_token = secret["token"].decode()
        result = await k8s.sh(block.text, cwd=view)
        outputs.append(result.output)

    oap = [p for p in k8s.cluster.deployment_pods(s.NS, "skywalking-oap") if p.ready]
    assert len(oap) == 3
    expected = {f"{p.ip}:11800" for p in oap}
    # Every replica knows every OAP pod (registrars heartbeat to each).
    assert len(k8s.cluster.deployment_pods(s.NS, "lbserver")) == 2
    views = await s.wait_backends(k8s, expected)
    assert len(views) == 2
    if doc == "deploying":
        # The "check" step printed the OAP pods.
        for address in expected:
            assert address in outputs[-1]
    arrived = await _delivered_exactly_once(k8s)
    duplicates = {seg: n for seg, n in arrived.items() if n > 1}
    assert not duplicates, f"segments delivered more than once: {list(duplicates)[:5]}"
    if doc == "deploying":
        # Nothing rolled while the agents sent: the OAP pods' shares of the
        # segments follow the balancer's list shares.
        status = await s.status_json(k8s)
        (service,) = status["services"]
        listed = {b["address"]: b["share"] for b in service["backends"]}
        got = {
            f"{pod.ip}:11800": sum(s.segments_by_pod(s.oap_records(k8s))[pod.name].values())
            for pod in oap
        }
        total = sum(got.values())
        for address, count in got.items():
            assert abs(count / total - listed[address]) <= 0.07, (got, listed)
    if doc == "chart-readme":
        # The application without a sidecar sent everything through the
        # agent-shim gateway (checked above with the others' segments).
        gateway_apps = k8s.cluster.deployment_pods("my-app", "my-gateway-app", live=False)
        assert gateway_apps and all(
            s.produced_segments(pod, "my-gateway-app") for pod in gateway_apps
        )
        # The rotation left one token, not the one the install generated.
        secret = k8s.cluster.object_data("Secret", s.NS, "lbserver-token")
        assert secret is not None
        lines = secret["token"].decode().splitlines()
        assert len(lines) == 1 and lines[0] != initial_token
    # No balancer replica, old or new, refused a heartbeat along the way
    # (the token rotation included).
    assert s.balancer_refusals(k8s) == []
