"""Fixtures for the Helm chart tests: a pinned helm (installed by
scripts/install-helm, never skipped), rendering, and Kubernetes schema
validation with kubernetes-validate."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.support.helm import install_helm

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lbserver"

RELEASE = "lbserver"
NAMESPACE = "observability"

# Kubernetes versions every rendered object is validated against: the chart's
# floor (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_FLOOR = "1.27.0"
KUBE_CURRENT = "1.37.0"

# Custom resources have no schema in kubernetes-validate: checked structurally.
CRD_GROUPS = ("monitoring.coreos.com/",)

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Helm:
    binary: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def template(
        self,
        *args: str,
        chart: Path = CHART,
        release: str = RELEASE,
        namespace: str = NAMESPACE,
    ) -> list[Manifest]:
        out = self.run("template", release, str(chart), "--namespace", namespace, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="session")
def helm() -> Helm:
    """The pinned helm, installed by scripts/install-helm (fast when present)."""
    return Helm(install_helm())


def scenario_files() -> list[Path]:
    return sorted((CHART / "ci").glob("*-values.yaml"))


def scenario_name(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[str, list[Manifest]]:
    """Every ci/*-values.yaml scenario rendered once: name -> objects."""
    return {scenario_name(path): helm.template("-f", str(path)) for path in scenario_files()}


def find(objects: Iterable[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def one(objects: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def pod_specs(objects: Iterable[Manifest]) -> list[tuple[str, Manifest]]:
    """(description, pod spec) of every Pod and workload pod template."""
    specs = []
    for obj in objects:
        if obj["kind"] == "Pod":
            specs.append((f"Pod/{obj['metadata']['name']}", obj["spec"]))
        elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append(
                (f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"])
            )
    return specs


def all_containers(spec: Mapping[str, Any]) -> list[Manifest]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def kube_validate(obj: Manifest, versions: Iterable[str] = (KUBE_FLOOR, KUBE_CURRENT)) -> None:
    """Validates one object against the Kubernetes schemas (strict: unknown
    fields fail too); AssertionError naming the object and the problem."""
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes "
                f"{version} at {path or '(top)'}: {err.message}"
            ) from None
        except kubernetes_validate.SchemaNotFoundError as err:
            raise AssertionError(f"no Kubernetes {version} schema: {err.message}") from None
