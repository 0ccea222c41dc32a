"""Faults with real processes, under load from grpcio's own grpclb client.
Each test prints what was lost; the target is zero (or only the calls that
were on the wire when a backend died)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import duration_pb2

from lbserver.proto.v1 import lbserver_pb2, lbserver_pb2_grpc
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
from tests.support.traffic import THREADS, Traffic, report

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

INTERVAL = 0.5
TTL = 3.0
# Calls each remaining backend serves after a fault is dealt with: the
# callers' progress, not seconds, is how long the checks that nothing more is
# lost look (a slow machine is watched for as many calls as a fast one).
ROUNDS = 100
CANARY = "canary"
CANARY_PORT = 9  # discard: nothing is ever sent there (the canary is draining)


@dataclass
class Cluster:
    balancer: BalancerProcess
    backends: list[BackendProcess]
    registrars: list[RegistrarProcess]
    channel: grpc.Channel


@pytest.fixture
def cluster(dns_server: DnsServer, processes: ProcessManager) -> Iterator[Cluster]:
    balancer = processes.start_balancer(env=E2E_BALANCER_ENV)
    backends = [processes.start_backend(f"b{i}") for i in range(3)]
    registrars = [
        processes.start_registrar(
            balancers=[balancer.address],
            service="faults",
            backend=b.address,
            interval=INTERVAL,
            ttl=TTL,
            args=["--instance-id", b.backend_name],
        )
        for b in backends
    ]
    balancer.wait_backends("faults", [b.port for b in backends])
    dns_server.set_balancers("faults.test", [(balancer.host, balancer.port)])
    dns_server.set_addresses("faults.test", ["127.0.0.1"])
    with grpclb_channel(dns_server.target("faults.test", 1)) as channel:
        yield Cluster(balancer, backends, registrars, channel)


def start_traffic(cluster: Cluster) -> contextlib.AbstractContextManager[Traffic]:
    return Traffic.running(call_stub(cluster.channel))


def warm(traffic: Traffic, cluster: Cluster) -> None:
    wait_until(
        lambda: all(traffic.calls_to(b.backend_name) > 10 for b in cluster.backends),
        timeout=20,
        message="traffic never reached every backend",
    )


def listed(balancer: BalancerProcess, backend: BackendProcess) -> bool:
    service = balancer.service_state("faults")
    return service is not None and any(
        b.port == backend.port and b.list_entries > 0 for b in service.backends
    )


def registered(balancer: BalancerProcess, instance_id: str) -> bool:
    service = balancer.service_state("faults")
    return service is not None and any(b.instance_id == instance_id for b in service.backends)


def canary_heartbeat(balancer: BalancerProcess) -> None:
    """Registers CANARY, draining (never in a list), with the registrars' TTL."""
    ttl = duration_pb2.Duration()
    ttl.FromNanoseconds(int(TTL * 1e9))
    with balancer.channel() as channel:
        lbserver_pb2_grpc.RegistryStub(channel).Heartbeat(
            lbserver_pb2.HeartbeatRequest(
                service="faults",
                instance_id=CANARY,
                ip="127.0.0.1",
                port=CANARY_PORT,
                state=lbserver_pb2.BACKEND_STATE_DRAINING,
                requested_ttl=ttl,
            ),
            timeout=5,
        )
    wait_until(lambda: registered(balancer, CANARY), timeout=5, message="the canary")


def calls_after(traffic: Traffic, backends: list[BackendProcess], after: float, calls: int) -> bool:
    return all(traffic.calls_to(b.backend_name, after=after) >= calls for b in backends)


def test_backend_sigkill_loses_only_calls_in_flight(cluster: Cluster) -> None:
    victim = cluster.backends[0]
    with start_traffic(cluster) as traffic:
        warm(traffic, cluster)
        killed_at = time.monotonic()
        victim.kill()
        # The registrar's probe finds it dead: out of every list well within the TTL.
        wait_until(lambda: not listed(cluster.balancer, victim), timeout=TTL, message="listed")
        out_at = time.monotonic()
        # Traffic past the drain, counted in calls rather than seconds: a
        # call lost after the drain would be among these.
        wait_until(
            lambda: calls_after(traffic, cluster.backends[1:], out_at, ROUNDS),
            timeout=10,
            message="traffic after the drain",
        )
    report("backend SIGKILL", traffic)
    lost = traffic.failures()
    assert len(lost) <= THREADS, lost
    assert all(o.started <= killed_at + 0.5 for o in lost), lost
    assert traffic.calls_to(victim.backend_name, after=killed_at) == 0
    for backend in cluster.backends[1:]:
        assert traffic.calls_to(backend.backend_name, after=out_at) > 0


def test_hung_backend_is_drained_and_comes_back(cluster: Cluster) -> None:
    victim = cluster.backends[0]
    with start_traffic(cluster) as traffic:
        warm(traffic, cluster)
        victim.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        hung_at = time.monotonic()
        wait_until(lambda: not listed(cluster.balancer, victim), timeout=TTL, message="listed")
        drained_at = time.monotonic()
        # Hung on past the drain for as many calls (not seconds) on every
        # machine: the losses checked below cover the calls started meanwhile.
        wait_until(
            lambda: calls_after(traffic, cluster.backends[1:], drained_at + 0.5, ROUNDS),
            timeout=10,
            message="traffic after the drain",
        )
        victim.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        wait_until(lambda: listed(cluster.balancer, victim), timeout=10, message="not back")
        wait_until(
            lambda: traffic.calls_to(victim.backend_name, after=resumed_at) > 0,
            timeout=10,
            message="no calls after it came back",
        )
    report("backend hung (SIGSTOP)", traffic)
    lost = traffic.failures()
    # Only calls that went to the hung backend before it left the list fail,
    # each after its deadline; none started after the drain reached clients.
    assert all(o.code == grpc.StatusCode.DEADLINE_EXCEEDED for o in lost), lost
    assert all(hung_at - 0.1 <= o.started <= drained_at + 0.5 for o in lost), lost
    print(f"[backend hung] drained {drained_at - hung_at:.2f} s after the hang")


def test_balancer_stall_loses_nothing_and_expires_nobody(cluster: Cluster) -> None:
    with start_traffic(cluster) as traffic:
        warm(traffic, cluster)
        cluster.balancer.send_signal(signal.SIGSTOP)
        # The fault itself: the balancer's clock runs on while it is stopped,
        # and the stall must outlast every TTL on it (a real process: no fake
        # clock), so this is a duration, not a wait for anything.
        time.sleep(TTL + 2.0)  # longer than every backend's TTL
        cluster.balancer.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        # Its first timer tick after the stall, which expires whoever is past
        # their TTL, logs the pause: the backends are checked after it.
        wait_until(
            lambda: "balancer was paused" in cluster.balancer.logs(),
            timeout=10,
            message="the balancer's first tick after the stall",
        )
        for backend in cluster.backends:
            assert listed(cluster.balancer, backend), f"{backend.backend_name} expired"
        wait_until(
            lambda: all(
                traffic.calls_to(b.backend_name, after=resumed_at) for b in cluster.backends
            ),
            timeout=10,
            message="traffic did not continue",
        )
    report("balancer SIGSTOP/SIGCONT", traffic)
    assert traffic.failures() == []
    assert "balancer was paused" in cluster.balancer.logs()


def test_registrar_restart_loses_nothing(cluster: Cluster, processes: ProcessManager) -> None:
    victim = cluster.registrars[0]
    backend = cluster.backends[0]
    with start_traffic(cluster) as traffic:
        warm(traffic, cluster)
        victim.kill()
        # The marker for "past the old registration's TTL": a canary heartbeat
        # sent now, with the same TTL, expires after it would have (draining,
        # so no call goes to the canary's made-up address).
        canary_heartbeat(cluster.balancer)
        processes.start_registrar(
            balancers=[cluster.balancer.address],
            service="faults",
            backend=backend.address,
            interval=INTERVAL,
            ttl=TTL,
            args=["--instance-id", backend.backend_name],
        )
        restarted_at = time.monotonic()

        def past_the_old_ttl() -> bool:
            # The canary is looked up first: an expiry it shows is one the
            # check of the backend that follows already sees.
            gone = not registered(cluster.balancer, CANARY)
            assert listed(cluster.balancer, backend)
            return gone

        wait_until(past_the_old_ttl, timeout=TTL + 10, message="the canary's expiry")
        wait_until(
            lambda: traffic.calls_to(backend.backend_name, after=restarted_at + TTL) > 0,
            timeout=10,
            message="backend stopped getting calls",
        )
    report("registrar SIGKILL + restart", traffic)
    assert traffic.failures() == []
