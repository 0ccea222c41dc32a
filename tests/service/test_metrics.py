"""/metrics after real traffic: values, not just names."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lbserver.metrics import register_balancer
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.server import start_metrics
from tests.service.grpclb_client import Client, balancer_for, register
from tests.service.harness import Harness
from tests.support.backends import BackendFleet, CountingBackend
from tests.support.dns import DnsServer
from tests.support.eventually import eventually


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    values = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def global_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_reflect_registrations_and_client_reported_calls(
    harness: Harness,
    dns: DnsServer,
    fleet: BackendFleet,
    fallback_backend: CountingBackend,
    client: Client,
) -> None:
    accepted_before = global_value("lbserver_heartbeats_total", result="accepted")
    pushes_before = global_value("lbserver_list_pushes_total", kind="server_list")
    running = await balancer_for(
        harness, dns, fallback_backend, client_stats_interval=1.0, blackout=0.0
    )
    registry = CollectorRegistry()
    register_balancer(running.balancer, registry)
    await register(running, harness, fleet[0], weight=1, load=pb.LoadReport(cpu_utilization=0.4))
    await register(running, harness, fleet[1], weight=3)
    await client.until_served(fleet[0], fleet[1])
    await client.calls(40)
    served = fleet[0].count + fleet[1].count
    started_key = ("lbserver_client_calls_total", (("outcome", "started"), ("service", "svc")))

    def reported() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        found = samples(registry)
        return found if found.get(started_key, 0) >= served else None

    values = await eventually(reported, "the served calls reported")
    started = values[started_key]
    key = (("instance", fleet[0].name), ("service", "svc"))
    other = (("instance", fleet[1].name), ("service", "svc"))
    assert started == served
    assert (
        values[("lbserver_client_calls_total", (("outcome", "dropped"), ("service", "svc")))] == 0
    )
    assert values[("lbserver_backends", (("service", "svc"), ("state", "serving")))] == 2
    assert values[("lbserver_server_list_entries", key)] == 1
    assert values[("lbserver_server_list_entries", other)] == 3
    assert values[("lbserver_backend_share", other)] == 0.75
    assert values[("lbserver_backend_weight", other)] == 3
    assert values[("lbserver_backend_cpu_utilization", key)] == 0.4
    assert ("lbserver_backend_cpu_utilization", other) not in values  # unknown, not zero
    assert values[("lbserver_connected_clients", (("service", "svc"),))] == 1
    assert global_value("lbserver_heartbeats_total", result="accepted") == accepted_before + 2
    assert global_value("lbserver_list_pushes_total", kind="server_list") >= pushes_before + 1


async def test_metrics_endpoint_serves_http(harness: Harness) -> None:
    running = await harness.start(metrics_listen="127.0.0.1:0")
    server = await start_metrics(running.config, running.balancer)
    assert server is not None
    try:
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{server.port}/metrics", timeout=5
            ).read()
        )
    finally:
        await server.close()
    assert b"lbserver_heartbeats_total" in body
    assert b"process_cpu_seconds_total" in body
