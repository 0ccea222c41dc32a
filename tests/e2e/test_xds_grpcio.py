"""End to end: grpcio's own xDS client (C-core, `GRPC_XDS_BOOTSTRAP` pointing
at lbserver, target `xds:///oap`) against real `lbserver serve` and `lbserver
register` processes.

The client runs in a subprocess (tests/support/xds_client.py: grpcio reads
its bootstrap once per process) with docs/xds/bootstrap.json as users copy
it, only `server_uri` set to the test balancer. It calls one call at a time
at a steady rate and records every call, so a lost call is seen.

- Weights 1:1:2 give shares within 5 points.
- A backend drained the way users drain (its registrar's SIGTERM: DRAINING,
  out of the lists) gets no call once the balancer has pushed the
  endpoints without it; the test's own ADS stream tells when that was.
- A balancer SIGKILL loses no call: the client keeps its last accepted
  config; after the restart (registrars re-register) it resyncs, and
  follows a change only the new balancer knows.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lbserver.proto.v1 import lbserver_pb2 as pb
from tests.support.backends import CountingBackend
from tests.support.eventually import eventually_blocking
from tests.support.processes import BalancerProcess, ProcessManager, RegistrarProcess
from tests.support.traffic import Outcome
from tests.support.xds_client import (
    BOOTSTRAP,
    EdsWatch,
    XdsClientProcess,
    bootstrap_file,
    start_xds_client,
)

from .conftest import E2E_BALANCER_ENV, FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

SERVICE = "oap"
TARGET = f"xds:///{SERVICE}"
# gRPC's weighted_target picks a locality at random by weight, so shares
# over n calls spread with sd sqrt(p(1-p)/n): 2.5 points for p=0.5 at 400
# calls, which puts +-5 points only 2 sd away (a few % of runs would fail).
# Over 2400 calls +-5 points is 4.9 sd for the 2-weight backend (measured:
# sd 21 calls per 1600 over 34 windows, binomial's 20).
SHARE_CALLS = 2400
SHARE_TOLERANCE = 0.05
SHARE_PAUSE = 0.001  # between the share test's calls (the others: the default 5 ms)
# Calls each remaining backend gets after a cutoff: how far past it the
# check that a removed backend gets none looks.
ROUNDS = 20
# Calls already in flight (or picked) when the push reaches the client: the
# watch's stream and the client's are written one after the other, and the
# client swaps in its new picker after parsing the update; calls starting
# within this much after the watch saw the push may still use the old one.
IN_FLIGHT = 0.5
DRAIN_SECONDS = 30.0  # the drained backend stays registered (DRAINING) through the test
HEARTBEAT = 1.0
OUTAGE_ROUNDS = 100
STARTUP_GRACE = 8.0


def _register(
    processes: ProcessManager,
    balancer: BalancerProcess,
    backend: CountingBackend,
    weight: int = 1,
    drain_seconds: float = 0.0,
) -> RegistrarProcess:
    return processes.start_registrar(
        balancers=balancer.address,
        service=SERVICE,
        backend=backend.address,
        weight=weight,
        interval=HEARTBEAT,
        drain_seconds=drain_seconds,
    )


def _client(
    processes: ProcessManager, balancer: BalancerProcess, tmp: Path, pause: float = 0.005
) -> XdsClientProcess:
    """The xDS client subprocess, bootstrapped from docs/xds/bootstrap.json,
    making a call every `pause` seconds plus the call's time."""
    path = bootstrap_file(balancer.address, tmp / "bootstrap.json")
    written, shipped = json.loads(path.read_text()), json.loads(BOOTSTRAP.read_text())
    assert written["xds_servers"][0]["server_uri"] == balancer.address
    written["xds_servers"][0]["server_uri"] = shipped["xds_servers"][0]["server_uri"]
    assert written == shipped, "the test bootstrap differs from docs/xds/bootstrap.json"
    return start_xds_client(
        processes, bootstrap=path, target=TARGET, out=tmp / "calls.txt", pause=pause
    )


def _served(client: XdsClientProcess, backends: Sequence[CountingBackend]) -> None:
    eventually_blocking(
        lambda: all(b.count for b in backends) or not client.alive(),
        "the xDS client's calls at every backend",
        within=20,
        detail=lambda: ([b.count for b in backends], client.logs(3000)),
    )
    assert client.alive(), client.logs()


def _calls_to_each(
    client: XdsClientProcess,
    backends: Sequence[CountingBackend],
    *,
    since: float,
    what: str,
    rounds: int = ROUNDS,
) -> None:
    """Waits for `rounds` calls to each of `backends` after `since`, failing
    as soon as the client records a failed call."""
    eventually_blocking(
        lambda: client.failures() or all(b.calls_since(since) >= rounds for b in backends),
        f"{rounds} calls to each backend {what}",
        within=20,
        detail=lambda: ([b.count for b in backends], client.logs(3000)),
    )
    _no_failures(client)


@contextlib.contextmanager
def _frozen(registrars: Sequence[RegistrarProcess]) -> Iterator[None]:
    """SIGSTOP `registrars` for the block, SIGCONT after it."""
    for registrar in registrars:
        registrar.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for registrar in registrars:
            registrar.send_signal(signal.SIGCONT)


def _no_failures(client: XdsClientProcess) -> list[Outcome]:
    calls = client.outcomes()
    failed = [o for o in calls if o.backend is None]
    assert not failed, (
        f"{len(failed)} of {len(calls)} calls failed: {Counter(o.code for o in failed)};"
        f" first at {failed[0].started:.3f}\n{client.logs(6000)}"
    )
    return calls


def test_weights_1_1_2_give_shares_within_5_points(
    processes: ProcessManager,
    backend_fleet: FleetFactory,
    balancer: BalancerProcess,
    tmp_path: Path,
) -> None:
    fleet = backend_fleet(3)
    for backend, weight in zip(fleet, [1, 1, 2], strict=True):
        _register(processes, balancer, backend, weight)
    balancer.wait_backends(SERVICE, [b.port for b in fleet])
    client = _client(processes, balancer, tmp_path, pause=SHARE_PAUSE)
    _served(client, list(fleet))

    since = time.monotonic()

    def window() -> list[Outcome] | None:
        calls = [o for o in client.outcomes() if o.started > since]
        return calls[:SHARE_CALLS] if len(calls) >= SHARE_CALLS else None

    calls = eventually_blocking(window, f"{SHARE_CALLS} calls", within=30, detail=fleet.counts)
    _no_failures(client)
    counts = Counter(o.backend for o in calls)
    shares = [counts[b.name] / SHARE_CALLS for b in fleet]
    print(f"\n[xds shares] {SHARE_CALLS} calls: {[counts[b.name] for b in fleet]}")
    for share, want in zip(shares, [0.25, 0.25, 0.5], strict=True):
        assert abs(share - want) <= SHARE_TOLERANCE, (shares, dict(counts))


def test_drained_backend_gets_no_call_after_the_push(
    processes: ProcessManager,
    backend_fleet: FleetFactory,
    balancer: BalancerProcess,
    tmp_path: Path,
) -> None:
    fleet = backend_fleet(3)
    drained, *rest = fleet
    registrar = _register(processes, balancer, drained, drain_seconds=DRAIN_SECONDS)
    for backend in rest:
        _register(processes, balancer, backend)
    everyone = {b.port for b in fleet}
    balancer.wait_backends(SERVICE, everyone)

    with EdsWatch(balancer.address, SERVICE) as watch:
        eventually_blocking(lambda: watch.first_with(everyone), "EDS with every backend")
        client = _client(processes, balancer, tmp_path)
        _served(client, list(fleet))

        registrar.send_signal(signal.SIGTERM)  # drain: DRAINING, out of the list
        remaining = frozenset(b.port for b in rest)
        push = eventually_blocking(
            lambda: watch.first_with(remaining),
            "the EDS push without the drained backend",
            detail=watch.updates,
        )
        cutoff = push.at + IN_FLIGHT
        _calls_to_each(client, rest, since=cutoff, what="after the push")
        assert watch.error is None, watch.error

    state = balancer.service_state(SERVICE)
    assert state is not None
    drained_state = {b.port: (b.state, b.list_entries) for b in state.backends}[drained.port]
    assert drained_state == (pb.BACKEND_STATE_DRAINING, 0), "not drained but deregistered"
    assert registrar.alive(), "the drain ended early"
    last = max((r.started for r in drained.records()), default=0.0)
    print(f"\n[xds drain] last call to the drained backend {last - push.at:+.3f}s after the push")
    late = drained.calls_since(cutoff)
    assert late == 0, f"{drained.name} got {late} calls more than {IN_FLIGHT}s after the push"
    _no_failures(client)


def _restart_rig(
    processes: ProcessManager, backend_fleet: FleetFactory, tmp_path: Path
) -> tuple[BalancerProcess, list[RegistrarProcess], list[CountingBackend], XdsClientProcess]:
    """A balancer with a startup grace, three backends of oap weighted 1:1:2,
    and the xDS client calling them all."""
    env = {
        **E2E_BALANCER_ENV,
        # The restarted balancer says nothing about oap (rather than "no such
        # service") until the registrars are back, for this long.
        "LBSERVER_STARTUP_GRACE": str(STARTUP_GRACE),
    }
    balancer = processes.start_balancer(env=env)
    backends = list(backend_fleet(3))
    registrars = [
        _register(processes, balancer, backend, weight)
        for backend, weight in zip(backends, [1, 1, 2], strict=True)
    ]
    balancer.wait_backends(SERVICE, [b.port for b in backends])
    client = _client(processes, balancer, tmp_path)
    _served(client, backends)
    return balancer, registrars, backends, client


def test_balancer_sigkill_loses_no_call(
    processes: ProcessManager, backend_fleet: FleetFactory, tmp_path: Path
) -> None:
    balancer, _, backends, client = _restart_rig(processes, backend_fleet, tmp_path)
    balancer.kill()
    down_at = time.monotonic()
    # The client keeps calling on the config it last accepted: every call
    # succeeds and every backend keeps getting its share, for OUTAGE_ROUNDS
    # calls each (a few seconds of this client's traffic).
    _calls_to_each(
        client, backends, since=down_at, what="while the balancer is down", rounds=OUTAGE_ROUNDS
    )
    assert client.alive(), client.logs()


def test_balancer_restart_resyncs_clients_that_are_back_first(
    processes: ProcessManager, backend_fleet: FleetFactory, tmp_path: Path
) -> None:
    balancer, registrars, backends, client = _restart_rig(processes, backend_fleet, tmp_path)
    # The registrars are held until the client is back on the restarted
    # balancer: clients reconnecting before the registrars (whose heartbeat
    # interval is seconds) is what the startup grace is for, and here it
    # happens every run rather than by chance.
    with _frozen(registrars):
        balancer.kill()
        _calls_to_each(client, backends, since=time.monotonic(), what="while the balancer is down")
        balancer = restarted = processes.restart_balancer(balancer)
        eventually_blocking(
            lambda: "xds client connected" in restarted.logs(),
            "the client's ADS stream to the restarted balancer",
            within=20,
            detail=lambda: client.logs(3000),
        )
        back_at = time.monotonic()
        _calls_to_each(client, backends, since=back_at, what="before the registrars are back")

    balancer.wait_backends(SERVICE, [b.port for b in backends])
    # A change only the new balancer knows: a 4th backend.
    late = backend_fleet(1, "late")[0]
    _register(processes, balancer, late)
    balancer.wait_backends(SERVICE, [b.port for b in [*backends, late]])
    _calls_to_each(client, [*backends, late], since=time.monotonic(), what="after the resync")
    assert client.alive(), client.logs()
