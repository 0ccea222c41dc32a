"""The balancer's state: membership in, server lists out.

A heartbeat (or a Kubernetes endpoints change, admitted by
lbserver.discovery.admission) changes membership; the affected service's list
is rebuilt (lbserver.domain: weights → list) and the publish policy
(lbserver.domain.publish) decides whether it goes out; only then are the
streams watching names that map to it woken (lbserver.watch).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import structlog

from lbserver.discovery import DiscoveryMode, Endpoint
from lbserver.discovery.admission import Admission
from lbserver.domain.clientstats import ClientCallStats as ClientCallStats
from lbserver.domain.clientstats import ClientStatsBook, gone_services
from lbserver.domain.membership import Membership, TtlPolicy
from lbserver.domain.model import Backend, LoadReport, Registration, with_load
from lbserver.domain.naming import NameRules, resolve
from lbserver.domain.publish import (
    Draft,
    EmptyServicePolicy,
    ListSettings,
    ServicePlan,
    decide,
    due,
)
from lbserver.domain.publish import same_member as _same_member
from lbserver.domain.serverlist import ServerList, build_server_list, list_counts
from lbserver.domain.subsetting import subset_positions
from lbserver.domain.weights import (
    LoadWeightSettings,
    WeightPolicy,
    drop_share,
    load_aware_weights,
)
from lbserver.errors import LimitExceededError
from lbserver.watch import PENDING as PENDING
from lbserver.watch import Answer, Watch, Watches
from lbserver.watch import AnswerKind as AnswerKind

__all__ = [
    "PENDING",
    "Answer",
    "AnswerKind",
    "Balancer",
    "ClientCallStats",
    "EmptyServicePolicy",
    "ListSettings",
    "ServicePlan",
    "ServiceView",
    "Watch",
]

log = structlog.get_logger("lbserver.balancer")

# A gap between timer ticks longer than this means the process was paused.
PAUSE_THRESHOLD = 2.0


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
        self._empty_service = empty_service
        self._clock = clock
        self._wall_clock = wall_clock
        self._grace_ends = clock() + startup_grace
        self._in_grace = startup_grace > 0
        self._plans: dict[str, ServicePlan] = {}
        self._published_at: dict[str, float] = {}
        # Rate-limited services with a change to send when their interval ends.
        self._deferred: set[str] = set()
        # Services with load-only heartbeats not yet reflected in their list
        # (refreshed by the next tick, or when something reads a list).
        self._stale: set[str] = set()
        # Since when each service's computed list has differed from its
        # published one by less than the threshold.
        self._drifting_since: dict[str, float] = {}
        self._subsets: dict[tuple[str, int], ServerList] = {}
        self._watches = Watches(self)
        # Per service, under lbserver.domain.clientstats' policy.
        self._client_stats: dict[str, ClientStatsBook] = {}
        self._max_services = max_services
        self._max_backends = max_backends_per_service
        self._admission = Admission(discovery)
        self._last_tick: float | None = None
        # membership.services_generation when every name was last answered.
        self._answered_generation = self.membership.services_generation

    @property
    def closed(self) -> bool:
        return self._watches.closed

    # --- membership -----------------------------------------------------

    def heartbeat(self, registration: Registration) -> Backend:
        """Registers or refreshes a backend; LimitExceededError (nothing
        changed) when it would exceed max_services or max_backends_per_service;
        RegistrationRefusedError when the service's discovery mode refuses it."""
        self._admission.check_heartbeat(registration)
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

    def set_endpoints(self, service: str, endpoints: frozenset[Endpoint] | None) -> None:
        """EndpointsCallback for Kubernetes discovery. None (the API cannot
        tell) keeps what was known: a control-plane outage must not empty lists."""
        if not self._admission.set_endpoints(service, endpoints):
            return
        if self._admission.mode(service) == "kubernetes":
            self._sync_kubernetes_members(service)
        self._refresh([service])

    def _sync_kubernetes_members(self, service: str) -> None:
        now, wall = self._clock(), self._wall_clock()
        wanted = self._admission.members(service)
        for backend in self.membership.backends(service):
            if backend.instance_id not in wanted:
                self.membership.deregister(service, backend.instance_id)
                log.info("endpoint left", service=service, instance=backend.instance_id)
        for registration in wanted.values():
            known = self.membership.get(service, registration.instance_id)
            if known is None:
                log.info("endpoint joined", service=service, address=registration.address)
            elif known.registration.ip == registration.ip:
                # The last scraped load stays until the next scrape replaces it.
                registration = with_load(registration, known.registration.load)
            self.membership.heartbeat(registration, now, wall, ttl=math.inf)

    def members(self, service: str) -> list[tuple[str, str]]:
        """(instance id, IP) of a service's members, for the load scraper."""
        return [(b.instance_id, str(b.registration.ip)) for b in self.membership.backends(service)]

    def report_load(self, service: str, instance_id: str, load: LoadReport) -> bool:
        """A Kubernetes member's load, scraped by the balancer (it sends no
        heartbeats); whether the member is still there. Only the weights can
        move, so like a load-only heartbeat it marks the service stale."""
        backend = self.membership.get(service, instance_id)
        if backend is None or self._admission.mode(service) != "kubernetes":
            return False
        self.membership.heartbeat(
            with_load(backend.registration, load),
            self._clock(),
            self._wall_clock(),
            ttl=math.inf,
        )
        self._stale.add(service)
        return True

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
        ready = due(
            now, self._deferred, self._published_at, self._drifting_since, self.list_settings
        )
        ready |= self._stale
        if changed or ready:
            self._refresh(changed | ready)
        if self._in_grace and now >= self._grace_ends:
            self._in_grace = False
            self._reanswer_all()

    async def run_timers(self, period: float = 0.25) -> None:
        while not self.closed:
            self.tick()
            await asyncio.sleep(period)

    # --- lists ----------------------------------------------------------

    def _draft(self, service: str, backends: list[Backend], now: float) -> Draft:
        weights = self._weight_policy(backends, now)
        settings = self.list_settings
        counts = list_counts(
            backends,
            weights,
            max_length=settings.max_length,
            drop_share=drop_share(backends, settings.shedding),
        )
        return Draft(tuple(backends), weights, counts)

    def _refresh_stale(self) -> None:
        if self._stale:
            self._refresh(set(self._stale))

    def _refresh(self, services: Iterable[str]) -> None:
        now = self._clock()
        published: set[str] = set()
        for service in services:
            self._deferred.discard(service)
            self._stale.discard(service)
            backends = self._admission.eligible(service, self.membership.backends(service))
            draft = self._draft(service, backends, now) if backends else None
            current = self._plans.get(service)
            verdict = decide(
                draft,
                current,
                now=now,
                published_at=self._published_at.get(service, -math.inf),
                drifting_since=self._drifting_since.get(service),
                settings=self.list_settings,
            )
            if verdict == "drifting":
                self._drifting_since.setdefault(service, now)
            elif verdict == "deferred":
                self._deferred.add(service)
            elif verdict == "unchanged":
                self._drifting_since.pop(service, None)
            else:
                self._publish(
                    service, draft.plan() if draft and verdict == "publish" else None, now
                )
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

    def _answerer(self) -> Callable[[str], Answer]:
        """The answer for a name, as things stand: built once per change, so
        that every name is resolved against one set of known services."""
        known = frozenset(self.membership.services())
        in_grace_or_hold = self._in_grace or self._empty_service == "hold"

        def answer(name: str) -> Answer:
            service = resolve(name, known, self.name_rules)
            plan = self._plans.get(service) if service is not None else None
            if plan is not None:
                return Answer("list", service=service, servers=plan.servers)
            if in_grace_or_hold:
                return Answer("pending", service=service)
            return Answer("fallback", service=service)

        return answer

    def _reanswer_all(self) -> None:
        self._answered_generation = self.membership.services_generation
        self._watches.publish(self._answerer(), self._watches.names())

    def _reanswer(self, published: set[str]) -> None:
        """Re-answers the names whose answer may have changed: every name
        when a service appeared or vanished (names resolve differently),
        otherwise those resolving to a service whose list was (re)published
        (the others' answers are what they hold; slots ignore equal answers)."""
        if self.membership.services_generation != self._answered_generation:
            self._reanswer_all()
        elif published:
            self._watches.publish(self._answerer(), self._watches.names(published))

    def server_list(self, service: str) -> ServerList | None:
        self._refresh_stale()
        plan = self._plans.get(service)
        return plan.servers if plan is not None else None

    def servers_for(self, service: str, client_index: Callable[[], int]) -> ServerList | None:
        """ListSource for the watches: the service's list, or a client's
        subset of it (cached per subset start)."""
        plan = self._plans.get(service)
        if plan is None:
            return None
        size = self.list_settings.subset_sizes.get(service, 0)
        if size <= 0:
            return plan.servers
        serving = [b for b in plan.backends if plan.weights.get(b.token, 0) > 0]
        if size >= len(serving):
            return plan.servers
        start = subset_positions(len(serving), size, client_index())
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

    # --- watches and client stats ----------------------------------------

    def watch(self, name: str) -> Watch:
        return self._watches.watch(name, self._answerer())

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
        return self._watches.clients_per_service()

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
        self._watches.close()
