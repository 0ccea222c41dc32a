"""PrometheusLoadProbe: a backend's load from its Prometheus text endpoint
(skywalking-oap serves one on port 1234 when its telemetry selector is
``prometheus``), counters turned into rates between two scrapes.

Whatever cannot be measured is reported as unknown (None), never as zero: the
first scrape (no earlier one to take a rate against), a counter that went down
(the backend restarted), a metric the endpoint does not have, and every field
while scrapes fail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client.parser import text_string_to_metric_families

from lbserver import __version__
from lbserver.domain.model import LoadReport
from lbserver.errors import InvalidArgumentError
from lbserver.logs import Logger, get_logger
from lbserver.registrar._cpus import default_cpus
from lbserver.registrar._selector import MetricSelector, parse_selector

# The logger users configure (documented): the same name as before the
# registrar became a package.
_log = get_logger("lbserver.loadprobe")

DEFAULT_CPU_METRIC = "process_cpu_seconds_total"
# Changes when the process restarts; a restart between two scrapes voids every
# rate even if the counters have already grown past their old values.
_START_TIME_METRIC = "process_start_time_seconds"
_DEFAULT_TIMEOUT = 2.0
# A metrics page is kilobytes; anything this large is not one.
_MAX_BODY = 32 * 1024 * 1024
_READ_CHUNK = 64 * 1024
_ACCEPT = "text/plain;version=0.0.4;q=1.0, */*;q=0.1"
# Errors that mean "this scrape did not work" (network, HTTP, charset, parsing);
# anything else is a bug and goes to the registrar, which logs it with a traceback.
_SCRAPE_ERRORS = (OSError, ValueError, LookupError, http.client.HTTPException)

SeriesKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class _Scrape:
    """What one scrape saw: per metric role, each matching series' value (None
    when the page has no matching sample)."""

    time: float
    series: Mapping[str, Mapping[SeriesKey, float] | None]
    start_time: float | None


class PrometheusLoadProbe:
    """Scrapes a Prometheus text endpoint and reports the backend's load.

    - ``cpu_metric``: counter of CPU seconds; utilization = its rate / ``cpus``
      (default: `default_cpus()`).
    - ``requests_metric``, ``errors_metric``: counters, reported as per-second
      rates, summed over every label set the selector matches.
    - ``inflight_metric``: gauge, summed, reported as an integer.

    Metrics are `MetricSelector` strings (``name`` or ``name{label="x"}``); None
    leaves that field unknown. Calls within ``min_interval`` seconds of the last
    scrape return its report again, and concurrent calls share one scrape, so a
    registrar heartbeating to several balancers scrapes once per interval.
    `url`, `cpus` (the default filled in), `timeout` and `min_interval` are
    read-only attributes; `metrics` gives the selectors by role.
    """

    def __init__(
        self,
        url: str,
        *,
        cpu_metric: str | None = DEFAULT_CPU_METRIC,
        requests_metric: str | None = None,
        errors_metric: str | None = None,
        inflight_metric: str | None = None,
        cpus: float | None = None,
        timeout: float = _DEFAULT_TIMEOUT,
        min_interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InvalidArgumentError(
                "url", f"{url!r} is not an http:// or https:// URL with a host"
            )
        try:
            parsed.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as err:
            raise InvalidArgumentError("url", f"{url!r}: {err}") from None
        if cpus is not None and not (math.isfinite(cpus) and cpus > 0):
            raise InvalidArgumentError("cpus", f"must be a number > 0, not {cpus}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise InvalidArgumentError("timeout", f"must be a number of seconds > 0, not {timeout}")
        if not (math.isfinite(min_interval) and min_interval >= 0):
            raise InvalidArgumentError(
                "min_interval", f"must be a number of seconds >= 0, not {min_interval}"
            )
        selectors: dict[str, MetricSelector] = {}
        for role, spec in (
            ("cpu", cpu_metric),
            ("requests", requests_metric),
            ("errors", errors_metric),
            ("inflight", inflight_metric),
        ):
            if spec is None:
                continue
            try:
                selectors[role] = parse_selector(spec)
            except ValueError as err:
                raise InvalidArgumentError(f"{role}_metric", str(err)) from None
        # The settings, as validated (read-only).
        self.url: Final = url
        self.cpus: Final = default_cpus() if cpus is None else float(cpus)
        self.timeout: Final = float(timeout)
        self.min_interval: Final = float(min_interval)
        self._selectors = selectors
        self._clock = clock
        # Where the blocking GET runs (None: asyncio's default executor).
        self._executor = executor
        # Proxy variables are for the outside world; a sidecar scrapes its pod.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._lock = asyncio.Lock()
        self._previous: _Scrape | None = None
        self._last_report: LoadReport | None = None
        self._last_call = -math.inf
        self._failing = False
        self._missing: set[str] = set()

    @property
    def failing(self) -> bool:
        """Whether the last scrape failed (its report was all unknown)."""
        return self._failing

    @property
    def metrics(self) -> Mapping[str, str]:
        """Configured selectors by role (cpu, requests, errors, inflight)."""
        return {role: str(selector) for role, selector in self._selectors.items()}

    @property
    def _log(self) -> Logger:
        # Bound on use, so the CLI's logging configuration applies.
        return _log.bind(load_url=self.url)

    async def __call__(self) -> LoadReport:
        async with self._lock:
            if self._last_report is not None and (
                self._clock() - self._last_call < self.min_interval
            ):
                return self._last_report
            self._last_call = self._clock()
            try:
                fetch = asyncio.get_running_loop().run_in_executor(self._executor, self._fetch)
                text = await asyncio.wait_for(fetch, self.timeout)
                report = self.observe(text)
            except _SCRAPE_ERRORS as err:  # TimeoutError is an OSError
                report = self.scrape_failed(err)
            self._last_report = report
            return report

    def observe(self, text: str) -> LoadReport:
        """Takes one scrape's exposition text, seen now (by the clock), and
        returns the load since the previous scrape. Raises ValueError (and
        changes nothing) if the text does not parse."""
        samples = self._matching_samples(text)
        now = self._clock()
        series = {role: self._select(chosen, samples) for role, chosen in self._selectors.items()}
        start_values = samples.get(_START_TIME_METRIC)
        start_time = start_values[0][1] if start_values else None
        scrape = _Scrape(time=now, series=series, start_time=start_time)
        previous, self._previous = self._previous, scrape
        if self._failing:
            self._log.info("load scrape works again")
            self._failing = False
        self._note_missing(series)
        return self._report(previous, scrape)

    def scrape_failed(self, error: BaseException) -> LoadReport:
        """Records a failed scrape: all load unknown, and the next scrape starts
        over without rates (the backend may have restarted meanwhile)."""
        self._previous = None
        if not self._failing:
            self._log.warning(
                "load scrape failed; reporting unknown load until it works again",
                error=str(error) or type(error).__name__,
            )
            self._failing = True
        return LoadReport()

    def _fetch(self) -> str:
        """One blocking GET (run in a thread); bounded by the timeout overall,
        not only per socket operation, so a trickling server cannot pin a thread."""
        deadline = time.monotonic() + self.timeout
        request = urllib.request.Request(
            self.url, headers={"Accept": _ACCEPT, "User-Agent": f"lbserver/{__version__}"}
        )
        chunks: list[bytes] = []
        size = 0
        with self._opener.open(request, timeout=self.timeout) as response:
            while chunk := response.read1(_READ_CHUNK):
                size += len(chunk)
                if size > _MAX_BODY:
                    raise ValueError(f"response is larger than {_MAX_BODY} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no complete response within {self.timeout} s")
                chunks.append(chunk)
            charset = response.headers.get_content_charset() or "utf-8"
        return b"".join(chunks).decode(charset)

    def _matching_samples(self, text: str) -> dict[str, list[tuple[Mapping[str, str], float]]]:
        """Samples whose names some selector may want, by sample name."""
        wanted = {_START_TIME_METRIC}
        for selector in self._selectors.values():
            wanted.update((selector.name, f"{selector.name}_total"))
        samples: dict[str, list[tuple[Mapping[str, str], float]]] = {}
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in wanted:
                        value = float(sample.value)
                        samples.setdefault(sample.name, []).append((sample.labels, value))
        except Exception as err:
            # The parser raises ValueError mostly, IndexError on some garbage.
            raise ValueError(f"not Prometheus text format: {err}") from err
        return samples

    @staticmethod
    def _select(
        selector: MetricSelector, samples: Mapping[str, list[tuple[Mapping[str, str], float]]]
    ) -> dict[SeriesKey, float] | None:
        candidates = samples.get(selector.name)
        if not candidates and not selector.name.endswith("_total"):
            candidates = samples.get(f"{selector.name}_total")
        found = {
            tuple(sorted(labels.items())): value
            for labels, value in candidates or ()
            if selector.matches(labels)
        }
        return found or None

    def _note_missing(self, series: Mapping[str, Mapping[SeriesKey, float] | None]) -> None:
        for role, values in series.items():
            selector = str(self._selectors[role])
            if values is None and role not in self._missing:
                self._missing.add(role)
                self._log.warning("load metric not found; reporting it as unknown", metric=selector)
            elif values is not None and role in self._missing:
                self._missing.discard(role)
                self._log.info("load metric found", metric=selector)

    def _report(self, previous: _Scrape | None, current: _Scrape) -> LoadReport:
        inflight = _gauge(current.series.get("inflight"))
        if previous is None:
            return LoadReport(in_flight=inflight)
        elapsed = current.time - previous.time
        restarted = (
            previous.start_time is not None
            and current.start_time is not None
            and previous.start_time != current.start_time
        )
        if elapsed <= 0 or restarted:
            return LoadReport(in_flight=inflight)

        def rate(role: str) -> float | None:
            return _rate(previous.series.get(role), current.series.get(role), elapsed)

        cpu_rate = rate("cpu")
        return LoadReport(
            cpu_utilization=None if cpu_rate is None else cpu_rate / self.cpus,
            requests_per_second=rate("requests"),
            errors_per_second=rate("errors"),
            in_flight=inflight,
        )


def _rate(
    before: Mapping[SeriesKey, float] | None,
    after: Mapping[SeriesKey, float] | None,
    elapsed: float,
) -> float | None:
    """Per-second increase summed over the series present in both scrapes; None
    if there are none, or if any of them went down (a counter reset) or is not
    a finite number. A series new since the last scrape has no baseline yet and
    counts from the next interval on."""
    if before is None or after is None:
        return None
    common = before.keys() & after.keys()
    if not common:
        return None
    total = 0.0
    for key in common:
        old, new = before[key], after[key]
        if not (math.isfinite(old) and math.isfinite(new)) or new < old:
            return None
        total += new - old
    return total / elapsed


def _gauge(values: Mapping[SeriesKey, float] | None) -> int | None:
    if values is None:
        return None
    total = sum(values.values())
    if not math.isfinite(total) or total < 0:
        return None
    return round(total)
