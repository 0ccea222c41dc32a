"""lbserver without the optional `kubernetes` package (the extra
`lbserver[kubernetes]`): everything but Kubernetes discovery works, and a
configuration that asks for that discovery is refused at start, saying what to
install.

The processes run with a `kubernetes` package first on PYTHONPATH whose import
fails as a missing package's does, so the real one installed for the other
tests is out of reach."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT, ProcessManager

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

INSTALL = "pip install 'lbserver[kubernetes]'"

_MISSING_PACKAGE = (
    "raise ModuleNotFoundError(\"No module named 'kubernetes'\", name='kubernetes')\n"
)

# Imports every lbserver module (Kubernetes discovery's included) and prints
# which `kubernetes` modules got loaded: none may.
_IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
try:
    import kubernetes
except ModuleNotFoundError:
    pass
else:
    sys.exit("the kubernetes package is still importable")
import lbserver
names = [
    info.name
    for info in pkgutil.walk_packages(lbserver.__path__, "lbserver.")
    if info.name != "lbserver.__main__"
]
for name in names:
    importlib.import_module(name)
assert "lbserver.server" in names and "lbserver.discovery.kubernetes" in names, names
print(sorted(m for m in sys.modules if m.split(".")[0] == "kubernetes"))
"""


@pytest.fixture
def no_kubernetes(tmp_path: Path) -> dict[str, str]:
    """Environment in which `import kubernetes` fails as when it is not installed."""
    package = tmp_path / "shadow" / "kubernetes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(_MISSING_PACKAGE)
    return {"PYTHONPATH": os.pathsep.join([str(package.parent), str(REPO_ROOT)])}


def run_python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        check=False,
    )


def test_no_module_imports_kubernetes(no_kubernetes: dict[str, str]) -> None:
    result = run_python(no_kubernetes, "-c", _IMPORT_EVERYTHING)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_heartbeat_discovery_serves_without_kubernetes(
    processes: ProcessManager, no_kubernetes: dict[str, str]
) -> None:
    balancer = processes.start_balancer(env={**no_kubernetes, "LBSERVER_SHUTDOWN_GRACE": "1"})
    balancer.send_signal(signal.SIGTERM)
    assert balancer.wait(timeout=15) == 0
    assert INSTALL not in balancer.logs()


@pytest.mark.parametrize("mode", ["kubernetes", "both"])
def test_kubernetes_discovery_without_the_package_is_refused(
    no_kubernetes: dict[str, str], mode: str
) -> None:
    services = [{"service": "oap", "namespace": "skywalking", "mode": mode}]
    result = run_python(
        {**no_kubernetes, "LBSERVER_KUBERNETES_SERVICES": json.dumps(services)},
        "-m",
        "lbserver",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
    )
    assert result.returncode == 2, result.stderr
    assert INSTALL in result.stderr
    assert "Traceback" not in result.stderr
