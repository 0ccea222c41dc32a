"""The load scraper reads each member's pod (through the fake Kubernetes API)
when its scrape block names the port or asks for `cpus: limit`: the named
container port is scraped, and CPU seconds are divided by that container's
CPU limit (1 CPU, with one warning, when it has none)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from lbserver.discovery import CPU_LIMIT, ScrapeSettings, WatchedService
from lbserver.discovery._pods import PodReader
from lbserver.discovery.scrape import Scraper
from lbserver.domain.model import LoadReport
from tests.support.eventually import eventually
from tests.support.fake_kube import FakeKubeApiServer, container, pod
from tests.support.log_capture import captured_logs, logged
from tests.support.scrape_target import PORT, Target, running

NAMESPACE = "skywalking"
IP = "127.0.0.6"
NO_LIMIT = "the scraped container has no CPU limit; its utilization assumes 1 CPU"
NO_PORT = "no container port of the pod has the scrape port's name; not scraped"
NO_POD = "cannot read the pod of a scrape target; its load stays unknown"
SCRAPE = ScrapeSettings(port="monitoring", interval=0.2, timeout=1.0, cpus=CPU_LIMIT)


class Sink:
    """One member, oap-0 at IP; the loads reported for it."""

    def __init__(self) -> None:
        self.loads: list[LoadReport] = []

    def members(self, service: str) -> list[tuple[str, str]]:
        return [("oap-0", IP)]

    def report_load(self, service: str, instance_id: str, load: LoadReport) -> bool:
        self.loads.append(load)
        return True

    def utilizations(self) -> list[float]:
        return [load.cpu_utilization for load in self.loads if load.cpu_utilization is not None]


def oap_pod(*, cpu_limit: str | None, port_name: str = "monitoring") -> dict[str, object]:
    # A sidecar first (with a larger limit): the container serving the port counts.
    return pod(
        "oap-0",
        containers=[
            container("sidecar", ports=[("admin", 9000)], cpu_limit="4"),
            container("oap", ports=[("grpc", 11800), (port_name, PORT)], cpu_limit=cpu_limit),
        ],
    )


@pytest.fixture
def apiserver() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server:
        yield server


@asynccontextmanager
async def scraping(
    apiserver: FakeKubeApiServer, sink: Sink, settings: ScrapeSettings = SCRAPE
) -> AsyncIterator[Target]:
    target = Target(IP, cpu=1.0)
    await target.start()
    watched = WatchedService("oap", NAMESPACE, "oap", "grpc", "kubernetes", settings)
    try:
        async with running(Scraper([watched], sink, pods=PodReader(apiserver.api_client()))):
            yield target
    finally:
        await target.stop()


async def test_cpu_seconds_are_divided_by_the_containers_cpu_limit(
    apiserver: FakeKubeApiServer,
) -> None:
    apiserver.add_pod(NAMESPACE, oap_pod(cpu_limit="2"))
    sink = Sink()
    async with scraping(apiserver, sink) as target:
        # 1 CPU second per second on a 2-CPU limit.
        await eventually(lambda: len(sink.utilizations()) >= 3, "three measured scrapes")
        assert all(abs(u - 0.5) < 0.1 for u in sink.utilizations()), sink.utilizations()
        assert target.scrapes >= 4
    # Read once: a pod's ports and limits do not change.
    assert len(apiserver.pod_requests()) == 1


async def test_millicores_are_read_as_cpus(apiserver: FakeKubeApiServer) -> None:
    apiserver.add_pod(NAMESPACE, oap_pod(cpu_limit="4000m"))
    sink = Sink()
    async with scraping(apiserver, sink):
        await eventually(lambda: len(sink.utilizations()) >= 2, "two measured scrapes")
        assert all(abs(u - 0.25) < 0.05 for u in sink.utilizations()), sink.utilizations()


async def test_a_container_without_a_limit_counts_as_one_cpu_with_one_warning(
    apiserver: FakeKubeApiServer,
) -> None:
    apiserver.add_pod(NAMESPACE, oap_pod(cpu_limit=None))
    sink = Sink()
    with captured_logs() as capture:
        async with scraping(apiserver, sink):
            await eventually(lambda: len(sink.utilizations()) >= 3, "three measured scrapes")
            assert all(abs(u - 1.0) < 0.2 for u in sink.utilizations()), sink.utilizations()
        (warning,) = logged(capture, NO_LIMIT)
    assert warning["log_level"] == "warning"
    assert (warning["pod"], warning["container"]) == ("oap-0", "oap")


async def test_a_port_name_no_container_has_is_never_scraped(
    apiserver: FakeKubeApiServer,
) -> None:
    apiserver.add_pod(NAMESPACE, oap_pod(cpu_limit="2", port_name="metrics"))
    sink = Sink()
    with captured_logs() as capture:
        async with scraping(apiserver, sink) as target:
            await eventually(lambda: logged(capture, NO_PORT), "the unknown port logged")
            await asyncio.sleep(3 * SCRAPE.interval)
            assert target.scrapes == 0
            assert sink.loads == []
        assert len(logged(capture, NO_PORT)) == 1
    assert len(apiserver.pod_requests()) == 1


async def test_a_pod_that_cannot_be_read_yet_is_read_again_next_interval(
    apiserver: FakeKubeApiServer,
) -> None:
    sink = Sink()
    with captured_logs() as capture:
        async with scraping(apiserver, sink) as target:
            await eventually(lambda: len(apiserver.pod_requests()) >= 2, "two reads (404)")
            assert target.scrapes == 0
            apiserver.add_pod(NAMESPACE, oap_pod(cpu_limit="2"))
            await eventually(lambda: len(sink.utilizations()) >= 2, "measured once readable")
        # Warned once, not on every retry.
        warnings = [e for e in logged(capture, NO_POD) if e["log_level"] == "warning"]
        assert len(warnings) == 1


async def test_a_numbered_port_with_cpus_limit_picks_the_container_of_that_port(
    apiserver: FakeKubeApiServer,
) -> None:
    apiserver.add_pod(NAMESPACE, oap_pod(cpu_limit="2"))
    sink = Sink()
    async with scraping(apiserver, sink, dataclasses.replace(SCRAPE, port=PORT)):
        await eventually(lambda: len(sink.utilizations()) >= 2, "two measured scrapes")
        assert all(abs(u - 0.5) < 0.1 for u in sink.utilizations()), sink.utilizations()


async def test_a_named_port_with_numeric_cpus(apiserver: FakeKubeApiServer) -> None:
    apiserver.add_pod(NAMESPACE, oap_pod(cpu_limit="2"))
    sink = Sink()
    async with scraping(apiserver, sink, dataclasses.replace(SCRAPE, cpus=4.0)):
        await eventually(lambda: len(sink.utilizations()) >= 2, "two measured scrapes")
        assert all(abs(u - 0.25) < 0.05 for u in sink.utilizations()), sink.utilizations()
