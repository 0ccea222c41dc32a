"""The balancer's own load scrapes, for Kubernetes members that send no
heartbeats (OAP pods of the official SkyWalking chart, no sidecar).

For every watched service with a `scrape` block, each member (a ready
endpoint) is a target: http://IP:port/path, read every `interval` seconds by
one PrometheusLoadProbe per target — the registrar's --load-url computation,
so counters become rates the same way and whatever cannot be measured (a
target's first scrape, a counter reset, a failing target) is unknown, never
zero: an unknown load keeps the median weight. Scrapes run at most
`MAX_CONCURRENT` at a time, each bounded by its timeout, and start at a
random offset within the interval so that neither targets nor replicas scrape
in step. Every replica scrapes on its own; a target answers one GET per
interval per replica.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from lbserver.discovery import ScrapeSettings, WatchedService
from lbserver.domain.model import LoadReport
from lbserver.logs import get_logger
from lbserver.metrics import SCRAPE_FAILURES, SCRAPE_SECONDS
from lbserver.registrar import PrometheusLoadProbe

__all__ = ["MAX_CONCURRENT", "LoadSink", "Scraper"]

log = get_logger("lbserver.discovery.scrape")

# Each scrape is a thread doing one blocking GET (PrometheusLoadProbe);
# this many at once keeps a large fleet from taking every thread.
MAX_CONCURRENT = 16


class LoadSink(Protocol):
    """What the scraper needs of the balancer (lbserver.balancer.Balancer)."""

    def members(self, service: str) -> Iterable[tuple[str, str]]:
        """(instance id, IP) of the service's current members."""

    def report_load(self, service: str, instance_id: str, load: LoadReport) -> bool:
        """Takes a member's scraped load; whether it is still a member."""


@dataclass(slots=True)
class _Target:
    ip: str
    probe: PrometheusLoadProbe
    due: float


class Scraper:
    """Scrapes the members of `services` (those with a scrape block) until
    cancelled, reporting each load to `sink`."""

    def __init__(
        self,
        services: Iterable[WatchedService],
        sink: LoadSink,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = {w.service: w.scrape for w in services if w.scrape is not None}
        self._sink = sink
        self._clock = clock
        self._rng = rng or random.Random()
        self._targets: dict[tuple[str, str], _Target] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._running: set[asyncio.Task[None]] = set()

    @property
    def services(self) -> list[str]:
        return sorted(self._settings)

    async def run(self, tick: float = 0.25) -> None:
        try:
            while True:
                self.start_due()
                await asyncio.sleep(tick)
        finally:
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    def start_due(self) -> None:
        """Follows the members (new targets, gone ones) and starts the
        scrapes that are due."""
        now = self._clock()
        current: set[tuple[str, str]] = set()
        for service, settings in self._settings.items():
            for instance_id, ip in self._sink.members(service):
                key = (service, instance_id)
                current.add(key)
                target = self._targets.get(key)
                if target is None or target.ip != ip:
                    # A new member (or a new pod under the name): a new probe,
                    # whose first scrape is unknown load, never zero.
                    target = self._targets[key] = _Target(
                        ip, _probe(ip, settings), now + self._rng.uniform(0, settings.interval)
                    )
                if target.due <= now:
                    target.due = now + settings.interval
                    task = asyncio.ensure_future(self._scrape(service, instance_id, target))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
        for key in self._targets.keys() - current:
            del self._targets[key]

    async def _scrape(self, service: str, instance_id: str, target: _Target) -> None:
        async with self._slots:
            started = time.perf_counter()
            load = await target.probe()
            SCRAPE_SECONDS.labels(service).observe(time.perf_counter() - started)
        if target.probe.failing:
            SCRAPE_FAILURES.labels(service, instance_id).inc()
        if self._targets.get((service, instance_id)) is target:
            self._sink.report_load(service, instance_id, load)


def _probe(ip: str, settings: ScrapeSettings) -> PrometheusLoadProbe:
    host = f"[{ip}]" if ":" in ip else ip
    return PrometheusLoadProbe(
        f"http://{host}:{settings.port}{settings.path}",
        cpu_metric=settings.cpu_metric,
        requests_metric=settings.requests_metric,
        errors_metric=settings.errors_metric,
        inflight_metric=settings.inflight_metric,
        cpus=settings.cpus,
        timeout=settings.timeout,
    )
