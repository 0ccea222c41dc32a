"""The copy-paste snippets of charts/lbserver/README.md: the registrar
sidecar patch for the official SkyWalking chart's OAP Deployment and the
agent-shim sidecar for application pods. Each is applied or taken as it is,
validated against the Kubernetes schemas, its command line parsed by the real
CLI, and checked against the names the chart renders for the README's
release (`lbserver` in namespace `skywalking`)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from agent_shim.cli import build_parser as shim_parser
from lbserver.cli import build_parser as lbserver_parser

from .conftest import CHART, KUBE_CURRENT, KUBE_FLOOR, Helm, Manifest, kube_validate, one

README = CHART / "README.md"
SNIPPET = re.compile(r"<!-- snippet: (?P<name>[\w-]+) -->\s*```yaml\n(?P<body>.*?)```", re.S)
# Native sidecars (restartPolicy on an init container) need Kubernetes 1.28+.
KUBE_NATIVE_SIDECARS = "1.29.0"

# What the official SkyWalking chart (apache/skywalking-helm) renders for the
# OAP of release "skywalking": Deployment skywalking-oap, container "oap"
# with ports grpc 11800 and rest 12800 (trimmed to what the patch touches).
OFFICIAL_OAP_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: skywalking-oap
  namespace: skywalking
  labels: {app: skywalking, component: oap, release: skywalking}
spec:
  replicas: 2
  selector:
    matchLabels: {app: skywalking, component: oap, release: skywalking}
  template:
    metadata:
      labels: {app: skywalking, component: oap, release: skywalking}
    spec:
      serviceAccountName: skywalking-oap
      containers:
        - name: oap
          image: apache/skywalking-oap-server:10.2.0
          imagePullPolicy: IfNotPresent
          ports:
            - {containerPort: 11800, name: grpc}
            - {containerPort: 12800, name: rest}
          livenessProbe:
            tcpSocket: {port: 12800}
            initialDelaySeconds: 15
            periodSeconds: 20
          resources:
            limits: {cpu: "2", memory: 4Gi}
            requests: {cpu: "1", memory: 4Gi}
          env:
            - {name: JAVA_OPTS, value: "-Xmx2g -Xms2g"}
            - {name: SW_CLUSTER, value: kubernetes}
            - {name: SW_STORAGE, value: banyandb}
"""

# Lists merged by name in a strategic-merge patch (others are replaced).
MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes", "volumeMounts"}


def snippets() -> dict[str, Any]:
    found = {m["name"]: yaml.safe_load(m["body"]) for m in SNIPPET.finditer(README.read_text())}
    assert set(found) == {"oap-registrar", "agent-shim"}, set(found)
    return found


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """kubectl's strategic merge for the fields the snippets touch."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for k, v in patch.items():
            merged[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_BY_NAME:
        by_name = {item["name"]: item for item in base}
        out = [
            strategic_merge(item, next((p for p in patch if p["name"] == item["name"]), {}))
            for item in base
        ]
        out += [copy.deepcopy(p) for p in patch if p["name"] not in by_name]
        return out
    return copy.deepcopy(patch)


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], arg)


def containers_by_name(spec: Manifest, key: str = "containers") -> dict[str, Manifest]:
    return {c["name"]: c for c in spec.get(key, [])}


INSTALL = re.compile(r"^helm install lbserver charts/lbserver -n skywalking (?P<flags>.*)$", re.M)


def install_flags() -> list[str]:
    """The flags of the README's `helm install` command."""
    match = INSTALL.search(README.read_text())
    assert match, "the README has no `helm install lbserver charts/lbserver -n skywalking` line"
    return match.group("flags").split("#")[0].split()


@pytest.fixture(scope="module")
def chart(helm: Helm) -> list[Manifest]:
    """The chart as the README installs it: release lbserver, namespace
    skywalking, with the README's flags (the image it tells to build)."""
    return helm.template(*install_flags(), namespace="skywalking")


def test_readme_has_both_snippets() -> None:
    snippets()


def test_oap_registrar_patch(chart: list[Manifest]) -> None:
    patch = snippets()["oap-registrar"]
    base = yaml.safe_load(OFFICIAL_OAP_DEPLOYMENT)
    merged = strategic_merge(base, patch)
    kube_validate(merged, (KUBE_FLOOR, KUBE_CURRENT))
    pod = merged["spec"]["template"]["spec"]
    containers = containers_by_name(pod)
    assert list(containers) == ["oap", "lbserver-registrar"]
    oap, registrar = containers["oap"], containers["lbserver-registrar"]
    # The OAP keeps what the official chart gave it, plus telemetry and preStop.
    assert oap["image"].startswith("apache/skywalking-oap-server")
    env = {e["name"]: e for e in oap["env"]}
    assert env["SW_STORAGE"]["value"] == "banyandb"
    assert env["SW_TELEMETRY"]["value"] == "prometheus"

    deployment = one(chart, "Deployment", "lbserver")
    assert registrar["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    # The pods become backends of the Service native grpclb clients dial.
    native = one(chart, "Service", "lbserver-oap")
    labels = merged["spec"]["template"]["metadata"]["labels"]
    assert native["spec"]["selector"].items() <= labels.items()
    backend_port = next(p for p in native["spec"]["ports"] if p["name"] != "grpclb")
    assert backend_port["targetPort"] in {p["name"] for p in oap["ports"]}
    values = {"POD_IP": "10.0.0.7", "OAP_CPU_LIMIT": "2000"}
    args = lbserver_parser().parse_args([expand(a, values) for a in registrar["args"]])
    assert args.command == "register"
    assert args.service == "oap"
    # The headless Service: every replica gets every heartbeat.
    headless = one(chart, "Service", "lbserver-headless")
    assert headless["spec"]["clusterIP"] == "None"
    port = {p["name"]: p["port"] for p in headless["spec"]["ports"]}["grpc"]
    assert args.balancer == [[f"lbserver-headless.skywalking.svc:{port}"]]
    # The pod IP and the OAP's grpc port (what Kubernetes discovery accepts).
    grpc_port = {p["name"]: p["containerPort"] for p in oap["ports"]}["grpc"]
    assert args.backend == ("10.0.0.7", grpc_port)
    registrar_env = {e["name"]: e["valueFrom"] for e in registrar["env"]}
    assert registrar_env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # --cpus: the OAP container's CPU limit, in millicores.
    assert registrar_env["OAP_CPU_LIMIT"]["resourceFieldRef"] == {
        "containerName": "oap",
        "resource": "limits.cpu",
        "divisor": "1m",
    }
    assert args.cpus == 2.0
    assert args.load_url == "http://127.0.0.1:1234/metrics"
    # The token: the chart's Secret, mounted as a file, not in the environment.
    secret = one(chart, "Secret", "lbserver-token")
    mounts = {m["name"]: m["mountPath"] for m in registrar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    token_volume = volumes["lbserver-token"]["secret"]
    assert token_volume["secretName"] == secret["metadata"]["name"]
    (item,) = token_volume["items"]
    assert item["key"] in secret["data"]
    assert args.token_file == f"{mounts['lbserver-token']}/{item['path']}"
    assert not any("secretKeyRef" in e["valueFrom"] for e in registrar["env"])
    # Drain: the OAP keeps serving while clients move away, within the grace.
    (sleep, seconds) = oap["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    assert int(seconds) >= args.drain_seconds > 0
    assert pod["terminationGracePeriodSeconds"] > int(seconds) + args.drain_seconds
    context = registrar["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["allowPrivilegeEscalation"] is False


def test_agent_shim_sidecar(chart: list[Manifest]) -> None:
    deployment = snippets()["agent-shim"]
    kube_validate(deployment, (KUBE_NATIVE_SIDECARS, KUBE_CURRENT))
    pod = deployment["spec"]["template"]["spec"]
    shim = containers_by_name(pod, "initContainers")["agent-shim"]
    # A native sidecar: up before the application, down after it.
    assert shim["restartPolicy"] == "Always"
    assert shim["command"] == ["agent-shim"]
    args = shim_parser().parse_args(shim["args"])
    assert args.command == "proxy"
    assert args.service == "oap"
    # Loopback only: the proxy is not exposed to the network.
    assert args.listen.startswith("127.0.0.1:")
    service = one(chart, "Service", "lbserver")
    port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpclb"]
    assert args.balancer == [[f"lbserver.skywalking.svc:{port}"]]
    assert args.fallback == [["skywalking-oap.skywalking.svc:11800"]]
    assert (
        shim["image"]
        == one(chart, "Deployment", "lbserver")["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
    )
    # The application starts once the proxy accepts connections: an exec
    # probe (a tcpSocket probe would dial the pod IP, not 127.0.0.1).
    probe = shim["startupProbe"]["exec"]["command"]
    assert probe[0] == "agent-shim"
    check = shim_parser().parse_args(probe[1:])
    assert check.command == "check"
    assert "{}:{}".format(*check.address) == args.listen
    (app,) = pod["containers"]
    env = {e["name"]: e["value"] for e in app["env"]}
    # The agent's collector.backend_service is the shim.
    assert env["SW_AGENT_COLLECTOR_BACKEND_SERVICES"] == args.listen
    context = shim["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["capabilities"] == {"drop": ["ALL"]}
