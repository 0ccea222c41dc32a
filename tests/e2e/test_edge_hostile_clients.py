"""`lbserver serve` as a process against hostile clients: what they cost in
log (its real stderr, JSON), and the warning about an open Registry."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.support.processes import BalancerProcess, ProcessManager, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

MEBIBYTE = 1024 * 1024
# Under max_message_bytes (1 MiB) with the rest of the message.
HUGE_SERVICE = "oap" + "x" * 1_000_000


def log_size(balancer: BalancerProcess) -> int:
    balancer.logs(tail=0)  # flushes
    return balancer.log_path.stat().st_size


def test_heartbeats_with_a_1mb_service_name_add_little_log(processes: ProcessManager) -> None:
    balancer = processes.start_balancer(env={"LBSERVER_HEARTBEAT_RATE_PER_PEER": "0"})
    before = log_size(balancer)
    request = pb.HeartbeatRequest(service=HUGE_SERVICE, ip="10.0.0.1", port=1)
    with balancer.channel() as channel:
        registry = pb_grpc.RegistryStub(channel)
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as error:
                registry.Heartbeat(request, timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        done = threading.Event()

        def stream() -> Iterator[pb.HeartbeatRequest]:
            for token in range(20):
                yield pb.HeartbeatRequest(
                    service=HUGE_SERVICE, ip="10.0.0.1", port=1, reply_token=token + 1
                )
            done.wait(10)

        replies = registry.HeartbeatStream(stream(), timeout=20)
        for count, reply in enumerate(replies, start=1):
            assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            if count == 20:
                break
        done.set()
        replies.cancel()  # type: ignore[no-untyped-call]
    wait_until(lambda: "heartbeat rejected" in balancer.logs(), timeout=10, message="no log")
    grown = log_size(balancer) - before
    assert grown < MEBIBYTE, f"{grown} bytes of log for 40 refused heartbeats"
    assert "(1000003 bytes, sha256:" in balancer.logs()


def test_a_bad_token_flood_logs_a_bounded_number_of_lines(processes: ProcessManager) -> None:
    balancer = processes.start_balancer(env={"LBSERVER_AUTH_TOKEN": "right"})
    with balancer.channel() as channel:
        registry = pb_grpc.RegistryStub(channel)
        for _ in range(1000):
            with pytest.raises(grpc.RpcError):
                registry.Heartbeat(
                    pb.HeartbeatRequest(service="oap", ip="10.0.0.1", port=1),
                    metadata=(("authorization", "Bearer wrong"),),
                    timeout=10,
                )
    wait_until(
        lambda: "suppressing repeated log events" in balancer.logs(),
        timeout=10,
        message="no suppression line",
    )
    lines = balancer.logs(tail=None).splitlines()
    assert 1 <= sum('"event": "auth failure"' in line for line in lines) <= 10
    assert sum("suppressing repeated log events" in line for line in lines) == 1


def test_an_open_registry_on_every_address_is_announced(processes: ProcessManager) -> None:
    port = free_port()
    balancer = processes.start_balancer(port=port, args=["--listen", f"0.0.0.0:{port}"])
    wait_until(
        lambda: "WITHOUT AUTHENTICATION" in balancer.logs(),
        timeout=10,
        message="no warning about the open Registry",
    )
    assert balancer.logs(tail=None).count("WITHOUT AUTHENTICATION") == 1
    url = f"http://127.0.0.1:{balancer.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    assert "lbserver_registry_unauthenticated 1.0" in text
