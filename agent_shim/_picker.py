"""Pure grpclb client bookkeeping: the weighted round robin over a server list,
the failing-backend marks, and the ClientStats counters.

Nothing here does I/O or locking; the Selector owns one Picker and guards it
with its lock. Times are plain floats from the caller's monotonic clock, so
tests drive them by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from agent_shim._errors import DroppedCallError, NoBackendError
from lbserver.backoff import Backoff


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """One entry of a server list. Drop entries have no address."""

    address: str
    token: str
    drop: bool = False


@dataclass(frozen=True, slots=True)
class StatsDelta:
    """Counters since the previous report, the body of a ClientStats message."""

    calls_started: int = 0
    calls_finished: int = 0
    calls_finished_with_client_failed_to_send: int = 0
    calls_finished_known_received: int = 0
    calls_dropped_by_token: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def is_empty(self) -> bool:
        return not (
            self.calls_started
            or self.calls_finished
            or self.calls_finished_with_client_failed_to_send
            or self.calls_finished_known_received
            or any(self.calls_dropped_by_token.values())
        )


class CallStats:
    """Accumulates client stats the way gRPC C-core's GrpcLbClientStats does:
    a dropped call counts as started and finished, and per token."""

    def __init__(self) -> None:
        self._started = 0
        self._finished = 0
        self._failed_to_send = 0
        self._known_received = 0
        self._dropped: dict[str, int] = {}

    def started(self) -> None:
        self._started += 1

    def finished(self, *, reached_backend: bool) -> None:
        self._finished += 1
        if reached_backend:
            self._known_received += 1
        else:
            self._failed_to_send += 1

    def dropped(self, token: str) -> None:
        self._started += 1
        self._finished += 1
        self._dropped[token] = self._dropped.get(token, 0) + 1

    def take(self) -> StatsDelta:
        """The counters since the last take(); resets them."""
        delta = StatsDelta(
            calls_started=self._started,
            calls_finished=self._finished,
            calls_finished_with_client_failed_to_send=self._failed_to_send,
            calls_finished_known_received=self._known_received,
            calls_dropped_by_token=MappingProxyType(dict(self._dropped)),
        )
        self._started = self._finished = self._failed_to_send = self._known_received = 0
        self._dropped = {}
        return delta


# A backend whose call failed to reach it is skipped for a while; short caps,
# because every skip moves its share onto the others and a probe costs at most
# one retried call.
FAILING_BACKOFF = Backoff(initial=1.0, multiplier=1.6, maximum=30.0)


@dataclass(slots=True)
class _Health:
    failures: int = 0
    failing_until: float = 0.0


class Picker:
    """Weighted round robin over a server list, in order, as gRPC's grpclb
    policy does it: one cursor walks the whole list deciding drops (so the
    drop share is exact), another walks the non-drop entries picking
    backends, skipping those that are failing. Duplicates are kept: a backend
    listed twice gets twice the calls."""

    def __init__(
        self,
        *,
        failing_backoff: Backoff = FAILING_BACKOFF,
        connection_failing: Callable[[str], bool] | None = None,
    ) -> None:
        self._failing_backoff = failing_backoff
        self._connection_failing = connection_failing
        self._entries: tuple[ServerEntry, ...] = ()
        self._backends: tuple[ServerEntry, ...] = ()
        self._listed: frozenset[str] = frozenset()
        self._has_drops = False
        self._drop_cursor = 0
        self._cursor = 0
        self._count_stats = False
        self._health: dict[str, _Health] = {}
        self.stats = CallStats()

    @property
    def entries(self) -> tuple[ServerEntry, ...]:
        return self._entries

    @property
    def counts_stats(self) -> bool:
        return self._count_stats

    def update(self, entries: Sequence[ServerEntry], *, count_stats: bool, start: int = 0) -> None:
        """Installs a new list. `count_stats` is true for lists from the
        balancer (fallback calls are not reported). `start` offsets both
        cursors, so that many clients given the same list do not all begin
        with its first entry."""
        self._entries = tuple(entries)
        self._backends = tuple(e for e in self._entries if not e.drop)
        self._has_drops = len(self._backends) < len(self._entries)
        self._drop_cursor = start % len(self._entries) if self._entries else 0
        self._cursor = start % len(self._backends) if self._backends else 0
        self._count_stats = count_stats
        self._listed = frozenset(e.address for e in self._backends)
        for address in [a for a in self._health if a not in self._listed]:
            del self._health[address]

    def pick(self, now: float, exclude: Collection[str] = ()) -> ServerEntry:
        """The entry for the next call. A non-empty `exclude` marks a retry
        of a call that already passed the drop decision, so it is never
        dropped (or counted) twice."""
        if not self._entries:
            raise NoBackendError("the server list is empty")
        if self._has_drops and not exclude:
            entry = self._entries[self._drop_cursor]
            self._drop_cursor = (self._drop_cursor + 1) % len(self._entries)
            if entry.drop:
                if self._count_stats:
                    self.stats.dropped(entry.token)
                raise DroppedCallError(entry.token)
        index = self._next_backend(now, exclude, skip_failing=True)
        if index is None:
            # Every candidate is marked failing: the marks are only guesses,
            # so try them anyway rather than fail without an attempt.
            index = self._next_backend(now, exclude, skip_failing=False)
        if index is None:
            raise NoBackendError(
                "no backend left to try" if self._backends else "every list entry is a drop"
            )
        self._cursor = (index + 1) % len(self._backends)
        if self._count_stats:
            self.stats.started()
        return self._backends[index]

    def _next_backend(
        self, now: float, exclude: Collection[str], *, skip_failing: bool
    ) -> int | None:
        n = len(self._backends)
        for step in range(n):
            index = (self._cursor + step) % n
            address = self._backends[index].address
            if address in exclude:
                continue
            if skip_failing and self.is_failing(address, now):
                continue
            return index
        return None

    def is_failing(self, address: str, now: float) -> bool:
        health = self._health.get(address)
        if health is not None and health.failing_until > now:
            return True
        return self._connection_failing is not None and self._connection_failing(address)

    def failing(self, now: float) -> list[str]:
        """Listed addresses marked failing by calls that did not reach them."""
        return sorted(a for a, h in self._health.items() if h.failing_until > now)

    def finished(
        self, address: str, now: float, *, counted: bool, reached_backend: bool, failed: bool
    ) -> None:
        """Records the end of a call made on a picked backend. `counted`
        says whether its start was counted (it came from a balancer list)."""
        if counted:
            self.stats.finished(reached_backend=reached_backend)
        if not reached_backend:
            if address not in self._listed:
                return  # no longer listed: nothing to skip
            health = self._health.setdefault(address, _Health())
            health.failures += 1
            health.failing_until = now + self._failing_backoff.delay(health.failures)
        elif not failed:
            self._health.pop(address, None)

    def take_stats(self) -> StatsDelta:
        return self.stats.take()

    def reset_stats(self) -> None:
        self.stats = CallStats()
