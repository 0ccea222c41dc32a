"""Two balancer replicas sharing no store: registrars heartbeat to both, both
build the same lists, and clients survive losing one."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.e2e.conftest import E2E_BALANCER_ENV, FleetFactory
from tests.support.backends import CallLoop, call_stub, call_until_served, grpclb_channel
from tests.support.dns import DnsServer
from tests.support.processes import BalancerProcess, ProcessManager, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def status_json(balancer: BalancerProcess) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "lbserver", "status", "--balancer", balancer.address, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def membership(document: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    """What must agree between replicas: members, weights, tokens, list shares."""
    return {
        service["name"]: sorted(
            (
                b["instance_id"],
                b["address"],
                b["state"],
                b["weight"],
                round(b["effective_weight"], 6),
                b["list_entries"],
                b["load_balance_token"],
            )
            for b in service["backends"]
        )
        for service in document["services"]
    }


def test_replicas_agree_and_clients_survive_losing_one(
    dns_server: DnsServer, processes: ProcessManager, backend_fleet: FleetFactory
) -> None:
    first = processes.start_balancer(env=E2E_BALANCER_ENV, name="replica-a")
    second = processes.start_balancer(env=E2E_BALANCER_ENV, name="replica-b")
    fleet = backend_fleet(3)
    fallback = backend_fleet(1, "fallback")[0]
    for backend, weight in zip(fleet, (1, 2, 3), strict=True):
        processes.start_registrar(
            balancers=[first.address, second.address],
            service="ha",
            backend=backend.address,
            weight=weight,
            interval=0.5,
        )
    for replica in (first, second):
        replica.wait_backends("ha", [b.port for b in fleet])
    wait_until(
        lambda: membership(status_json(first)) == membership(status_json(second)),
        timeout=10,
        message="replicas never agreed",
    )
    agreed = membership(status_json(first))
    # Weights 1:2:3 became 1, 2 and 3 list entries on both replicas.
    assert sorted((weight, entries) for _, _, _, weight, _, entries, _ in agreed["ha"]) == [
        (1, 1),
        (2, 2),
        (3, 3),
    ]

    dns_server.set_balancers("ha.test", [(first.host, first.port), (second.host, second.port)])
    dns_server.set_addresses("ha.test", ["127.0.0.1"])
    with grpclb_channel(dns_server.target("ha.test", fallback.port)) as channel:
        stub = call_stub(channel)
        call_until_served(stub, list(fleet))
        with CallLoop(stub) as loop:
            wait_until(lambda: loop.snapshot()[0] >= 200, timeout=20, message="no traffic")
            first.kill()
            before = loop.snapshot()[0]
            wait_until(lambda: loop.snapshot()[0] >= before + 300, timeout=30, message="stalled")
            # Membership changes still reach the client: through the survivor.
            newcomer = backend_fleet(1, "newcomer")[0]
            processes.start_registrar(
                balancers=[first.address, second.address],
                service="ha",
                backend=newcomer.address,
                interval=0.5,
            )
            assert newcomer.wait_for_calls(1, timeout=30), "the survivor's list never arrived"
        successes, failures = loop.snapshot()
    assert failures == [], failures[:5]
    assert successes >= 500
    assert fallback.count == 0
