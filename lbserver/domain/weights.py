"""Weight policies: which share of calls each backend of a service should get.

A weight policy is a pure function of the backends and the time; the list
builder turns its weights into list entries. The default follows gRPC's
weighted_round_robin (gRFC A58): a backend's capacity is

    qps / (utilization + eps / qps * error_penalty)

so equally loaded backends get equal weights and a backend that needs more
CPU per request (a busy node, a cold JVM) gets less. Capacities are smoothed
across reports, not trusted during a blackout after a backend's first report,
forgotten when reports stop, and clamped around the median (one wild report
cannot drag the centre along with it); new backends ramp up
over a slow-start period.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lbserver.domain.model import Backend, Capacity, LoadReport
from lbserver.errors import InvalidValueError

# backends of one service, monotonic now → weight per token (> 0; absent = no calls)
WeightPolicy = Callable[[Sequence[Backend], float], Mapping[str, float]]


def static_weights(backends: Sequence[Backend], now: float) -> Mapping[str, float]:
    """The static weight each serving backend registered with; draining
    backends get nothing."""
    del now  # static weights do not age
    return {b.token: float(b.registration.weight) for b in backends if b.serving}


@dataclass(frozen=True, slots=True)
class LoadWeightSettings:
    # A58's error_utilization_penalty: how much an error per request counts
    # as utilization.
    error_penalty: float = 1.0
    # Weight of the newest report in the moving average (1 = no smoothing).
    smoothing: float = 0.5
    # Seconds after a backend's first report during which it gets the median
    # weight: early reports of a starting process are not representative.
    blackout: float = 10.0
    # A capacity not refreshed for this long no longer counts (median weight).
    report_expiry: float = 15.0
    # Seconds over which a new backend ramps from min_ramp to full weight.
    slow_start: float = 0.0
    min_ramp: float = 0.1
    # Weights are clamped to [median / max_ratio, median * max_ratio].
    max_ratio: float = 10.0

    def __post_init__(self) -> None:
        if self.error_penalty < 0:
            raise InvalidValueError("error_penalty must be >= 0")
        if not 0 < self.smoothing <= 1:
            raise InvalidValueError("smoothing must be in (0, 1]")
        if self.blackout < 0 or self.report_expiry <= 0 or self.slow_start < 0:
            raise InvalidValueError("blackout and slow_start must be >= 0, report_expiry > 0")
        if not 0 < self.min_ramp <= 1:
            raise InvalidValueError("min_ramp must be in (0, 1]")
        if self.max_ratio < 1:
            raise InvalidValueError("max_ratio must be >= 1")


def estimate_capacity(load: LoadReport, error_penalty: float) -> float | None:
    """Requests per second per unit of utilization, or None when the report
    cannot tell (utilization or rate unknown, or no traffic yet)."""
    utilization, qps = load.cpu_utilization, load.requests_per_second
    if utilization is None or qps is None or qps <= 0 or utilization <= 0:
        return None
    eps = load.errors_per_second or 0.0
    capacity = qps / (utilization + eps / qps * error_penalty)
    return capacity if math.isfinite(capacity) else None


MAX_STEP = 2.0


def update_capacity(
    previous: Capacity | None,
    load: LoadReport,
    now: float,
    settings: LoadWeightSettings,
) -> Capacity | None:
    """Folds one heartbeat's load into a backend's capacity. A heartbeat that
    cannot tell keeps the previous value, which then ages towards expiry."""
    estimate = estimate_capacity(load, settings.error_penalty)
    if estimate is None:
        return previous
    if previous is None or now - previous.updated_at > settings.report_expiry:
        return Capacity(value=estimate, updated_at=now, since=now)
    # One report moves a capacity by at most a factor of MAX_STEP: a nearly
    # idle interval (a few requests, tiny CPU) can estimate 100x the truth.
    estimate = min(max(estimate, previous.value / MAX_STEP), previous.value * MAX_STEP)
    alpha = settings.smoothing
    return Capacity(
        value=alpha * estimate + (1 - alpha) * previous.value,
        updated_at=now,
        since=previous.since,
    )


def _trusted_capacity(backend: Backend, now: float, settings: LoadWeightSettings) -> float | None:
    capacity = backend.capacity
    if capacity is None:
        return None
    if now - capacity.updated_at > settings.report_expiry:
        return None
    if now - capacity.since < settings.blackout:
        return None
    return capacity.value


def ramp(backend: Backend, now: float, settings: LoadWeightSettings) -> float:
    if settings.slow_start <= 0:
        return 1.0
    progress = min(1.0, max(0.0, (now - backend.first_seen) / settings.slow_start))
    return settings.min_ramp + (1 - settings.min_ramp) * progress


def load_aware_weights(
    backends: Sequence[Backend], now: float, settings: LoadWeightSettings
) -> dict[str, float]:
    serving = [b for b in backends if b.serving]
    capacities = {b.token: _trusted_capacity(b, now, settings) for b in serving}
    known = [c for c in capacities.values() if c is not None]
    # Backends without a trusted report get the median: neither starved nor
    # flooded until they report. With no reports at all every base is 1 and
    # the static weights decide.
    centre = statistics.median(known) if known else 1.0
    low, high = centre / settings.max_ratio, centre * settings.max_ratio
    weights: dict[str, float] = {}
    for backend in serving:
        base = capacities[backend.token]
        base = centre if base is None else min(max(base, low), high)
        weights[backend.token] = base * backend.registration.weight * ramp(backend, now, settings)
    return weights


@dataclass(frozen=True, slots=True)
class SheddingSettings:
    """Overload shedding: off while `utilization` is 0."""

    utilization: float = 0.0
    max_drop_share: float = 0.5


def drop_share(backends: Sequence[Backend], settings: SheddingSettings) -> float:
    """The share of calls to drop when every serving backend reports
    utilization above the threshold: enough to bring the mean back to it."""
    if settings.utilization <= 0:
        return 0.0
    utilizations = [b.registration.load.cpu_utilization for b in backends if b.serving]
    if not utilizations or any(u is None or u <= settings.utilization for u in utilizations):
        return 0.0
    mean = math.fsum(u for u in utilizations if u is not None) / len(utilizations)
    return min(settings.max_drop_share, 1.0 - settings.utilization / mean)
