"""End to end, zero-touch: `lbserver serve` learns the OAP pods from a fake
Kubernetes API (kubeconfig) and their load from its own scrapes of each pod's
Prometheus telemetry; no registrar anywhere (issue 16, "Must show" 1).

Each pod stand-in has its own loopback IP (127.0.0.12-15): a counting gRPC
backend on the EndpointSlice's port and telemetry on the scrape port, both the
same on every pod as in a Deployment. Counters grow at fixed rates: CPU
0.9/0.3/0.3 (0.15 for the late fourth) and equal requests/s, so the A58 weights
are 1/0.9 : 1/0.3 : 1/0.3 = 1/7, 3/7, 3/7. Two clients use the balancer: grpcio's
own grpclb policy (found through DNS SRV) and agent-shim's balanced channel.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import agent_shim
from lbserver.proto.v1 import lbserver_pb2
from tests.support.backends import CallLoop, CountingBackend, call_stub, grpclb_channel
from tests.support.dns import DnsServer
from tests.support.eventually import eventually_blocking
from tests.support.fake_kube import FakeKubeApiServer, endpoint, endpoint_slice
from tests.support.processes import BalancerProcess, ProcessManager, free_port
from tests.support.telemetry import TelemetryServer

from .conftest import E2E_BALANCER_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NAMESPACE, SLICE, SERVICE = "skywalking", "oap-abc", "oap"
IPS = ("127.0.0.12", "127.0.0.13", "127.0.0.14", "127.0.0.15")
CPUS = (0.9, 0.3, 0.3, 0.15)
EXPECTED = (1 / 7, 3 / 7, 3 / 7)  # A58: requests/s over utilization, normalized
TOLERANCE = 0.07  # +- 7 points
BLACKOUT = 1.0
SCRAPE_INTERVAL = 0.5
CALLS = 700
CALL_TIMEOUT = 5.0
ROUNDS = 20  # calls each remaining pod gets after a leave before it is checked


@dataclass
class Pod:
    ip: str
    backend: CountingBackend
    telemetry: TelemetryServer

    def endpoint(self, n: int) -> dict[str, object]:
        return endpoint(self.ip, pod=f"oap-{n}")


@dataclass
class ZeroTouch:
    kube: FakeKubeApiServer
    pods: list[Pod]
    balancer: BalancerProcess
    target: str  # grpcio's channel target (DNS SRV → the balancer)

    def shares(self) -> dict[str, float]:
        """Each listed pod's share of the balancer's current list, by IP."""
        state = self.balancer.service_state(SERVICE)
        return {b.ip: b.share for b in state.backends} if state is not None else {}

    def backends(self) -> list[lbserver_pb2.BackendStatus]:
        state = self.balancer.service_state(SERVICE)
        return list(state.backends) if state is not None else []

    def wait_shares(self, expected: Sequence[float], what: str) -> None:
        def near() -> bool:
            seen = self.shares()
            return len(seen) == len(expected) and all(
                abs(seen.get(p.ip, 0.0) - want) <= TOLERANCE
                for p, want in zip(self.pods, expected, strict=False)
            )

        eventually_blocking(near, what, within=20, detail=self.shares)

    def add_pod(self, n: int) -> None:
        def add(obj: dict[str, list[object]]) -> None:
            obj["endpoints"].append(self.pods[n].endpoint(n))

        self.kube.modify_slice(NAMESPACE, SLICE, add)


@pytest.fixture
def zero_touch(
    tmp_path: Path, processes: ProcessManager, dns_server: DnsServer
) -> Iterator[ZeroTouch]:
    grpc_port, telemetry_port = free_port(IPS[0]), free_port(IPS[0])
    with ExitStack() as stack:
        pods = [
            Pod(
                ip,
                stack.enter_context(CountingBackend(f"oap-{n}", host=ip).start(grpc_port)),
                stack.enter_context(TelemetryServer(ip, telemetry_port, cpu=cpu)),
            )
            for n, (ip, cpu) in enumerate(zip(IPS, CPUS, strict=True))
        ]
        kube = stack.enter_context(FakeKubeApiServer())
        kube.add_slice(
            NAMESPACE,
            endpoint_slice(
                SLICE,
                SERVICE,
                [p.endpoint(n) for n, p in enumerate(pods[:3])],
                ports=(("grpc", grpc_port),),
            ),
        )
        kubeconfig = tmp_path / "kubeconfig.json"
        kubeconfig.write_text(json.dumps(kube.kubeconfig()))
        scrape = {
            "port": telemetry_port,
            "interval": SCRAPE_INTERVAL,
            "timeout": SCRAPE_INTERVAL,
            "cpus": 1.0,
            "requests_metric": "requests_total",
        }
        services = [
            {
                "service": SERVICE,
                "namespace": NAMESPACE,
                "kubernetes_service": SERVICE,
                "port_name": "grpc",
                "mode": "kubernetes",
                "scrape": scrape,
            }
        ]
        env = {
            **E2E_BALANCER_ENV,
            "LBSERVER_KUBECONFIG": str(kubeconfig),
            "LBSERVER_KUBERNETES_SERVICES": json.dumps(services),
            "LBSERVER_BLACKOUT": str(BLACKOUT),
            "LBSERVER_LOAD_SMOOTHING": "1",
            "LBSERVER_REPORT_EXPIRY": "2",
            "LBSERVER_MIN_PUSH_INTERVAL": "0.2",
            "LBSERVER_SHARE_SETTLE_TIME": "1",
        }
        balancer = processes.start_balancer(env=env)
        dns_server.set_balancers(f"{SERVICE}.test", [(balancer.host, balancer.port)])
        fallback = stack.enter_context(CountingBackend("fallback").start())
        dns_server.set_addresses(f"{SERVICE}.test", ["127.0.0.1"])
        target = dns_server.target(f"{SERVICE}.test", fallback.port)
        balancer.wait_backends(SERVICE, [grpc_port])
        yield ZeroTouch(kube, pods, balancer, target)
        assert fallback.count == 0, "a client fell back"


def _clients(
    zero_touch: ZeroTouch, stack: ExitStack
) -> list[grpc.UnaryUnaryMultiCallable[bytes, bytes]]:
    """The stock grpclb client and agent-shim's channel, both open until `stack` closes."""
    native = stack.enter_context(grpclb_channel(zero_touch.target))
    shim = stack.enter_context(agent_shim.balanced_channel(zero_touch.balancer.address, SERVICE))
    return [call_stub(native), call_stub(shim)]


def _calls(pods: Sequence[Pod]) -> list[int]:
    return [p.backend.count for p in pods]


def _split(pods: Sequence[Pod], stub: Callable[..., bytes]) -> list[float]:
    for p in pods:
        p.backend.reset()
    for _ in range(CALLS):
        stub(b"x", timeout=CALL_TIMEOUT, wait_for_ready=True)
    counts = _calls(pods)
    return [c / sum(counts) for c in counts]


def _no_failures(loop: CallLoop) -> None:
    successes, failures = loop.snapshot()
    assert successes and not failures, f"{successes} calls, failures: {failures[:3]}"


def test_both_clients_split_by_the_scraped_load(zero_touch: ZeroTouch) -> None:
    zero_touch.wait_shares(EXPECTED, "the list weighed by the scraped load")
    pods = zero_touch.pods[:3]
    with ExitStack() as stack:
        for name, stub in zip(("grpclb", "agent-shim"), _clients(zero_touch, stack), strict=True):
            shares = _split(pods, stub)
            assert all(
                abs(share - want) <= TOLERANCE for share, want in zip(shares, EXPECTED, strict=True)
            ), f"{name}: shares {[round(s, 3) for s in shares]}, expected {EXPECTED}"


def test_a_new_pod_gets_its_share_within_blackout_and_two_scrapes(zero_touch: ZeroTouch) -> None:
    zero_touch.wait_shares(EXPECTED, "the list weighed by the scraped load")
    # CPU 0.15: weights 1:3:3:6, so its fair share (6/13) is well above the
    # median weight it has until its load is known (3/10): only its scraped
    # load gets it there.
    fair = 6 / 13
    new = zero_touch.pods[3].backend
    with ExitStack() as stack:
        loops = [
            stack.enter_context(CallLoop(stub, pause=0.002)) for stub in _clients(zero_touch, stack)
        ]
        eventually_blocking(
            lambda: all(loop.successes > 20 for loop in loops), "both clients calling"
        )
        added = time.monotonic()
        zero_touch.add_pod(3)

        def recent_share() -> float:
            # The share over the last half second, counted where the calls land.
            since = max(added, time.monotonic() - 0.5)
            counts = [p.backend.calls_since(since) for p in zero_touch.pods]
            return counts[3] / sum(counts) if sum(counts) >= 50 else 0.0

        # The balancer's list: within blackout + 2 scrape intervals (its first
        # scrape is at once, the second gives a rate, the blackout follows).
        eventually_blocking(
            lambda: zero_touch.shares().get(IPS[3], 0.0) >= 0.9 * fair,
            "the new pod at 90% of its fair share of the list",
            within=BLACKOUT + 2 * SCRAPE_INTERVAL,
            detail=lambda: (recent_share(), zero_touch.shares()),
        )
        # Where the calls land: the clients follow the pushed list, measured
        # over half a second, so within that window more.
        eventually_blocking(
            lambda: recent_share() >= 0.9 * fair,
            "the new pod at 90% of its fair share of the calls",
            within=1.0,
            detail=lambda: (recent_share(), zero_touch.shares()),
        )
        # Both clients, neither restarted, send it calls.
        assert len({r.peer for r in new.records()}) >= 2, {r.peer for r in new.records()}
        for loop in loops:
            _no_failures(loop)


def test_a_terminating_pod_leaves_every_list_at_once(zero_touch: ZeroTouch) -> None:
    gone, staying = zero_touch.pods[0], zero_touch.pods[1:3]
    with ExitStack() as stack:
        loops = [
            stack.enter_context(CallLoop(stub, pause=0.002)) for stub in _clients(zero_touch, stack)
        ]
        eventually_blocking(lambda: gone.backend.count > 10, "calls at the first pod")
        zero_touch.kube.set_conditions(
            NAMESPACE, SLICE, gone.ip, ready=False, serving=True, terminating=True
        )
        eventually_blocking(
            lambda: gone.ip not in zero_touch.shares(), "the terminating pod off the list"
        )
        # The balancer lists it no more: the clients' lists went out with that
        # change. A call already on its way when they arrived may still land.
        cutoff = time.monotonic() + 0.1
        eventually_blocking(
            lambda: all(p.backend.calls_since(cutoff) >= ROUNDS for p in staying),
            f"{ROUNDS} calls to each other pod after the leave",
            detail=lambda: _calls(zero_touch.pods),
        )
        for loop in loops:
            _no_failures(loop)
    assert gone.backend.calls_since(cutoff) == 0


def test_a_pod_whose_scrapes_fail_gets_the_median_weight_and_recovers(
    zero_touch: ZeroTouch,
) -> None:
    zero_touch.wait_shares(EXPECTED, "the list weighed by the scraped load")
    failing = zero_touch.pods[0]

    def at_median() -> bool:
        weights = {b.ip: b.effective_weight for b in zero_touch.backends()}
        others = [w for ip, w in weights.items() if ip != failing.ip]
        return len(others) == 2 and (
            abs(weights.get(failing.ip, 0.0) - statistics.median(others))
            <= 0.01 * statistics.median(others)
        )

    failing.telemetry.broken = True
    eventually_blocking(
        at_median, "the failing pod at the median weight", detail=zero_touch.backends
    )
    failing.telemetry.broken = False
    zero_touch.wait_shares(EXPECTED, "the pod weighed by its load again")
