"""End to end with the real SkyWalking Python agent.

    SkyWalking agent (apache-skywalking, subprocess)
        │ one plain gRPC channel to its collector address
        ▼
    agent-shim proxy (real process) ──BalanceLoad──▶ lbserver serve (real process)
        (a sidecar: one agent on 127.0.0.1; a gateway: two agents sharing
        one proxy on another address, as behind the chart's gateway Service)
        │ per call                                      ▲ heartbeats
        ▼                                               │
    OAP stand-ins x3 (processes, the agent's own stubs) ◀── lbserver register x3

The agent reports trace segments on `TraceSegmentReportService/collect`, a
client-streaming call. Every segment id the agent produced is checked against
what the stand-ins received (their record files survive a SIGKILL).
"""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.processes import (
    BalancerProcess,
    ManagedProcess,
    ProcessManager,
    RegistrarProcess,
    _base_env,
    free_port,
    wait_until,
)
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.skywalking import (
    INSTALL_HINT,
    StandInProcess,
    StandInRecord,
    agent_protocol_available,
    start_stand_in,
)

from .conftest import E2E_BALANCER_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SERVICE = "oap"
WEIGHTS = (1, 2, 3)
SHARE_TOLERANCE = 0.10  # +- 10 percentage points


@pytest.fixture(autouse=True, scope="module")
def _agent_installed() -> None:
    """The real agent comes from the project's own install script; a missing
    agent is installed here, never a reason to skip."""
    if not agent_protocol_available():
        script = Path(__file__).parents[2] / "scripts" / "install-test-tools"
        subprocess.run([str(script)], check=True, timeout=600)
        importlib.invalidate_caches()
    assert agent_protocol_available(), INSTALL_HINT


TOPOLOGIES = ("sidecar", "gateway")
GATEWAY_ADDRESS = "127.0.0.3"


class Deployment:
    """lbserver, three registered OAP stand-ins and the proxy, all processes."""

    def __init__(
        self, processes: ProcessManager, weights: Sequence[int], topology: str = "sidecar"
    ) -> None:
        self.topology = topology
        self.processes = processes
        self.balancer: BalancerProcess = processes.start_balancer(env=E2E_BALANCER_ENV)
        self.stand_ins: list[StandInProcess] = [
            start_stand_in(processes, f"oap-{i}") for i in range(len(weights))
        ]
        self.registrars: list[RegistrarProcess] = [
            processes.start_registrar(
                balancers=self.balancer.address,
                service=SERVICE,
                backend=s.address,
                weight=w,
                interval=1,
                ttl=3,
            )
            for s, w in zip(self.stand_ins, weights, strict=True)
        ]
        self.balancer.wait_backends(SERVICE, [s.port for s in self.stand_ins])
        host = GATEWAY_ADDRESS if topology == "gateway" else "127.0.0.1"
        self.proxy: ProxyProcess = start_proxy(
            processes,
            balancers=[self.balancer.address],
            service=SERVICE,
            host=host,
            port=free_port(host),
        )

    def start_agents(
        self, tmp_path: Path, *, segments: int, rate: float, queue_timeout: int
    ) -> list[tuple[ManagedProcess, Path]]:
        """One agent for a sidecar, two sharing the proxy for a gateway; the
        segments and the rate split between them."""
        count = 2 if self.topology == "gateway" else 1
        return [
            (
                self.start_agent(
                    tmp_path / f"produced-{i}.txt",
                    segments=segments // count,
                    rate=rate / count,
                    queue_timeout=queue_timeout,
                    name=f"agent-{i}",
                ),
                tmp_path / f"produced-{i}.txt",
            )
            for i in range(count)
        ]

    def start_agent(
        self, out: Path, *, segments: int, rate: float, queue_timeout: int, name: str = "agent"
    ) -> ManagedProcess:
        argv = [
            sys.executable,
            "-m",
            "tests.support.skywalking_agent",
            "--collector",
            self.proxy.address,
            "--segments",
            str(segments),
            "--rate",
            str(rate),
            "--queue-timeout",
            str(queue_timeout),
            "--out",
            str(out),
            "--linger",
            "60",
        ]
        agent = ManagedProcess(
            f"skywalking-{name}", argv, _base_env(None), self.processes.log_dir / f"{name}.log"
        )
        self.processes.processes.append(agent)
        return agent

    def records(self) -> list[StandInRecord]:
        return [s.record() for s in self.stand_ins]


def _produced(*outs: Path) -> list[str]:
    """Segment ids the agents wrote (complete lines only)."""
    return [
        line.split()[0]
        for out in outs
        if out.exists()
        for line in out.read_text().splitlines()
        if line.count(" ") == 1
    ]


def _finish_agent(agent: ManagedProcess) -> None:
    agent.send_signal(signal.SIGTERM)
    try:
        code = agent.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the agent did not exit after SIGTERM; log:\n{agent.logs()}")
    assert code == 0, agent.logs()
    # The agent logs every failed report ("Exception in segment service ...").
    assert "Exception in" not in agent.logs(), agent.logs()


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_agent_segments_arrive_exactly_once_spread_by_weight(
    processes: ProcessManager, tmp_path: Path, topology: str
) -> None:
    """Must show 1: every segment exactly once; shares within +-10 points of
    the weights. With `agent_queue_timeout=0` each collect call carries one
    segment, so per-call balancing is per-segment balancing."""
    deployment = Deployment(processes, WEIGHTS, topology)
    n = 300
    agents = deployment.start_agents(tmp_path, segments=n, rate=150, queue_timeout=0)
    outs = [out for _, out in agents]

    def all_arrived() -> bool:
        produced = _produced(*outs)
        got = set().union(*(r.segment_ids() for r in deployment.records()))
        return len(produced) == n and got >= set(produced)

    wait_until(
        all_arrived,
        timeout=40,
        interval=0.2,
        message=lambda: (
            f"all {n} segments at the stand-ins (produced {len(_produced(*outs))},"
            f" received {[len(r.segments) for r in deployment.records()]});"
            f" agent log:\n{agents[0][0].logs(4000)}"
        ),
    )
    for agent, _ in agents:
        _finish_agent(agent)

    records = deployment.records()
    produced = _produced(*outs)
    received: Counter[str] = Counter()
    for record in records:
        received.update(record.segment_ids())
    assert len(set(produced)) == n
    assert received == Counter(produced), (
        f"duplicates: {[s for s, c in received.items() if c > 1][:5]},"
        f" unknown: {list(set(received) - set(produced))[:5]}"
    )

    counts = [len(r.segments) for r in records]
    collect_calls = [len(r.collect_calls()) for r in records]
    shares = [c / n for c in counts]
    expected = [w / sum(WEIGHTS) for w in WEIGHTS]
    state = deployment.balancer.service_state(SERVICE)
    diag = (
        f"segments={counts} collect calls={collect_calls} shares={[round(s, 3) for s in shares]}"
        f" expected={[round(e, 3) for e in expected]} balancer="
        f"{[(b.port, b.weight, b.list_entries) for b in state.backends] if state else None}"
    )
    print(diag)  # for the test log
    for share, want in zip(shares, expected, strict=True):
        assert abs(share - want) <= SHARE_TOLERANCE, diag
    # The agent opened one collect stream per segment (plus one empty at exit).
    assert sum(collect_calls) >= n, diag


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_no_segment_lost_when_a_collector_drains_and_another_is_killed(
    processes: ProcessManager, tmp_path: Path, topology: str
) -> None:
    """Must show 2, with the agent's default long collect streams (many
    segments each, `agent_queue_timeout=1`): oap-0's registrar gets SIGTERM
    mid-run (drain: it gets no call started more than 1 s later), then the
    stand-in holding an open collect stream is SIGKILLed (its registrar keeps
    heartbeating, as a sidecar would while its collector crashed). Every
    segment reaches a collector that finished the call carrying it."""
    deployment = Deployment(processes, (1, 1, 1), topology)
    n, rate = 800, 100.0
    agents = deployment.start_agents(tmp_path, segments=n, rate=rate, queue_timeout=1)
    outs = [out for _, out in agents]

    # Drain oap-0 once reporting is under way.
    wait_until(lambda: len(_produced(*outs)) >= n // 4, timeout=30, message="the agent to start")
    drained, drained_registrar = deployment.stand_ins[0], deployment.registrars[0]
    drain_at = time.monotonic()
    drained_registrar.send_signal(signal.SIGTERM)
    assert drained_registrar.wait(10) == 0, drained_registrar.logs()

    # Later, SIGKILL whichever other stand-in has a collect stream open.
    wait_until(lambda: len(_produced(*outs)) >= n // 2, timeout=30, message="half of the segments")

    def victim() -> StandInProcess | None:
        for s in deployment.stand_ins[1:]:
            if any(
                c.started > drain_at + 1.0
                and any(call == c.number for call, _, _ in s.record().segments)
                for c in s.record().open_collect_calls()
            ):
                return s
        return None

    killed = wait_until(victim, timeout=10, interval=0.02, message="an open collect stream")
    killed_open = killed.record().open_collect_calls()
    killed.kill()
    killed_at = time.monotonic()

    wait_until(
        lambda: len(_produced(*outs)) == n, timeout=40, message="the agent to produce everything"
    )
    produced = set(_produced(*outs))

    def delivered() -> Counter[str]:
        """Segments on calls a collector finished (a killed one's open calls don't count)."""
        got: Counter[str] = Counter()
        for s in deployment.stand_ins:
            record = s.record()
            done = {c.number for c in record.calls.values() if c.ended is not None}
            got.update(seg for call, seg, _ in record.segments if call in done)
        return got

    wait_until(
        lambda: set(delivered()) >= produced,
        timeout=40,
        interval=0.2,
        message=lambda: (
            f"every segment delivered (missing {len(produced - set(delivered()))});"
            f" agent log:\n{agents[0][0].logs(4000)}\nproxy log:\n{deployment.proxy.logs(6000)}"
        ),
    )
    for agent, _ in agents:
        _finish_agent(agent)

    got = delivered()
    assert set(got) >= produced
    assert set(got) <= produced
    duplicates = sum(c - 1 for c in got.values())

    # The killed stand-in had segments on a stream it never finished: they
    # were replayed elsewhere from the proxy's buffer.
    lost_there = {
        seg for call, seg, _ in killed.record().segments if call in {c.number for c in killed_open}
    }
    assert lost_there, "the kill did not hit an open stream with segments"
    assert lost_there <= produced
    assert "replaying it on another backend" in deployment.proxy.logs()

    late = drained.record().calls_started_after(drain_at + 1.0)
    assert not late, f"{drained.name} got calls after its drain: {late[:3]}"
    survivor = next(s for s in deployment.stand_ins[1:] if s is not killed)
    assert survivor.record().calls_started_after(killed_at), "nothing reached the survivor"
    print(  # for the test log: how the segments were spread
        f"segments delivered per stand-in: {[len(r.segments) for r in deployment.records()]},"
        f" duplicates (replays of finished-but-unanswered calls): {duplicates}"
    )
