"""Weight policies: which share of calls each backend of a service should get.

A weight policy is a pure function of the backends (and the time, for policies
that age load reports); the list builder turns weights into list entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from lbserver.domain.model import Backend

# backends of one service, monotonic now → weight per token (> 0; absent = no calls)
WeightPolicy = Callable[[Sequence[Backend], float], Mapping[str, float]]


def static_weights(backends: Sequence[Backend], now: float) -> Mapping[str, float]:
    """The static weight each serving backend registered with; draining
    backends get nothing."""
    del now  # static weights do not age
    return {b.token: float(b.registration.weight) for b in backends if b.serving}
