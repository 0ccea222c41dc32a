"""Watch and fan-out: the answers streams watch, one slot per name asked for.

Like go-control-plane's cache and server, the balancer owns every list and a
stream merely watches the answer for its name: `Watches.publish` replaces a
name's answer and wakes the streams watching it; a woken stream reads the
newest answer, so a burst of changes reaches each client as one push. The
services depend on `Watch` alone; where lists come from is the `ListSource`
the Balancer implements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from lbserver.domain.serverlist import ServerList
from lbserver.domain.subsetting import IndexPool

AnswerKind = Literal["list", "fallback", "pending"]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a client of one name should be told now. `pending` means say
    nothing: the client keeps whatever list it has."""

    kind: AnswerKind
    service: str | None = None
    servers: ServerList | None = None


PENDING = Answer("pending")


class ListSource(Protocol):
    def servers_for(self, service: str, client_index: Callable[[], int]) -> ServerList | None:
        """The list a client of `service` gets: the service's list, or, when
        the service is subsetted, the subset for the client whose index
        among the service's clients `client_index()` returns."""


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

    def __init__(self, watches: Watches, slot: _NameSlot) -> None:
        self._watches = watches
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

    def changed(self, seen_version: int) -> asyncio.Future[None] | None:
        """A future that completes when the answer next changes (or the
        balancer closes, or interrupt() is called); None when the answer's
        version already differs from `seen_version` or the balancer is closed.
        A stream awaits it beside its other inputs (client stats, the end of
        the call)."""
        if self._slot.version != seen_version or self._watches.closed:
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
        service = answer.service
        return self._watches.lists.servers_for(service, lambda: self._client_index(service))

    def _client_index(self, service: str) -> int:
        if self._index_service != service:
            self._release_index()
            self._index = self._watches.index_pool(service).acquire()
            self._index_service = service
        return self._index

    def _release_index(self) -> None:
        if self._index_service is not None:
            self._watches.index_pool(self._index_service).release(self._index)
            self._index_service = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            waiter, self._waiter = self._waiter, None
            if waiter is not None:
                self._slot.waiters.pop(waiter, None)
                waiter.cancel()
            self._release_index()
            self._watches.release(self._slot)


class Watches:
    """The slots of the names streams watch, and the subsetting indices of
    their clients. Answers come from the owner; lists from its ListSource."""

    def __init__(self, lists: ListSource) -> None:
        self.lists = lists
        self._slots: dict[str, _NameSlot] = {}
        self._index_pools: dict[str, IndexPool] = {}
        self.closed = False

    def watch(self, name: str, answer_for: Callable[[str], Answer]) -> Watch:
        """A new stream's watch of `name` (answered with `answer_for(name)`
        when nobody watches it yet)."""
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = _NameSlot(name, answer_for(name))
        slot.watchers += 1
        return Watch(self, slot)

    def release(self, slot: _NameSlot) -> None:
        slot.watchers -= 1
        if slot.watchers <= 0:
            self._slots.pop(slot.name, None)

    def index_pool(self, service: str) -> IndexPool:
        pool = self._index_pools.get(service)
        if pool is None:
            pool = self._index_pools[service] = IndexPool()
        return pool

    def names(self, services: Iterable[str] | None = None) -> Iterator[str]:
        """The watched names (only those now answered with one of `services`)."""
        wanted = None if services is None else set(services)
        for slot in self._slots.values():
            if wanted is None or slot.answer.service in wanted:
                yield slot.name

    def publish(self, answer_for: Callable[[str], Answer], names: Iterable[str]) -> None:
        """Re-answers `names` (`answer_for` is built once per change: it may
        hold what every name is resolved against); a slot whose answer is
        equal wakes nobody."""
        for name in list(names):
            slot = self._slots.get(name)
            if slot is not None:
                slot.publish(answer_for(name))

    def clients_per_service(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for slot in self._slots.values():
            if slot.answer.service is not None:
                counts[slot.answer.service] = counts.get(slot.answer.service, 0) + slot.watchers
        return counts

    def close(self) -> None:
        """Wakes every stream so it can end (shutdown)."""
        self.closed = True
        for slot in self._slots.values():
            slot.changed.set()
            slot.wake_waiters()
