"""Publish policy: whether a service's freshly built list goes out now.

Every membership or load change rebuilds a service's list as a `Draft`; the
policy compares it with the `ServicePlan` last published and decides. Lists
whose backends are unchanged are gated by hysteresis (a share change at or
under the threshold waits until it has lasted `settle_time`) and by a rate
limit (`min_push_interval`); a join, a leave or a drain goes out at once.
Pure: the caller passes the time and the service's publish history in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from lbserver.domain.model import Backend, Registration
from lbserver.domain.serverlist import (
    DEFAULT_MAX_LIST_LENGTH,
    DROP_TOKEN,
    ServerList,
    list_from_counts,
    max_share_change_of,
    shares_of,
)
from lbserver.domain.weights import SheddingSettings

# What a client of a service with no list is told: `fallback` (use your
# resolver's addresses) or `hold` (nothing: keep your last list).
EmptyServicePolicy = Literal["fallback", "hold"]

# publish: send the draft now. unpublish: the service has no list any more.
# unchanged: the published list is the draft's. drifting: a small share
# change, held back by the hysteresis. deferred: rate-limited, due later.
Verdict = Literal["publish", "unpublish", "unchanged", "drifting", "deferred"]


@dataclass(frozen=True, slots=True)
class ListSettings:
    max_length: int = DEFAULT_MAX_LIST_LENGTH
    # Hysteresis: a list whose backends are unchanged is pushed only when
    # some backend's share moves by more than this (0 = any change).
    share_threshold: float = 0.0
    # A difference under the threshold that lasts this long is pushed anyway,
    # so small errors (a ramp that ended, a rounding) never freeze in place.
    settle_time: float = 10.0
    # Weight-only changes are pushed at most once per this many seconds per
    # service; membership changes (join, leave, drain) always go out at once.
    min_push_interval: float = 0.0
    shedding: SheddingSettings = field(default_factory=SheddingSettings)
    # Services whose clients each get a subset of this many backends.
    subset_sizes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """A service's published list and what it was built from."""

    backends: tuple[Backend, ...]
    weights: Mapping[str, float]
    # Entries per token, drops under DROP_TOKEN: the list is made of these.
    counts: Mapping[str, int]
    servers: ServerList

    @property
    def drop_entries(self) -> int:
        return self.counts.get(DROP_TOKEN, 0)


class Draft:
    """A list a service could publish, built only as far as deciding needs.

    The list is a function of its counts (entries per token) and the
    backends' addresses, and a token names one address: two lists are equal
    exactly when their counts are, and their tokens and shares follow from
    the counts. So a rebuild that ends up not published (most heartbeats:
    equal list, or a share change under the hysteresis, or rate-limited)
    never interleaves."""

    __slots__ = ("_servers", "backends", "counts", "weights")

    def __init__(
        self, backends: tuple[Backend, ...], weights: Mapping[str, float], counts: dict[str, int]
    ) -> None:
        self.backends = backends
        self.weights = weights
        self.counts = counts
        self._servers: ServerList | None = None

    @property
    def servers(self) -> ServerList:
        if self._servers is None:
            self._servers = list_from_counts(self.backends, self.counts)
        return self._servers

    def empty(self) -> bool:
        return not self.counts

    def same_list(self, plan: ServicePlan) -> bool:
        return self.counts == plan.counts

    def membership_changed(self, plan: ServicePlan) -> bool:
        return self.counts.keys() != plan.counts.keys()

    def share_change(self, plan: ServicePlan) -> float:
        return max_share_change_of(shares_of(plan.counts), shares_of(self.counts))

    def plan(self) -> ServicePlan:
        return ServicePlan(self.backends, self.weights, self.counts, self.servers)


def decide(
    draft: Draft | None,
    current: ServicePlan | None,
    *,
    now: float,
    published_at: float,
    drifting_since: float | None,
    settings: ListSettings,
) -> Verdict:
    """What to do with `draft` (None: the service has no eligible backend)
    given the `current` plan, when it was published (-inf: never) and since
    when the computed list has drifted under the threshold (None: it has not)."""
    if draft is None or draft.empty():
        return "unpublish" if current is not None else "unchanged"
    if current is None:
        return "publish"
    if draft.same_list(current):
        return "unchanged"
    if draft.membership_changed(current):
        return "publish"
    # A drift starts now unless it started before; it is held until it has
    # lasted settle_time (at once when settle_time is 0).
    since = now if drifting_since is None else drifting_since
    if (
        draft.share_change(current) <= settings.share_threshold
        and now - since < settings.settle_time
    ):
        return "drifting"
    if now - published_at < settings.min_push_interval:
        return "deferred"
    return "publish"


def due(
    now: float,
    deferred: Iterable[str],
    published_at: Mapping[str, float],
    drifting_since: Mapping[str, float],
    settings: ListSettings,
) -> set[str]:
    """Services whose held-back change is due: rate-limited ones whose
    interval has passed, drifting ones that have drifted for settle_time."""
    ready = {
        service
        for service in deferred
        if now - published_at.get(service, float("-inf")) >= settings.min_push_interval
    }
    ready.update(
        service for service, since in drifting_since.items() if now - since >= settings.settle_time
    )
    return ready


def same_member(old: Registration, new: Registration) -> bool:
    """Whether a heartbeat changes nothing that a list shows but the load
    (a new TTL changes only when the backend expires)."""
    return (
        old.state is new.state
        and old.port == new.port
        and old.ip == new.ip
        and old.weight == new.weight
        and old.zone == new.zone
        and old.labels == new.labels
    )
