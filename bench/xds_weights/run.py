"""The processes of one bench/xds_weights measurement, all on 127.0.0.1.

`measure(case, layout, ...)`: a `lbserver serve` with
LBSERVER_XDS_LOCALITIES=<layout>, one `lbserver register` per backend of the
case (static weight, one zone), lbserver's list checked against the weights,
then the xDS client and the grpclb client (bench/xds_weights/client.py), one
after the other, against that balancer. The counting backends and the DNS
server answering the grpclb client's SRV lookups live in the driver's
process (tests/support); every child process is stopped before it returns
(tests/support/processes does the bookkeeping, logs in the run's folder).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from bench.balance.infra import child_env
from lbserver.xds.resources import ENDPOINT
from tests.support.backends import CountingBackend
from tests.support.dns import DnsServer
from tests.support.processes import (
    LOOPBACK,
    BalancerProcess,
    ManagedProcess,
    ProcessManager,
    wait_until,
)
from tests.support.xds_client import bootstrap_file

SERVICE = "oap"
XDS_TARGET = f"xds:///{SERVICE}"
ZONE = "zone-a"
# The port grpclb clients put in their target; they never connect to it (the
# balancer's list carries the backends' own ports).
SERVICE_PORT = 11800
LAYOUTS = ("backend", "zone")
LBSERVER_ENV: Mapping[str, str] = {
    "LBSERVER_HEARTBEAT_INTERVAL": "1",
    "LBSERVER_STARTUP_GRACE": "0",
}
REGISTRAR_INTERVAL = 1.0
CLIENT_TIMEOUT = 240.0  # seconds one client process may take, warm-up included


@dataclass(frozen=True)
class Case:
    name: str
    weights: tuple[int, ...]


CASES: tuple[Case, ...] = (Case("1:1:2", (1, 1, 2)), Case("1:2:3:4", (1, 2, 3, 4)))


@dataclass
class ClientRun:
    """What one client process counted."""

    client: str  # "xds" or "grpclb"
    counts: list[int]  # calls per backend, in the case's order
    failures: dict[str, int]
    calls: int
    seconds: float
    warmup_calls: int
    first_ok_after: float


@dataclass
class Measurement:
    """One case under one layout: lbserver's list and both clients' counts."""

    case: Case
    layout: str
    list_entries: list[int]  # grpclb list entries per backend, in the case's order
    # The ClusterLoadAssignment lbserver served over ADS: per locality, its
    # weight and its endpoints' weights, both in the case's backend order.
    localities: list[tuple[int, list[int]]]
    runs: list[ClientRun] = field(default_factory=list)


def _client(
    manager: ProcessManager,
    log_dir: Path,
    tag: str,
    target: str,
    *,
    grpclb: bool,
    expect: int,
    calls: int,
    env: Mapping[str, str],
) -> dict[str, Any]:
    out = log_dir / f"result-{tag}.json"
    argv = [
        sys.executable, "-m", "bench.xds_weights.client",
        "--target", target, "--expect", str(expect), "--calls", str(calls), "--out", str(out),
        *(["--grpclb"] if grpclb else []),
    ]  # fmt: skip
    process = ManagedProcess(tag, argv, env, log_dir / f"{tag}.log")
    manager.processes.append(process)
    code = process.wait(CLIENT_TIMEOUT)
    if code != 0 or not out.exists():
        raise RuntimeError(f"client {tag} failed ({code}); log:\n{process.logs(4000)}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _list_entries(balancer: BalancerProcess, ports: Sequence[int]) -> list[int]:
    state = balancer.service_state(SERVICE)
    by_port = {b.port: b.list_entries for b in state.backends} if state is not None else {}
    return [int(by_port.get(p, 0)) for p in ports]


def served_localities(
    balancer: BalancerProcess, ports: Sequence[int]
) -> list[tuple[int, list[int]]]:
    """The localities of the ClusterLoadAssignment `oap` as lbserver serves
    it over ADS (one EDS request, its first response): (locality weight,
    endpoint weights) each, ordered by the backends' `ports`."""
    request = discovery_pb2.DiscoveryRequest(
        node=base_pb2.Node(id="bench-xds-weights"), type_url=ENDPOINT, resource_names=[SERVICE]
    )
    method = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    with balancer.channel() as channel:
        stream = channel.stream_stream(
            method,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        # A response iterator that is also a grpc.Call (the stubs know only one).
        calls: Any = stream(iter([request]), timeout=10)
        try:
            response = next(calls)
        finally:
            calls.cancel()
    order = {port: index for index, port in enumerate(ports)}
    found: list[tuple[int, list[tuple[int, int]]]] = []
    for resource in response.resources:
        assignment = endpoint_pb2.ClusterLoadAssignment()
        resource.Unpack(assignment)
        for locality in assignment.endpoints:
            endpoints = sorted(
                (order.get(e.endpoint.address.socket_address.port_value, len(order)),
                 e.load_balancing_weight.value)
                for e in locality.lb_endpoints
            )  # fmt: skip
            found.append((locality.load_balancing_weight.value, endpoints))
    found.sort(key=lambda locality: locality[1][0][0] if locality[1] else len(order))
    return [(weight, [w for _, w in endpoints]) for weight, endpoints in found]


def _proportional(entries: Sequence[int], weights: Sequence[int]) -> bool:
    """True when lbserver's list holds entries in the weights' proportions."""
    if not all(entries):
        return False
    return all(e * weights[0] == entries[0] * w for e, w in zip(entries, weights, strict=True))


def measure(
    case: Case,
    layout: str,
    calls: int,
    log_dir: Path,
    dns: DnsServer,
) -> Measurement:
    """Both clients against a balancer serving `layout`, backends weighted as `case`."""
    run_dir = log_dir / f"{case.name.replace(':', '-')}-{layout}"
    names = [f"b{i + 1}-w{w}" for i, w in enumerate(case.weights)]
    fleet = [CountingBackend(name=n) for n in names]
    try:
        for backend in fleet:
            backend.start()
        return _measure(case, layout, calls, run_dir, dns, fleet)
    finally:
        for backend in fleet:
            backend.stop()


def _measure(
    case: Case,
    layout: str,
    calls: int,
    run_dir: Path,
    dns: DnsServer,
    fleet: Sequence[CountingBackend],
) -> Measurement:
    names = [b.name for b in fleet]
    with ProcessManager(run_dir) as manager:
        balancer = manager.start_balancer(
            env={**LBSERVER_ENV, "LBSERVER_XDS_LOCALITIES": layout},
            args=["--log-level", "warning"],
        )
        ports = [b.port for b in fleet]
        for backend, weight in zip(fleet, case.weights, strict=True):
            manager.start_registrar(
                balancers=balancer.address,
                service=SERVICE,
                backend=backend.address,
                weight=weight,
                interval=REGISTRAR_INTERVAL,
                zone=ZONE,
                probe="tcp",
                args=["--log-level", "warning"],
            )
        balancer.wait_backends(SERVICE, ports, timeout=30)

        def listed() -> list[int] | None:
            entries = _list_entries(balancer, ports)
            return entries if _proportional(entries, case.weights) else None

        entries = wait_until(
            listed,
            30,
            interval=0.2,
            message=lambda: (
                f"lbserver's list in proportions {case.name} (has {_list_entries(balancer, ports)})"
            ),
        )
        result = Measurement(case, layout, entries, served_localities(balancer, ports))
        bootstrap = bootstrap_file(balancer.address, run_dir / "bootstrap.json")
        dns_name = f"{SERVICE}.bench.test"
        dns.set_balancers(dns_name, [(LOOPBACK, balancer.port)])
        clients: tuple[tuple[str, str, bool, dict[str, str]], ...] = (
            ("xds", XDS_TARGET, False, {"GRPC_XDS_BOOTSTRAP": str(bootstrap)}),
            ("grpclb", dns.target(dns_name, SERVICE_PORT), True, {}),
        )
        for client, target, grpclb, extra in clients:
            raw = _client(
                manager,
                run_dir,
                f"client-{client}",
                target,
                grpclb=grpclb,
                expect=len(names),
                calls=calls,
                env=child_env(extra),
            )
            counts = raw["counts"]
            result.runs.append(
                ClientRun(
                    client=client,
                    counts=[int(counts.get(n, 0)) for n in names],
                    failures={str(k): int(v) for k, v in raw["failures"].items()},
                    calls=int(raw["calls"]),
                    seconds=float(raw["seconds"]),
                    warmup_calls=int(raw["warmup_calls"]),
                    first_ok_after=float(raw["first_ok_after"]),
                )
            )
        (run_dir / "measurement.json").write_text(
            json.dumps(
                {
                    "entries": entries,
                    "localities": result.localities,
                    "runs": [r.__dict__ for r in result.runs],
                }
            )
        )
        return result
