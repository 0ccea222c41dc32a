"""The balancer scrapes the load of Kubernetes members itself (kubernetes
mode with a `scrape` block): real HTTP targets on 127.0.0.x serving
Prometheus text, a real Balancer, the Scraper in between."""

from __future__ import annotations

import json
import statistics
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from lbserver.balancer import Balancer
from lbserver.discovery import Endpoint, ScrapeSettings, WatchedService
from lbserver.discovery.scrape import Scraper
from lbserver.domain.model import LoadReport
from lbserver.domain.weights import LoadWeightSettings
from lbserver.metrics import SCRAPE_FAILURES
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.service.harness import Harness
from tests.support.eventually import eventually
from tests.support.fake_kube import FakeKubeApiServer, endpoint_slice
from tests.support.fake_kube import endpoint as fake_endpoint
from tests.support.scrape_target import PORT, Target, running

IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
SCRAPE = ScrapeSettings(
    port=PORT, interval=0.2, timeout=1.0, cpus=1.0, requests_metric="requests_total"
)
WATCHED = WatchedService("oap", "skywalking", "oap", "grpc", "kubernetes", SCRAPE)


@pytest.fixture
def apiserver() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server:
        yield server


def endpoint(n: int, *, ready: bool = True, terminating: bool = False) -> Endpoint:
    return Endpoint(
        ip=IPS[n], port=11800, ready=ready, serving=ready, terminating=terminating, pod=f"oap-{n}"
    )


def make_balancer() -> Balancer:
    return Balancer(
        discovery={"oap": "kubernetes"},
        load_settings=LoadWeightSettings(blackout=0.0, smoothing=1.0, report_expiry=1.0),
    )


def shares(balancer: Balancer) -> dict[str, float]:
    (view,) = balancer.view("oap")
    total = sum(view.weights.values())
    by_token = {b.token: b.instance_id for b in view.backends}
    return {by_token[t]: w / total for t, w in view.weights.items()} if total else {}


@asynccontextmanager
async def scraping(balancer: Balancer) -> AsyncIterator[Scraper]:
    async with running(Scraper([WATCHED], balancer)) as scraper:
        yield scraper


async def started(*targets: Target) -> None:
    for target in targets:
        await target.start()


def near(value: float, expected: float, points: float = 0.07) -> bool:
    return abs(value - expected) <= points


async def test_weights_follow_the_scraped_cpu() -> None:
    targets = [Target(IPS[0], 0.9), Target(IPS[1], 0.3), Target(IPS[2], 0.3)]
    await started(*targets)
    balancer = make_balancer()
    balancer.set_endpoints("oap", frozenset(endpoint(n) for n in range(3)))
    try:
        async with scraping(balancer):
            # A58: capacity = rps / utilization → 1/0.9 : 1/0.3 : 1/0.3.
            expected = {"oap-0": 1 / 7, "oap-1": 3 / 7, "oap-2": 3 / 7}

            def balanced() -> bool:
                balancer.tick()
                seen = shares(balancer)
                return bool(seen) and all(near(seen.get(k, 0), v) for k, v in expected.items())

            await eventually(
                balanced, "weights from the scraped load", detail=lambda: shares(balancer)
            )
    finally:
        for target in targets:
            await target.stop()


async def test_a_failing_target_gets_the_median_weight_and_recovers() -> None:
    targets = [Target(IPS[0], 0.9), Target(IPS[1], 0.3), Target(IPS[2], 0.6)]
    await started(*targets)
    balancer = make_balancer()
    balancer.set_endpoints("oap", frozenset(endpoint(n) for n in range(3)))
    failures = SCRAPE_FAILURES.labels("oap", "oap-0")
    try:
        async with scraping(balancer):

            def weights() -> dict[str, float]:
                balancer.tick()
                return shares(balancer)

            await eventually(lambda: weights().get("oap-0", 1) < 0.2, "oap-0 weighed down")
            before = failures._value.get()
            targets[0].broken = True
            # Its capacity ages out (report_expiry 1 s): the median of the others'.
            await eventually(
                lambda: near(
                    weights()["oap-0"],
                    statistics.median([weights()["oap-1"], weights()["oap-2"]]),
                    0.01,
                ),
                "the failing target at the median weight",
                detail=weights,
            )
            assert failures._value.get() > before
            targets[0].broken = False
            await eventually(lambda: weights()["oap-0"] < 0.2, "oap-0 weighed by its load again")
    finally:
        for target in targets:
            await target.stop()


async def test_a_new_member_is_scraped_and_a_gone_one_is_not() -> None:
    targets = [Target(ip, 0.5) for ip in IPS]
    await started(*targets)
    balancer = make_balancer()
    balancer.set_endpoints("oap", frozenset(endpoint(n) for n in range(3)))
    try:
        async with scraping(balancer):
            await eventually(lambda: all(t.scrapes >= 2 for t in targets[:3]), "three scraped")
            assert targets[3].scrapes == 0
            balancer.set_endpoints(
                "oap",
                frozenset(
                    [endpoint(0, ready=False, terminating=True), *(endpoint(n) for n in (1, 2, 3))]
                ),
            )
            # Leaving is at once (the list), and the scrapes of oap-0 stop.
            assert [b.instance_id for b in balancer.membership.backends("oap")].count("oap-0") == 0
            await eventually(lambda: targets[3].scrapes >= 2, "the new member scraped")
            gone = targets[0].scrapes
            await eventually(lambda: targets[3].scrapes >= 4, "two more rounds")
            assert targets[0].scrapes <= gone + 1  # at most one scrape already running
    finally:
        for target in targets:
            await target.stop()


def test_the_scraped_load_survives_an_endpoints_update() -> None:
    balancer = make_balancer()
    balancer.set_endpoints("oap", frozenset(endpoint(n) for n in range(2)))
    assert balancer.report_load(
        "oap", "oap-0", LoadReport(cpu_utilization=0.7, requests_per_second=10.0)
    )
    balancer.set_endpoints("oap", frozenset(endpoint(n) for n in range(3)))
    backend = balancer.membership.get("oap", "oap-0")
    assert backend is not None and backend.registration.load.cpu_utilization == 0.7
    # Only Kubernetes members take scraped load; unknown members are refused.
    assert not balancer.report_load("oap", "oap-9", LoadReport(cpu_utilization=0.1))


def test_scraper_lists_only_services_with_a_scrape_block() -> None:
    plain = WatchedService("other", "default", "other", "grpc", "kubernetes")
    assert Scraper([WATCHED, plain], make_balancer()).services == ["oap"]


async def test_lbserver_serve_scrapes_its_kubernetes_members(
    harness: Harness, apiserver: FakeKubeApiServer, tmp_path: Path
) -> None:
    """The whole path in one process: the fake API server's EndpointSlice →
    the balancer's members → scrapes → weights → the list Admin shows."""
    targets = [Target(IPS[0], 0.9), Target(IPS[1], 0.3), Target(IPS[2], 0.3)]
    await started(*targets)
    kubeconfig = tmp_path / "kubeconfig.json"
    kubeconfig.write_text(json.dumps(apiserver.kubeconfig()))
    apiserver.add_slice(
        "skywalking",
        endpoint_slice(
            "oap-abc", "oap", [fake_endpoint(ip, pod=f"oap-{n}") for n, ip in enumerate(IPS[:3])]
        ),
    )
    try:
        running = await harness.start(
            kubeconfig=str(kubeconfig),
            kubernetes_services=(WATCHED,),
            blackout=0,
            load_smoothing=1,
        )
        assert running.scraping is not None
        admin = pb_grpc.AdminStub(harness.channel(running))

        async def entries() -> dict[str, int]:
            state = await admin.GetState(pb.GetStateRequest(service="oap"))
            return {b.instance_id: b.list_entries for s in state.services for b in s.backends}

        async def weighed() -> dict[str, int] | None:
            seen = await entries()
            # 1/0.9 : 1/0.3 : 1/0.3 = 1 : 3 : 3 (within a list entry).
            ok = len(seen) == 3 and abs(seen["oap-1"] - 3 * seen["oap-0"]) <= 1
            return seen if ok and abs(seen["oap-2"] - seen["oap-1"]) <= 1 else None

        await eventually(weighed, "the list to follow the scraped load")
    finally:
        for target in targets:
            await target.stop()
