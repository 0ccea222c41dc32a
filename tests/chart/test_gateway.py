"""The agent-shim gateway (values `agentShimGateway`): `agent-shim proxy` as
its own Deployment, Service and PodDisruptionBudget that agents use as their
collector. Rendered with helm and checked against the Kubernetes schemas, the
real `agent-shim` command line parser, and the balancer objects it must not
get mixed up with."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from agent_shim.cli import build_parser as shim_parser

from .conftest import (
    CHART,
    KUBE_CURRENT,
    KUBE_FLOOR,
    NAMESPACE,
    RELEASE,
    Helm,
    Manifest,
    find,
    kube_validate,
    one,
)

FULLNAME = RELEASE
GATEWAY = f"{FULLNAME}-agent-shim"
GATEWAY_ADDRESS = f"{GATEWAY}.{NAMESPACE}.svc:11800"
BALANCER_ADDRESS = f"{FULLNAME}.{NAMESPACE}.svc:11810"
COMPONENT = "app.kubernetes.io/component"
ENABLED = ("--set", "agentShimGateway.enabled=true")


def gateway_objects(objects: list[Manifest]) -> list[Manifest]:
    return [o for o in objects if o["metadata"]["labels"].get(COMPONENT) == "agent-shim-gateway"]


def gateway_pod(objects: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    return spec


def gateway_container(objects: list[Manifest]) -> dict[str, Any]:
    containers = gateway_pod(objects)["containers"]
    assert [c["name"] for c in containers] == ["agent-shim"]
    container: dict[str, Any] = containers[0]
    return container


def proxy_args(objects: list[Manifest]) -> Any:
    """The gateway's command line as `agent-shim` parses it."""
    container = gateway_container(objects)
    assert container["command"] == ["agent-shim"]
    args = shim_parser().parse_args(container["args"])
    assert args.command == "proxy"
    return args


def render_error(helm: Helm, *values: str) -> str:
    args = [arg for value in values for arg in ("--set", value)]
    result = helm.run("template", RELEASE, str(CHART), *args, check=False)
    assert result.returncode != 0, f"rendered despite {values}"
    return result.stderr


# --- off by default -----------------------------------------------------------


def test_disabled_by_default_renders_nothing(rendered: dict[str, list[Manifest]]) -> None:
    for scenario, objects in rendered.items():
        if scenario == "gateway":
            continue
        assert gateway_objects(objects) == [], scenario
        assert not [o for o in objects if "agent-shim" in o["metadata"]["name"]], scenario
        test_pod = one(objects, "Pod", f"{FULLNAME}-test")
        assert "gateway" not in {c["name"] for c in test_pod["spec"]["containers"]}


# --- the ci/gateway-values.yaml scenario ----------------------------------------


def test_gateway_deployment_service_and_pdb(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["gateway"]
    kinds = sorted(o["kind"] for o in gateway_objects(objects))
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service"]
    deployment = one(objects, "Deployment", GATEWAY)
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    selector = spec["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "lbserver",
        "app.kubernetes.io/instance": RELEASE,
        COMPONENT: "agent-shim-gateway",
    }
    labels = spec["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    # Its own Service: port 11800 to the container's port named grpc.
    service = one(objects, "Service", GATEWAY)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == selector
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("grpc", 11800, "grpc")
    container = gateway_container(objects)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 11800}
    # No Service of the balancer selects the gateway pods, and the gateway's
    # Service selects no balancer pod (nor the native clients' Service's).
    balancer_labels = one(objects, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    for other in find(objects, "Service"):
        if other["metadata"]["name"] != GATEWAY:
            assert not other["spec"]["selector"].items() <= labels.items(), other["metadata"]
    assert not selector.items() <= balancer_labels.items()
    assert "lbserver.io/grpclb-service" not in labels
    pdb = one(objects, "PodDisruptionBudget", GATEWAY)
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    anti = gateway_pod(objects)["affinity"]["podAntiAffinity"]
    (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"] == selector


def test_gateway_runs_agent_shim_proxy_against_the_balancer_service(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["gateway"]
    container = gateway_container(objects)
    assert (
        container["image"]
        == one(objects, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
    )
    args = proxy_args(objects)
    assert args.listen == "0.0.0.0:11800"
    assert args.balancer == [[BALANCER_ADDRESS]]
    assert args.service == "oap"  # what the registrars register (nativeClients.service)
    assert args.fallback == [["skywalking-oap.skywalking.svc:11800"]]
    assert args.fallback_timeout == 5
    assert args.max_buffer_bytes == 8 * 1024 * 1024
    assert args.no_backend_wait == 5
    assert args.shutdown_grace == 15
    assert (args.log_level, args.log_format) == ("info", "json")
    # The balancer's Service port is the one the gateway dials.
    balancer = one(objects, "Service", FULLNAME)
    assert 11810 in {p["port"] for p in balancer["spec"]["ports"] if p["name"] == "grpclb"}


def test_gateway_needs_no_token_and_no_api_access(rendered: dict[str, list[Manifest]]) -> None:
    """BalanceLoad is open (the token guards Registry and Admin only): the
    gateway mounts no Secret and no service account token."""
    pod = gateway_pod(rendered["gateway"])
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert not [v for v in pod["volumes"] if "secret" in v or "projected" in v]
    container = gateway_container(rendered["gateway"])
    assert not [a for a in container["args"] if "token" in a or "tls" in a]
    assert "env" not in container and "envFrom" not in container
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]


def test_gateway_probes_connect_to_the_gateway_port(rendered: dict[str, list[Manifest]]) -> None:
    container = gateway_container(rendered["gateway"])
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]
        assert probe["tcpSocket"] == {"port": "grpc"}, kind
        assert not {"grpc", "exec", "httpGet"} & set(probe), kind
    # Ready within seconds of starting; one slow answer does not kill it.
    assert container["startupProbe"]["periodSeconds"] == 1
    assert container["livenessProbe"]["failureThreshold"] >= 3


def test_gateway_shutdown_leaves_endpoints_then_finishes_calls(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["gateway"]
    container = gateway_container(objects)
    (sleep, seconds) = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and int(seconds) == 5
    grace = proxy_args(objects).shutdown_grace
    assert gateway_pod(objects)["terminationGracePeriodSeconds"] > int(seconds) + grace


def test_gateway_resources_have_requests_and_a_memory_limit(helm: Helm) -> None:
    container = gateway_container(helm.template(*ENABLED))
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    # No CPU limit: throttling would delay every relayed call.
    assert set(resources["limits"]) == {"memory"}


def test_helm_test_checks_the_gateway_service_speaks_http2(
    rendered: dict[str, list[Manifest]],
) -> None:
    pod = one(rendered["gateway"], "Pod", f"{FULLNAME}-test")
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    gateway = containers["gateway"]
    assert gateway["command"] == ["python", "-c"]
    assert gateway["args"][1:] == [GATEWAY_ADDRESS, "60"]
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True


def _run_check(script: str, target: str, limit: str = "0") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, target, limit],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_helm_test_check_wants_an_http2_server(
    rendered: dict[str, list[Manifest]],
) -> None:
    """The check the test pod runs: a gRPC server passes; a port that
    accepts and resets (a Service without endpoints behind a proxy) or
    refuses fails."""
    pod = one(rendered["gateway"], "Pod", f"{FULLNAME}-test")
    (gateway,) = [c for c in pod["spec"]["containers"] if c["name"] == "gateway"]
    script = gateway["args"][0]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = _run_check(script, f"127.0.0.1:{port}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "answers HTTP/2" in result.stdout
    finally:
        server.stop(0)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        resetting = listener.getsockname()[1]

        def reset_all() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conn.close()

        threading.Thread(target=reset_all, daemon=True).start()
        result = _run_check(script, f"127.0.0.1:{resetting}")
        assert result.returncode == 1, result.stdout
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = closed.getsockname()[1]
    result = _run_check(script, f"127.0.0.1:{refused}")
    assert result.returncode == 1 and "refused" in result.stdout


# --- other values -------------------------------------------------------------


def test_defaults_when_enabled(helm: Helm) -> None:
    objects = helm.template(*ENABLED)
    for obj in gateway_objects(objects):
        kube_validate(obj)
    args = proxy_args(objects)
    assert args.balancer == [[BALANCER_ADDRESS]]
    assert args.service == "oap"
    assert args.fallback == []
    assert args.max_buffer_bytes == 4 * 1024 * 1024
    assert args.shutdown_grace == 10
    pdb = one(objects, "PodDisruptionBudget", GATEWAY)
    assert pdb["spec"]["maxUnavailable"] == 1
    pod = gateway_pod(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "preferredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["podAntiAffinity"]


def test_balanced_service_follows_the_native_clients_service(helm: Helm) -> None:
    renamed = helm.template(*ENABLED, "--set", "nativeClients.service=collector")
    assert proxy_args(renamed).service == "collector"
    unnamed = helm.template(*ENABLED, "--set", "nativeClients.service=")
    assert proxy_args(unnamed).service == "oap"
    explicit = helm.template(
        *ENABLED,
        "--set",
        "nativeClients.service=collector",
        "--set",
        "agentShimGateway.balancedService=oap.skywalking:11800",
    )
    assert proxy_args(explicit).service == "oap.skywalking:11800"


def test_extra_args_come_last_and_numbers_stay_numbers(helm: Helm, tmp_path: Path) -> None:
    # A values file, as operators write them: helm reads its numbers as
    # floats, which must not come out as 4.194304e+06.
    values = tmp_path / "values.yaml"
    values.write_text(
        "agentShimGateway:\n"
        "  enabled: true\n"
        "  maxBufferBytes: 4194304\n"
        "  shutdownGrace: 2.5\n"
        "  noBackendWait: 1\n"
        "  fallback: ['oap-0.oap:11800', '[fd00::1]:11800']\n"
        "  extraArgs: ['--log-level=debug']\n"
    )
    objects = helm.template("-f", str(values))
    container = gateway_container(objects)
    assert "--max-buffer-bytes=4194304" in container["args"]
    assert container["args"][-1] == "--log-level=debug"
    args = proxy_args(objects)
    assert args.max_buffer_bytes == 4194304
    assert args.shutdown_grace == 2.5
    assert args.log_level == "debug"  # the last one wins
    assert args.fallback == [["oap-0.oap:11800"], ["[fd00::1]:11800"]]


def test_placement_and_scaling_values(helm: Helm) -> None:
    objects = helm.template(
        *ENABLED,
        "--set",
        "agentShimGateway.replicaCount=4",
        "--set",
        "agentShimGateway.nodeSelector.pool=agents",
        "--set",
        "agentShimGateway.tolerations[0].key=dedicated",
        "--set",
        "agentShimGateway.tolerations[0].operator=Exists",
        "--set",
        "agentShimGateway.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].key=pool",
        "--set",
        "agentShimGateway.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
        "--set",
        "agentShimGateway.podDisruptionBudget.maxUnavailable=2",
        "--set",
        "agentShimGateway.service.type=LoadBalancer",
        "--set",
        "agentShimGateway.podLabels.team=observability",
        "--set",
        "agentShimGateway.podAnnotations.note=gateway",
        "--set",
        "listenHost=[::]",
    )
    for obj in gateway_objects(objects):
        kube_validate(obj)
    deployment = one(objects, "Deployment", GATEWAY)
    assert deployment["spec"]["replicas"] == 4
    pod = gateway_pod(objects)
    assert pod["nodeSelector"] == {"pool": "agents"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    # An explicit affinity replaces the anti-affinity.
    assert set(pod["affinity"]) == {"nodeAffinity"}
    assert one(objects, "PodDisruptionBudget", GATEWAY)["spec"]["maxUnavailable"] == 2
    assert one(objects, "Service", GATEWAY)["spec"]["type"] == "LoadBalancer"
    template = deployment["spec"]["template"]["metadata"]
    assert template["labels"]["team"] == "observability"
    assert template["annotations"] == {"note": "gateway"}
    assert proxy_args(objects).listen == "[::]:11800"

    none = helm.template(
        *ENABLED,
        "--set",
        "agentShimGateway.podAntiAffinity=none",
        "--set",
        "agentShimGateway.podDisruptionBudget.enabled=false",
        "--set",
        "agentShimGateway.preStopSleepSeconds=0",
    )
    assert "affinity" not in gateway_pod(none)
    assert find(none, "PodDisruptionBudget", GATEWAY) == []
    assert "lifecycle" not in gateway_container(none)


def test_a_long_release_name_still_gives_a_valid_service_name(helm: Helm) -> None:
    objects = helm.template(*ENABLED, "--set", "fullnameOverride=" + "a" * 60)
    # The fullname is cut to 54 characters, the gateway's name to 63.
    name = ("a" * 54 + "-agent-shim")[:63]
    assert one(objects, "Deployment", name)["metadata"]["name"] == name
    one(objects, "Service", name)
    one(objects, "PodDisruptionBudget", name)
    for obj in gateway_objects(objects):
        kube_validate(obj)


def test_network_policy_admits_the_gateway_to_the_balancer(helm: Helm) -> None:
    restricted = (
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.clients.allowAll=false",
    )
    objects = helm.template(*ENABLED, *restricted)
    policy = one(objects, "NetworkPolicy", FULLNAME)
    (grpc_rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "grpclb"]
    labels = one(objects, "Deployment", GATEWAY)["spec"]["template"]["metadata"]["labels"]
    selectors = [p["podSelector"]["matchLabels"] for p in grpc_rule["from"] if "podSelector" in p]
    assert any(s.items() <= labels.items() for s in selectors), grpc_rule
    without = one(helm.template(*restricted), "NetworkPolicy", FULLNAME)
    assert "agent-shim-gateway" not in str(without)


def test_notes_give_agents_the_gateway_address(helm: Helm, tmp_path: Path) -> None:
    chart = tmp_path / "lbserver"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n'
    )

    def notes(*args: str) -> str:
        objects = helm.template("--show-only", "templates/zz-notes.yaml", *args, chart=chart)
        text: str = objects[0]["notes"]
        return text

    enabled = notes(*ENABLED)
    assert f"SW_AGENT_COLLECTOR_BACKEND_SERVICES={GATEWAY_ADDRESS}" in enabled
    assert f"rollout status deployment {GATEWAY}" in enabled
    disabled = notes()
    assert GATEWAY_ADDRESS not in disabled
    assert "agentShimGateway.enabled=true" in disabled


# --- refused values -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("agentShimGateway.replicaCont=3", "Additional property replicaCont is not allowed"),
        ("agentShimGateway.service.portt=1", "Additional property portt is not allowed"),
        ("agentShimGateway.probes.startup.exec=x", "Additional property exec is not allowed"),
        ("agentShimGateway.enabled=yes", "agentShimGateway.enabled"),
        ("agentShimGateway.replicaCount=0", "agentShimGateway.replicaCount"),
        ("agentShimGateway.maxBufferBytes=4 MB", "agentShimGateway.maxBufferBytes"),
        ("agentShimGateway.maxBufferBytes=-1", "agentShimGateway.maxBufferBytes"),
        ("agentShimGateway.shutdownGrace=-1", "agentShimGateway.shutdownGrace"),
        ("agentShimGateway.fallback={oap}", "agentShimGateway.fallback"),
        ("agentShimGateway.logLevel=trace", "agentShimGateway.logLevel"),
        ("agentShimGateway.service.type=ExternalName", "agentShimGateway.service.type"),
        ("agentShimGateway.service.port=70000", "agentShimGateway.service.port"),
        ("agentShimGateway.podAntiAffinity=always", "agentShimGateway.podAntiAffinity"),
        ("agentShimGateway.balancedService=two words", "agentShimGateway.balancedService"),
    ],
)
def test_schema_rejects_bad_values(helm: Helm, value: str, message: str) -> None:
    error = render_error(helm, "agentShimGateway.enabled=true", value)
    assert "schema" in error, error
    assert message in error, error


def test_grace_must_cover_prestop_and_shutdown_grace(helm: Helm) -> None:
    error = render_error(
        helm, "agentShimGateway.enabled=true", "agentShimGateway.terminationGracePeriodSeconds=15"
    )
    assert "agentShimGateway.terminationGracePeriodSeconds (15) must exceed" in error
    assert "(15 s)" in error
    # Not checked while the gateway is off.
    helm.template("--set", "agentShimGateway.terminationGracePeriodSeconds=15")


def test_gateway_refuses_a_tls_balancer(helm: Helm) -> None:
    """agent-shim proxy has no TLS options: it could not reach the balancer."""
    error = render_error(
        helm, "agentShimGateway.enabled=true", "tls.enabled=true", "tls.secretName=lbserver-tls"
    )
    assert "agentShimGateway.enabled needs tls.enabled=false" in error


# --- the chart README's example ---------------------------------------------------


def test_readme_gateway_app_sends_to_the_rendered_gateway_service(helm: Helm) -> None:
    """my-gateway-app.yaml of the chart README: a valid Deployment whose
    agent's collector is the gateway Service the chart renders for the
    README's release (lbserver in namespace skywalking)."""
    text = (CHART / "README.md").read_text()
    match = re.search(r"```yaml\n(# my-gateway-app\.yaml:.*?)```", text, re.S)
    assert match, "the chart README has no my-gateway-app.yaml block"
    app = yaml.safe_load(match.group(1))
    for version in (KUBE_FLOOR, KUBE_CURRENT):
        kube_validate(app, (version,))
    pod = app["spec"]["template"]["spec"]
    assert "initContainers" not in pod  # no sidecar
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    collector = env["SW_AGENT_COLLECTOR_BACKEND_SERVICES"]
    objects = helm.template(*ENABLED, namespace="skywalking")
    service = one(objects, "Service", GATEWAY)
    (port,) = service["spec"]["ports"]
    assert collector == f"{GATEWAY}.skywalking.svc:{port['port']}"
    # The README's commands enable it the same way.
    assert "--set agentShimGateway.enabled=true" in text
    assert f"rollout status deployment {GATEWAY}" in text
    assert "**Sizing** (bench/proxy" in text and "docs/benchmarks.md" in text
