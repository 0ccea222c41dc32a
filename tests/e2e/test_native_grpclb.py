"""End to end: gRPC's own grpclb client (C-core, through grpcio) against real
`lbserver serve` and `lbserver register` processes.

The client finds the balancer the native way: a plain channel with SRV queries
on and the grpclb service config, whose target resolves through the in-test DNS
server (`_grpclb._tcp.<name>` -> the balancer, A `<name>` -> 127.0.0.1, the
fallback address). The channel target's port is a separate counting "fallback"
backend, so a client that falls back is seen doing so.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Sequence

import pytest

from lbserver.proto.v1 import lbserver_pb2
from tests.support.backends import (
    BackendFleet,
    CallLoop,
    CountingBackend,
    aio_call_stub,
    call_stub,
    call_until_served,
    grpclb_aio_channel,
    grpclb_channel,
)
from tests.support.dns import DnsServer
from tests.support.eventually import eventually_blocking
from tests.support.processes import BalancerProcess, ProcessManager, RegistrarProcess

from .conftest import E2E_BALANCER_ENV, FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

CALL_TIMEOUT = 5.0  # deadline of every test call
BALANCE_CALLS = 400
BALANCE_TOLERANCE = 0.05  # +- 5 percentage points
# Calls each remaining backend gets after a removal's cutoff: how far past it
# the check that the removed one gets none looks.
ROUNDS = 20


def _publish(dns: DnsServer, name: str, balancer: BalancerProcess) -> None:
    """SRV `_grpclb._tcp.<name>` -> the balancer; A `<name>` -> 127.0.0.1 (fallback)."""
    dns.set_balancers(name, [(balancer.host, balancer.port)])
    dns.set_addresses(name, ["127.0.0.1"])


def _register_all(
    processes: ProcessManager,
    balancer: BalancerProcess,
    service: str,
    backends: Sequence[CountingBackend],
    weights: Sequence[int] | None = None,
    *,
    interval: float | None = None,
    ttl: float | None = None,
) -> list[RegistrarProcess]:
    weights = weights or [1] * len(backends)
    return [
        processes.start_registrar(
            balancers=balancer.address,
            service=service,
            backend=b.address,
            weight=w,
            interval=interval,
            ttl=ttl,
        )
        for b, w in zip(backends, weights, strict=True)
    ]


def _shares(fleet: BackendFleet) -> list[float]:
    total = fleet.total()
    return [c / total for c in fleet.counts()] if total else [0.0] * len(fleet)


def _check_weighted_spread(
    fleet: BackendFleet,
    fallback: CountingBackend,
    state: lbserver_pb2.ServiceStatus,
    expected: Sequence[float],
) -> None:
    """Counts within tolerance of `expected`; one valid, distinct lb-token per
    backend, equal to the one the balancer reports for it."""
    counts = fleet.counts()
    listed = state.backends
    shares = _shares(fleet)
    diag = (
        f"counts={counts} shares={[round(s, 3) for s in shares]} expected={list(expected)}"
        f" balancer={[(b.port, b.weight, b.list_entries, round(b.share, 3)) for b in listed]}"
    )
    assert fleet.total() >= BALANCE_CALLS, diag
    for share, want in zip(shares, expected, strict=True):
        assert abs(share - want) <= BALANCE_TOLERANCE, diag
    assert fallback.count == 0, f"fallback backend got {fallback.count} calls; {diag}"

    token_by_port = {b.port: b.load_balance_token for b in state.backends}
    seen: list[str] = []
    for backend in fleet:
        tokens = backend.tokens()
        assert len(tokens) == 1, f"{backend.name}: tokens {dict(tokens)}"
        (token,) = tokens
        assert token, f"{backend.name}: a call without an lb-token"
        assert len(token.encode()) <= 50, f"{backend.name}: token {token!r} is over 50 bytes"
        assert token == token_by_port[backend.port], (backend.name, token, token_by_port)
        seen.append(token)
    assert len(set(seen)) == len(seen), f"tokens are not distinct: {seen}"


def test_sync_client_spreads_calls_by_weight(
    dns_server: DnsServer,
    processes: ProcessManager,
    backend_fleet: FleetFactory,
    balancer: BalancerProcess,
) -> None:
    fleet = backend_fleet(3)
    fallback = backend_fleet(1, "fallback")[0]
    _register_all(processes, balancer, "weighted", list(fleet), [1, 1, 2], interval=1)
    state = balancer.wait_backends("weighted", [b.port for b in fleet])
    _publish(dns_server, "weighted.test", balancer)

    with grpclb_channel(dns_server.target("weighted.test", fallback.port)) as channel:
        stub = call_stub(channel)
        call_until_served(stub, list(fleet))
        fleet.reset()
        for _ in range(BALANCE_CALLS):
            stub(b"x", timeout=CALL_TIMEOUT)

    state = balancer.service_state("weighted") or state
    _check_weighted_spread(fleet, fallback, state, [0.25, 0.25, 0.5])
    # The client found the balancer through the SRV record.
    names = {(q.name, q.qtype) for q in dns_server.queries()}
    assert ("_grpclb._tcp.weighted.test", "SRV") in names


async def test_aio_client_spreads_calls_by_weight(
    dns_server: DnsServer,
    processes: ProcessManager,
    backend_fleet: FleetFactory,
    balancer: BalancerProcess,
) -> None:
    fleet = backend_fleet(3)
    fallback = backend_fleet(1, "fallback")[0]
    # Registered with the domain this time: the client's name "weighted-aio.test:PORT"
    # maps to it by the host-without-port rule (the sync test uses the first label).
    service = "weighted-aio.test"
    _register_all(processes, balancer, service, list(fleet), [1, 1, 2], interval=1)
    state = await asyncio.to_thread(balancer.wait_backends, service, [b.port for b in fleet])
    _publish(dns_server, "weighted-aio.test", balancer)

    async with grpclb_aio_channel(dns_server.target("weighted-aio.test", fallback.port)) as channel:
        stub = aio_call_stub(channel)
        deadline = time.monotonic() + 15
        while not all(b.count for b in fleet):
            assert time.monotonic() < deadline, f"not all backends served: {fleet.counts()}"
            await stub(b"warm-up", timeout=CALL_TIMEOUT, wait_for_ready=True)
        fleet.reset()
        batch = 8  # a few calls in flight at once, as an asyncio client would
        for _ in range(BALANCE_CALLS // batch):
            await asyncio.gather(*(stub(b"x", timeout=CALL_TIMEOUT) for _ in range(batch)))

    current = await asyncio.to_thread(balancer.service_state, service)
    state = current or state
    _check_weighted_spread(fleet, fallback, state, [0.25, 0.25, 0.5])


def _assert_no_failures(loop: CallLoop) -> None:
    successes, failures = loop.snapshot()
    assert not failures, (
        f"{len(failures)} of {successes + len(failures)} calls failed, first:"
        f" {failures[0].code} {failures[0].details!r}"
    )


def _remove_first_backend_under_load(
    dns_server: DnsServer,
    processes: ProcessManager,
    backend_fleet: FleetFactory,
    balancer: BalancerProcess,
    service: str,
    end_registrar: Callable[[RegistrarProcess], float],
    cutoff_text: str,
    *,
    interval: float,
    ttl: float | None = None,
) -> None:
    """Three backends of `service` get calls without pause while the first
    one's registrar is ended by `end_registrar`, which returns the time after
    which that backend must get no more calls (`cutoff_text` says which)."""
    fleet = backend_fleet(3)
    fallback = backend_fleet(1, "fallback")[0]
    registrars = _register_all(
        processes, balancer, service, list(fleet), interval=interval, ttl=ttl
    )
    balancer.wait_backends(service, [b.port for b in fleet])
    _publish(dns_server, f"{service}.test", balancer)

    with grpclb_channel(dns_server.target(f"{service}.test", fallback.port)) as channel:
        stub = call_stub(channel)
        call_until_served(stub, list(fleet))
        with CallLoop(stub) as loop:
            cutoff = end_registrar(registrars[0])
            # Past the cutoff by calls, not seconds: the client goes round its
            # list, so had the first backend still been in it, it would have
            # had its share of these.
            eventually_blocking(
                lambda: all(b.calls_since(cutoff) >= ROUNDS for b in list(fleet)[1:]),
                f"{ROUNDS} calls to each other backend after the cutoff",
                within=max(0.0, cutoff - time.monotonic()) + 10,
                detail=fleet.counts,
            )
        _assert_no_failures(loop)

    late = fleet[0].calls_since(cutoff)
    assert late == 0, f"{fleet[0].name} got {late} calls more than {cutoff_text}"
    for backend in list(fleet)[1:]:
        assert backend.calls_since(cutoff) > 0, f"{backend.name} got no calls after the cutoff"
    assert fallback.count == 0
    assert balancer.backend_ports(service) == {fleet[1].port, fleet[2].port}


def test_sigterm_registrar_deregisters_within_2s(
    dns_server: DnsServer,
    processes: ProcessManager,
    backend_fleet: FleetFactory,
    balancer: BalancerProcess,
) -> None:
    def sigterm(registrar: RegistrarProcess) -> float:
        sigterm_at = time.monotonic()
        registrar.send_signal(signal.SIGTERM)
        assert registrar.wait(timeout=10) == 0, registrar.logs()
        return sigterm_at + 2.0

    _remove_first_backend_under_load(
        dns_server,
        processes,
        backend_fleet,
        balancer,
        "drain",
        sigterm,
        "2 s after its SIGTERM",
        interval=1,
    )


def test_sigkilled_registrar_expires_after_ttl(
    dns_server: DnsServer,
    processes: ProcessManager,
    backend_fleet: FleetFactory,
    balancer: BalancerProcess,
) -> None:
    ttl = 2.0

    def sigkill(registrar: RegistrarProcess) -> float:
        killed_at = time.monotonic()
        registrar.kill()
        return killed_at + ttl + 1.0

    _remove_first_backend_under_load(
        dns_server,
        processes,
        backend_fleet,
        balancer,
        "expire",
        sigkill,
        "TTL+1 s after SIGKILL",
        interval=0.5,
        ttl=ttl,
    )


def test_unknown_service_falls_back_to_resolver_addresses(
    dns_server: DnsServer,
    backend_fleet: FleetFactory,
    processes: ProcessManager,
    balancer: BalancerProcess,
) -> None:
    # Another service is registered: its backends must not get this client's calls.
    others = backend_fleet(1, "other")
    _register_all(processes, balancer, "known", list(others), interval=1)
    balancer.wait_backends("known", [others[0].port])

    fallback = backend_fleet(1, "fallback")[0]
    _publish(dns_server, "nobody.test", balancer)
    # A huge fallback timeout: only the balancer's fallback_response can make
    # this client use its resolver addresses within the test's time.
    options = [("grpc.grpclb_fallback_timeout_ms", 600_000)]
    with grpclb_channel(dns_server.target("nobody.test", fallback.port), options) as channel:
        stub = call_stub(channel)
        assert stub(b"first", timeout=8.0, wait_for_ready=True) == fallback.name.encode()
        for _ in range(20):
            assert stub(b"x", timeout=CALL_TIMEOUT) == fallback.name.encode()

    assert fallback.count == 21
    assert fallback.tokens() == {None: 21}, "fallback calls carry no lb-token"
    assert others.total() == 0


def test_balancer_restart_keeps_clients_working(
    dns_server: DnsServer,
    processes: ProcessManager,
    backend_fleet: FleetFactory,
) -> None:
    heartbeat = 1.0
    env = {
        **E2E_BALANCER_ENV,
        "LBSERVER_HEARTBEAT_INTERVAL": str(heartbeat),
        # Longer than a heartbeat interval: the restarted balancer must not send
        # fallback before the registrars are back.
        "LBSERVER_STARTUP_GRACE": "4",
    }
    balancer = processes.start_balancer(env=env)
    fleet = backend_fleet(4)
    first, late = list(fleet)[:3], fleet[3]
    fallback = backend_fleet(1, "fallback")[0]
    _register_all(processes, balancer, "restart", first, interval=heartbeat)
    balancer.wait_backends("restart", [b.port for b in first])
    _publish(dns_server, "restart.test", balancer)

    with grpclb_channel(dns_server.target("restart.test", fallback.port)) as channel:
        stub = call_stub(channel)
        call_until_served(stub, first)
        with CallLoop(stub) as loop:
            balancer.kill()
            down_at = time.monotonic()
            eventually_blocking(
                lambda: all(b.calls_since(down_at + 0.5) for b in first),
                "calls while the balancer is down",
                detail=fleet.counts,
            )
            assert all(b.calls_since(down_at + 0.5) for b in first), (
                f"calls stopped while the balancer was down: {fleet.counts()}"
            )

            balancer = processes.restart_balancer(balancer)
            ready_at = time.monotonic()
            balancer.wait_backends("restart", [b.port for b in first], timeout=heartbeat + 1.5)
            back_after = time.monotonic() - ready_at

            processes.start_registrar(
                balancers=balancer.address,
                service="restart",
                backend=late.address,
                interval=heartbeat,
            )
            balancer.wait_backends("restart", [b.port for b in fleet])
            # The client reconnects to the balancer (with its own backoff) and
            # gets the new list: the 4th backend receives calls.
            assert late.wait_for_calls(5, timeout=25), (
                f"4th backend got no calls after the restart: {fleet.counts()}"
            )
            assert all(b.calls_since(ready_at) for b in first)
        _assert_no_failures(loop)

    assert back_after <= heartbeat + 1.5
    assert fallback.count == 0, "clients were pushed into fallback by the restart"
