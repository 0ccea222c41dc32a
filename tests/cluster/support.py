"""What the cluster scenarios share: the documentation's code blocks, the
stand-in images under the names the docs use, the official SkyWalking OAP as
its chart renders it, and readers for what the stand-ins recorded."""

from __future__ import annotations

import json
import re
import textwrap
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.harness import ClusterHarness
from tests.cluster.harness.images import image_from_dockerfile, python_image
from tests.cluster.harness.kubelet import Pod
from tests.support.eventually import eventually
from tests.support.skywalking import StandInRecord

ROOT = Path(__file__).resolve().parents[2]
DEPLOYING = ROOT / "docs" / "deploying-with-skywalking.md"
CHART_README = ROOT / "charts" / "lbserver" / "README.md"
README = ROOT / "README.md"
XDS_DOC = ROOT / "docs" / "xds.md"
XDS_BOOTSTRAP = ROOT / "docs" / "xds" / "bootstrap.json"
MANIFESTS = Path(__file__).with_name("manifests")
CI_VALUES = sorted((ROOT / "charts" / "lbserver" / "ci").glob("*-values.yaml"))

LBSERVER_IMAGE = "registry.example.com/lbserver:0.1.0"
LBSERVER_REPOSITORY = "registry.example.com/lbserver"
OAP_IMAGE = "apache/skywalking-oap-server:10.1.0"
APP_IMAGE = "registry.example.com/my-app:1.0.0"
CLIENT_IMAGE = "registry.example.com/grpclb-client:1.0.0"
NS = "skywalking"
TOKEN_FILE = "/etc/lbserver/token/token"

_SEGMENT_ID = re.compile(r"[0-9a-f.]{16,}")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# A fenced block inside a list item: the fence and its body indented alike.
_INDENTED_FENCE = re.compile(
    r"^(?P<indent> *)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```", re.S | re.M
)
_SNIPPET = re.compile(r"<!-- snippet: (?P<name>[\w-]+) -->\s*```yaml\n(?P<body>.*?)```", re.S)


@dataclass(frozen=True)
class CodeBlock:
    language: str
    text: str
    line: int


def code_blocks(path: Path, language: str | None = None) -> list[CodeBlock]:
    text = path.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        if language is None or match.group(1) == language:
            line = text[: match.start()].count("\n") + 1
            blocks.append(CodeBlock(match.group(1), match.group(2), line))
    return blocks


def snippet(path: Path, name: str) -> str:
    for match in _SNIPPET.finditer(path.read_text()):
        if match.group("name") == name:
            return match.group("body")
    raise AssertionError(f"{path} has no snippet {name!r}")


def named_files(*paths: Path) -> dict[str, str]:
    """YAML blocks whose first line is `# NAME.yaml: ...`: the files the docs
    tell the reader to save under that name."""
    files = {}
    for path in paths:
        for block in code_blocks(path, "yaml"):
            first = block.text.splitlines()[0] if block.text else ""
            match = re.match(r"#\s*([\w.-]+\.ya?ml):", first)
            if match:
                files[match.group(1)] = block.text
    return files


def readme_python_client() -> str:
    """The README's grpclb client code (the block that creates `channel`
    with the grpclb service config)."""
    for block in code_blocks(README, "python"):
        if "grpc.insecure_channel" in block.text and "grpclb" in block.text:
            return block.text
    raise AssertionError("README.md has no Python block with a grpclb channel")


def xds_python_client() -> str:
    """docs/xds.md's grpcio code (the Python block, in the bootstrap file's
    list of clients, that creates `channel` on an `xds:///` target), dedented."""
    for match in _INDENTED_FENCE.finditer(XDS_DOC.read_text()):
        body = textwrap.dedent(match.group("body"))
        if match.group("lang") == "python" and "xds:///" in body:
            return body
    raise AssertionError(f"{XDS_DOC} has no Python block with an xds:/// channel")


def checkout_view(work: Path, files: dict[str, str]) -> Path:
    """A working directory like a checkout of the repository (symlinks to its
    top-level entries) plus the files a reader saved from the docs."""
    view = work / "checkout"
    view.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") and entry.name != ".dockerignore":
            continue
        target = view / entry.name
        if not target.exists():
            target.symlink_to(entry)
    for name, text in files.items():
        (view / name).write_text(text)
    return view


# ---------------------------------------------------------------------------
# images


def push_images(
    k8s: ClusterHarness,
    *,
    lbserver: bool = True,
    app_segments: int = 200,
    app_rate: float = 40.0,
) -> None:
    """Stand-ins for the images the docs name (the lbserver image unless the
    test builds and pushes it with the docs' own commands)."""
    registry = k8s.cluster.registry
    if lbserver:
        registry.push(LBSERVER_IMAGE, image_from_dockerfile())
    registry.push(OAP_IMAGE, python_image("tests.cluster.images.oap"))
    registry.push(
        APP_IMAGE,
        python_image(
            "tests.support.skywalking_agent",
            "--segments",
            str(app_segments),
            "--rate",
            str(app_rate),
            "--out",
            "-",
            "--linger",
            "1000000",
            "--name",
            "my-app",
        ),
    )
    registry.push(CLIENT_IMAGE, python_image("tests.cluster.images.grpclb_client"))


async def start_readme_client(
    k8s: ClusterHarness, namespace: str, name: str, calls: int, rate: float
) -> Pod:
    """A pod running the README's grpclb client code (from a ConfigMap made
    of the README's block) for `calls` calls at `rate` per second."""
    return await start_client(
        k8s, namespace, name, calls, rate, "readme-client", readme_python_client()
    )


async def start_client(
    k8s: ClusterHarness,
    namespace: str,
    name: str,
    calls: int,
    rate: float,
    snippet_map: str,
    snippet: str,
    *,
    env: Mapping[str, str] | None = None,
    config_maps: Mapping[str, str] | None = None,
) -> Pod:
    """A pod of the client image making `calls` calls at `rate` per second
    over the channel `snippet` makes (kept in ConfigMap `snippet_map`, made
    once per namespace), with `env` and the existing ConfigMaps
    `config_maps` ({name: mount path}) mounted."""
    mounts = {"snippet": "/snippet", **(config_maps or {})}
    if k8s.cluster.get("ConfigMap", namespace, snippet_map) is None:
        await k8s.cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": snippet_map},
                "data": {"client.py": snippet},
            },
            namespace,
        )
    await k8s.cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "client",
                        "image": CLIENT_IMAGE,
                        "args": [
                            "--snippet=/snippet/client.py",
                            f"--calls={calls}",
                            f"--rate={rate}",
                            f"--name={name}",
                        ],
                        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                        "volumeMounts": [
                            {"name": volume, "mountPath": path} for volume, path in mounts.items()
                        ],
                    }
                ],
                "volumes": [
                    {
                        "name": volume,
                        "configMap": {"name": snippet_map if volume == "snippet" else volume},
                    }
                    for volume in mounts
                ],
            },
        },
        namespace,
    )
    pod = k8s.cluster.find_pod(namespace, name)
    assert pod is not None
    return pod


async def start_xds_client(
    k8s: ClusterHarness, namespace: str, name: str, calls: int, rate: float
) -> Pod:
    """A pod running docs/xds.md's grpcio code as the doc sets it up:
    docs/xds/bootstrap.json as it is in ConfigMap `xds-bootstrap` (made once
    per namespace), mounted into the pod, GRPC_XDS_BOOTSTRAP naming it."""
    if k8s.cluster.get("ConfigMap", namespace, "xds-bootstrap") is None:
        await k8s.cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "xds-bootstrap"},
                "data": {"bootstrap.json": XDS_BOOTSTRAP.read_text()},
            },
            namespace,
        )
    return await start_client(
        k8s,
        namespace,
        name,
        calls,
        rate,
        "xds-client",
        xds_python_client(),
        env={"GRPC_XDS_BOOTSTRAP": "/etc/grpc-xds/bootstrap.json"},
        config_maps={"xds-bootstrap": "/etc/grpc-xds"},
    )


async def install_skywalking(
    k8s: ClusterHarness, replicas: int = 3, manifest: str = "skywalking-oap.yaml"
) -> None:
    """The OAP of the official chart (release skywalking, namespace skywalking),
    as rendered in `manifest` (under manifests/)."""
    cluster = k8s.cluster
    if NS not in cluster.namespaces:
        await cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    for obj in yaml.safe_load_all((MANIFESTS / manifest).read_text()):
        if obj["kind"] == "Deployment":
            obj["spec"]["replicas"] = replicas
        await cluster.apply(obj, NS)
    await cluster.wait_rollout(NS, "skywalking-oap")


async def install_lbserver(k8s: ClusterHarness, *flags: str, name: str = "lbserver") -> None:
    await k8s.sh(
        f"helm install {name} charts/lbserver -n {NS} "
        f"--set image.repository={LBSERVER_REPOSITORY} " + " ".join(flags)
    )
    await k8s.cluster.wait_rollout(NS, name)


async def patch_oap_with_registrar(k8s: ClusterHarness) -> None:
    """The chart README's registrar patch, applied as the README says."""
    view = checkout_view(k8s.work, named_files(CHART_README))
    await k8s.sh(
        f"kubectl -n {NS} patch deployment skywalking-oap --patch-file oap-registrar.yaml",
        cwd=view,
    )
    await k8s.cluster.wait_rollout(NS, "skywalking-oap", limit=120)


async def registered_oap_pods(k8s: ClusterHarness) -> list[Pod]:
    """Applies the registrar patch and waits until lbserver lists every ready
    OAP pod; those pods."""
    await patch_oap_with_registrar(k8s)
    oap = [p for p in k8s.cluster.deployment_pods(NS, "skywalking-oap") if p.ready]
    await wait_backends(k8s, {f"{p.ip}:11800" for p in oap})
    return oap


# ---------------------------------------------------------------------------
# what happened


def oap_pods(k8s: ClusterHarness) -> list[Pod]:
    return [
        p for p in k8s.cluster.all_pods if p.namespace == NS and p.labels.get("component") == "oap"
    ]


def oap_records(k8s: ClusterHarness) -> dict[str, StandInRecord]:
    """What every OAP pod (gone ones too) received, by pod name."""
    records = {}
    for pod in oap_pods(k8s):
        container = pod.container("oap")
        text = container.all_logs()
        path = pod.dir / "oap.record"
        path.write_text(text)
        records[pod.name] = StandInRecord.read(path)
    return records


def segments_by_pod(records: dict[str, StandInRecord]) -> dict[str, Counter[str]]:
    return {name: record.segment_ids() for name, record in records.items()}


def arrived_segments(k8s: ClusterHarness) -> Counter[str]:
    """How often each segment arrived, over every OAP pod (gone ones too)."""
    total: Counter[str] = Counter()
    for counts in segments_by_pod(oap_records(k8s)).values():
        total.update(counts)
    return total


def produced_segments(pod: Pod, container: str = "my-app") -> list[str]:
    """Segment ids an agent app pod printed (`<segment> <trace>` lines)."""
    ids = []
    for line in pod.container(container).all_logs().splitlines():
        parts = line.split()
        if len(parts) == 2 and all(_SEGMENT_ID.fullmatch(p) for p in parts):
            ids.append(parts[0])
    return ids


def client_result(pod: Pod, container: str | None = None) -> dict[str, Any]:
    for line in pod.container(container).all_logs().splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise AssertionError(f"no RESULT from {pod.name}:\n{pod.describe()}")


async def balancer_backends(
    k8s: ClusterHarness, name: str = "lbserver"
) -> dict[str, list[dict[str, Any]]]:
    """Each ready balancer replica's backends of service oap, as
    `lbserver status --json` run inside that replica lists them: {pod: [backend]}."""
    backends = {}
    for pod in k8s.cluster.deployment_pods(NS, name):
        if not pod.ready:
            continue
        code, out = await pod.container("lbserver").exec(
            ["lbserver", "status", "--token-file", TOKEN_FILE, "--json"], limit=30
        )
        assert code == 0, out
        document = json.loads(out)
        backends[pod.name] = [
            b
            for service in document["services"]
            if service["name"] == "oap"
            for b in service["backends"]
        ]
    return backends


async def balancer_views(k8s: ClusterHarness, name: str = "lbserver") -> dict[str, dict[str, str]]:
    """Each balancer replica's backends of service oap: {pod: {address: state}},
    from `lbserver status --json` run inside that replica."""
    return {
        pod: {b["address"]: b["state"] for b in backends}
        for pod, backends in (await balancer_backends(k8s, name)).items()
    }


async def wait_backends(
    k8s: ClusterHarness, expected: set[str], limit: float = 30.0, name: str = "lbserver"
) -> dict[str, dict[str, str]]:
    """Until every ready balancer replica lists exactly `expected` as serving."""
    seen: dict[str, dict[str, str]] = {}

    async def listed() -> dict[str, dict[str, str]] | None:
        nonlocal seen
        views = seen = await balancer_views(k8s, name)
        serving = {
            pod: {a for a, st in view.items() if st == "serving"} for pod, view in views.items()
        }
        return views if views and all(found == expected for found in serving.values()) else None

    return await eventually(
        listed,
        f"balancers to list exactly {sorted(expected)}",
        within=limit,
        interval=1.0,
        detail=lambda: f"{seen}\n{k8s.cluster.describe()}",
    )


REFUSAL_EVENTS = frozenset({"auth failure", "heartbeat rejected", "heartbeat refused"})


def balancer_refusals(k8s: ClusterHarness) -> list[dict[str, Any]]:
    """Every refused Registry call any balancer pod (gone ones too) logged."""
    refusals = []
    for pod in k8s.cluster.all_pods:
        if pod.namespace != NS or pod.labels.get("app.kubernetes.io/component") != "balancer":
            continue
        for line in pod.container("lbserver").all_logs().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") in REFUSAL_EVENTS:
                refusals.append({"pod": pod.name, **event})
    return refusals


async def status_json(k8s: ClusterHarness, *flags: str) -> dict[str, Any]:
    """`lbserver status --json` run inside a balancer pod, as the docs do."""
    result = await k8s.sh(
        f"kubectl -n {NS} exec deploy/lbserver -- lbserver status --token-file {TOKEN_FILE} "
        "--json " + " ".join(flags)
    )
    document: dict[str, Any] = json.loads(result.output)
    return document


def calls_by_oap_pod(k8s: ClusterHarness, name: str) -> Counter[str]:
    """Calls of client `name` that each OAP pod recorded."""
    counts: Counter[str] = Counter()
    for pod_name, segments in segments_by_pod(oap_records(k8s)).items():
        for segment, n in segments.items():
            if segment.startswith(f"{name}-"):
                counts[pod_name] += n
    return counts
