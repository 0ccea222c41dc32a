"""The Kubernetes watch's failure policy: backoff, and when endpoints become unknown."""

from __future__ import annotations

import random
from typing import Any

import pytest

from lbserver.discovery._failures import FailureStreak, watch_backoff
from lbserver.discovery.kubernetes import KubernetesEndpointSource, KubernetesSettingsError
from lbserver.errors import ConfigError


def test_delays_double_up_to_the_cap_between_half_and_all_of_nominal() -> None:
    backoff = watch_backoff(0.5, 30.0)
    assert [backoff.nominal(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    rng = random.Random(3)
    for attempt in range(1, 12):
        nominal = backoff.nominal(attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(nominal / 2 <= d <= nominal for d in delays)
        assert max(delays) - min(delays) > nominal / 4  # jittered, not fixed


def test_streak_counts_failures_until_a_success() -> None:
    streak = FailureStreak(watch_backoff(1.0, 8.0), unknown_after=60.0, rng=random.Random(1))
    first = streak.failed(now=100.0)
    assert (first.number, first.first, first.failing_seconds) == (1, True, 0.0)
    second = streak.failed(now=104.0)
    assert (second.number, second.first, second.failing_seconds) == (2, False, 4.0)
    assert 1.0 <= second.delay <= 2.0
    assert streak.succeeded() == 2
    assert streak.succeeded() == 0
    again = streak.failed(now=500.0)
    assert (again.number, again.failing_seconds) == (1, 0.0)


def test_unknown_at_once_when_nothing_was_reported_else_after_unknown_after() -> None:
    streak = FailureStreak(watch_backoff(1.0, 8.0), unknown_after=60.0, rng=random.Random(1))
    first = streak.failed(now=0.0)
    assert streak.unknown(first, ever_reported=False)
    assert not streak.unknown(first, ever_reported=True)
    assert not streak.unknown(streak.failed(now=59.0), ever_reported=True)
    assert streak.unknown(streak.failed(now=60.0), ever_reported=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"backoff_initial": 0}, "backoff_initial=0"),
        ({"backoff_initial": 5, "backoff_max": 1}, "initial must be > 0 and <= maximum"),
        ({"watch_timeout": 0}, "watch_timeout"),
    ],
)
def test_bad_settings_are_config_errors_and_value_errors(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(KubernetesSettingsError, match=message) as info:
        KubernetesEndpointSource([], lambda service, endpoints: None, **settings)
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, ValueError)
