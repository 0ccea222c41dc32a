"""`lbserver serve` as Kubernetes runs it: service-link variables in the
environment, bad values, busy ports, and SIGTERM with registrars' and
clients' streams open."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.processes import ProcessManager, _base_env, free_port, wait_until
from tests.support.proxy_process import start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

LOOPBACK = "127.0.0.1"


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbserver", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_base_env(env),
        check=False,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other process listens on."""
    with socket.socket() as occupant:
        occupant.bind((LOOPBACK, 0))
        occupant.listen()
        yield occupant.getsockname()[1]


def assert_one_line(stderr: str, *parts: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], stderr


def test_busy_metrics_port_exits_1_naming_address_and_option(busy_port: int) -> None:
    result = run_serve(
        "--listen", f"{LOOPBACK}:{free_port()}", "--metrics-listen", f"{LOOPBACK}:{busy_port}"
    )
    assert result.returncode == 1
    assert_one_line(
        result.stderr,
        f"cannot listen on {LOOPBACK}:{busy_port}",
        "metrics_listen",
        "Address already in use",
    )


def test_busy_grpc_port_exits_1_naming_address_and_option(busy_port: int) -> None:
    result = run_serve("--listen", f"{LOOPBACK}:{busy_port}", "--metrics-listen", "off")
    assert result.returncode == 1
    assert_one_line(
        result.stderr,
        f"cannot listen on {LOOPBACK}:{busy_port} (listen)",
        "Address already in use",
    )


@pytest.mark.parametrize(
    ("env", "option"),
    [
        ({"LBSERVER_MAX_MESSAGE_BYTES": "99999999999"}, "max_message_bytes"),
        ({"LBSERVER_AUTH_TOKEN": " "}, "auth_token"),
        ({"LBSERVER_HEARTBEAT_INTERVL": "1"}, "LBSERVER_HEARTBEAT_INTERVL"),
    ],
)
def test_bad_values_exit_2_with_one_line(env: dict[str, str], option: str) -> None:
    result = run_serve("--listen", f"{LOOPBACK}:{free_port()}", "--metrics-listen", "off", env=env)
    assert result.returncode == 2
    assert_one_line(result.stderr, "lbserver serve: ", option)


def test_kubernetes_service_links_and_client_token_are_ignored(
    processes: ProcessManager,
) -> None:
    links = {
        "LBSERVER_SERVICE_HOST": "10.96.0.17",
        "LBSERVER_SERVICE_PORT": "11810",
        "LBSERVER_SERVICE_PORT_GRPCLB": "11810",
        "LBSERVER_SERVICE_PORT_METRICS": "11811",
        "LBSERVER_PORT": "tcp://10.96.0.17:11810",
        "LBSERVER_PORT_11810_TCP": "tcp://10.96.0.17:11810",
        "LBSERVER_PORT_11810_TCP_PROTO": "tcp",
        "LBSERVER_PORT_11810_TCP_PORT": "11810",
        "LBSERVER_PORT_11810_TCP_ADDR": "10.96.0.17",
        "LBSERVER_PROD_SERVICE_HOST": "10.96.0.18",
        "LBSERVER_PROD_PORT_11811_TCP_ADDR": "10.96.0.18",
        "LBSERVER_TOKEN": "a-registrars-token",
    }
    balancer = processes.start_balancer(env=links)  # waits until SERVING
    assert balancer.terminate() == 0


def test_sigterm_ends_open_streams_at_once_with_only_json_lines(
    processes: ProcessManager,
) -> None:
    balancer = processes.start_balancer(
        env={"LBSERVER_SHUTDOWN_GRACE": "30", "LBSERVER_HEARTBEAT_INTERVAL": "1"},
        args=["--log-format", "json"],
    )
    backend = processes.start_backend("oap-0")
    registrar = processes.start_registrar(
        balancers=[balancer.address], service="oap", backend=backend.address, interval=1
    )
    balancer.wait_backends("oap", [backend.port])
    start_proxy(processes, balancers=[balancer.address], service="oap")

    def client_connected() -> bool:
        state = balancer.service_state("oap")
        return state is not None and state.clients >= 1

    wait_until(client_connected, timeout=20, message="the proxy's BalanceLoad stream")

    balancer.send_signal(signal.SIGTERM)
    # Only idle streams are open: the stop must not wait out the 30 s grace.
    assert balancer.wait(timeout=10) == 0
    lines = balancer.logs(tail=None).splitlines()[1:]  # the first is the command
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert events[-1]["event"] == "stopped"
    assert not [line for line in lines if "Traceback" in line or "CancelledError" in line]
    # The registrar saw the stream end as a balancer going away, nothing worse.
    assert registrar.alive()
    assert "Traceback" not in registrar.logs(tail=None)
