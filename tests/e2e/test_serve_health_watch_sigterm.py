"""`lbserver serve` stopped by SIGTERM while a health checker (Envoy, Consul,
a gRPC client with health checking) has a grpc.health.v1 Watch open: the
Watch is told NOT_SERVING and ends at once, the process exits without
waiting out its grace, and no traceback follows "stopped"."""

from __future__ import annotations

import json
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.processes import ProcessManager

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_sigterm_ends_open_watch_streams_at_once(processes: ProcessManager) -> None:
    balancer = processes.start_balancer(
        env={"LBSERVER_SHUTDOWN_GRACE": "60"}, args=["--log-format", "json"]
    )
    with grpc.insecure_channel(balancer.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        balancer.send_signal(signal.SIGTERM)
        # Only the Watch is open: the stop must not wait out the 60 s grace.
        assert balancer.wait(timeout=15) == 0
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    lines = balancer.logs(tail=None).splitlines()[1:]  # the first is the command
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert events[-1]["event"] == "stopped"
    assert not [line for line in lines if "Traceback" in line or "CancelledError" in line]
