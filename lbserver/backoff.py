"""Exponential backoff: the one retry-delay rule of lbserver and agent_shim.

The registrar's heartbeat stream, the Kubernetes watch, agent_shim's balancer
stream, its failing-backend marks and the relay's backend connects all wait
`Backoff.delay(attempt)` between tries; they differ only in the numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lbserver.errors import InvalidValueError

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """initial x multiplier^(attempt-1), capped at maximum, then jittered.

    `jitter` is a fraction: the delay is spread over +-jitter of the nominal
    one, or, with `one_sided`, over [1 - jitter, 1] of it (never longer than
    the cap: what the Kubernetes watch uses so that a thousand balancers
    restarted together do not retry in step, yet none waits past the cap).
    Without an `rng` the nominal delay is returned, which tests rely on."""

    initial: float = 1.0
    multiplier: float = 1.6
    maximum: float = 120.0
    jitter: float = 0.0
    one_sided: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise InvalidValueError("backoff: initial must be > 0 and <= maximum")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise InvalidValueError("backoff: multiplier must be >= 1 and jitter in [0, 1)")

    def nominal(self, attempt: int) -> float:
        """The delay before retry number `attempt` (1 = the first), unjittered."""
        # The exponent is capped so that a long outage cannot overflow a float.
        exponent = min(max(0, attempt - 1), 64)
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before retry number `attempt` (1 = the first retry)."""
        base = self.nominal(attempt)
        if self.jitter and rng is not None:
            if self.one_sided:
                base *= 1 - rng.uniform(0, self.jitter)
            else:
                base *= 1 + rng.uniform(-self.jitter, self.jitter)
        return base
