from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lbserver.domain.subsetting import IndexPool, subset_positions


@given(
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=0, max_value=300),
)
def test_every_backend_serves_the_same_number_of_clients_within_one(
    backends: int, size: int, clients: int
) -> None:
    served = Counter(
        position
        for client in range(clients)
        for position in subset_positions(backends, size, client)
    )
    per_backend = [served[position] for position in range(backends)]
    assert max(per_backend) - min(per_backend) <= 1
    for client in range(min(clients, 5)):
        subset = subset_positions(backends, size, client)
        assert len(subset) == min(size, backends) == len(set(subset))


def test_subsets_are_deterministic() -> None:
    assert subset_positions(10, 3, 4) == subset_positions(10, 3, 4) == [2, 3, 4]


def test_index_pool_reuses_the_smallest_free_index() -> None:
    pool = IndexPool()
    assert [pool.acquire() for _ in range(4)] == [0, 1, 2, 3]
    pool.release(1)
    pool.release(0)
    assert pool.acquire() == 0
    assert pool.acquire() == 1
    assert pool.acquire() == 4
    assert len(pool) == 5
