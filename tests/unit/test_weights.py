from __future__ import annotations

import ipaddress

import pytest

from lbserver.domain.model import Backend, BackendState, Capacity, LoadReport, Registration
from lbserver.domain.serverlist import DROP_TOKEN, list_counts
from lbserver.domain.weights import (
    LoadWeightSettings,
    SheddingSettings,
    drop_share,
    estimate_capacity,
    load_aware_weights,
    update_capacity,
)


def drop_entries_for(share: float, backend_entries: int) -> int:
    """Drop entries lbserver's list builder puts into the list of
    `backend_entries` equal backends when `share` of the calls is shed."""
    backends = [backend(n) for n in range(1, backend_entries + 1)]
    counts = list_counts(backends, {b.token: 1.0 for b in backends}, drop_share=share)
    return counts.get(DROP_TOKEN, 0)


NO_BLACKOUT = LoadWeightSettings(blackout=0.0, smoothing=1.0)


def backend(
    n: int,
    *,
    cpu: float | None = None,
    rps: float | None = None,
    eps: float | None = None,
    weight: int = 1,
    capacity: Capacity | None = None,
    first_seen: float = 0.0,
    state: BackendState = BackendState.SERVING,
    settings: LoadWeightSettings = NO_BLACKOUT,
    now: float = 100.0,
) -> Backend:
    load = LoadReport(cpu_utilization=cpu, requests_per_second=rps, errors_per_second=eps)
    registration = Registration(
        service="oap",
        instance_id=f"pod-{n}",
        ip=ipaddress.ip_address(f"10.0.0.{n}"),
        port=11800,
        weight=weight,
        load=load,
        state=state,
    )
    if capacity is None:
        capacity = update_capacity(None, load, now, settings)
    return Backend(
        registration=registration,
        token=f"t{n}",
        last_heartbeat=now,
        expires_at=now + 10,
        last_heartbeat_wall=now,
        ttl=10,
        first_seen=first_seen,
        capacity=capacity,
    )


def test_capacity_formula_follows_a58() -> None:
    assert estimate_capacity(LoadReport(cpu_utilization=0.5, requests_per_second=100), 1.0) == 200
    with_errors = LoadReport(cpu_utilization=0.5, requests_per_second=100, errors_per_second=50)
    assert estimate_capacity(with_errors, 1.0) == pytest.approx(100)
    assert estimate_capacity(LoadReport(cpu_utilization=0.5), 1.0) is None
    assert estimate_capacity(LoadReport(cpu_utilization=0.5, requests_per_second=0), 1.0) is None


def test_equal_load_gives_equal_weights() -> None:
    backends = [backend(n, cpu=0.5, rps=100) for n in (1, 2, 3)]
    weights = load_aware_weights(backends, 100.0, NO_BLACKOUT)
    assert len(set(weights.values())) == 1


def test_a_busier_backend_gets_proportionally_less() -> None:
    weights = load_aware_weights(
        [backend(1, cpu=0.9, rps=100), backend(2, cpu=0.3, rps=100)], 100.0, NO_BLACKOUT
    )
    assert weights["t2"] / weights["t1"] == pytest.approx(3.0)


def test_static_weight_multiplies_and_draining_gets_nothing() -> None:
    weights = load_aware_weights(
        [
            backend(1, cpu=0.5, rps=100, weight=2),
            backend(2, cpu=0.5, rps=100),
            backend(3, cpu=0.5, rps=100, state=BackendState.DRAINING),
        ],
        100.0,
        NO_BLACKOUT,
    )
    assert weights == {"t1": pytest.approx(2 * weights["t2"]), "t2": weights["t2"]}


def test_unknown_load_gets_the_mean_and_no_load_at_all_means_static() -> None:
    weights = load_aware_weights(
        [backend(1, cpu=0.5, rps=100), backend(2, cpu=0.25, rps=100), backend(3)],
        100.0,
        NO_BLACKOUT,
    )
    assert weights["t3"] == pytest.approx((200 + 400) / 2)
    static = load_aware_weights([backend(1, weight=3), backend(2)], 100.0, NO_BLACKOUT)
    assert static == {"t1": 3.0, "t2": 1.0}


def test_blackout_then_trusted() -> None:
    settings = LoadWeightSettings(blackout=10.0, smoothing=1.0)
    first = backend(1, cpu=0.9, rps=100, settings=settings, now=100.0)
    other = backend(2, capacity=Capacity(value=1 / 0.3 * 100, updated_at=104.0, since=50.0))
    during = load_aware_weights([first, other], 105.0, settings)
    assert during["t1"] == during["t2"]  # t1 is in blackout: gets the mean of known
    after = load_aware_weights([first, other], 111.0, settings)
    assert after["t2"] / after["t1"] == pytest.approx(3.0)


def test_stale_reports_expire_to_the_mean() -> None:
    settings = LoadWeightSettings(blackout=0.0, report_expiry=15.0)
    old = backend(1, cpu=0.9, rps=100, settings=settings, now=0.0)
    fresh = backend(2, cpu=0.3, rps=100, settings=settings, now=100.0)
    weights = load_aware_weights([old, fresh], 100.0, settings)
    assert weights["t1"] == weights["t2"]


def test_weights_are_clamped_around_the_mean() -> None:
    settings = LoadWeightSettings(blackout=0.0, smoothing=1.0, max_ratio=1.5)
    weights = load_aware_weights(
        [backend(1, cpu=1.0, rps=1), backend(2, cpu=0.01, rps=100)], 100.0, settings
    )
    mean = (1 + 10_000) / 2
    assert weights["t1"] == pytest.approx(mean / 1.5)
    assert weights["t2"] == pytest.approx(mean * 1.5)


def test_smoothing_damps_one_noisy_report() -> None:
    settings = LoadWeightSettings(blackout=0.0, smoothing=0.25)
    steady = LoadReport(cpu_utilization=0.5, requests_per_second=100)
    capacity = update_capacity(None, steady, 0.0, settings)
    noisy = update_capacity(
        capacity, LoadReport(cpu_utilization=0.05, requests_per_second=100), 1.0, settings
    )
    assert capacity is not None and noisy is not None
    # The 10x outlier is first cut to 2x (MAX_STEP), then smoothed.
    assert noisy.value == pytest.approx(0.25 * 400 + 0.75 * 200)
    assert noisy.since == 0.0
    # A report that cannot tell keeps the last value.
    assert update_capacity(noisy, LoadReport(), 2.0, settings) == noisy


def test_slow_start_ramps_new_backends() -> None:
    settings = LoadWeightSettings(blackout=0.0, slow_start=20.0, min_ramp=0.1)
    old = backend(1, first_seen=0.0)
    new = backend(2, first_seen=100.0)
    assert load_aware_weights([old, new], 100.0, settings)["t2"] == pytest.approx(0.1)
    assert load_aware_weights([old, new], 110.0, settings)["t2"] == pytest.approx(0.55)
    assert load_aware_weights([old, new], 120.0, settings)["t2"] == pytest.approx(1.0)


def test_shedding_only_when_every_backend_is_over_the_threshold() -> None:
    settings = SheddingSettings(utilization=0.8, max_drop_share=0.5)
    assert drop_share([backend(1, cpu=1.0), backend(2, cpu=0.7)], settings) == 0
    assert drop_share([backend(1, cpu=1.0), backend(2)], settings) == 0
    assert drop_share([backend(1, cpu=1.0), backend(2, cpu=1.0)], settings) == pytest.approx(0.2)
    assert drop_share([backend(1, cpu=9.0)], settings) == 0.5
    assert drop_share([backend(1, cpu=1.0)], SheddingSettings()) == 0
    assert drop_entries_for(0.2, 8) == 2
    assert drop_entries_for(0.0, 8) == 0


def test_one_outlier_report_cannot_take_over_the_list() -> None:
    settings = LoadWeightSettings(blackout=0.0, smoothing=0.5, max_ratio=10.0)
    steady = [backend(n, cpu=0.5, rps=100) for n in range(1, 5)]
    # A nearly idle interval: 3 requests for almost no CPU estimates 100x.
    previous = steady[0].capacity
    outlier = update_capacity(
        previous, LoadReport(cpu_utilization=0.0015, requests_per_second=3), 101.0, settings
    )
    assert outlier is not None and previous is not None
    assert outlier.value <= 1.5 * previous.value
    spiked = backend(9, capacity=outlier)
    weights = load_aware_weights([*steady, spiked], 101.0, settings)
    assert weights["t9"] / sum(weights.values()) < 0.3


def test_clamp_is_centred_on_the_median() -> None:
    settings = LoadWeightSettings(blackout=0.0, smoothing=1.0, max_ratio=2.0)
    backends = [backend(n, cpu=0.5, rps=100) for n in range(1, 5)]
    backends.append(backend(9, capacity=Capacity(value=1e6, updated_at=100.0, since=0.0)))
    weights = load_aware_weights(backends, 100.0, settings)
    assert weights["t9"] == pytest.approx(2 * weights["t1"])
