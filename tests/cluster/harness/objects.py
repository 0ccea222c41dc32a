"""Kubernetes object rules the harness applies as the real components do:
label selectors, strategic-merge patches, resource quantities, the names of
service-link variables, `$(VAR)` expansion and the Downward API."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

Obj = dict[str, Any]


class ObjectError(ValueError):
    """An object the API server or a controller would refuse."""


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    result: Mapping[str, Any] = obj.get("metadata") or {}
    return result


def name_of(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("name", ""))


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict(meta(obj).get("labels") or {})


def annotations_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict(meta(obj).get("annotations") or {})


# ---------------------------------------------------------------------------
# label selectors


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector ({matchLabels, matchExpressions}); None/empty matches all."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def service_selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """A Service's plain map selector; a Service without one selects nothing."""
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------
# strategic merge patch (the keys Kubernetes' own structs declare for pods)

_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    """Applies a strategic-merge patch as `kubectl patch` (the default type) does."""
    if isinstance(patch, Mapping) and isinstance(original, Mapping):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        if patch.get("$patch") == "delete":
            return None
        result = dict(copy.deepcopy(original))
        for key, value in patch.items():
            if key.startswith("$"):
                continue
            if value is None:
                result.pop(key, None)
            elif key in result:
                merged = strategic_merge(result[key], value, key)
                if merged is None:
                    result.pop(key, None)
                else:
                    result[key] = merged
            else:
                result[key] = _strip_directives(copy.deepcopy(value))
        return result
    if isinstance(patch, list) and isinstance(original, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        result_list = [copy.deepcopy(item) for item in original]
        for item in patch:
            if not isinstance(item, Mapping) or key not in item:
                raise ObjectError(f"patch of {field}: every item needs its merge key {key!r}")
            index = next((i for i, o in enumerate(result_list) if o.get(key) == item[key]), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    del result_list[index]
            elif index is None:
                result_list.append(_strip_directives(copy.deepcopy(dict(item))))
            else:
                result_list[index] = strategic_merge(result_list[index], item, field)
        return result_list
    return _strip_directives(copy.deepcopy(patch))


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# quantities

_SUFFIX = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(n|u|m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


def quantity(value: Any) -> Decimal:
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ObjectError(f"quantities must match the regular expression, got {value!r}")
    return Decimal(match.group(1)) * _SUFFIX[match.group(2) or ""]


def resource_field(
    container: Mapping[str, Any], resource: str, divisor: Any, node: Mapping[str, Decimal]
) -> str:
    """The Downward API's resourceFieldRef: limits fall back to the node's
    allocatable, requests to 0; the value is divided and rounded up."""
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage"):
        raise ObjectError(f"resourceFieldRef: unsupported resource {resource!r}")
    section = (container.get("resources") or {}).get(kind) or {}
    if name in section:
        amount = quantity(section[name])
    elif kind == "limits":
        amount = node[name]
    else:
        amount = Decimal(0)
    div = quantity(divisor or "1")
    return str(math.ceil(amount / div))


# ---------------------------------------------------------------------------
# environment


def env_name(service_name: str) -> str:
    """kubelet's makeEnvVariableName."""
    return service_name.upper().replace("-", "_")


def service_link_env(service: Mapping[str, Any]) -> dict[str, str]:
    """The variables kubelet injects for one Service with a cluster IP
    (pkg/kubelet/envvars FromServices)."""
    spec = service.get("spec") or {}
    ip = spec.get("clusterIP")
    if not ip or ip == "None":
        return {}
    name = env_name(name_of(service))
    ports = spec.get("ports") or []
    env: dict[str, str] = {f"{name}_SERVICE_HOST": ip}
    if ports:
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
    for port in ports:
        if port.get("name"):
            env[f"{name}_SERVICE_PORT_{env_name(port['name'])}"] = str(port["port"])
    for i, port in enumerate(ports):
        proto = str(port.get("protocol", "TCP"))
        url = f"{proto.lower()}://{ip}:{port['port']}"
        prefix = f"{name}_PORT_{port['port']}_{proto.upper()}"
        if i == 0:
            env[f"{name}_PORT"] = url
        env[prefix] = url
        env[f"{prefix}_PROTO"] = proto.lower()
        env[f"{prefix}_PORT"] = str(port["port"])
        env[f"{prefix}_ADDR"] = ip
    return env


_REF = re.compile(r"\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)|\$\$")


def expand(text: str, env: Mapping[str, str]) -> str:
    """`$(VAR)` expansion: known names are replaced, `$$` is a `$`, unknown
    references stay as written (k8s.io/kubernetes third_party expansion)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _REF.sub(replace, text)


def split_image(ref: str) -> tuple[str, str]:
    """(repository, tag or @digest) of an image reference; tag defaults to latest."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, "@" + digest
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = ref.rpartition(":")
        return repo, tag
    return ref, "latest"
