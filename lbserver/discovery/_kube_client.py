"""The optional `kubernetes` client: loading it, and an ApiClient for the API.

`kubernetes` is the extra `lbserver[kubernetes]`: heartbeat-only deployments
and the client libraries do without it. Nothing here imports it until
Kubernetes discovery starts (`load_kubernetes()`), and a missing package is a
`KubernetesConfigError` that says how to install it, so `lbserver serve`
refuses the configuration in one line instead of a traceback.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from lbserver.errors import ConfigError

if TYPE_CHECKING:
    from kubernetes import client as k8s_client

__all__ = [
    "INSTALL_HINT",
    "KubernetesConfigError",
    "KubernetesModules",
    "describe_error",
    "load_kubernetes",
    "make_api_client",
]

INSTALL_HINT: Final = "pip install 'lbserver[kubernetes]'"


class KubernetesConfigError(ConfigError):
    """No usable Kubernetes API configuration (in-cluster or kubeconfig), or
    no `kubernetes` package to talk to the API with."""


@dataclass(frozen=True, slots=True)
class KubernetesModules:
    """The parts of the `kubernetes` package discovery uses.

    Typed as Any: the package is typed in some releases and not in others, and
    may be missing altogether; `mypy --strict` then reads this code the same way
    whatever is installed."""

    client: Any  # kubernetes.client
    config: Any  # kubernetes.config
    watch: Any  # kubernetes.watch


@functools.cache
def load_kubernetes() -> KubernetesModules:
    """The `kubernetes` package, imported on first use (it is slow to import,
    and only Kubernetes discovery needs it). Raises `KubernetesConfigError`
    naming the extra to install when it is missing."""
    try:
        return KubernetesModules(
            client=importlib.import_module("kubernetes.client"),
            config=importlib.import_module("kubernetes.config"),
            watch=importlib.import_module("kubernetes.watch"),
        )
    except ImportError as exc:
        raise KubernetesConfigError(
            "Kubernetes discovery (kubernetes_services) needs the Python package "
            f"'kubernetes', which is not installed ({exc}): {INSTALL_HINT}"
        ) from exc


def make_api_client(kubeconfig: str | None) -> k8s_client.ApiClient:
    """An ApiClient for the Kubernetes API.

    With `kubeconfig`, that file (its current context). Without, the in-cluster
    configuration (the pod's service account); outside a cluster, the default
    kubeconfig (`$KUBECONFIG`, else `~/.kube/config`) when one exists, as kubectl
    does. Raises `KubernetesConfigError` saying what was tried when nothing works.
    """
    kube = load_kubernetes()
    if kubeconfig is not None:
        return _client_from_file(kube, kubeconfig, f"cannot load the kubeconfig {kubeconfig!r}")
    configuration = kube.client.Configuration()
    try:
        kube.config.load_incluster_config(client_configuration=configuration)
    except kube.config.ConfigException as incluster_exc:
        default = _default_kubeconfig()
        if default is None:
            raise KubernetesConfigError(
                "no Kubernetes API configuration: not running in a cluster "
                f"({incluster_exc}) and no kubeconfig given (set the kubeconfig "
                "option, or $KUBECONFIG)"
            ) from incluster_exc
        return _client_from_file(
            kube,
            default,
            f"not running in a cluster ({incluster_exc}), and the default "
            f"kubeconfig {default!r} cannot be loaded",
        )
    client: k8s_client.ApiClient = kube.client.ApiClient(configuration)
    return client


def _client_from_file(kube: KubernetesModules, path: str, problem: str) -> k8s_client.ApiClient:
    """A client from the kubeconfig at `path`; `problem` says what failed."""
    try:
        client: k8s_client.ApiClient = kube.config.new_client_from_config(config_file=path)
    except (kube.config.ConfigException, OSError, ValueError, TypeError) as exc:
        raise KubernetesConfigError(f"{problem}: {exc}") from exc
    return client


def _default_kubeconfig() -> str | None:
    env = os.environ.get("KUBECONFIG", "")
    candidates = [p for p in env.split(os.pathsep) if p] or [os.path.expanduser("~/.kube/config")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


def describe_error(exc: BaseException) -> str:
    """An API failure as a log line shows it: the HTTP status for an API error,
    else the exception's type and message."""
    if isinstance(exc, load_kubernetes().client.ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
