from __future__ import annotations

import ipaddress
import math
from collections import Counter

from hypothesis import assume, given
from hypothesis import strategies as st

from lbserver.domain.membership import backend_token
from lbserver.domain.model import Backend, Registration
from lbserver.domain.serverlist import (
    DROP_TOKEN,
    build_server_list,
    interleave,
    multiplicities,
)


def make_backend(n: int, weight: int = 1) -> Backend:
    registration = Registration(
        service="oap",
        instance_id=f"pod-{n}",
        ip=ipaddress.ip_address(f"10.0.0.{n}"),
        port=11800,
        weight=weight,
    )
    return Backend(
        registration=registration,
        token=backend_token("oap", registration.instance_id, registration.address),
        last_heartbeat=0.0,
        expires_at=10.0,
        last_heartbeat_wall=0.0,
        ttl=10.0,
    )


def test_integer_weights_that_fit_are_exact_and_reduced() -> None:
    assert multiplicities({"a": 2, "b": 2, "c": 4}, 100) == {"a": 1, "b": 1, "c": 2}
    assert multiplicities({"a": 3, "b": 1}, 100) == {"a": 3, "b": 1}


def test_weights_that_do_not_fit_are_scaled_to_the_bound() -> None:
    counts = multiplicities({"a": 1000, "b": 1, "c": 3}, 10)
    assert sum(counts.values()) == 10
    assert counts["b"] == 1 and counts["c"] == 1  # every backend keeps one entry
    assert counts["a"] == 8


def test_non_positive_weights_get_no_entries() -> None:
    assert multiplicities({"a": 0, "b": -1, "c": 2}, 10) == {"c": 1}
    assert multiplicities({}, 10) == {}


def test_interleave_spreads_a_heavy_backend() -> None:
    assert interleave({"a": 1, "b": 1, "c": 2}) == ["c", "a", "b", "c"]
    order = interleave({"a": 3, "b": 1})
    assert Counter(order) == {"a": 3, "b": 1}


def test_build_server_list_repeats_entries_by_weight_in_stable_order() -> None:
    backends = [make_backend(1, 1), make_backend(2, 1), make_backend(3, 2)]
    weights = {b.token: float(b.registration.weight) for b in backends}
    servers = build_server_list(backends, weights)
    assert len(servers) == 4
    assert servers.count(backends[2].token) == 2
    assert servers == build_server_list(list(reversed(backends)), dict(reversed(weights.items())))
    assert all(len(entry.token.encode()) < 50 for entry in servers.entries)
    assert {entry.ip for entry in servers.entries} == {b.registration.ip.packed for b in backends}


def test_drop_entries_are_spread_and_marked() -> None:
    backends = [make_backend(1), make_backend(2)]
    servers = build_server_list(backends, {b.token: 1.0 for b in backends}, drop_entries=1)
    drops = [entry for entry in servers.entries if entry.drop]
    assert len(drops) == 1 and drops[0].token == DROP_TOKEN and len(servers) == 3


weights_strategy = st.dictionaries(
    st.text(alphabet="abcdefgh", min_size=1, max_size=3),
    st.integers(min_value=1, max_value=50),
    min_size=1,
    max_size=12,
)


@given(weights_strategy, st.integers(min_value=1, max_value=200))
def test_multiplicities_are_proportional_within_one_slot(
    weights: dict[str, int], bound: int
) -> None:
    counts = multiplicities(weights, bound)
    total_entries = sum(counts.values())
    total_weight = sum(weights.values())
    assert set(counts) == set(weights)
    assert total_entries <= max(bound, len(weights))
    ideals = {key: weight * total_entries / total_weight for key, weight in weights.items()}
    # The one-entry floor for tiny weights is the only allowed distortion.
    assume(min(ideals.values()) >= 1)
    for key, ideal in ideals.items():
        assert abs(counts[key] - ideal) < 1


def _deviation(order: list[str], counts: dict[str, int], start: int, length: int) -> float:
    """How far a cyclic window's counts stray from each key's share."""
    total = len(order)
    window = Counter(order[(start + i) % total] for i in range(length))
    return max(abs(window[key] - count * length / total) for key, count in counts.items())


@given(
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=1, max_value=8),
)
def test_two_backends_every_window_of_length_l_over_k_within_one_entry(
    a: int, b: int, k: int
) -> None:
    counts = multiplicities({"a": a, "b": b}, 1000)
    order = interleave(counts)
    length = max(1, len(order) // k)
    for start in range(len(order)):
        assert _deviation(order, counts, start, length) < 1


@given(weights_strategy, st.integers(min_value=1, max_value=8))
def test_every_window_of_length_l_over_k_within_one_entry_of_the_rounded_share(
    weights: dict[str, int], k: int
) -> None:
    # "Within one entry": the count is at most one entry away from the share
    # rounded down or up. Exact rounding for every cyclic window is impossible
    # with three or more backends (1:2:2:3 has no such order).
    counts = multiplicities(weights, 1000)
    order = interleave(counts)
    total = len(order)
    length = max(1, total // k)
    for start in range(total):
        window = Counter(order[(start + i) % total] for i in range(length))
        for key, count in counts.items():
            share = count * length / total
            assert math.floor(share) - 1 <= window[key] <= math.ceil(share) + 1


@given(weights_strategy)
def test_interleave_is_deterministic(weights: dict[str, int]) -> None:
    assert interleave(weights) == interleave(dict(reversed(list(weights.items()))))
