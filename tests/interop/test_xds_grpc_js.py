"""@grpc/grpc-js's own xDS client (@grpc/grpc-js-xds) against `lbserver serve`:
the bootstrap file of docs/xds as users copy it (only `server_uri` pointed at
the test balancer), target `xds:///oap`, static weights 1:1:2.

A second xDS client implementation beside grpcio's (tests/e2e/test_xds_grpcio.py):
it checks the resources on its own (its NACKs would fail the calls) and picks
localities by weight like C-core."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.interop.harness import NODE_MODULES, REPO_ROOT, peer_env
from tests.support.backends import CALL_METHOD, BackendFleet
from tests.support.processes import ProcessManager
from tests.support.xds_client import bootstrap_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

XDS_CLIENT = REPO_ROOT / "tests" / "interop" / "node" / "xds_client.js"
CALLS = 400
TOLERANCE = 0.05  # +- 5 percentage points


def _run_client(bootstrap: Path, calls: int) -> dict[str, object]:
    env = peer_env()
    env["GRPC_XDS_BOOTSTRAP"] = str(bootstrap)
    done = subprocess.run(
        ["node", str(XDS_CLIENT), "xds:///oap", CALL_METHOD, str(calls)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_grpc_js_xds_client_follows_the_weights_and_a_removal(tmp_path: Path) -> None:
    assert (NODE_MODULES / "@grpc" / "grpc-js-xds" / "package.json").is_file()
    processes = ProcessManager(tmp_path / "logs")
    with BackendFleet(3) as fleet:
        try:
            balancer = processes.start_balancer(
                env={"LBSERVER_HEARTBEAT_INTERVAL": "1", "LBSERVER_STARTUP_GRACE": "0"}
            )
            registrars = [
                processes.start_registrar(
                    balancers=balancer.address, service="oap", backend=b.address, weight=w
                )
                for b, w in zip(fleet, (1, 1, 2), strict=True)
            ]
            balancer.wait_backends("oap", [b.port for b in fleet])
            bootstrap = bootstrap_file(balancer.address, tmp_path / "bootstrap.json")
            result = _run_client(bootstrap, CALLS)
            assert result == {"ok": CALLS, "failed": 0, "errors": []}
            shares = [count / CALLS for count in fleet.counts()]
            for share, want in zip(shares, (0.25, 0.25, 0.5), strict=True):
                assert abs(share - want) <= TOLERANCE, shares
            # The weight-2 backend's registrar stops: it drains, the list
            # (and the ClusterLoadAssignment) lose it.
            registrars[2].terminate()
            balancer.wait_backends("oap", [fleet[0].port, fleet[1].port])
            fleet.reset()
            result = _run_client(bootstrap, 100)
            assert result == {"ok": 100, "failed": 0, "errors": []}
            assert fleet[2].count == 0
            assert fleet[0].count > 0 and fleet[1].count > 0
        finally:
            for process in processes.processes:
                process.terminate()
