"""`lbserver serve` as a process: exit codes, signals, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import ProcessManager, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbserver", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_bad_configuration_exits_2_naming_the_option() -> None:
    result = run_serve(env={"LBSERVER_HEARTBEAT_INTERVAL": "later", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "heartbeat_interval" in result.stderr


def test_busy_port_exits_1(processes: ProcessManager) -> None:
    first = processes.start_balancer()
    result = run_serve("--listen", f"127.0.0.1:{first.port}", "--metrics-listen", "off")
    assert result.returncode == 1
    assert f"127.0.0.1:{first.port}" in result.stderr


def test_sigterm_stops_cleanly_with_exit_0(processes: ProcessManager) -> None:
    balancer = processes.start_balancer(env={"LBSERVER_SHUTDOWN_GRACE": "2"})
    balancer.send_signal(signal.SIGTERM)
    assert balancer.wait(timeout=15) == 0
    assert "stopped" in balancer.logs()


def test_metrics_count_backends_and_heartbeats(processes: ProcessManager) -> None:
    balancer = processes.start_balancer()
    backend_port = free_port()
    processes.start_registrar(
        balancers=[balancer.address],
        service="oap",
        backend=f"127.0.0.1:{backend_port}",
        probe="none",
        weight=2,
        interval=0.5,
    )
    url = f"http://127.0.0.1:{balancer.metrics_port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
            return text

    wait_until(
        lambda: 'lbserver_backends{service="oap",state="serving"} 1.0' in scrape(),
        timeout=15,
        message="backend never showed in /metrics",
    )
    text = scrape()
    assert (
        f'lbserver_server_list_entries{{instance="127.0.0.1:{backend_port}",service="oap"}} 1.0'
        in text
    )
    accepted = [
        line
        for line in text.splitlines()
        if line.startswith('lbserver_heartbeats_total{result="accepted"}')
    ]
    assert accepted and float(accepted[0].split()[-1]) >= 1


def test_token_protected_registration_and_status(processes: ProcessManager, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("let-me-in\n")
    balancer = processes.start_balancer(
        env={"LBSERVER_AUTH_TOKEN_FILE": str(token_file), "LBSERVER_HEARTBEAT_INTERVAL": "1"}
    )
    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    intruder = processes.start_registrar(
        balancers=[balancer.address],
        service="oap",
        backend=f"127.0.0.1:{free_port()}",
        probe="none",
        args=["--token-file", str(wrong)],
    )
    trusted_port = free_port()
    processes.start_registrar(
        balancers=[balancer.address],
        service="oap",
        backend=f"127.0.0.1:{trusted_port}",
        probe="none",
        args=["--token-file", str(token_file)],
    )

    def status(env_token: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "LBSERVER_TOKEN"}
        if env_token:
            env["LBSERVER_TOKEN"] = env_token
        return subprocess.run(
            [sys.executable, "-m", "lbserver", "status", "--balancer", balancer.address, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )

    wait_until(
        lambda: f'"port": {trusted_port}' in status("let-me-in").stdout,
        timeout=15,
        message="the trusted backend never registered",
    )
    document = json.loads(status("let-me-in").stdout)
    assert [b["port"] for s in document["services"] for b in s["backends"]] == [trusted_port]
    refused = status(None)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr
    assert "PERMISSION_DENIED" in intruder.logs()


def test_status_json_matches_known_registrations(processes: ProcessManager) -> None:
    balancer = processes.start_balancer(
        env={"LBSERVER_HEARTBEAT_INTERVAL": "1", "LBSERVER_BLACKOUT": "0"}
    )
    ports = [free_port(), free_port()]
    processes.start_registrar(
        balancers=[balancer.address],
        service="oap",
        backend=f"127.0.0.1:{ports[0]}",
        probe="none",
        weight=1,
        zone="eu-1a",
        args=["--label", "pod=oap-0", "--load-static", "cpu=0.9,rps=100", "--instance-id", "oap-0"],
    )
    processes.start_registrar(
        balancers=[balancer.address],
        service="oap",
        backend=f"127.0.0.1:{ports[1]}",
        probe="none",
        weight=1,
        zone="eu-1b",
        args=["--load-static", "cpu=0.3,rps=100", "--instance-id", "oap-1"],
    )

    def document() -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "lbserver", "status", "--balancer", balancer.address, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed

    def backends() -> list[dict[str, Any]]:
        return [b for s in document()["services"] for b in s["backends"]]

    wait_until(
        lambda: sorted(b["list_entries"] for b in backends()) == [25, 75],
        timeout=20,
        message="load-aware shares never showed",
    )
    full = document()
    assert full["balancer"] == balancer.address
    (service,) = full["services"]
    assert service["name"] == "oap" and service["list_length"] == 100
    by_id = {b["instance_id"]: b for b in service["backends"]}
    busy, idle = by_id["oap-0"], by_id["oap-1"]
    assert (busy["address"], busy["zone"], busy["labels"]) == (
        f"127.0.0.1:{ports[0]}",
        "eu-1a",
        {"pod": "oap-0"},
    )
    assert busy["state"] == idle["state"] == "serving"
    assert busy["load"] == {
        "cpu_utilization": 0.9,
        "requests_per_second": 100.0,
        "errors_per_second": None,
        "in_flight": None,
    }
    assert (busy["share"], idle["share"]) == (0.25, 0.75)
    assert abs(idle["effective_weight"] / busy["effective_weight"] - 3) < 1e-6
    assert busy["load_balance_token"] != idle["load_balance_token"]
    assert 0 <= busy["last_heartbeat_age_seconds"] < 5
    assert busy["ttl_seconds"] == 10.0
