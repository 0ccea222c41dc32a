"""The balancer's state: membership in, server lists out, watched by streams.

Like go-control-plane's snapshot cache, the state owns every list and every
stream merely watches it: a heartbeat changes membership, the affected
service's list is rebuilt, and only if it differs are the watchers of names
that map to it woken. A woken stream reads the newest answer, so a burst of
changes reaches each client as one push.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import structlog

from lbserver.discovery import DiscoveryMode, Endpoint
from lbserver.domain.clientstats import ClientCallStats as ClientCallStats
from lbserver.domain.clientstats import ClientStatsBook, gone_services
from lbserver.domain.membership import Membership, TtlPolicy
from lbserver.domain.model import Backend, Registration
from lbserver.domain.naming import NameRules, resolve
from lbserver.domain.serverlist import (
    DEFAULT_MAX_LIST_LENGTH,
    DROP_TOKEN,
    ServerList,
    build_server_list,
    list_counts,
    list_from_counts,
    max_share_change,
    max_share_change_of,
    shares_of,
)
from lbserver.domain.subsetting import IndexPool, subset_positions
from lbserver.domain.validation import parse_registration
from lbserver.domain.weights import (
    LoadWeightSettings,
    SheddingSettings,
    WeightPolicy,
    drop_share,
    load_aware_weights,
)
from lbserver.errors import LimitExceededError, RegistrationRefusedError

log = structlog.get_logger("lbserver.balancer")

AnswerKind = Literal["list", "fallback", "pending"]
EmptyServicePolicy = Literal["fallback", "hold"]
# Replaces the whole weights → list pipeline for one service (tests use it
# to inject drop entries).
ListBuilder = Callable[[str, list[Backend], float], ServerList]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a client of one name should be told now. `pending` means say
    nothing: the client keeps whatever list it has."""

    kind: AnswerKind
    service: str | None = None
    servers: ServerList | None = None


PENDING = Answer("pending")
# A gap between timer ticks longer than this means the process was paused.
PAUSE_THRESHOLD = 2.0


class _NameSlot:
    """Shared by every stream that asked for the same name."""

    __slots__ = ("answer", "changed", "name", "published_at", "version", "waiters", "watchers")

    def __init__(self, name: str, answer: Answer) -> None:
        self.name = name
        self.answer = answer
        self.published_at = time.monotonic()
        self.version = 0
        self.watchers = 0
        self.changed = asyncio.Event()
        # One-shot futures of streams waiting for the next change (cheaper
        # than a task per stream around Event.wait); insertion-ordered.
        self.waiters: dict[asyncio.Future[None], None] = {}

    def publish(self, answer: Answer) -> None:
        if answer == self.answer:
            return
        self.answer = answer
        self.version += 1
        self.published_at = time.monotonic()
        # Swap the event before setting it so waiters that wake and wait again
        # block on the new one.
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()
        self.wake_waiters()

    def wake_waiters(self) -> None:
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Watch:
    """One stream's subscription to the answer for its name."""

    def __init__(self, balancer: Balancer, slot: _NameSlot) -> None:
        self._balancer = balancer
        self._slot = slot
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        # Subsetting: this client's index among the clients of its service.
        self._index_service: str | None = None
        self._index = 0

    @property
    def name(self) -> str:
        return self._slot.name

    @property
    def service(self) -> str | None:
        return self._slot.answer.service

    @property
    def published_at(self) -> float:
        """time.monotonic() of the newest answer, for push-latency metrics."""
        return self._slot.published_at

    def current(self) -> tuple[int, Answer]:
        return self._slot.version, self._slot.answer

    async def next(self, seen_version: int) -> tuple[int, Answer]:
        """The newest answer once its version differs from `seen_version`."""
        while self._slot.version == seen_version and not self._balancer.closed:
            await self._slot.changed.wait()
        return self._slot.version, self._slot.answer

    def changed(self, seen_version: int) -> asyncio.Future[None] | None:
        """A future that completes when the answer next changes (or the
        balancer closes, or interrupt() is called); None when the answer's
        version already differs from `seen_version` or the balancer is closed.
        The non-blocking form of next() for a stream that also waits for
        something else."""
        if self._slot.version != seen_version or self._balancer.closed:
            return None
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            self._slot.waiters[waiter] = None
        return waiter

    def interrupt(self) -> None:
        """Completes the future changed() returned, if any is pending."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def servers(self, answer: Answer) -> ServerList | None:
        """The list this client gets for `answer`: the service's list, or its
        subset of it when the service is subsetted."""
        if answer.kind != "list" or answer.service is None:
            return None
        return self._balancer._servers_for(self, answer.service)

    def client_index(self, service: str) -> int:
        if self._index_service != service:
            self._release_index()
            self._index = self._balancer._index_pool(service).acquire()
            self._index_service = service
        return self._index

    def _release_index(self) -> None:
        if self._index_service is not None:
            self._balancer._index_pool(self._index_service).release(self._index)
            self._index_service = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            waiter, self._waiter = self._waiter, None
            if waiter is not None:
                self._slot.waiters.pop(waiter, None)
                waiter.cancel()
            self._release_index()
            self._balancer._release(self._slot)


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """A service's published list and what it was built from."""

    backends: tuple[Backend, ...]
    weights: Mapping[str, float]
    drop_entries: int
    servers: ServerList
    # Entries per token (list_counts) when the default list builder made the
    # list; None with a custom ListBuilder.
    counts: Mapping[str, int] | None = field(default=None, compare=False)


class _Draft:
    """A list a service could publish, built only as far as deciding needs.

    With the default builder the list is a function of its counts (entries
    per token) and the backends' addresses, and a token names one address:
    two lists are equal exactly when their counts are, and their tokens and
    shares follow from the counts. So a rebuild that ends up not published
    (most heartbeats: equal list, or a share change under the hysteresis, or
    rate-limited) never interleaves. A custom ListBuilder's list is compared
    as it is."""

    __slots__ = ("_servers", "backends", "counts", "weights")

    def __init__(
        self,
        backends: tuple[Backend, ...],
        weights: Mapping[str, float],
        counts: dict[str, int] | None,
        servers: ServerList | None = None,
    ) -> None:
        self.backends = backends
        self.weights = weights
        self.counts = counts
        self._servers = servers

    @property
    def servers(self) -> ServerList:
        if self._servers is None:
            assert self.counts is not None
            self._servers = list_from_counts(self.backends, self.counts)
        return self._servers

    def empty(self) -> bool:
        return not self.counts if self.counts is not None else not self.servers.entries

    def same_list(self, plan: ServicePlan) -> bool:
        if self.counts is not None and plan.counts is not None:
            return self.counts == plan.counts
        return self.servers == plan.servers

    def membership_changed(self, plan: ServicePlan) -> bool:
        if self.counts is not None and plan.counts is not None:
            return self.counts.keys() != plan.counts.keys()
        return _membership_changed(plan.servers, self.servers)

    def share_change(self, plan: ServicePlan) -> float:
        if self.counts is not None and plan.counts is not None:
            return max_share_change_of(shares_of(plan.counts), shares_of(self.counts))
        return max_share_change(plan.servers, self.servers)

    def plan(self) -> ServicePlan:
        # A custom ListBuilder's plan counts no drop entries (subsets get none).
        drops = self.counts.get(DROP_TOKEN, 0) if self.counts is not None else 0
        return ServicePlan(self.backends, self.weights, drops, self.servers, self.counts)


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
class ServiceView:
    """A service as operators see it."""

    name: str
    backends: tuple[Backend, ...]
    servers: ServerList
    weights: Mapping[str, float]
    clients: int
    client_stats: ClientCallStats


EMPTY_LIST = ServerList(())


class Balancer:
    def __init__(
        self,
        *,
        ttl_policy: TtlPolicy | None = None,
        heartbeat_interval: float = 3.0,
        name_rules: NameRules | None = None,
        load_settings: LoadWeightSettings | None = None,
        weight_policy: WeightPolicy | None = None,
        list_settings: ListSettings | None = None,
        list_builder: ListBuilder | None = None,
        empty_service: EmptyServicePolicy = "fallback",
        startup_grace: float = 0.0,
        max_services: int = 1000,
        max_backends_per_service: int = 1000,
        discovery: Mapping[str, DiscoveryMode] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        load_settings = load_settings or LoadWeightSettings()
        self.membership = Membership(ttl_policy, load_settings)
        self.heartbeat_interval = heartbeat_interval
        self.name_rules = name_rules or NameRules()
        self._weight_policy: WeightPolicy = weight_policy or (
            lambda backends, now: load_aware_weights(backends, now, load_settings)
        )
        self.list_settings = list_settings or ListSettings()
        self._list_builder = list_builder
        self._empty_service = empty_service
        self._clock = clock
        self._wall_clock = wall_clock
        self._grace_ends = clock() + startup_grace
        self._in_grace = startup_grace > 0
        self._plans: dict[str, ServicePlan] = {}
        self._published_at: dict[str, float] = {}
        self._pending: set[str] = set()
        # Services with load-only heartbeats not yet reflected in their list
        # (refreshed by the next tick, or when something reads a list).
        self._stale: set[str] = set()
        # Since when each service's computed list has differed from its
        # published one by less than the threshold.
        self._drifting_since: dict[str, float] = {}
        self._subsets: dict[tuple[str, int], ServerList] = {}
        self._index_pools: dict[str, IndexPool] = {}
        self._slots: dict[str, _NameSlot] = {}
        # Per service, under lbserver.domain.clientstats' policy.
        self._client_stats: dict[str, ClientStatsBook] = {}
        self._max_services = max_services
        self._max_backends = max_backends_per_service
        # Kubernetes discovery: the mode per service, and the endpoints last
        # reported for it (absent: not known yet).
        self._discovery = dict(discovery or {})
        self._last_tick: float | None = None
        self._endpoints: dict[str, frozenset[Endpoint]] = {}
        # membership.services_generation when every slot was last answered.
        self._answered_generation = self.membership.services_generation
        self.closed = False

    # --- membership -----------------------------------------------------

    def heartbeat(self, registration: Registration) -> Backend:
        """Registers or refreshes a backend; LimitExceededError (nothing
        changed) when it would exceed max_services or max_backends_per_service."""
        self._check_discovery(registration)
        known = registration.service in self.membership
        previous = self.membership.get(registration.service, registration.instance_id)
        if not known and len(self.membership.services()) >= self._max_services:
            raise LimitExceededError("max_services", self._max_services)
        if previous is None and self.membership.count(registration.service) >= self._max_backends:
            raise LimitExceededError("max_backends_per_service", self._max_backends)
        backend = self.membership.heartbeat(registration, self._clock(), self._wall_clock())
        if not known:
            log.info("service appeared", service=registration.service)
        if previous is None:
            log.info(
                "backend joined",
                service=registration.service,
                instance=registration.instance_id,
                address=registration.address,
                weight=registration.weight,
                state=registration.state.value,
            )
        elif previous.registration.state != registration.state:
            log.info(
                "backend state changed",
                service=registration.service,
                instance=registration.instance_id,
                state=registration.state.value,
            )
        if previous is not None and _same_member(previous.registration, registration):
            # Only the load moved: its effect on weights is smoothed and
            # hysteresis-gated anyway, so one rebuild per tick serves every
            # heartbeat of the service in between (at scale a rebuild per
            # heartbeat costs more than receiving it).
            self._stale.add(registration.service)
        else:
            self._refresh([registration.service])
        return backend

    def _check_discovery(self, registration: Registration) -> None:
        mode = self._discovery.get(registration.service, "heartbeat")
        if mode == "heartbeat":
            return
        if mode == "kubernetes":
            raise RegistrationRefusedError(
                "failed_precondition",
                f"service {registration.service!r} takes its members from Kubernetes "
                "(discovery mode 'kubernetes'); heartbeats are not accepted",
            )
        endpoints = self._endpoints.get(registration.service)
        if endpoints is None:
            raise RegistrationRefusedError(
                "unavailable",
                f"the Kubernetes endpoints of service {registration.service!r} are not known "
                "yet; retry",
            )
        if (str(registration.ip), registration.port) not in _ready_addresses(endpoints):
            raise RegistrationRefusedError(
                "permission_denied",
                f"{registration.address} is not a ready endpoint of the Kubernetes Service "
                f"behind {registration.service!r}",
            )

    def set_endpoints(self, service: str, endpoints: frozenset[Endpoint] | None) -> None:
        """EndpointsCallback for Kubernetes discovery. None (the API cannot
        tell) keeps what was known: a control-plane outage must not empty lists."""
        mode = self._discovery.get(service, "heartbeat")
        if endpoints is None or mode == "heartbeat":
            return
        self._endpoints[service] = endpoints
        if mode == "kubernetes":
            self._sync_kubernetes_members(service, endpoints)
        self._refresh([service])

    def _sync_kubernetes_members(self, service: str, endpoints: frozenset[Endpoint]) -> None:
        now, wall = self._clock(), self._wall_clock()
        wanted: dict[str, Registration] = {}
        for endpoint in endpoints:
            if not endpoint.ready or endpoint.terminating:
                continue
            registration = parse_registration(
                service=service,
                instance_id=endpoint.pod or "",
                ip=endpoint.ip,
                port=endpoint.port,
                zone=endpoint.zone,
            )
            wanted[registration.instance_id] = registration
        for backend in self.membership.backends(service):
            if backend.instance_id not in wanted:
                self.membership.deregister(service, backend.instance_id)
                log.info("endpoint left", service=service, instance=backend.instance_id)
        for registration in wanted.values():
            if self.membership.get(service, registration.instance_id) is None:
                log.info("endpoint joined", service=service, address=registration.address)
            self.membership.heartbeat(registration, now, wall, ttl=math.inf)

    def _eligible(self, service: str, backends: list[Backend]) -> list[Backend]:
        """In 'both' mode only heartbeating backends that are also ready,
        non-terminating endpoints get calls."""
        if self._discovery.get(service) != "both":
            return backends
        ready = _ready_addresses(self._endpoints.get(service, frozenset()))
        return [b for b in backends if (str(b.registration.ip), b.registration.port) in ready]

    def deregister(self, service: str, instance_id: str) -> bool:
        removed = self.membership.deregister(service, instance_id)
        if removed:
            log.info("backend left", service=service, instance=instance_id)
            self._refresh([service])
        return removed

    def tick(self) -> None:
        """Expires backends past their TTL, sends rate-limited list changes
        that are due and ends the startup grace; call it periodically
        (run_timers does)."""
        now = self._clock()
        gap = now - self._last_tick if self._last_tick is not None else 0.0
        self._last_tick = now
        if gap > PAUSE_THRESHOLD:
            # This process did not run for `gap` seconds (SIGSTOP, a VM or
            # container freeze, a blocked loop): heartbeats could not be
            # received, so the silence is ours, not the backends'.
            self.membership.extend_expiries(gap)
            log.warning("balancer was paused; extended every TTL", paused_for=round(gap, 3))
        changed: set[str] = set()
        for backend in self.membership.expire(now):
            registration = backend.registration
            changed.add(registration.service)
            log.warning(
                "backend expired",
                service=registration.service,
                instance=registration.instance_id,
                address=registration.address,
                silent_for=round(now - backend.last_heartbeat, 3),
            )
        due = {
            service
            for service in self._pending
            if now - self._published_at.get(service, -math.inf)
            >= self.list_settings.min_push_interval
        }
        due |= {
            service
            for service, since in self._drifting_since.items()
            if now - since >= self.list_settings.settle_time
        }
        due |= self._stale
        if changed or due:
            self._refresh(changed | due)
        if self._in_grace and now >= self._grace_ends:
            self._in_grace = False
            self._reanswer_all()

    async def run_timers(self, period: float = 0.25) -> None:
        while not self.closed:
            self.tick()
            await asyncio.sleep(period)

    # --- lists ----------------------------------------------------------

    def _draft(self, service: str, backends: list[Backend], now: float) -> _Draft:
        if self._list_builder is not None:
            servers = self._list_builder(service, backends, now)
            return _Draft(tuple(backends), {}, None, servers)
        weights = self._weight_policy(backends, now)
        settings = self.list_settings
        counts = list_counts(
            backends,
            weights,
            max_length=settings.max_length,
            drop_share=drop_share(backends, settings.shedding),
        )
        return _Draft(tuple(backends), weights, counts)

    def _refresh_stale(self) -> None:
        if self._stale:
            self._refresh(set(self._stale))

    def _refresh(self, services: Iterable[str]) -> None:
        now = self._clock()
        published: set[str] = set()
        for service in services:
            self._pending.discard(service)
            self._stale.discard(service)
            backends = self._eligible(service, self.membership.backends(service))
            draft = self._draft(service, backends, now) if backends else None
            current = self._plans.get(service)
            if draft is None or draft.empty():
                self._drifting_since.pop(service, None)
                if current is not None:
                    self._publish(service, None, now)
                    published.add(service)
                continue
            if current is not None and draft.same_list(current):
                self._drifting_since.pop(service, None)
                continue
            if current is not None and not draft.membership_changed(current):
                if draft.share_change(current) <= self.list_settings.share_threshold:
                    since = self._drifting_since.setdefault(service, now)
                    if now - since < self.list_settings.settle_time:
                        continue
                if now - self._published_at.get(service, -math.inf) < (
                    self.list_settings.min_push_interval
                ):
                    self._pending.add(service)
                    continue
            self._publish(service, draft.plan(), now)
            published.add(service)
        self._reanswer(published)

    def _publish(self, service: str, plan: ServicePlan | None, now: float) -> None:
        self._drifting_since.pop(service, None)
        if plan is None:
            self._plans.pop(service, None)
        else:
            self._plans[service] = plan
        self._published_at[service] = now
        for key in [key for key in self._subsets if key[0] == service]:
            del self._subsets[key]

    def _answer(self, name: str, known: frozenset[str]) -> Answer:
        service = resolve(name, known, self.name_rules)
        plan = self._plans.get(service) if service is not None else None
        if plan is not None:
            return Answer("list", service=service, servers=plan.servers)
        if self._in_grace or self._empty_service == "hold":
            return Answer("pending", service=service)
        return Answer("fallback", service=service)

    def _reanswer_all(self) -> None:
        self._answered_generation = self.membership.services_generation
        known = frozenset(self.membership.services())
        for slot in self._slots.values():
            slot.publish(self._answer(slot.name, known))

    def _reanswer(self, published: set[str]) -> None:
        """Re-answers the names whose answer may have changed: every name
        when a service appeared or vanished (names resolve differently),
        otherwise those resolving to a service whose list was (re)published
        (the others' answers are what they hold; slots ignore equal answers)."""
        if self.membership.services_generation != self._answered_generation:
            self._reanswer_all()
            return
        if not published:
            return
        known = frozenset(self.membership.services())
        for slot in self._slots.values():
            if slot.answer.service in published:
                slot.publish(self._answer(slot.name, known))

    def server_list(self, service: str) -> ServerList | None:
        self._refresh_stale()
        plan = self._plans.get(service)
        return plan.servers if plan is not None else None

    def _servers_for(self, watch: Watch, service: str) -> ServerList | None:
        plan = self._plans.get(service)
        if plan is None:
            return None
        size = self.list_settings.subset_sizes.get(service, 0)
        if size <= 0:
            return plan.servers
        serving = [b for b in plan.backends if plan.weights.get(b.token, 0) > 0]
        if size >= len(serving):
            return plan.servers
        start = subset_positions(len(serving), size, watch.client_index(service))
        key = (service, start[0] if start else 0)
        cached = self._subsets.get(key)
        if cached is None:
            chosen = [serving[position] for position in start]
            weights = {b.token: plan.weights[b.token] for b in chosen}
            cached = self._subsets[key] = build_server_list(
                chosen,
                weights,
                max_length=self.list_settings.max_length,
                drop_entries=round(plan.drop_entries * size / len(serving)),
            )
        return cached

    def _index_pool(self, service: str) -> IndexPool:
        pool = self._index_pools.get(service)
        if pool is None:
            pool = self._index_pools[service] = IndexPool()
        return pool

    # --- watches and client stats ----------------------------------------

    def watch(self, name: str) -> Watch:
        slot = self._slots.get(name)
        if slot is None:
            known = frozenset(self.membership.services())
            slot = self._slots[name] = _NameSlot(name, self._answer(name, known))
        slot.watchers += 1
        return Watch(self, slot)

    def _release(self, slot: _NameSlot) -> None:
        slot.watchers -= 1
        if slot.watchers <= 0:
            self._slots.pop(slot.name, None)

    def record_client_stats(self, service: str, stats: ClientCallStats) -> None:
        """Adds one ClientStats report's delta (lbserver.domain.clientstats:
        counters clamped per report, totals saturated, drops kept per token
        only for the tokens of the service's current list)."""
        book = self._client_stats.get(service)
        if book is None:
            # A service's stats outlive it only until the next service
            # starts some: the map holds at most the live services + 1.
            self._forget_gone_client_stats(self.clients_per_service())
            book = self._client_stats[service] = ClientStatsBook()
        plan = self._plans.get(service)
        book.follow(plan.servers if plan is not None else None)
        book.record(stats)

    def _forget_gone_client_stats(self, clients: Mapping[str, int]) -> None:
        """Drops the client stats of services with no backends and no clients."""
        for name in gone_services(self._client_stats, self.membership, clients):
            del self._client_stats[name]

    def clients_per_service(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for slot in self._slots.values():
            if slot.answer.service is not None:
                counts[slot.answer.service] = counts.get(slot.answer.service, 0) + slot.watchers
        return counts

    def iter_views(self, service: str | None = None, start: str = "") -> Iterator[ServiceView]:
        """Views of the services named `start` or later, in name order (only
        `service` when one is given), built one at a time as they are taken:
        a caller that stops early (a page of Admin.GetState) pays only for
        the services it took."""
        self._refresh_stale()
        clients = self.clients_per_service()
        self._forget_gone_client_stats(clients)
        if service:
            names = [service] if service >= start else []
        else:
            names = [
                name
                for name in sorted(
                    set(self.membership.services()) | set(self._client_stats) | set(clients)
                )
                if name >= start
            ]
        for name in names:
            view = self._view(name, clients.get(name, 0))
            if view is not None:
                yield view

    def _view(self, name: str, clients: int) -> ServiceView | None:
        plan = self._plans.get(name)
        book = self._client_stats.get(name)
        if book is not None:
            book.follow(plan.servers if plan is not None else None)
        elif not clients and name not in self.membership:
            return None
        return ServiceView(
            name=name,
            backends=tuple(self.membership.backends(name)),
            servers=plan.servers if plan is not None else EMPTY_LIST,
            weights=plan.weights if plan is not None else {},
            clients=clients,
            client_stats=book.snapshot() if book is not None else ClientCallStats(),
        )

    def view(self, service: str | None = None) -> list[ServiceView]:
        return list(self.iter_views(service))

    def close(self) -> None:
        """Wakes every stream so it can end (shutdown)."""
        self.closed = True
        for slot in self._slots.values():
            slot.changed.set()
            slot.wake_waiters()


def _same_member(old: Registration, new: Registration) -> bool:
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


def _membership_changed(old: ServerList, new: ServerList) -> bool:
    return {e.token for e in old.entries} != {e.token for e in new.entries}


def _ready_addresses(endpoints: frozenset[Endpoint]) -> set[tuple[str, int]]:
    return {
        (str(ipaddress.ip_address(e.ip)), e.port)
        for e in endpoints
        if e.ready and not e.terminating
    }
