"""The Dockerfile, checked statically (no Docker engine runs in CI): a
multi-stage build on a pinned slim Python base, no build tools in the final
stage, a non-root user that matches the chart, `lbserver` as the entrypoint,
and a build context (.dockerignore) that holds what the build copies."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field

import pytest
import yaml

from .conftest import CHART, ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|dnf|yum|gcc|g\+\+|cc|make|build-essential|pip3? install|"
    r"python3? -m pip install|curl|wget)\b"
)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and stages: (KEYWORD, arguments) with continuation lines
    joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            words = args.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())[1]


def test_multi_stage_on_a_pinned_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    for stage in stages:
        # A full version, never a floating tag: python:3.11.<patch>-slim-<debian>.
        assert re.fullmatch(r"python:3\.11\.\d+-slim-(bookworm|trixie)", stage.base), stage.base
    assert len({stage.base for stage in stages}) == 1, "build and runtime share the base"


def test_build_stage_installs_into_a_venv_without_pip(stages: list[Stage]) -> None:
    (command,) = stages[0].all("RUN")
    assert "python -m venv --without-pip /opt/venv" in command
    # pip's --python is a general option: it must come before `install`.
    assert "python -m pip --python /opt/venv/bin/python install" in command
    assert "/opt/venv/bin/lbserver --version" in command


def test_final_stage_has_no_build_tools(stages: list[Stage]) -> None:
    build, final = stages[0], stages[-1]
    copies = final.all("COPY")
    assert copies == [f"--from={build.name} /opt/venv /opt/venv"], copies
    for command in final.all("RUN"):
        assert not BUILD_TOOLS.search(command), command
    # The base's own pip and setuptools go too.
    assert any("pip uninstall --yes" in c and "setuptools" in c for c in final.all("RUN"))
    assert "/opt/venv/bin" in " ".join(final.all("ENV"))


def test_runs_as_the_charts_non_root_user(stages: list[Stage]) -> None:
    final = stages[-1]
    users = final.all("USER")
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it.
    assert uid.isdigit() and gid.isdigit()
    assert int(uid) != 0 and int(gid) != 0
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    # Nothing is written at run time (read-only root filesystem).
    assert "PYTHONDONTWRITEBYTECODE=1" in " ".join(final.all("ENV"))


def test_entrypoint_and_ports(stages: list[Stage]) -> None:
    final = stages[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["lbserver"]
    (cmd,) = final.all("CMD")
    assert json.loads(cmd) == ["serve"]
    exposed = {int(port) for line in final.all("EXPOSE") for port in line.split()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert exposed == {values["ports"]["grpc"], values["ports"]["metrics"]} == {11810, 11811}


def test_chart_default_image_is_this_dockerfile() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"docker build -t {values['image']['repository']}:" in DOCKERFILE.read_text()


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the simple patterns used: last match wins,
    `!` re-includes, a directory pattern covers what is below it."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        pattern = pattern.removeprefix("**/")
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))] + parts
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_build_context_has_what_the_build_copies(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore is an allow-list"
    sources = [
        word
        for args in stages[0].all("COPY")
        for word in args.split()[:-1]
        if not word.startswith("--")
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", project["project"]["readme"], *packages} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    for excluded in (".git", "tests", "lbserver/__pycache__", ".tools", "charts"):
        assert _ignored(excluded, patterns), excluded
