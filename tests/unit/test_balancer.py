"""The Balancer's state machine with a fake clock: TTLs, grace, answers."""

from __future__ import annotations

import ipaddress

import pytest

from lbserver.balancer import Answer, Balancer
from lbserver.domain.membership import TtlPolicy, backend_token
from lbserver.domain.model import BackendState, Registration
from lbserver.watch import Watch


async def next_answer(watch: Watch, seen_version: int) -> tuple[int, Answer]:
    """The newest answer once its version differs from `seen_version`, waited
    for as a BalanceLoad stream waits (Watch.changed)."""
    while (waiter := watch.changed(seen_version)) is not None:
        await waiter
    return watch.current()


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


def run_for(balancer: Balancer, clock: Clock, seconds: float, step: float = 0.25) -> None:
    """Advances time as a running balancer sees it: ticking every `step`."""
    end = clock.now + seconds
    while clock.now + step <= end + 1e-9:
        clock.now += step
        balancer.tick()
    clock.now = end
    balancer.tick()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **kwargs: object) -> Balancer:
    return Balancer(clock=clock, wall_clock=clock, ttl_policy=TtlPolicy(default=10), **kwargs)  # type: ignore[arg-type]


def test_backend_expires_after_its_ttl_not_before(clock: Clock) -> None:
    balancer = make(clock)
    balancer.heartbeat(registration(1))
    run_for(balancer, clock, 9.9)
    assert balancer.server_list("oap") is not None
    balancer.heartbeat(registration(1))  # refresh
    run_for(balancer, clock, 9.9)
    assert balancer.server_list("oap") is not None
    run_for(balancer, clock, 0.2)
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
    version, answer = await next_answer(watch, version)
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
    from lbserver.domain.serverlist import DROP_TOKEN

    balancer = make(clock)
    balancer.heartbeat(registration(1))
    list_now = balancer.server_list("oap")
    assert list_now is not None
    token = list_now.entries[0].token
    balancer.record_client_stats("oap", ClientCallStats(3, 3, 0, 3, {token: 1}, 1))
    balancer.record_client_stats(
        "oap", ClientCallStats(2, 1, 1, 0, {token: 2, DROP_TOKEN: 1, "u": 1}, 1)
    )
    stats = balancer.view("oap")[0].client_stats
    assert (stats.calls_started, stats.calls_finished, stats.reports) == (5, 4, 2)
    # Drops under tokens of the list (and lbserver's own) are kept by token;
    # any other token only adds to one sum.
    assert stats.calls_dropped_by_token == {token: 3, DROP_TOKEN: 1}
    assert (stats.calls_dropped_other_tokens, stats.drop_tokens_ignored) == (1, 1)


def loaded(n: int, cpu: float, rps: float = 100.0, **changes: object) -> Registration:
    from lbserver.domain.model import LoadReport

    return registration(n, load=LoadReport(cpu_utilization=cpu, requests_per_second=rps), **changes)


def make_loaded(clock: Clock, **list_changes: object) -> Balancer:
    from lbserver.balancer import ListSettings
    from lbserver.domain.weights import LoadWeightSettings

    return make(
        clock,
        load_settings=LoadWeightSettings(blackout=0.0, smoothing=1.0),
        list_settings=ListSettings(**list_changes),  # type: ignore[arg-type]
    )


def test_load_reports_become_list_shares(clock: Clock) -> None:
    balancer = make_loaded(clock)
    balancer.heartbeat(loaded(1, cpu=0.9))
    balancer.heartbeat(loaded(2, cpu=0.3))
    servers = balancer.server_list("oap")
    assert servers is not None
    tokens = {b.instance_id: b.token for b in balancer.membership.backends("oap")}
    assert servers.count(tokens["pod-2"]) == 3 * servers.count(tokens["pod-1"])


def test_small_share_moves_are_not_pushed(clock: Clock) -> None:
    balancer = make_loaded(clock, share_threshold=0.05, max_length=100)
    balancer.heartbeat(loaded(1, cpu=0.5))
    balancer.heartbeat(loaded(2, cpu=0.5))
    before = balancer.server_list("oap")
    balancer.heartbeat(loaded(1, cpu=0.52))  # about one point of share
    assert balancer.server_list("oap") == before
    balancer.heartbeat(loaded(1, cpu=0.9))  # many points
    assert balancer.server_list("oap") != before


def test_weight_changes_are_rate_limited_but_membership_is_not(clock: Clock) -> None:
    balancer = make_loaded(clock, min_push_interval=5.0)
    balancer.heartbeat(loaded(1, cpu=0.5))
    balancer.heartbeat(loaded(2, cpu=0.5))  # a join: pushed at once
    joined = balancer.server_list("oap")
    assert joined is not None and len({e.token for e in joined.entries}) == 2
    balancer.heartbeat(loaded(1, cpu=0.9))
    assert balancer.server_list("oap") == joined  # too soon after the last push
    run_for(balancer, clock, 5.0)
    assert balancer.server_list("oap") != joined
    balancer.heartbeat(loaded(2, cpu=0.5, state=BackendState.DRAINING))
    drained = balancer.server_list("oap")
    assert drained is not None and len({e.token for e in drained.entries}) == 1  # never waits


def test_overload_shedding_adds_drop_entries(clock: Clock) -> None:
    from lbserver.domain.weights import SheddingSettings

    balancer = make_loaded(clock, shedding=SheddingSettings(utilization=0.8))
    balancer.heartbeat(loaded(1, cpu=1.0))
    balancer.heartbeat(loaded(2, cpu=1.0))
    servers = balancer.server_list("oap")
    assert servers is not None
    drops = sum(1 for entry in servers.entries if entry.drop)
    assert drops / len(servers) == pytest.approx(0.2, abs=0.1)
    balancer.heartbeat(loaded(2, cpu=0.5))
    relieved = balancer.server_list("oap")
    assert relieved is not None and not any(entry.drop for entry in relieved.entries)


async def test_subsetting_gives_each_client_its_share_of_backends(clock: Clock) -> None:
    balancer = make_loaded(clock, subset_sizes={"oap": 2})
    for n in range(1, 7):
        balancer.heartbeat(registration(n))
    watches = [balancer.watch("oap") for _ in range(9)]
    per_backend: dict[bytes, int] = {}
    for watch in watches:
        servers = watch.servers(watch.current()[1])
        assert servers is not None and len({e.ip for e in servers.entries}) == 2
        for ip in {e.ip for e in servers.entries}:
            per_backend[ip] = per_backend.get(ip, 0) + 1
    assert len(per_backend) == 6
    assert max(per_backend.values()) - min(per_backend.values()) <= 1
    for watch in watches:
        watch.close()


def test_a_pause_of_the_balancer_does_not_expire_healthy_backends(clock: Clock) -> None:
    balancer = make(clock)
    balancer.heartbeat(registration(1))
    balancer.tick()
    clock.now += 60.0  # SIGSTOP, VM freeze: no tick and no heartbeat for a minute
    balancer.tick()
    assert balancer.server_list("oap") is not None
    # Once running again, a backend that stays silent still expires on time.
    run_for(balancer, clock, 9.5)
    assert balancer.server_list("oap") is not None
    run_for(balancer, clock, 0.75)
    assert balancer.server_list("oap") is None


def test_wall_clock_jumps_do_not_matter(clock: Clock) -> None:
    wall = [1_000_000.0]
    balancer = Balancer(clock=clock, wall_clock=lambda: wall[0], ttl_policy=TtlPolicy(default=10))
    balancer.heartbeat(registration(1))
    wall[0] -= 3600.0  # NTP steps the wall clock back an hour
    clock.now += 1.0
    balancer.tick()
    wall[0] += 7200.0
    clock.now += 1.0
    balancer.tick()
    assert balancer.server_list("oap") is not None


def test_a_small_difference_is_pushed_once_it_has_lasted(clock: Clock) -> None:
    balancer = make_loaded(clock, share_threshold=0.05, settle_time=5.0, max_length=100)
    balancer.heartbeat(loaded(1, cpu=0.5))
    balancer.heartbeat(loaded(2, cpu=0.5))
    before = balancer.server_list("oap")
    balancer.heartbeat(loaded(1, cpu=0.52))  # about one point of share: held back...
    assert balancer.server_list("oap") == before
    run_for(balancer, clock, 4.0)
    assert balancer.server_list("oap") == before
    run_for(balancer, clock, 1.5)  # ...until it has lasted settle_time
    settled = balancer.server_list("oap")
    assert settled is not None and settled != before


def test_load_only_heartbeats_are_applied_once_per_tick(clock: Clock) -> None:
    balancer = make_loaded(clock)
    balancer.heartbeat(loaded(1, cpu=0.5))
    balancer.heartbeat(loaded(2, cpu=0.5))
    watch = balancer.watch("oap")
    version, equal = watch.current()
    balancer.heartbeat(loaded(1, cpu=0.9))
    balancer.heartbeat(loaded(1, cpu=0.8))
    # Not rebuilt per heartbeat: watchers see the change at the next tick...
    assert watch.current()[0] == version
    balancer.tick()
    new_version, unequal = watch.current()
    assert new_version > version and unequal.servers != equal.servers
    # ...from the newest report (0.8 vs 0.5 is 5:8 of capacity).
    tokens = {b.instance_id: b.token for b in balancer.membership.backends("oap")}
    assert unequal.servers is not None
    ratio = unequal.servers.count(tokens["pod-1"]) / unequal.servers.count(tokens["pod-2"])
    assert ratio == pytest.approx(5 / 8, rel=0.05)
    # Anything else a list shows is applied at once.
    balancer.heartbeat(loaded(2, cpu=0.5, state=BackendState.DRAINING))
    drained = watch.current()[1].servers
    assert drained is not None and {e.token for e in drained.entries} == {tokens["pod-1"]}
    watch.close()


def test_reading_a_list_applies_pending_load(clock: Clock) -> None:
    balancer = make_loaded(clock)
    balancer.heartbeat(loaded(1, cpu=0.5))
    balancer.heartbeat(loaded(2, cpu=0.5))
    before = balancer.server_list("oap")
    balancer.heartbeat(loaded(1, cpu=0.9))
    assert balancer.server_list("oap") != before
    assert balancer.view("oap")[0].servers == balancer.server_list("oap")
