"""The balancer's state: membership in, server lists out, watched by streams.

Like go-control-plane's snapshot cache, the state owns every list and every
stream merely watches it: a heartbeat changes membership, the affected
service's list is rebuilt, and only if it differs are the watchers of names
that map to it woken. A woken stream reads the newest answer, so a burst of
changes reaches each client as one push.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import structlog

from lbserver.domain.membership import Membership, TtlPolicy
from lbserver.domain.model import Backend, Registration
from lbserver.domain.naming import NameRules, resolve
from lbserver.domain.serverlist import DEFAULT_MAX_LIST_LENGTH, ServerList, build_server_list
from lbserver.domain.weights import WeightPolicy, static_weights

log = structlog.get_logger("lbserver.balancer")

AnswerKind = Literal["list", "fallback", "pending"]
EmptyServicePolicy = Literal["fallback", "hold"]
# Builds one service's list from its backends; replaceable for load-aware
# weights or drops.
ListBuilder = Callable[[str, list[Backend], float], ServerList]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a client of one name should be told now. `pending` means say
    nothing: the client keeps whatever list it has."""

    kind: AnswerKind
    service: str | None = None
    servers: ServerList | None = None


PENDING = Answer("pending")


@dataclass(slots=True)
class ClientCallStats:
    """Sums of the ClientStats deltas reported for one service."""

    calls_started: int = 0
    calls_finished: int = 0
    calls_finished_with_client_failed_to_send: int = 0
    calls_finished_known_received: int = 0
    calls_dropped_by_token: dict[str, int] = field(default_factory=dict)
    reports: int = 0

    def add(self, other: ClientCallStats) -> None:
        self.calls_started += other.calls_started
        self.calls_finished += other.calls_finished
        self.calls_finished_with_client_failed_to_send += (
            other.calls_finished_with_client_failed_to_send
        )
        self.calls_finished_known_received += other.calls_finished_known_received
        for token, count in other.calls_dropped_by_token.items():
            self.calls_dropped_by_token[token] = self.calls_dropped_by_token.get(token, 0) + count
        self.reports += other.reports


class _NameSlot:
    """Shared by every stream that asked for the same name."""

    __slots__ = ("answer", "changed", "name", "published_at", "version", "watchers")

    def __init__(self, name: str, answer: Answer) -> None:
        self.name = name
        self.answer = answer
        self.published_at = time.monotonic()
        self.version = 0
        self.watchers = 0
        self.changed = asyncio.Event()

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


class Watch:
    """One stream's subscription to the answer for its name."""

    def __init__(self, balancer: Balancer, slot: _NameSlot) -> None:
        self._balancer = balancer
        self._slot = slot
        self._closed = False

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

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._balancer._release(self._slot)


@dataclass(frozen=True, slots=True)
class ServiceView:
    """A service as operators see it."""

    name: str
    backends: tuple[Backend, ...]
    servers: ServerList
    clients: int
    client_stats: ClientCallStats


class Balancer:
    def __init__(
        self,
        *,
        ttl_policy: TtlPolicy | None = None,
        heartbeat_interval: float = 3.0,
        name_rules: NameRules | None = None,
        weight_policy: WeightPolicy = static_weights,
        max_list_length: int = DEFAULT_MAX_LIST_LENGTH,
        list_builder: ListBuilder | None = None,
        empty_service: EmptyServicePolicy = "fallback",
        startup_grace: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.membership = Membership(ttl_policy)
        self.heartbeat_interval = heartbeat_interval
        self.name_rules = name_rules or NameRules()
        self._weight_policy = weight_policy
        self._max_list_length = max_list_length
        self._list_builder = list_builder or self._build_weighted_list
        self._empty_service = empty_service
        self._clock = clock
        self._wall_clock = wall_clock
        self._grace_ends = clock() + startup_grace
        self._in_grace = startup_grace > 0
        self._lists: dict[str, ServerList] = {}
        self._slots: dict[str, _NameSlot] = {}
        self._client_stats: dict[str, ClientCallStats] = {}
        self.closed = False

    # --- membership -----------------------------------------------------

    def heartbeat(self, registration: Registration) -> Backend:
        known = registration.service in self.membership
        previous = self._find(registration.service, registration.instance_id)
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
        self._refresh([registration.service])
        return backend

    def deregister(self, service: str, instance_id: str) -> bool:
        removed = self.membership.deregister(service, instance_id)
        if removed:
            log.info("backend left", service=service, instance=instance_id)
            self._refresh([service])
        return removed

    def tick(self) -> None:
        """Expires backends past their TTL and ends the startup grace; call
        it periodically (run_timers does)."""
        now = self._clock()
        for service in self.membership.expire(now):
            log.warning("backend expired", service=service)
            self._refresh([service])
        if self._in_grace and now >= self._grace_ends:
            self._in_grace = False
            self._reanswer_all()

    async def run_timers(self, period: float = 0.25) -> None:
        while not self.closed:
            self.tick()
            await asyncio.sleep(period)

    def _find(self, service: str, instance_id: str) -> Backend | None:
        for backend in self.membership.backends(service):
            if backend.instance_id == instance_id:
                return backend
        return None

    # --- lists ----------------------------------------------------------

    def _build_weighted_list(self, service: str, backends: list[Backend], now: float) -> ServerList:
        del service
        weights = self._weight_policy(backends, now)
        return build_server_list(backends, weights, max_length=self._max_list_length)

    def _refresh(self, services: Iterable[str]) -> None:
        now = self._clock()
        for service in services:
            backends = self.membership.backends(service)
            servers = self._list_builder(service, backends, now) if backends else ServerList(())
            if servers.entries:
                self._lists[service] = servers
            else:
                self._lists.pop(service, None)
        # Re-answering every name also covers services appearing or vanishing;
        # slots ignore answers equal to the one they hold.
        self._reanswer_all()

    def _answer(self, name: str, known: frozenset[str]) -> Answer:
        service = resolve(name, known, self.name_rules)
        servers = self._lists.get(service) if service is not None else None
        if servers is not None:
            return Answer("list", service=service, servers=servers)
        if self._in_grace or self._empty_service == "hold":
            return Answer("pending", service=service)
        return Answer("fallback", service=service)

    def _reanswer_all(self) -> None:
        known = frozenset(self.membership.services())
        for slot in self._slots.values():
            slot.publish(self._answer(slot.name, known))

    def server_list(self, service: str) -> ServerList | None:
        return self._lists.get(service)

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
        self._client_stats.setdefault(service, ClientCallStats()).add(stats)

    def clients_per_service(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for slot in self._slots.values():
            if slot.answer.service is not None:
                counts[slot.answer.service] = counts.get(slot.answer.service, 0) + slot.watchers
        return counts

    def view(self, service: str | None = None) -> list[ServiceView]:
        clients = self.clients_per_service()
        names = sorted(set(self.membership.services()) | set(self._client_stats) | set(clients))
        return [
            ServiceView(
                name=name,
                backends=tuple(self.membership.backends(name)),
                servers=self._lists.get(name, ServerList(())),
                clients=clients.get(name, 0),
                client_stats=self._client_stats.get(name, ClientCallStats()),
            )
            for name in names
            if service in (None, "", name)
        ]

    def close(self) -> None:
        """Wakes every stream so it can end (shutdown)."""
        self.closed = True
        for slot in self._slots.values():
            slot.changed.set()
