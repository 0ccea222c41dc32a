"""What is written from `Config`: the option table of docs/configuration.md
and the `config` section of the Helm chart's values schema
(charts/lbserver/values.schema.json). `scripts/gen-config-docs` writes them;
with `--check` it fails when either differs from the model (a unit test runs
the check)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lbserver.config._model import ENV_PREFIX, Config

DOC = Path("docs/configuration.md")
CHART_SCHEMA = Path("charts/lbserver/values.schema.json")
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"

# Options the chart sets itself, from its own values (ports, auth, tls), and
# that values.config therefore refuses.
CHART_OWNED_OPTIONS = frozenset(
    {
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
)
# Where the chart means something else than lbserver alone: it turns
# discovery's RBAC on, and fills in the release's namespace.
_CHART_DESCRIPTIONS = {
    ("kubernetes_services",): (
        "Kubernetes discovery; non-empty turns it on (Role + RoleBinding per namespace)"
    ),
    ("kubernetes_services", "items", "properties", "namespace"): (
        "namespace of the Service (default: the release namespace)"
    ),
}


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, dict):
        return "{}"
    return str(value)


def options_table() -> str:
    """The Markdown table of every option: name, variable, default, help."""
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in Config.model_fields.items():
        env = f"{ENV_PREFIX}{name.upper()}"
        default = _default_text(field.default)
        rows.append(f"| `{name}` | `{env}` | `{default}` | {field.description} |")
    return "\n".join(rows)


def _without_titles_and_defaults(node: Any) -> Any:
    """JSON Schema annotations pydantic adds that the chart does without
    (its defaults are values.yaml's, not lbserver's)."""
    if isinstance(node, dict):
        return {
            key: _without_titles_and_defaults(value)
            for key, value in node.items()
            if key not in ("title", "default")
        }
    if isinstance(node, list):
        return [_without_titles_and_defaults(item) for item in node]
    return node


def chart_config_schema() -> dict[str, Any]:
    """The values schema of `config`: the model's JSON Schema without the
    options the chart owns."""
    model = _without_titles_and_defaults(Config.model_json_schema())
    properties = {
        name: schema
        for name, schema in model["properties"].items()
        if name not in CHART_OWNED_OPTIONS
    }
    for path, description in _CHART_DESCRIPTIONS.items():
        node = properties
        for key in path:
            node = node[key]
        node["description"] = description
    return {
        "type": "object",
        "description": "lbserver options (docs/configuration.md) except those the chart sets",
        "additionalProperties": False,
        "properties": properties,
    }


def _doc_text(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{options_table()}\n{END}{tail}"


def _schema_text(text: str) -> str:
    schema = json.loads(text)
    schema["properties"]["config"] = chart_config_schema()
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def generated(root: Path) -> dict[Path, tuple[str, str]]:
    """For each written file under `root`: (what it holds, what it should)."""
    files = {}
    for path, render in ((DOC, _doc_text), (CHART_SCHEMA, _schema_text)):
        current = (root / path).read_text(encoding="utf-8")
        files[root / path] = (current, render(current))
    return files


def main(argv: Sequence[str], root: Path) -> int:
    """Writes both files; with --check, exits 1 naming those that are stale."""
    check = "--check" in argv
    stale = []
    for path, (current, wanted) in generated(root).items():
        if current == wanted:
            continue
        stale.append(path)
        if not check:
            path.write_text(wanted, encoding="utf-8")
            print(f"wrote {path}")
    if check and stale:
        names = ", ".join(str(path.relative_to(root)) for path in stale)
        print(f"stale: {names}: run scripts/gen-config-docs and commit", file=sys.stderr)
        return 1
    if check:
        print("configuration reference and chart schema are fresh")
    return 0
