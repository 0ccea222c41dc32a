"""What a Kubernetes watcher does about API failures: how long to back off, and
when the endpoints it reported stop being known.

Pure bookkeeping (the clock is passed in), so the policy reads in one place
and apart from the threads and sockets of the watch loop."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lbserver.backoff import Backoff

__all__ = ["Failure", "FailureStreak", "watch_backoff"]


def watch_backoff(initial: float, maximum: float) -> Backoff:
    """The watch's retry delays: doubling from `initial` up to `maximum`, each
    jittered to between half and all of the nominal delay, so that balancers
    restarted together do not retry in step, yet none waits past the cap.
    Backoff validates the numbers (ValueError)."""
    return Backoff(initial=initial, multiplier=2, maximum=maximum, jitter=0.5, one_sided=True)


@dataclass(frozen=True, slots=True)
class Failure:
    """One failure of a streak, as `FailureStreak.failed` judged it."""

    number: int  # 1 for the first failure of the streak
    delay: float  # seconds to wait before the next try
    failing_seconds: float  # since the streak's first failure

    @property
    def first(self) -> bool:
        return self.number == 1


@dataclass(slots=True)
class FailureStreak:
    """Consecutive API failures of one watcher, ended by any success.

    A service becomes unknown when the API has failed for `unknown_after`
    seconds without a success in between, or at once when nothing was ever
    reported: a balancer that cannot tell must say so rather than keep lists
    it never had or that may be long stale."""

    backoff: Backoff
    unknown_after: float
    rng: random.Random
    failures: int = 0
    failing_since: float = 0.0

    def failed(self, now: float) -> Failure:
        self.failures += 1
        if self.failures == 1:
            self.failing_since = now
        return Failure(
            number=self.failures,
            delay=self.backoff.delay(self.failures, self.rng),
            failing_seconds=now - self.failing_since,
        )

    def succeeded(self) -> int:
        """Ends the streak; returns how many failures it had (0: none)."""
        failures, self.failures = self.failures, 0
        return failures

    def unknown(self, failure: Failure, *, ever_reported: bool) -> bool:
        """Whether, after `failure`, the endpoints must be reported unknown."""
        return not ever_reported or failure.failing_seconds >= self.unknown_after
