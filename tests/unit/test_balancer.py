"""The Balancer's state machine with a fake clock: TTLs, grace, answers."""

from __future__ import annotations

import ipaddress

import pytest

from lbserver.balancer import Answer, Balancer
from lbserver.domain.membership import TtlPolicy, backend_token
from lbserver.domain.model import BackendState, Registration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registration(n: int, **changes: object) -> Registration:
    fields: dict[str, object] = {
        "service": "oap",
        "instance_id": f"pod-{n}",
        "ip": ipaddress.ip_address(f"10.0.0.{n}"),
        "port": 11800,
    }
    fields.update(changes)
    return Registration(**fields)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **kwargs: object) -> Balancer:
    return Balancer(clock=clock, wall_clock=clock, ttl_policy=TtlPolicy(default=10), **kwargs)  # type: ignore[arg-type]


def test_backend_expires_after_its_ttl_not_before(clock: Clock) -> None:
    balancer = make(clock)
    balancer.heartbeat(registration(1))
    clock.now += 9.9
    balancer.tick()
    assert balancer.server_list("oap") is not None
    balancer.heartbeat(registration(1))  # refresh
    clock.now += 9.9
    balancer.tick()
    assert balancer.server_list("oap") is not None
    clock.now += 0.2
    balancer.tick()
    assert balancer.server_list("oap") is None
    assert "oap" not in balancer.membership


def test_requested_ttl_is_clamped(clock: Clock) -> None:
    balancer = Balancer(clock=clock, ttl_policy=TtlPolicy(default=10, minimum=2, maximum=30))
    assert balancer.heartbeat(registration(1, requested_ttl=0.5)).ttl == 2
    assert balancer.heartbeat(registration(1, requested_ttl=100)).ttl == 30
    assert balancer.heartbeat(registration(1)).ttl == 10


async def test_watch_sees_changes_and_coalesces(clock: Clock) -> None:
    balancer = make(clock)
    watch = balancer.watch("oap:11800")
    version, answer = watch.current()
    assert answer == Answer("fallback", service=None)
    balancer.heartbeat(registration(1))
    balancer.heartbeat(registration(2))
    version, answer = await watch.next(version)
    # Two changes, one wake-up, newest state.
    assert answer.kind == "list" and answer.servers is not None and len(answer.servers) == 2
    assert watch.service == "oap"
    watch.close()
    assert balancer.clients_per_service() == {}


async def test_identical_rebuild_does_not_bump_the_version(clock: Clock) -> None:
    balancer = make(clock)
    balancer.heartbeat(registration(1))
    watch = balancer.watch("oap")
    version, _ = watch.current()
    balancer.heartbeat(registration(1))
    assert watch.current()[0] == version


def test_startup_grace_then_fallback(clock: Clock) -> None:
    balancer = make(clock, startup_grace=5.0)
    watch = balancer.watch("oap")
    assert watch.current()[1].kind == "pending"
    clock.now += 5.0
    balancer.tick()
    assert watch.current()[1].kind == "fallback"


def test_all_draining_means_no_list(clock: Clock) -> None:
    balancer = make(clock)
    watch = balancer.watch("oap")
    balancer.heartbeat(registration(1))
    assert watch.current()[1].kind == "list"
    balancer.heartbeat(registration(1, state=BackendState.DRAINING))
    assert watch.current()[1] == Answer("fallback", service="oap")
    # Still known (and listed for operators) while draining.
    assert [b.instance_id for b in balancer.view()[0].backends] == ["pod-1"]


def test_replicas_fed_the_same_heartbeats_build_the_same_lists(clock: Clock) -> None:
    first, second = make(clock), make(clock)
    regs = [registration(n, weight=n) for n in (1, 2, 3)]
    for reg in regs:
        first.heartbeat(reg)
    for reg in reversed(regs):
        second.heartbeat(reg)
    assert first.server_list("oap") == second.server_list("oap")


def test_tokens_are_stable_unique_and_short() -> None:
    a = backend_token("oap", "pod-1", "10.0.0.1:11800")
    assert a == backend_token("oap", "pod-1", "10.0.0.1:11800")
    assert a != backend_token("oap", "pod-2", "10.0.0.1:11800")
    assert a.isalnum() and len(a.encode()) < 50


def test_client_stats_accumulate(clock: Clock) -> None:
    from lbserver.balancer import ClientCallStats

    balancer = make(clock)
    balancer.record_client_stats("oap", ClientCallStats(3, 3, 0, 3, {"t": 1}, 1))
    balancer.record_client_stats("oap", ClientCallStats(2, 1, 1, 0, {"t": 2, "u": 1}, 1))
    stats = balancer.view("oap")[0].client_stats
    assert (stats.calls_started, stats.calls_finished, stats.reports) == (5, 4, 2)
    assert stats.calls_dropped_by_token == {"t": 3, "u": 1}
