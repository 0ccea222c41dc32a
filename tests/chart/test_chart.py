"""The Helm chart charts/lbserver: lint, every ci/*-values.yaml scenario
rendered and validated against the Kubernetes schemas, and assertions on the
rendered objects (what the issue requires of a secure, working install)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbserver import __version__
from lbserver.cli import build_parser
from lbserver.config import Config, load_config, option_names

from .conftest import (
    CHART,
    CRD_GROUPS,
    NAMESPACE,
    RELEASE,
    Helm,
    Manifest,
    all_containers,
    find,
    kube_validate,
    one,
    pod_specs,
    scenario_files,
    scenario_name,
)

SCENARIOS = [scenario_name(path) for path in scenario_files()]
FULLNAME = RELEASE  # release "lbserver" of chart "lbserver"
# Options of lbserver's config that the chart sets itself (not in values.config).
CHART_OWNED_OPTIONS = {
    "listen",
    "metrics_listen",
    "registry_listen",
    "auth_token_file",
    "auth_token",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "tls_client_auth",
}


def deployment(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment", FULLNAME)


def balancer_pod(objects: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment(objects)["spec"]["template"]["spec"]
    return spec


def balancer_container(objects: list[Manifest]) -> dict[str, Any]:
    containers = balancer_pod(objects)["containers"]
    assert [c["name"] for c in containers] == ["lbserver"]
    container: dict[str, Any] = containers[0]
    return container


def rendered_config(objects: list[Manifest]) -> dict[str, Any]:
    text = one(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def container_port(container: Manifest, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports[name])


# --- lint and scenarios ------------------------------------------------------


def test_ci_scenarios_cover_the_issue() -> None:
    assert set(SCENARIOS) == {"defaults", "discovery", "tls", "monitoring", "hpa", "gateway"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict(helm: Helm, scenario: str) -> None:
    values = CHART / "ci" / f"{scenario}-values.yaml"
    result = helm.run("lint", "--strict", str(CHART), "-f", str(values), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_is_valid_kubernetes(
    rendered: dict[str, list[Manifest]], scenario: str
) -> None:
    objects = rendered[scenario]
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            check_service_monitor(obj)
        else:
            kube_validate(obj)
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by", "component", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["kind"], key)
        assert labels["helm.sh/chart"] == f"lbserver-{chart_yaml()['version']}"


_RELABEL_KEYS = {
    "sourceLabels",
    "separator",
    "targetLabel",
    "regex",
    "modulus",
    "replacement",
    "action",
}
_RELABEL_ACTIONS = {
    "replace",
    "keep",
    "drop",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
    "keepequal",
    "dropequal",
}
_ENDPOINT_KEYS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "relabelings",
    "metricRelabelings",
    "honorLabels",
}


def check_service_monitor(obj: Manifest) -> None:
    """The subset of the ServiceMonitor CRD (monitoring.coreos.com/v1) the
    chart uses, checked by hand: kubernetes-validate has no CRD schemas."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["kind"] == "ServiceMonitor"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    spec = obj["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert set(spec["namespaceSelector"]) <= {"matchNames", "any"}
    assert all(isinstance(n, str) for n in spec["namespaceSelector"]["matchNames"])
    assert spec["endpoints"]
    duration = re.compile(  # the CRD's pattern for durations
        r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
        r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
    )
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= _ENDPOINT_KEYS, set(endpoint) - _ENDPOINT_KEYS
        assert isinstance(endpoint["port"], str)
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                assert duration.match(endpoint[key]), (key, endpoint[key])
        for key in ("relabelings", "metricRelabelings"):
            for rule in endpoint.get(key, []):
                assert set(rule) <= _RELABEL_KEYS, set(rule) - _RELABEL_KEYS
                assert rule.get("action", "replace").lower() in _RELABEL_ACTIONS


# --- the issue's "must show" ----------------------------------------------------


def test_service_has_a_port_named_grpclb(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["defaults"]
    service = one(objects, "Service", FULLNAME)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    # Cluster DNS publishes _grpclb._tcp.<service> for a port named grpclb.
    assert ports["grpclb"]["port"] == 11810
    assert ports["grpclb"]["protocol"] == "TCP"
    assert container_port(balancer_container(objects), ports["grpclb"]["targetPort"]) == 11810
    assert ports["metrics"]["port"] == 11811
    assert container_port(balancer_container(objects), ports["metrics"]["targetPort"]) == 11811
    pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"].get("clusterIP") != "None"


def test_headless_service_reaches_every_replica(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["defaults"]
    headless = one(objects, "Service", f"{FULLNAME}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in headless["spec"]["ports"]}
    assert ports["grpc"]["port"] == 11810
    # No metrics port: a ServiceMonitor then scrapes each replica once.
    assert "metrics" not in ports


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_role_unless_discovery_is_on(rendered: dict[str, list[Manifest]], scenario: str) -> None:
    objects = rendered[scenario]
    rbac = [
        o
        for o in objects
        if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    discovery = bool(rendered_config(objects).get("kubernetes_services"))
    assert discovery == (scenario == "discovery")
    if not discovery:
        assert rbac == []
        assert balancer_pod(objects)["automountServiceAccountToken"] is False
    one(objects, "ServiceAccount", FULLNAME)
    assert balancer_pod(objects)["serviceAccountName"] == FULLNAME


def test_discovery_role_reads_endpointslices_only(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["discovery"]
    config = rendered_config(objects)
    namespaces = {w["namespace"] for w in config["kubernetes_services"]}
    # The item without a namespace watches the release's.
    assert namespaces == {"skywalking", NAMESPACE}
    roles = find(objects, "Role")
    assert {r["metadata"]["namespace"] for r in roles} == namespaces
    assert not find(objects, "ClusterRole")
    for role in roles:
        assert role["rules"] == [
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["get", "list", "watch"],
            }
        ]
    bindings = find(objects, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == namespaces
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": f"{FULLNAME}-endpointslices",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
    assert balancer_pod(objects)["automountServiceAccountToken"] is True


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_run_as_non_root_with_read_only_root(
    rendered: dict[str, list[Manifest]], scenario: str
) -> None:
    specs = pod_specs(rendered[scenario])
    expected = {f"Deployment/{FULLNAME}", f"Pod/{FULLNAME}-test"}
    if scenario == "gateway":
        expected.add(f"Deployment/{FULLNAME}-agent-shim")
    assert {name for name, _ in specs} == expected
    for name, spec in specs:
        pod_context = spec.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True, name
        assert pod_context.get("runAsUser", 0) != 0, name
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for container in all_containers(spec):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context.get("runAsUser", pod_context["runAsUser"]) != 0, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert not context.get("privileged"), where


def _secret_refs_in_env(container: Manifest) -> list[str]:
    refs = [
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    refs += [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
    return refs


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_token_secret_is_mounted_as_a_file_not_env(
    rendered: dict[str, list[Manifest]], scenario: str
) -> None:
    objects = rendered[scenario]
    pod = balancer_pod(objects)
    container = balancer_container(objects)
    tls_scenario = scenario == "tls"
    secret_name = "skywalking-lbserver-token" if tls_scenario else f"{FULLNAME}-token"
    key = "registration-token" if tls_scenario else "token"
    # The chart creates the Secret unless an existing one is given.
    secrets = find(objects, "Secret")
    if tls_scenario:
        assert secrets == []
    else:
        secret = one(objects, "Secret", secret_name)
        assert secret["type"] == "Opaque"
        assert len(secret["data"]["token"]) >= 40  # base64 of a 40-character token
    volumes = {v["name"]: v for v in pod["volumes"]}
    token_volume = volumes["token"]["secret"]
    assert token_volume["secretName"] == secret_name
    assert token_volume["items"] == [{"key": key, "path": "token"}]
    assert token_volume["defaultMode"] == 0o440
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["token"]["readOnly"] is True
    token_file = f"{mounts['token']['mountPath']}/token"
    assert rendered_config(objects)["auth_token_file"] == token_file
    # Never in the environment, of any container of any pod.
    for name, spec in pod_specs(objects):
        for each in all_containers(spec):
            assert _secret_refs_in_env(each) == [], f"{name}/{each['name']}"
            assert not any("TOKEN" in e["name"] for e in each.get("env", [])), name


def test_auth_disabled_renders_no_token(helm: Helm) -> None:
    objects = helm.template("--set", "auth.enabled=false")
    assert find(objects, "Secret") == []
    assert "auth_token_file" not in rendered_config(objects)
    assert "token" not in {v["name"] for v in balancer_pod(objects)["volumes"]}


def test_explicit_token_restarts_pods_when_changed(helm: Helm) -> None:
    first = helm.template("--set", "auth.token=first-token-0123456789")
    second = helm.template("--set", "auth.token=second-token-0123456789")
    annotation = "checksum/token"

    def checksum(objects: list[Manifest]) -> str:
        value: str = deployment(objects)["spec"]["template"]["metadata"]["annotations"][annotation]
        return value

    assert checksum(first) != checksum(second)


def test_probes_use_grpc_on_the_grpc_port(rendered: dict[str, list[Manifest]]) -> None:
    container = balancer_container(rendered["defaults"])
    port = container_port(container, "grpclb")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]
        assert probe["grpc"] == {"port": port, "service": ""}, kind
        assert "httpGet" not in probe and "tcpSocket" not in probe and "exec" not in probe


def test_tls_probes_fall_back_to_tcp(rendered: dict[str, list[Manifest]]) -> None:
    # Kubelet's gRPC probe cannot speak TLS.
    container = balancer_container(rendered["tls"])
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[kind]["tcpSocket"] == {"port": "grpclb"}, kind
        assert "grpc" not in container[kind]


def test_values_typo_fails_with_a_schema_error(helm: Helm) -> None:
    result = helm.run("template", RELEASE, str(CHART), "--set", "replicaCont=3", check=False)
    assert result.returncode != 0
    assert "schema" in result.stderr
    assert "Additional property replicaCont is not allowed" in result.stderr
    result = helm.run(
        "template", RELEASE, str(CHART), "--set", "config.heartbeat_intervall=3s", check=False
    )
    assert result.returncode != 0
    assert "Additional property heartbeat_intervall is not allowed" in result.stderr


# --- the rest of the chart ----------------------------------------------------


def chart_yaml() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return data


def test_chart_metadata() -> None:
    chart = chart_yaml()
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "lbserver"
    assert chart["appVersion"] == __version__
    assert chart["kubeVersion"] == ">=1.27.0-0"


def test_deployment_defaults(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["defaults"]
    spec = deployment(objects)["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    selector = spec["selector"]["matchLabels"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == selector
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    container = balancer_container(objects)
    assert container["image"] == f"ghcr.io/lbserver/lbserver:{__version__}"
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert container["resources"]["limits"] == {"memory": "512Mi"}
    # Shutdown: preStop sleep, then shutdown_grace, within the grace period.
    (sleep, seconds) = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    grace = load_rendered_config(objects).shutdown_grace
    assert pod["terminationGracePeriodSeconds"] > int(seconds) + grace


def load_rendered_config(objects: list[Manifest]) -> Config:
    """The rendered config file, as `lbserver serve --config` reads it."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "config.yaml"
        path.write_text(one(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"])
        return load_config(path, environ={})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_config_is_accepted_by_lbserver(rendered: dict[str, list[Manifest]], scenario: str) -> None:
    objects = rendered[scenario]
    config = load_rendered_config(objects)
    container = balancer_container(objects)
    assert config.listen == f"0.0.0.0:{container_port(container, 'grpclb')}"
    assert config.metrics_listen == f"0.0.0.0:{container_port(container, 'metrics')}"
    # `lbserver serve --config <the mounted ConfigMap>`
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args.config == f"{mounts['config']}/config.yaml"
    volumes = {v["name"]: v for v in balancer_pod(objects)["volumes"]}
    assert volumes["config"]["configMap"]["name"] == FULLNAME
    # Native grpclb clients dialing the Service's name get service "oap".
    assert config.name_aliases == {FULLNAME: "oap", f"{FULLNAME}-oap": "oap"}


def test_config_schema_lists_every_lbserver_option() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]
    assert config["additionalProperties"] is False
    in_values = set(config["properties"])
    assert in_values.isdisjoint(CHART_OWNED_OPTIONS)
    missing = set(option_names()) - in_values - CHART_OWNED_OPTIONS
    unknown = in_values - set(option_names())
    assert not missing, f"add to values.schema.json properties.config: {sorted(missing)}"
    assert not unknown, f"not lbserver options: {sorted(unknown)}"


def test_schema_rejects_unknown_keys_everywhere() -> None:
    """Every object the chart defines closes its keys (typos fail)."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, path or "(top)"
            for key, child in node["properties"].items():
                walk(child, f"{path}.{key}")
        if "items" in node and isinstance(node["items"], dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "")


def test_tls_scenario_mounts_certificates_and_registry_port(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["tls"]
    config = load_rendered_config(objects)
    container = balancer_container(objects)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config.tls_cert_file == f"{mounts['tls']}/tls.crt"
    assert config.tls_key_file == f"{mounts['tls']}/tls.key"
    assert config.tls_client_ca_file == f"{mounts['client-ca']}/ca.crt"
    assert config.tls_client_auth == "registry"
    assert config.registry_listen == f"0.0.0.0:{container_port(container, 'registry')}"
    volumes = {v["name"]: v for v in balancer_pod(objects)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "lbserver-tls"
    assert volumes["client-ca"]["secret"]["secretName"] == "lbserver-client-ca"
    for name in (FULLNAME, f"{FULLNAME}-headless"):
        ports = {p["name"]: p for p in one(objects, "Service", name)["spec"]["ports"]}
        assert ports["registry"]["port"] == 11812


def test_pod_disruption_budget(rendered: dict[str, list[Manifest]]) -> None:
    for scenario, expected in (("defaults", {"maxUnavailable": 1}), ("hpa", {"minAvailable": 1})):
        objects = rendered[scenario]
        pdb = one(objects, "PodDisruptionBudget", FULLNAME)
        assert (
            pdb["spec"]["selector"]["matchLabels"]
            == deployment(objects)["spec"]["selector"]["matchLabels"]
        )
        assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == expected


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_optional_objects_only_when_asked(
    rendered: dict[str, list[Manifest]], scenario: str
) -> None:
    kinds = {o["kind"] for o in rendered[scenario]}
    assert ("HorizontalPodAutoscaler" in kinds) == (scenario == "hpa")
    assert ("ServiceMonitor" in kinds) == (scenario == "monitoring")
    assert ("NetworkPolicy" in kinds) == (scenario in ("monitoring", "tls"))


def test_hpa_scales_the_deployment(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["hpa"]
    hpa = one(objects, "HorizontalPodAutoscaler", FULLNAME)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    # The HPA owns the replica count.
    assert "replicas" not in deployment(objects)["spec"]
    anti = balancer_pod(objects)["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in anti


def test_service_monitor_scrapes_the_metrics_port(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["monitoring"]
    monitor = one(objects, "ServiceMonitor", FULLNAME)
    service = one(objects, "Service", FULLNAME)
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The headless Service, also selected, has no metrics port: scraped once.
    headless = one(objects, "Service", f"{FULLNAME}-headless")
    assert endpoint["port"] not in {p["name"] for p in headless["spec"]["ports"]}


def _ingress_by_port(policy: Manifest) -> dict[str, list[Any] | None]:
    rules: dict[str, list[Any] | None] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            rules[port["port"]] = rule.get("from")
    return rules


TEST_POD_PEER = {
    "podSelector": {
        "matchLabels": {
            "app.kubernetes.io/name": "lbserver",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "test",
        }
    }
}


def test_network_policy_on_a_shared_grpc_port(rendered: dict[str, list[Manifest]]) -> None:
    """Without a registry port, Registry/Admin share the gRPC port: the policy
    admits clients and registrars alike there (it cannot filter methods)."""
    objects = rendered["monitoring"]
    policy = one(objects, "NetworkPolicy", FULLNAME)
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == deployment(objects)["spec"]["selector"]["matchLabels"]
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = _ingress_by_port(policy)
    assert set(rules) == {"grpclb", "metrics"}
    agents = {"namespaceSelector": {"matchLabels": {"skywalking-agents": "true"}}}
    oap = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "skywalking"}}}
    assert rules["grpclb"] == [agents, oap, TEST_POD_PEER]
    monitoring = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    assert rules["metrics"] == [monitoring]


def test_network_policy_restricts_the_registry_port(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["tls"]
    rules = _ingress_by_port(one(objects, "NetworkPolicy", FULLNAME))
    # BalanceLoad open to every client; Registry/Admin only from the OAP pods
    # (and the test pod); metrics scraped by no one (none configured).
    assert set(rules) == {"grpclb", "registry"}
    assert rules["grpclb"] is None
    (oap, test_pod) = rules["registry"] or []
    assert oap["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "skywalking"}
    assert oap["podSelector"]["matchLabels"] == {"app": "skywalking", "component": "oap"}
    assert test_pod == TEST_POD_PEER


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_test_pod_checks_health_and_status(
    rendered: dict[str, list[Manifest]], scenario: str
) -> None:
    objects = rendered[scenario]
    pod = one(objects, "Pod", f"{FULLNAME}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    # Not a Service endpoint.
    for service in find(objects, "Service"):
        assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    # With the agent-shim gateway, a third checks its Service (test_gateway.py).
    assert set(containers) - {"gateway"} == {"health", "status"}
    assert ("gateway" in containers) == (scenario == "gateway")
    host = f"{FULLNAME}.{NAMESPACE}.svc"
    assert containers["health"]["args"][1] == f"{host}:11810"
    assert "HealthCheckRequest" in containers["health"]["args"][0]
    args = build_parser().parse_args(containers["status"]["args"])
    assert args.command == "status"
    admin_port = 11812 if scenario == "tls" else 11810
    assert args.balancer == f"{host}:{admin_port}"
    assert args.token_file == "/etc/lbserver/token/token"
    if scenario == "tls":
        assert (args.tls_ca, args.tls_cert) == (
            "/etc/lbserver/tls/ca.crt",
            "/etc/lbserver/client/tls.crt",
        )


def test_termination_grace_must_cover_prestop_and_shutdown(helm: Helm) -> None:
    result = helm.run(
        "template", RELEASE, str(CHART), "--set", "terminationGracePeriodSeconds=10", check=False
    )
    assert result.returncode != 0
    assert "terminationGracePeriodSeconds (10) must exceed" in result.stderr
    # Durations with units are understood: 5 + 2 minutes.
    result = helm.run(
        "template", RELEASE, str(CHART), "--set", "config.shutdown_grace=2m", check=False
    )
    assert result.returncode != 0 and "(125 s)" in result.stderr
    helm.template(
        "--set", "config.shutdown_grace=500ms", "--set", "terminationGracePeriodSeconds=6"
    )


def test_tls_needs_a_secret(helm: Helm) -> None:
    result = helm.run("template", RELEASE, str(CHART), "--set", "tls.enabled=true", check=False)
    assert result.returncode != 0
    assert "tls.enabled needs tls.secretName" in result.stderr


def test_notes_tell_each_kind_of_client_where_to_go(helm: Helm, tmp_path: Path) -> None:
    """NOTES.txt rendered (helm template skips it): through `tpl` in a copy
    of the chart."""
    chart = tmp_path / "lbserver"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n'
    )
    objects = helm.template("--show-only", "templates/zz-notes.yaml", chart=chart)
    notes: str = objects[0]["notes"]
    headless = f"{FULLNAME}-headless.{NAMESPACE}.svc:11810"
    service = f"{FULLNAME}.{NAMESPACE}.svc:11810"
    assert f"lbserver register --balancer {headless} --service oap" in notes
    assert "--token-file /etc/lbserver/token/token" in notes
    assert f"agent-shim proxy --listen 127.0.0.1:11800 --balancer {service}" in notes
    assert f"_grpclb._tcp.{FULLNAME}.{NAMESPACE}.svc" in notes
    assert f"dns:///{FULLNAME}.{NAMESPACE}.svc.cluster.local:11800" in notes
    assert f'balanced_channel("{service}", "oap")' in notes
    assert f"helm test {RELEASE}" in notes


EDGE_CASES = {
    "mtls-all-without-client-cert": [
        "tls.enabled=true",
        "tls.secretName=lbserver-tls",
        "tls.clientAuth.enabled=true",
        "tls.clientAuth.mode=all",
    ],
    "mtls-registry-without-client-cert": [
        "tls.enabled=true",
        "tls.secretName=lbserver-tls",
        "tls.clientAuth.enabled=true",
        "networkPolicy.enabled=true",
        "networkPolicy.clients.allowAll=false",
    ],
    "minimal": [
        "serviceAccount.create=false",
        "podDisruptionBudget.enabled=false",
        "tests.enabled=false",
        "podAntiAffinity=none",
        "topologySpreadConstraints=null",
        "lifecycle.preStopSleepSeconds=0",
        "nativeClients.service=",
        "auth.enabled=false",
    ],
    "extras": [
        "image.digest=sha256:" + "a" * 64,
        "listenHost=[::]",
        "autoscaling.enabled=true",
        "autoscaling.targetCPUUtilizationPercentage=null",
        "autoscaling.targetMemoryUtilizationPercentage=75",
        "extraEnv[0].name=GRPC_VERBOSITY",
        "extraEnv[0].value=info",
        "extraVolumes[0].name=extra",
        "extraVolumes[0].emptyDir.medium=Memory",
        "extraVolumeMounts[0].name=extra",
        "extraVolumeMounts[0].mountPath=/extra",
        "priorityClassName=system-cluster-critical",
    ],
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_other_value_combinations_render_valid_objects(helm: Helm, case: str) -> None:
    args = [arg for value in EDGE_CASES[case] for arg in ("--set", value)]
    objects = helm.template(*args)
    for obj in objects:
        kube_validate(obj)
    load_rendered_config(objects)
    tests = find(objects, "Pod")
    container = balancer_container(objects)
    if case == "mtls-all-without-client-cert":
        # Every call needs a client certificate: nothing for `helm test` to run.
        assert tests == []
    elif case == "mtls-registry-without-client-cert":
        # Health on the open port only; Admin needs a certificate.
        assert [c["name"] for c in tests[0]["spec"]["containers"]] == ["health"]
        rules = _ingress_by_port(one(objects, "NetworkPolicy", FULLNAME))
        assert rules["grpclb"] == [TEST_POD_PEER]
        assert rules["registry"] == [TEST_POD_PEER]
    elif case == "minimal":
        assert tests == [] and "lifecycle" not in container
        assert {o["kind"] for o in objects} == {"ConfigMap", "Deployment", "Service"}
        pod = balancer_pod(objects)
        assert pod["serviceAccountName"] == "default"
        assert "affinity" not in pod and "topologySpreadConstraints" not in pod
        assert "name_aliases" not in rendered_config(objects)
    else:
        assert container["image"] == "ghcr.io/lbserver/lbserver@sha256:" + "a" * 64
        assert rendered_config(objects)["listen"] == "[::]:11810"
        hpa = one(objects, "HorizontalPodAutoscaler", FULLNAME)
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["memory"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_service_links_in_the_chart_pods(
    rendered: dict[str, list[Manifest]], scenario: str
) -> None:
    """lbserver reads LBSERVER_* from the environment; a Service named
    lbserver would inject LBSERVER_SERVICE_HOST and friends."""
    for description, spec in pod_specs(rendered[scenario]):
        assert spec.get("enableServiceLinks") is False, description


def test_native_clients_service_reaches_balancer_and_backends(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["defaults"]
    native = one(objects, "Service", f"{FULLNAME}-oap")
    ports = {p["name"]: p for p in native["spec"]["ports"]}
    # SRV _grpclb._tcp.<name>: the balancer's named port.
    container = balancer_container(objects)
    assert ports["grpclb"]["targetPort"] == "grpclb"
    assert ports["grpclb"]["port"] == 11810
    assert container_port(container, "grpclb") == 11810
    # The name's address: the backends' named port (a name, so that the
    # balancer pods, which have no port of that name, get none of it).
    assert ports["grpc"] == {"name": "grpc", "port": 11800, "targetPort": "grpc", "protocol": "TCP"}
    assert "grpc" not in {p["name"] for p in container["ports"]}
    # It selects the balancer pods by the label they carry.
    labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert native["spec"]["selector"].items() <= labels.items()
    # Clients dialing it get the service "oap".
    assert rendered_config(objects)["name_aliases"][f"{FULLNAME}-oap"] == "oap"


def test_previous_tokens_follow_the_current_one_in_the_secret(helm: Helm) -> None:
    objects = helm.template(
        "--set", "auth.token=new-token-0123456789", "--set", "auth.previousTokens={old-token-0123}"
    )
    secret = one(objects, "Secret", f"{FULLNAME}-token")
    assert base64.b64decode(secret["data"]["token"]).decode() == (
        "new-token-0123456789\nold-token-0123"
    )
    with_old = helm.template("--set", "auth.token=new-token-0123456789")
    annotation = "checksum/token"

    def checksum(found: list[Manifest]) -> str:
        value: str = deployment(found)["spec"]["template"]["metadata"]["annotations"][annotation]
        return value

    # Dropping the previous token restarts the balancers (they then refuse it).
    assert checksum(objects) != checksum(with_old)
