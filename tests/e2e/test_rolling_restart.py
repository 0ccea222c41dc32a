"""A rolling restart of every backend — drain, stop, start, register — while
grpcio's own grpclb clients and agent-shim proxy clients call continuously:
zero failed calls."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from tests.e2e.conftest import E2E_BALANCER_ENV
from tests.support.backends import call_stub, grpclb_channel
from tests.support.dns import DnsServer
from tests.support.processes import (
    BackendProcess,
    BalancerProcess,
    ProcessManager,
    RegistrarProcess,
    wait_until,
)
from tests.support.proxy_process import start_proxy
from tests.support.traffic import Traffic, report

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

DRAIN = 1.0


def register(
    processes: ProcessManager, balancer: BalancerProcess, backend: BackendProcess
) -> RegistrarProcess:
    return processes.start_registrar(
        balancers=[balancer.address],
        service="rolling",
        backend=backend.address,
        interval=0.5,
        drain_seconds=DRAIN,
        args=["--instance-id", backend.backend_name],
    )


def test_rolling_restart_loses_no_call(dns_server: DnsServer, processes: ProcessManager) -> None:
    balancer = processes.start_balancer(env=E2E_BALANCER_ENV)
    backends = [processes.start_backend(f"r{i}") for i in range(3)]
    registrars = [register(processes, balancer, b) for b in backends]
    balancer.wait_backends("rolling", [b.port for b in backends])
    dns_server.set_balancers("rolling.test", [(balancer.host, balancer.port)])
    dns_server.set_addresses("rolling.test", ["127.0.0.1"])
    proxy = start_proxy(processes, balancers=[balancer.address], service="rolling")

    with (
        grpclb_channel(dns_server.target("rolling.test", 1)) as native_channel,
        grpc.insecure_channel(proxy.address) as proxy_channel,
        Traffic.running(call_stub(native_channel), threads=2) as native,
        Traffic.running(call_stub(proxy_channel), threads=2) as shimmed,
    ):
        wait_until(
            lambda: all(
                t.calls_to(b.backend_name) > 5 for t in (native, shimmed) for b in backends
            ),
            timeout=30,
            message="traffic never reached every backend",
        )
        for index, backend in enumerate(backends):
            registrars[index].send_signal(signal.SIGTERM)  # drain, then deregister
            assert registrars[index].wait(timeout=DRAIN + 10) == 0
            backend.terminate(timeout=10)
            restarted = processes.start_backend(backend.backend_name, port=backend.port)
            registrars[index] = register(processes, balancer, restarted)
            back_at = time.monotonic()
            wait_until(
                lambda: all(
                    t.calls_to(restarted.backend_name, after=back_at) > 0  # noqa: B023
                    for t in (native, shimmed)
                ),
                timeout=30,
                message=f"{backend.backend_name} got no calls after its restart",
            )
    report("rolling restart, native grpclb clients", native)
    report("rolling restart, agent-shim proxy clients", shimmed)
    assert native.failures() == []
    assert shimmed.failures() == []
    assert native.total() > 100 and shimmed.total() > 100
