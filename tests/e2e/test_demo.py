"""`agent-shim demo` runs to completion and shows what it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_demo_balances_the_lbserver_group_and_not_the_kubernetes_one() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent_shim", "demo", "--duration", "12", "--json"],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    lbserver, kubernetes = figures["lbserver"], figures["kubernetes-service"]
    assert lbserver["imbalance"] <= 1.10
    assert kubernetes["imbalance"] > 1.10
    # The half-capacity backend gets about half the calls of a full one.
    shares = {row["capacity"]: row["share"] for row in lbserver["backends"]}
    assert shares["half"] < shares["full"]
    assert all(row["calls"] > 0 for row in lbserver["backends"])


def test_demo_prints_a_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent_shim", "demo", "--duration", "4"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "kubernetes-service" in result.stdout and "lbserver" in result.stdout
    assert "utilization max/mean" in result.stdout
