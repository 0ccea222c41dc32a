"""The chart's ci/ scenarios that change how lbserver runs, installed and
used as the chart README describes:

- ci/discovery-values.yaml: membership of `oap` from the EndpointSlices of
  skywalking-oap (mode both), read through the in-cluster API with the
  chart's ServiceAccount and Role (the harness API server enforces the
  rendered RBAC);
- ci/tls-values.yaml: TLS on the gRPC port, mTLS for Registry and Admin on
  their own port, the token from an existing Secret; `helm test` and
  registrars with the flags the chart README names for TLS."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trustme
import yaml

from tests.cluster import support as s
from tests.cluster.harness import ClusterHarness
from tests.cluster.harness.objects import strategic_merge
from tests.support.eventually import eventually

pytestmark = pytest.mark.timeout(300)


def _events(k8s: ClusterHarness, deployment: str = "lbserver") -> list[dict[str, Any]]:
    events = []
    for pod in k8s.cluster.deployment_pods(s.NS, deployment):
        for line in pod.container("lbserver").all_logs().splitlines():
            try:
                events.append({"pod": pod.name, **json.loads(line)})
            except json.JSONDecodeError:
                continue
    return events


async def test_discovery_values(k8s: ClusterHarness) -> None:
    s.push_images(k8s)
    await s.install_skywalking(k8s)
    await s.install_lbserver(k8s, "-f charts/lbserver/ci/discovery-values.yaml")
    oap = await s.registered_oap_pods(k8s)
    # lbserver watched the EndpointSlices through the API server, allowed by
    # the chart's Role (a missing or wrong rule answers 403).
    api = k8s.cluster.api
    assert api is not None
    watches = [r for r in api.requests if r.watch and "/namespaces/skywalking/" in r.path]
    assert watches, "lbserver never watched EndpointSlices"

    # A backend that is not a ready endpoint of skywalking-oap may not register.
    intruder = yaml.safe_load(s.snippet(s.CHART_README, "oap-registrar"))["spec"]["template"][
        "spec"
    ]
    registrar = next(c for c in intruder["containers"] if c["name"] == "lbserver-registrar")
    await k8s.cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "intruder"},
            "spec": {
                "containers": [
                    {
                        "name": "register",
                        "image": s.LBSERVER_IMAGE,
                        "args": [
                            "register",
                            "--balancer=lbserver-headless.skywalking.svc:11810",
                            "--service=oap",
                            "--backend=$(POD_IP):11800",
                            "--token-file=/etc/lbserver/token/token",
                            "--probe=none",
                        ],
                        "env": [
                            {
                                "name": "POD_IP",
                                "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                            }
                        ],
                        "volumeMounts": registrar["volumeMounts"],
                    }
                ],
                "volumes": intruder["volumes"],
            },
        },
        s.NS,
    )
    pod = k8s.cluster.find_pod(s.NS, "intruder")
    assert pod is not None
    await k8s.cluster.wait_for(
        "both replicas to refuse the intruder",
        lambda: (
            {
                e["pod"]
                for e in _events(k8s)
                if e.get("event") == "heartbeat refused" and pod.ip in str(e.get("peer"))
            }
            == {p.name for p in k8s.cluster.deployment_pods(s.NS, "lbserver")}
        ),
        30,
    )
    views = await s.balancer_views(k8s)
    assert all(f"{pod.ip}:11800" not in view for view in views.values()), views

    # A terminating OAP pod leaves every list at once (its endpoint is no
    # longer ready), long before its preStop sleep and drain end.
    leaving = oap[0]
    await k8s.sh(f"kubectl -n {s.NS} delete pod {leaving.name} --wait=false")
    gone, others = f"{leaving.ip}:11800", {f"{p.ip}:11800" for p in oap[1:]}

    async def left() -> dict[str, set[str]] | None:
        # What each replica lists (entries in its server list): the others
        # still, the terminating pod no more. A replacement the Deployment
        # starts meanwhile may join; its registration state is beside the point.
        listed = {
            pod: {b["address"] for b in backends if b["list_entries"]}
            for pod, backends in (await s.balancer_backends(k8s)).items()
        }
        ok = listed and all(others <= found and gone not in found for found in listed.values())
        return listed if ok else None

    await eventually(left, "the terminating pod out of every list", within=5, interval=0.5)
    assert not leaving.gone.is_set()


def _tls_secret(name: str, cert: trustme.LeafCert, ca: trustme.CA) -> dict[str, Any]:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name},
        "data": {
            "tls.crt": b64(cert.cert_chain_pems[0].bytes()),
            "tls.key": b64(cert.private_key_pem.bytes()),
            "ca.crt": b64(ca.cert_pem.bytes()),
        },
    }


async def _tls_secrets(k8s: ClusterHarness) -> trustme.CA:
    """The Secrets ci/tls-values.yaml names, and one for the registrars."""
    ca = trustme.CA()
    # The names the chart README says the certificate should carry.
    server = ca.issue_cert(
        "lbserver",
        "lbserver.skywalking.svc",
        "lbserver.skywalking.svc.cluster.local",
        "lbserver-headless.skywalking.svc",
        "lbserver-headless.skywalking.svc.cluster.local",
    )
    client = ca.issue_cert("oap-registrar")
    for secret in (
        _tls_secret("lbserver-tls", server, ca),
        _tls_secret("lbserver-test-client", client, ca),
        _tls_secret("oap-lbserver-client", client, ca),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "lbserver-client-ca"},
            "data": {"ca.crt": base64.b64encode(ca.cert_pem.bytes()).decode()},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "skywalking-lbserver-token"},
            "stringData": {"registration-token": "tls-scenario-token"},
        },
    ):
        await k8s.cluster.apply(secret, s.NS)
    return ca


SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"},
        "scope": "Namespaced",
        "versions": [{"name": "v1", "served": True, "storage": True}],
    },
}


@pytest.mark.parametrize(
    "scenario", sorted(p.name.removesuffix("-values.yaml") for p in s.CI_VALUES)
)
async def test_every_ci_scenario_installs_and_passes_helm_test(
    k8s: ClusterHarness, scenario: str
) -> None:
    s.push_images(k8s)
    await k8s.sh(f"kubectl create namespace {s.NS}")
    if scenario == "tls":
        await _tls_secrets(k8s)
    if scenario == "monitoring":
        # The Prometheus Operator's CRD: without it the install fails, as in
        # a cluster without the operator.
        failed = await k8s.sh(
            f"helm install lbserver charts/lbserver -n {s.NS} "
            f"--set image.repository={s.LBSERVER_REPOSITORY} "
            "-f charts/lbserver/ci/monitoring-values.yaml",
            check=False,
        )
        assert failed.code != 0 and "ensure CRDs are installed first" in failed.output
        await k8s.cluster.apply(SERVICE_MONITOR_CRD)
    await s.install_lbserver(k8s, f"-f charts/lbserver/ci/{scenario}-values.yaml")
    await k8s.sh(f"helm test lbserver -n {s.NS}")
    assert s.balancer_refusals(k8s) == []


async def test_tls_values(k8s: ClusterHarness) -> None:
    s.push_images(k8s)
    await s.install_skywalking(k8s)
    await _tls_secrets(k8s)
    await s.install_lbserver(k8s, "-f charts/lbserver/ci/tls-values.yaml")
    await k8s.sh(f"helm test lbserver -n {s.NS}")

    # The registrar patch with what the chart README adds for mTLS: the CA,
    # the client certificate and the registry port.
    patch = yaml.safe_load(s.snippet(s.CHART_README, "oap-registrar"))
    registrar = next(
        c
        for c in patch["spec"]["template"]["spec"]["containers"]
        if c["name"] == "lbserver-registrar"
    )
    registrar["args"] = [
        "--balancer=lbserver-headless.skywalking.svc:11812"
        if a.startswith("--balancer=")
        else "--token-file=/etc/lbserver/token/token"
        if a.startswith("--token-file=")
        else a
        for a in registrar["args"]
    ] + [
        "--tls-ca=/etc/lbserver/client/ca.crt",
        "--tls-cert=/etc/lbserver/client/tls.crt",
        "--tls-key=/etc/lbserver/client/tls.key",
    ]
    registrar["volumeMounts"].append(
        {"name": "lbserver-client", "mountPath": "/etc/lbserver/client", "readOnly": True}
    )
    volumes = patch["spec"]["template"]["spec"]["volumes"]
    volumes[0]["secret"] = {
        "secretName": "skywalking-lbserver-token",
        "defaultMode": 0o444,
        "items": [{"key": "registration-token", "path": "token"}],
    }
    volumes.append(
        {
            "name": "lbserver-client",
            "secret": {"secretName": "oap-lbserver-client", "defaultMode": 0o444},
        }
    )
    deployment = k8s.cluster.get("Deployment", s.NS, "skywalking-oap")
    assert deployment is not None
    await k8s.cluster.apply(strategic_merge(deployment, patch), s.NS)
    await k8s.cluster.wait_rollout(s.NS, "skywalking-oap", limit=120)
    oap = [p for p in k8s.cluster.deployment_pods(s.NS, "skywalking-oap") if p.ready]

    def joined() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for event in _events(k8s):
            if event.get("event") == "backend joined":
                found.setdefault(event["pod"], set()).add(event["address"])
        return found

    expected = {f"{p.ip}:11800" for p in oap}
    balancers = {p.name for p in k8s.cluster.deployment_pods(s.NS, "lbserver")}
    await k8s.cluster.wait_for(
        "every replica to accept every OAP pod over mTLS",
        lambda: (
            {name: joined().get(name, set()) >= expected for name in balancers}
            == dict.fromkeys(balancers, True)
        ),
        30,
    )
    assert s.balancer_refusals(k8s) == []
