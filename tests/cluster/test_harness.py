"""The cluster harness itself: it must give pods what a kubelet, cluster DNS
and kube-proxy give them, and so catch the defects that only show up there.
The first test is the one that motivated it: the chart and app of commit
13c0361 (before `enableServiceLinks: false` and before lbserver ignored
service-link variables) crash-loop here exactly as they did in a cluster."""

from __future__ import annotations

import json
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import support as s
from tests.cluster.harness import ClusterHarness
from tests.cluster.harness.images import Bind, Image, image_from_dockerfile, python_image
from tests.cluster.harness.kubelet import Pod

pytestmark = pytest.mark.timeout(240)

INSPECT = "registry.example.com/inspect:1"
# The last commit before this fix: its chart injects service links into the
# balancer pods and its lbserver refuses unknown LBSERVER_* variables.
OLD_COMMIT = "13c0361"


def _old_tree(tmp_path: Path, *paths: str) -> Path:
    """The given paths of the repository at OLD_COMMIT (needs its history)."""
    archive = subprocess.run(
        ["git", "-C", str(s.ROOT), "archive", "--format=tar", OLD_COMMIT, *paths],
        capture_output=True,
        check=False,
    )
    assert archive.returncode == 0, (
        f"git archive {OLD_COMMIT} failed (the test needs the repository's history): "
        f"{archive.stderr.decode()}"
    )
    old = tmp_path / "old"
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(old, filter="data")
    return old


def _report(pod: Pod, container: str | None = None) -> dict[str, Any]:
    for line in pod.container(container).all_logs().splitlines():
        if line.startswith("REPORT "):
            report: dict[str, Any] = json.loads(line[len("REPORT ") :])
            return report
    raise AssertionError(f"no report from {pod.name}:\n{pod.describe()}")


def _pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": spec,
    }


async def _running(k8s: ClusterHarness, namespace: str, name: str) -> Pod:
    def ready() -> Pod | None:
        pod = k8s.cluster.find_pod(namespace, name)
        if pod is not None and any("REPORT " in c.all_logs() for c in pod.containers):
            return pod
        return None

    found: Pod = await k8s.cluster.wait_for(f"pod {name} to report", ready, 30)
    return found


async def test_the_old_chart_and_app_crash_loop_on_service_links(
    k8s: ClusterHarness, tmp_path: Path
) -> None:
    old = _old_tree(tmp_path, "lbserver", "charts")
    image = image_from_dockerfile()
    # The old package in front of the installed one, run by the Dockerfile's
    # entrypoint name (lbserver), as the old image would.
    k8s.cluster.registry.push(
        "registry.example.com/lbserver:old",
        Image(
            entrypoint=(
                "python",
                "-c",
                "import sys; from lbserver.cli import main; sys.exit(main())",
            ),
            cmd=image.cmd,
            env={**image.env, "PYTHONPATH": "/opt/old"},
            user=image.user,
            binds=(*image.binds, Bind(str(old), "/opt/old")),
        ),
    )
    await k8s.sh("kubectl create namespace skywalking")
    await k8s.sh(
        f"helm install lbserver {old}/charts/lbserver -n skywalking "
        "--set image.repository=registry.example.com/lbserver --set image.tag=old"
    )
    with pytest.raises(AssertionError, match="crash-looping") as failure:
        await k8s.cluster.wait_rollout("skywalking", "lbserver", limit=60)
    assert "unknown option 'service_host'" in str(failure.value)


async def test_the_current_app_runs_under_the_old_chart(
    k8s: ClusterHarness, tmp_path: Path
) -> None:
    """The app half of the fix alone: service links present, lbserver ignores them."""
    old = _old_tree(tmp_path, "charts")
    s.push_images(k8s)
    await k8s.sh("kubectl create namespace skywalking")
    await k8s.sh(
        f"helm install lbserver {old}/charts/lbserver -n skywalking "
        f"--set image.repository={s.LBSERVER_REPOSITORY}"
    )
    await k8s.cluster.wait_rollout("skywalking", "lbserver", limit=60)
    pod = k8s.cluster.deployment_pods("skywalking", "lbserver")[0]
    env = pod.container("lbserver").process_env()
    service = k8s.cluster.get("Service", "skywalking", "lbserver")
    assert service is not None
    assert env["LBSERVER_SERVICE_HOST"] == service["spec"]["clusterIP"]
    assert "LBSERVER_PORT_11810_TCP_ADDR" in env


async def test_a_dockerfile_entrypoint_the_chart_does_not_expect_fails(
    k8s: ClusterHarness, tmp_path: Path
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    dockerfile = (s.ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["lbserver"]' in dockerfile
    (context / "Dockerfile").write_text(
        dockerfile.replace('ENTRYPOINT ["lbserver"]', 'ENTRYPOINT ["agent-shim"]')
    )
    await k8s.sh(
        f"docker build -t registry.example.com/lbserver:mismatch {context} && "
        "docker push registry.example.com/lbserver:mismatch"
    )
    await k8s.sh("kubectl create namespace skywalking")
    await k8s.sh(
        "helm install lbserver charts/lbserver -n skywalking "
        "--set image.repository=registry.example.com/lbserver --set image.tag=mismatch"
    )
    with pytest.raises(AssertionError, match="crash-looping") as failure:
        await k8s.cluster.wait_rollout("skywalking", "lbserver", limit=60)
    assert "invalid choice: 'serve'" in str(failure.value)


async def test_an_image_nobody_pushed_is_not_pulled(k8s: ClusterHarness) -> None:
    await k8s.sh("kubectl create namespace skywalking")
    # The chart's default image: not published anywhere.
    await k8s.sh("helm install lbserver charts/lbserver -n skywalking")
    pods = await k8s.cluster.wait_for(
        "balancer pods waiting for their image",
        lambda: [
            p
            for p in k8s.cluster.deployment_pods("skywalking", "lbserver")
            if p.reason == "ErrImagePull"
        ],
        20,
    )
    assert all(not c.log_paths for p in pods for c in p.containers)
    assert any('"ghcr.io/lbserver/lbserver:0.1.0"' in e for e in pods[0].events)
    assert k8s.cluster.rollout_done("skywalking", "lbserver")[0] is False


async def test_pods_get_what_a_kubelet_gives(k8s: ClusterHarness) -> None:
    k8s.cluster.registry.push(INSPECT, python_image("tests.cluster.images.inspect"))
    await k8s.sh("kubectl create namespace lab")
    cluster = k8s.cluster
    await cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "lbserver"},
            "spec": {
                "selector": {"app": "none"},
                "ports": [
                    {"name": "grpclb", "port": 11810, "targetPort": "grpclb"},
                    {"name": "metrics", "port": 11811},
                ],
            },
        },
        "lab",
    )
    await cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "token"},
            "stringData": {"token": "s3cret"},
        },
        "lab",
    )
    reads = ["/etc/token", "/etc/token/token", "/var/run/secrets/kubernetes.io/serviceaccount"]
    container = {
        "name": "main",
        "image": INSPECT,
        "args": [
            *[f"--read={p}" for p in reads],
            "--write=/x",
            "--write=/tmp/x",
            "--resolve=lbserver",
            "--resolve=lbserver.lab.svc.cluster.local",
            "--resolve=nope",
            "--resolve=$(ECHO)",
        ],
        "env": [
            {"name": "FOO", "value": "bar"},
            {"name": "ECHO", "value": "$(FOO)-x"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "CPU",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}},
            },
        ],
        "resources": {"limits": {"cpu": "500m"}},
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
        },
        "volumeMounts": [
            {"name": "token", "mountPath": "/etc/token", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    volumes = [
        {"name": "token", "secret": {"secretName": "token", "defaultMode": 0o440}},
        {"name": "tmp", "emptyDir": {}},
    ]
    await cluster.apply(_pod("plain", {"containers": [container], "volumes": volumes}), "lab")
    await cluster.apply(
        _pod(
            "grouped",
            {
                "enableServiceLinks": False,
                "automountServiceAccountToken": False,
                "securityContext": {"fsGroup": 10001},
                "containers": [container],
                "volumes": volumes,
            },
        ),
        "lab",
    )
    plain = _report(await _running(k8s, "lab", "plain"))
    grouped = _report(await _running(k8s, "lab", "grouped"))
    service_ip = cluster.get("Service", "lab", "lbserver")["spec"]["clusterIP"]  # type: ignore[index]

    # Identity, hostname, $(VAR) expansion, the Downward API.
    assert (plain["uid"], plain["gid"]) == (10001, 10001)
    assert 10001 in grouped["groups"]
    assert plain["hostname"] == "plain"
    assert plain["env"]["ECHO"] == "bar-x" and plain["argv"][-1] == "--resolve=bar-x"
    assert plain["env"]["POD_IP"] == cluster.find_pod("lab", "plain").ip  # type: ignore[union-attr]
    assert plain["env"]["CPU"] == "500"
    # Service links: every ClusterIP Service of the namespace, unless disabled;
    # the API server's always.
    assert plain["env"]["LBSERVER_SERVICE_HOST"] == service_ip
    assert plain["env"]["LBSERVER_SERVICE_PORT_GRPCLB"] == "11810"
    assert plain["env"]["LBSERVER_PORT"] == f"tcp://{service_ip}:11810"
    assert plain["env"]["LBSERVER_PORT_11811_TCP_PROTO"] == "tcp"
    assert not [k for k in grouped["env"] if k.startswith("LBSERVER_")]
    assert "KUBERNETES_SERVICE_HOST" in grouped["env"]
    # A Secret volume is a directory of files (with kubelet's ..data link);
    # 0440 files are readable by the fsGroup only.
    assert "token" in plain["read"]["/etc/token"]["dir"]
    assert "..data" in plain["read"]["/etc/token"]["dir"]
    assert plain["read"]["/etc/token/token"] == {"error": "Permission denied"}
    assert grouped["read"]["/etc/token/token"] == {"text": "s3cret"}
    # The service account token is mounted unless automount is off.
    assert "token" in plain["read"]["/var/run/secrets/kubernetes.io/serviceaccount"]["dir"]
    assert "error" in grouped["read"]["/var/run/secrets/kubernetes.io/serviceaccount"]
    # Read-only root, writable emptyDir.
    assert plain["write"] == {"/x": "Read-only file system", "/tmp/x": "ok"}
    # Cluster DNS with the pod's search path.
    assert plain["resolve"]["lbserver"] == [service_ip]
    assert plain["resolve"]["lbserver.lab.svc.cluster.local"] == [service_ip]
    assert "error" in plain["resolve"]["nope"]


async def test_termination_runs_pre_stop_then_sigterm_then_sigkill(k8s: ClusterHarness) -> None:
    k8s.cluster.registry.push(INSPECT, python_image("tests.cluster.images.inspect"))
    await k8s.sh("kubectl create namespace lab")
    spec = {
        "terminationGracePeriodSeconds": 3,
        "containers": [
            {
                "name": "polite",
                "image": INSPECT,
                "lifecycle": {
                    "preStop": {
                        "exec": {"command": ["sh", "-c", "echo preStop > /proc/1/fd/1; sleep 1"]}
                    }
                },
            },
            {"name": "stubborn", "image": INSPECT, "args": ["--ignore-sigterm"]},
        ],
    }
    await k8s.cluster.apply(_pod("doomed", spec), "lab")
    pod = await _running(k8s, "lab", "doomed")
    await k8s.cluster.wait_for(
        "both containers up", lambda: all("REPORT" in c.all_logs() for c in pod.containers), 20
    )
    await k8s.sh("kubectl -n lab delete pod doomed")
    polite = pod.container("polite").all_logs().splitlines()
    stubborn = pod.container("stubborn")
    # The hook ran before SIGTERM; the polite container stopped on SIGTERM.
    assert polite[-2:] == ["preStop", "SIGTERM"]
    assert pod.container("polite").status.exit_code == 0
    # The other one ignored SIGTERM and was killed at the grace period.
    assert stubborn.all_logs().splitlines()[-1] == "SIGTERM"
    assert stubborn.status.exit_code == 128 + 9
    assert any("SIGKILL" in e for e in pod.events)
