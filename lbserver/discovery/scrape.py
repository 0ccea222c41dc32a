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

A scrape block that names its port, or asks for `cpus: "limit"`, needs the
member's pod: it is read once per pod (lbserver.discovery._pods) before the
target's first scrape; until it has been read the target's load is unknown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from lbserver.discovery import CPU_LIMIT, ScrapeSettings, WatchedService
from lbserver.discovery._kube_client import KubernetesConfigError, describe_error
from lbserver.discovery._pods import PodReader, PodSource, scrape_facts
from lbserver.domain.model import LoadReport
from lbserver.logs import get_logger
from lbserver.metrics import SCRAPE_FAILURES, SCRAPE_SECONDS
from lbserver.registrar import PrometheusLoadProbe

__all__ = ["FALLBACK_CPUS", "MAX_CONCURRENT", "LoadSink", "Scraper"]

log = get_logger("lbserver.discovery.scrape")

# Each scrape is a thread doing one blocking GET (PrometheusLoadProbe), on
# threads of the scraper's own: asyncio's default executor has only
# min(32, CPUs + 4) threads, shared with the rest of the process, and a scrape
# queued for one would spend its timeout waiting. This many at once.
MAX_CONCURRENT = 16


class LoadSink(Protocol):
    """What the scraper needs of the balancer (lbserver.balancer.Balancer)."""

    def members(self, service: str) -> Iterable[tuple[str, str]]:
        """(instance id, IP) of the service's current members."""

    def report_load(self, service: str, instance_id: str, load: LoadReport) -> bool:
        """Takes a member's scraped load; whether it is still a member."""


# The CPUs of a pod whose container has no CPU limit (with cpus: "limit").
FALLBACK_CPUS = 1.0


@dataclass(slots=True)
class _Target:
    ip: str
    # None until the pod has been read (a named port or cpus: "limit").
    probe: PrometheusLoadProbe | None
    due: float
    # The pod could not be used (its port name is unknown): never scraped.
    unusable: bool = False
    reading: bool = False
    read_failures: int = 0


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
        pods: PodSource | None = None,
        kubeconfig: str | None = None,
    ) -> None:
        """`pods` reads the members' pods when a scrape block needs them;
        by default the Kubernetes API, configured from `kubeconfig` (else
        in-cluster) as discovery is."""
        watched = [w for w in services if w.scrape is not None]
        self._settings = {w.service: w.scrape for w in watched if w.scrape is not None}
        self._namespaces = {w.service: w.namespace for w in watched}
        self._pods = pods if pods is not None else PodReader(kubeconfig=kubeconfig)
        self._sink = sink
        self._clock = clock
        self._rng = rng or random.Random()
        self._targets: dict[tuple[str, str], _Target] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            MAX_CONCURRENT, thread_name_prefix="lbserver-scrape"
        )
        self._running: set[asyncio.Task[None]] = set()
        # Whether the first round (every target at once) is over.
        self._warm = False

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
            # A GET still running ends by its own deadline; nothing waits for it.
            self._threads.shutdown(wait=False, cancel_futures=True)

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
                    probe = None if _needs_pod(settings) else _probe(ip, settings, self._threads)
                    # The first round spreads every target over the interval
                    # (a restarted balancer must not scrape them all at once);
                    # a pod joining later is scraped at once: its load is
                    # unknown until its second scrape gives a rate.
                    first = self._rng.uniform(0, settings.interval) if not self._warm else 0.0
                    target = self._targets[key] = _Target(ip, probe, now + first)
                if target.due <= now and not target.unusable:
                    target.due = now + settings.interval
                    task = asyncio.ensure_future(self._scrape(service, instance_id, target))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
        for key in self._targets.keys() - current:
            del self._targets[key]
        self._warm = self._warm or bool(self._targets)

    async def _scrape(self, service: str, instance_id: str, target: _Target) -> None:
        if target.probe is None:
            if target.reading:
                return  # a slow API: one read of a pod at a time
            target.reading = True
            try:
                target.probe = await self._probe_from_pod(service, instance_id, target)
            finally:
                target.reading = False
            if target.probe is None:
                return
        async with self._slots:
            started = time.perf_counter()
            load = await target.probe()
            SCRAPE_SECONDS.labels(service).observe(time.perf_counter() - started)
        if target.probe.failing:
            SCRAPE_FAILURES.labels(service, instance_id).inc()
        if self._targets.get((service, instance_id)) is target:
            self._sink.report_load(service, instance_id, load)

    async def _probe_from_pod(
        self, service: str, pod: str, target: _Target
    ) -> PrometheusLoadProbe | None:
        """The target's probe, from its pod's port and CPU limit; None when
        the pod cannot be read (tried again next interval) or used."""
        settings = self._settings[service]
        namespace = self._namespaces[service]
        try:
            async with self._slots:
                raw = await asyncio.to_thread(self._pods.read, namespace, pod)
        except Exception as exc:  # any API failure (or no configuration): retried
            target.read_failures += 1
            # Once per pod: a missing RBAC rule would otherwise log every interval.
            emit = log.warning if target.read_failures == 1 else log.debug
            emit(
                "cannot read the pod of a scrape target; its load stays unknown",
                service=service,
                namespace=namespace,
                pod=pod,
                error=str(exc) if isinstance(exc, KubernetesConfigError) else describe_error(exc),
            )
            return None
        facts = scrape_facts(raw, settings.port)
        if facts.port is None:
            target.unusable = True
            log.warning(
                "no container port of the pod has the scrape port's name; not scraped",
                service=service,
                pod=pod,
                port=settings.port,
            )
            return None
        cpus = settings.cpus
        if cpus == CPU_LIMIT:
            cpus = facts.cpu_limit if facts.cpu_limit is not None else FALLBACK_CPUS
            if facts.cpu_limit is None:
                log.warning(
                    "the scraped container has no CPU limit; its utilization assumes 1 CPU",
                    service=service,
                    pod=pod,
                    container=facts.container,
                    cpus=FALLBACK_CPUS,
                )
        return _probe(target.ip, settings, self._threads, port=facts.port, cpus=float(cpus))


def _needs_pod(settings: ScrapeSettings) -> bool:
    return isinstance(settings.port, str) or settings.cpus == CPU_LIMIT


def _probe(
    ip: str,
    settings: ScrapeSettings,
    threads: concurrent.futures.Executor,
    *,
    port: int | None = None,
    cpus: float | None = None,
) -> PrometheusLoadProbe:
    """A probe of http://IP:port/path; `port` and `cpus` as read from the
    pod, else the settings' (numbers when no pod is needed)."""
    host = f"[{ip}]" if ":" in ip else ip
    return PrometheusLoadProbe(
        f"http://{host}:{settings.port if port is None else port}{settings.path}",
        cpu_metric=settings.cpu_metric,
        requests_metric=settings.requests_metric,
        errors_metric=settings.errors_metric,
        inflight_metric=settings.inflight_metric,
        cpus=float(settings.cpus if cpus is None else cpus),
        timeout=settings.timeout,
        executor=threads,
    )
