"""What grpclb clients' ClientStats reports may add to a service's totals.

BalanceLoad is open to any client, so a report is untrusted input: its
counters are deltas a client chose, and its drop counts are keyed by tokens
it chose. The policy keeps the totals meaningful and their size bounded:

- Each counter of one report (and each per-token drop count) is clamped to
  0..MAX_CALLS_PER_REPORT: no client makes more than 10^9 calls in one report
  interval (C-core reports at least every second; that is a billion calls a
  second from one client). Each clamp is counted.
- Totals saturate at INT64_MAX, the largest value the Admin API's int64
  fields carry, so a reply can never fail to serialize.
- Drops are kept per token only for the tokens of the service's current
  server list and lbserver's own drop token (DROP_TOKEN). Drops reported under
  any other token go to one bucket (`calls_dropped_other_tokens`) and each
  such token is counted as ignored; when a token leaves the list, its count
  moves to that bucket too. So a service keeps at most (distinct tokens of its
  list) + 1 token counts, whatever clients send.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from lbserver.domain.serverlist import DROP_TOKEN, ServerList

# The largest value of a protobuf int64 (what Admin.GetState carries).
INT64_MAX = 2**63 - 1
# The most calls one report may add to one counter (or to one token's drops).
MAX_CALLS_PER_REPORT = 10**9


def saturating_add(total: int, delta: int) -> int:
    """total + delta, at most INT64_MAX (delta is never negative here)."""
    return min(total + delta, INT64_MAX)


@dataclass(slots=True)
class ClientCallStats:
    """Sums of the ClientStats deltas reported for one service (or one
    report's delta: then only the first six fields are set)."""

    calls_started: int = 0
    calls_finished: int = 0
    calls_finished_with_client_failed_to_send: int = 0
    calls_finished_known_received: int = 0
    calls_dropped_by_token: dict[str, int] = field(default_factory=dict)
    reports: int = 0
    # Dropped calls kept under no token: reported with a token not in the
    # list, or counted under a token that has since left it.
    calls_dropped_other_tokens: int = 0
    # Per-token drop counts whose token was not accepted (one per token per
    # report).
    drop_tokens_ignored: int = 0
    # Counters (and per-token drop counts) clamped to MAX_CALLS_PER_REPORT.
    counters_clamped: int = 0

    def add(self, other: ClientCallStats) -> None:
        """Adds every field of `other`, each saturating at INT64_MAX; no
        token policy (see ClientStatsBook.record for reports)."""
        self.calls_started = saturating_add(self.calls_started, other.calls_started)
        self.calls_finished = saturating_add(self.calls_finished, other.calls_finished)
        self.calls_finished_with_client_failed_to_send = saturating_add(
            self.calls_finished_with_client_failed_to_send,
            other.calls_finished_with_client_failed_to_send,
        )
        self.calls_finished_known_received = saturating_add(
            self.calls_finished_known_received, other.calls_finished_known_received
        )
        dropped = self.calls_dropped_by_token
        for token, count in other.calls_dropped_by_token.items():
            dropped[token] = saturating_add(dropped.get(token, 0), count)
        self.reports = saturating_add(self.reports, other.reports)
        self.calls_dropped_other_tokens = saturating_add(
            self.calls_dropped_other_tokens, other.calls_dropped_other_tokens
        )
        self.drop_tokens_ignored = saturating_add(
            self.drop_tokens_ignored, other.drop_tokens_ignored
        )
        self.counters_clamped = saturating_add(self.counters_clamped, other.counters_clamped)


def clamp(value: int) -> tuple[int, bool]:
    """`value` within 0..MAX_CALLS_PER_REPORT, and whether it had to move."""
    if value < 0:
        return 0, True
    if value > MAX_CALLS_PER_REPORT:
        return MAX_CALLS_PER_REPORT, True
    return value, False


def list_tokens(servers: ServerList | None) -> frozenset[str]:
    """The drop tokens a service accepts while `servers` is its list."""
    if servers is None:
        return frozenset((DROP_TOKEN,))
    return frozenset(entry.token for entry in servers.entries) | {DROP_TOKEN}


class ClientStatsBook:
    """One service's client stats under the policy above."""

    __slots__ = ("_list", "_tokens", "totals")

    def __init__(self) -> None:
        self.totals = ClientCallStats()
        # The list the accepted tokens were taken from (compared by identity:
        # a republished list is a new object) and those tokens.
        self._list: ServerList | None = None
        self._tokens: frozenset[str] = list_tokens(None)

    @property
    def accepted_tokens(self) -> frozenset[str]:
        return self._tokens

    def follow(self, servers: ServerList | None) -> None:
        """Takes the accepted tokens from the service's current list;
        counts of tokens no longer in it move to the other-tokens bucket."""
        if servers is self._list:
            return
        self._list = servers
        tokens = self._tokens = list_tokens(servers)
        dropped = self.totals.calls_dropped_by_token
        gone = [token for token in dropped if token not in tokens]
        other = self.totals.calls_dropped_other_tokens
        for token in gone:
            other = saturating_add(other, dropped.pop(token))
        self.totals.calls_dropped_other_tokens = other

    def record(self, delta: ClientCallStats) -> None:
        """Adds one report's delta: clamped, saturated, tokens filtered."""
        totals = self.totals
        clamped = 0
        started, moved = clamp(delta.calls_started)
        clamped += moved
        finished, moved = clamp(delta.calls_finished)
        clamped += moved
        failed, moved = clamp(delta.calls_finished_with_client_failed_to_send)
        clamped += moved
        received, moved = clamp(delta.calls_finished_known_received)
        clamped += moved
        totals.calls_started = saturating_add(totals.calls_started, started)
        totals.calls_finished = saturating_add(totals.calls_finished, finished)
        totals.calls_finished_with_client_failed_to_send = saturating_add(
            totals.calls_finished_with_client_failed_to_send, failed
        )
        totals.calls_finished_known_received = saturating_add(
            totals.calls_finished_known_received, received
        )
        tokens = self._tokens
        dropped = totals.calls_dropped_by_token
        other = 0
        ignored = 0
        for token, count in delta.calls_dropped_by_token.items():
            count, moved = clamp(count)
            clamped += moved
            if token in tokens:
                dropped[token] = saturating_add(dropped.get(token, 0), count)
            else:
                # Summed in a plain int first: other could grow past
                # INT64_MAX only by (tokens in one report) x 10^9.
                other += count
                ignored += 1
        totals.calls_dropped_other_tokens = saturating_add(totals.calls_dropped_other_tokens, other)
        totals.drop_tokens_ignored = saturating_add(totals.drop_tokens_ignored, ignored)
        totals.counters_clamped = saturating_add(totals.counters_clamped, clamped)
        totals.reports = saturating_add(totals.reports, 1)

    def snapshot(self) -> ClientCallStats:
        """A copy of the totals (callers may keep it while reports arrive)."""
        t = self.totals
        return ClientCallStats(
            t.calls_started,
            t.calls_finished,
            t.calls_finished_with_client_failed_to_send,
            t.calls_finished_known_received,
            dict(t.calls_dropped_by_token),
            t.reports,
            t.calls_dropped_other_tokens,
            t.drop_tokens_ignored,
            t.counters_clamped,
        )


def gone_services(
    with_stats: Iterable[str], known: Container[str], with_clients: Container[str]
) -> list[str]:
    """Services whose client stats are to be forgotten: neither known (it
    has backends) nor asked for by any open stream."""
    return [s for s in with_stats if s not in known and s not in with_clients]
