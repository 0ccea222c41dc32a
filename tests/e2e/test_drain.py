"""`lbserver register` drains on SIGTERM: out of the lists at once, still
registered as DRAINING for --drain-seconds, then deregistered; a second
SIGTERM ends the drain."""

from __future__ import annotations

import signal
import time

import pytest

from lbserver.proto.v1 import lbserver_pb2 as pb
from tests.support.processes import (
    BalancerProcess,
    ProcessManager,
    RegistrarProcess,
    free_port,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def states(balancer: BalancerProcess) -> dict[int, tuple[int, int]]:
    """port → (state, list entries) for service oap."""
    service = balancer.service_state("oap")
    if service is None:
        return {}
    return {b.port: (b.state, b.list_entries) for b in service.backends}


def registered(
    processes: ProcessManager, drain_seconds: float
) -> tuple[BalancerProcess, RegistrarProcess, int]:
    """A balancer, and a registrar that has registered a backend port of oap."""
    balancer = processes.start_balancer(env={"LBSERVER_HEARTBEAT_INTERVAL": "1"})
    port = free_port()
    registrar = processes.start_registrar(
        balancers=[balancer.address],
        service="oap",
        backend=f"127.0.0.1:{port}",
        probe="none",
        interval=0.5,
        drain_seconds=drain_seconds,
    )
    wait_until(lambda: port in states(balancer), timeout=15, message="never registered")
    return balancer, registrar, port


def test_sigterm_drains_then_deregisters(processes: ProcessManager) -> None:
    balancer, registrar, port = registered(processes, drain_seconds=3.0)
    registrar.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_until(
        lambda: states(balancer).get(port) == (pb.BACKEND_STATE_DRAINING, 0),
        timeout=5,
        message="never drained",
    )
    # Still registered (draining, no list entries) while the drain lasts.
    assert registrar.alive()
    assert registrar.wait(timeout=15) == 0
    assert time.monotonic() - sent >= 2.5
    assert port not in states(balancer)


def test_second_sigterm_ends_the_drain(processes: ProcessManager) -> None:
    balancer, registrar, port = registered(processes, drain_seconds=60.0)
    registrar.send_signal(signal.SIGTERM)
    wait_until(
        lambda: states(balancer).get(port, (0, 0))[0] == pb.BACKEND_STATE_DRAINING,
        timeout=5,
        message="never drained",
    )
    registrar.send_signal(signal.SIGTERM)
    assert registrar.wait(timeout=10) == 0
    assert port not in states(balancer)
