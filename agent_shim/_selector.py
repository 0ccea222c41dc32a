"""The shim's grpclb client core, shared by the Python channels and the proxy.

A Selector keeps a BalanceLoad stream to the balancer, applies every server
list it receives, reports client stats at the interval the balancer asks for,
and chooses a backend for each call (weighted round robin over the list in
order, skipping backends whose connection is failing). It falls back to the
configured fallback addresses only when it never got a list (after a timeout)
or when the balancer sends `fallback_response`.

API CONTRACT (the proxy and the channels are written against it):

    selector = Selector(balancers=["10.0.0.5:11810"], service="oap",
                        fallback=["oap:11800"], channel_factory=...)
    await selector.start()
    await selector.wait_ready(timeout=10)      # a list or fallback is in force
    choice = selector.choose(exclude=())       # raises NoBackendError / DroppedCallError
    ... make the call on choice.channel with ("lb-token", choice.token) metadata ...
    selector.finished(choice, reached_backend=True)   # for client stats
    await selector.close()

Every choose() that returns must be matched by exactly one finished(): it
feeds client stats, the failing-backend marks, and the count of calls still
running on a backend that left the list (its channel is closed when that count
reaches zero, or after `retire_grace` seconds). A retry of a call that did not
reach its backend passes the failed address in `exclude`; such a retry is
never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from agent_shim._balancer_call import BalancerConnector
from agent_shim._balancer_stream import BalancerStream
from agent_shim._errors import AlreadyStartedError, NoBackendError
from agent_shim._picker import Picker, ServerEntry, StatsDelta
from lbserver.errors import InvalidArgumentError
from lbserver.logs import get_logger

# grpc is imported where a grpc.aio channel is made or looked at, not here:
# the proxy runs the Selector without grpcio loaded at all.
if TYPE_CHECKING:
    import grpc
    import grpc.aio


log = get_logger("agent_shim.selector")

ChannelT = TypeVar("ChannelT")

LB_TOKEN_METADATA_KEY = "lb-token"

DEFAULT_RETIRE_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class Choice(Generic[ChannelT]):
    """The backend chosen for one call."""

    address: str  # "ip:port" or "[v6]:port"
    token: str  # "" in fallback mode
    channel: ChannelT  # cached per address, reused across list updates
    # False for fallback choices: gRPC reports stats only for balancer lists.
    from_balancer: bool = True

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((LB_TOKEN_METADATA_KEY, self.token),) if self.token else ()


def _is_aio_channel(channel: object) -> bool:
    grpc_aio = sys.modules.get("grpc.aio")  # no grpc loaded: not a grpc channel
    return grpc_aio is not None and isinstance(channel, grpc_aio.Channel)


def _aio_transient_failure(channel: object) -> bool:
    if not _is_aio_channel(channel):
        return False
    import grpc

    state = channel.get_state(try_to_connect=False)  # type: ignore[attr-defined]
    return state is grpc.ChannelConnectivity.TRANSIENT_FAILURE


@dataclass(slots=True)
class _Slot(Generic[ChannelT]):
    channel: ChannelT
    in_flight: int = 0
    retire_timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class Selector(Generic[ChannelT]):
    """See the module docstring. All methods are safe to call from any thread
    except start()/close(), which run on the selector's event loop."""

    def __init__(
        self,
        balancers: Sequence[str],
        service: str,
        *,
        fallback: Sequence[str] = (),
        channel_factory: Callable[[str], ChannelT],
        close_channel: Callable[[ChannelT], object] | None = None,
        fallback_timeout: float = 10.0,
        connection_failing: Callable[[ChannelT], bool] | None = None,
        balancer_channel_factory: Callable[[str], grpc.aio.Channel] | None = None,
        balancer_connector: BalancerConnector | None = None,
        retire_grace: float = DEFAULT_RETIRE_GRACE,
        rng: random.Random | None = None,
    ) -> None:
        """`close_channel` may return an awaitable; by default the channel's
        own close() is called (and awaited for grpc.aio channels).
        `connection_failing` tells whether a backend's connection is down, so
        it is skipped; by default grpc.aio channels in TRANSIENT_FAILURE are.
        `balancer_connector` opens the BalanceLoad calls (by default over
        grpc.aio channels made by `balancer_channel_factory`)."""
        balancers = (balancers,) if isinstance(balancers, str) else tuple(balancers)
        if not balancers:
            raise InvalidArgumentError("balancers", "at least one balancer address is needed")
        if not service:
            raise InvalidArgumentError("service", "the service name must not be empty")
        if fallback_timeout < 0 or retire_grace < 0:
            raise InvalidArgumentError("fallback_timeout, retire_grace", "must not be negative")
        self._service = service
        self._fallback = (fallback,) if isinstance(fallback, str) else tuple(fallback)
        self._channel_factory = channel_factory
        self._close_channel = close_channel
        self._fallback_timeout = fallback_timeout
        self._connection_failing = connection_failing
        self._default_connection_check = connection_failing is None
        self._retire_grace = retire_grace
        self._rng = rng or random.Random()
        self._clock = time.monotonic

        self._lock = threading.Lock()
        self._picker = Picker(connection_failing=self._address_failing)
        self._slots: dict[str, _Slot[ChannelT]] = {}
        self._retiring: dict[str, _Slot[ChannelT]] = {}
        self._empty_reason = "no server list from the balancer yet"
        self._server_list: tuple[ServerEntry, ...] | None = None
        self._in_fallback = False
        self._closed = False
        self._ready = threading.Event()
        self._settled = threading.Event()
        self._ready_async: asyncio.Event | None = None
        self._settled_async: asyncio.Event | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._runner: asyncio.Task[None] | None = None
        self._fallback_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[Callable[[], None]] = []
        self._log = log.bind(service=service)
        self._stream = BalancerStream(
            balancers,
            service,
            self,
            self._log,
            rng=self._rng,
            connector=balancer_connector,
            channel_factory=balancer_channel_factory,
        )

    # ---- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.start_nowait()

    def start_nowait(self) -> None:
        """start() for synchronous code running on the loop."""
        if self._loop is not None:
            raise AlreadyStartedError("the selector was already started")
        if self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._ready_async = asyncio.Event()
        self._settled_async = asyncio.Event()
        self._fallback_timer = self._loop.call_later(
            self._fallback_timeout, self._on_fallback_timeout
        )
        self._runner = self._loop.create_task(self._stream.run(), name=f"grpclb-{self._service}")

    async def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots = [*self._slots.values(), *self._retiring.values()]
            self._slots.clear()
            self._retiring.clear()
            self._picker.update((), count_stats=False)
        self._empty_reason = "the selector is closed"
        self._cancel_fallback_timer()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for slot in slots:
            if slot.retire_timer is not None:
                slot.retire_timer.cancel()
        # Pending closes of retired channels finish first; then the rest.
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stream.close()
        for slot in slots:
            await self._close_one(slot.channel)
        # Wake anyone still waiting for a list: there will be none, and
        # choose() now says the selector is closed.
        self._set_ready()

    # ---- readiness -------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._loop is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mode(self) -> str:
        """What is in force: "list" (the balancer's), "fallback" (told to, or
        no list in time) or "waiting" (nothing yet)."""
        if self._in_fallback:
            return "fallback"
        return "list" if self._server_list is not None else "waiting"

    @property
    def ready(self) -> bool:
        """A server list or fallback is in force."""
        return self._ready.is_set()

    @property
    def settled(self) -> bool:
        """Ready, or the fallback timeout passed without a list (and without
        fallback addresses): waiting longer is only for wait_for_ready calls."""
        return self._settled.is_set()

    # The contract's signature; a bool answer reads better than TimeoutError here.
    async def wait_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        return await self._wait(self._ready, self._ready_async, timeout)

    async def wait_settled(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        return await self._wait(self._settled, self._settled_async, timeout)

    async def _wait(
        self, flag: threading.Event, event: asyncio.Event | None, limit: float | None
    ) -> bool:
        if flag.is_set():
            return True
        if event is None or asyncio.get_running_loop() is not self._loop:
            return await asyncio.to_thread(flag.wait, limit)
        try:
            await asyncio.wait_for(event.wait(), limit)
        except TimeoutError:
            return flag.is_set()
        return True

    def _set_ready(self) -> None:
        self._ready.set()
        if self._ready_async is not None:
            self._ready_async.set()
        self._set_settled()

    def _set_settled(self) -> None:
        self._settled.set()
        if self._settled_async is not None:
            self._settled_async.set()
        self._notify()

    def connectivity(self) -> grpc.ChannelConnectivity:
        """A channel-like summary: READY while a list or fallback with at least
        one backend is in force (whether or not its connections are up)."""
        import grpc

        with self._lock:
            if self._closed:
                return grpc.ChannelConnectivity.SHUTDOWN
            has_backends = any(not e.drop for e in self._picker.entries)
        if not self._ready.is_set():
            return (
                grpc.ChannelConnectivity.TRANSIENT_FAILURE
                if self._settled.is_set()
                else grpc.ChannelConnectivity.CONNECTING
            )
        return (
            grpc.ChannelConnectivity.READY
            if has_backends
            else grpc.ChannelConnectivity.TRANSIENT_FAILURE
        )

    def add_listener(self, callback: Callable[[], None]) -> None:
        """`callback` runs on the selector's loop after anything that may
        change connectivity(); it must not block."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                self._log.exception("a selector listener failed")

    # ---- choosing ----------------------------------------------------------------

    def choose(self, exclude: Collection[str] = ()) -> Choice[ChannelT]:
        with self._lock:
            if self._closed:
                raise NoBackendError("the selector is closed")
            if not self._picker.entries:
                raise NoBackendError(self._empty_reason)
            entry = self._picker.pick(self._clock(), exclude)
            slot = self._slots[entry.address]
            slot.in_flight += 1
            return Choice(
                entry.address, entry.token, slot.channel, from_balancer=self._picker.counts_stats
            )

    def finished(
        self, choice: Choice[ChannelT], *, reached_backend: bool, failed: bool = False
    ) -> None:
        """Counts the call for client stats; a call that did not reach its
        backend marks that backend as failing for a while (with backoff), and
        one that reached it without failing clears the mark."""
        retired: _Slot[ChannelT] | None = None
        with self._lock:
            self._picker.finished(
                choice.address,
                self._clock(),
                counted=choice.from_balancer,
                reached_backend=reached_backend,
                failed=failed,
            )
            slot = self._slots.get(choice.address)
            if slot is not None and slot.channel is choice.channel:
                slot.in_flight = max(0, slot.in_flight - 1)
            else:
                slot = self._retiring.get(choice.address)
                if slot is not None and slot.channel is choice.channel:
                    slot.in_flight = max(0, slot.in_flight - 1)
                    if slot.in_flight == 0:
                        retired = self._retiring.pop(choice.address)
        if retired is not None:
            self._close_soon(retired)

    def failing(self) -> list[str]:
        """Backends skipped now because a call failed to reach them."""
        with self._lock:
            return self._picker.failing(self._clock())

    def _address_failing(self, address: str) -> bool:
        """Called by the picker, under the lock."""
        slot = self._slots.get(address)
        if slot is None:
            return False
        if self._default_connection_check:
            # grpc.aio channels belong to the loop's thread.
            return threading.get_ident() == self._loop_thread and _aio_transient_failure(
                slot.channel
            )
        assert self._connection_failing is not None
        return self._connection_failing(slot.channel)

    # ---- applying lists ------------------------------------------------------------

    def _reconfigure(self) -> None:
        """Installs what is in force now: the fallback addresses in fallback
        mode (if any), else the balancer's last list. Runs on the loop."""
        count_stats = False
        if self._in_fallback and self._fallback:
            entries: tuple[ServerEntry, ...] = tuple(ServerEntry(a, "") for a in self._fallback)
        elif self._server_list is not None:
            entries, count_stats = self._server_list, True
            self._empty_reason = "the balancer's server list is empty"
        else:
            entries = ()
            self._empty_reason = (
                "the balancer asked for fallback and there are no fallback addresses"
                if self._in_fallback
                else "no server list from the balancer yet"
            )
        created: list[ChannelT] = []
        to_close: list[_Slot[ChannelT]] = []
        with self._lock:
            if self._closed:
                return
            wanted = {e.address for e in entries if not e.drop}
            broken: set[str] = set()
            for address in wanted:
                if address in self._slots:
                    continue
                slot = self._retiring.pop(address, None)
                if slot is not None:
                    if slot.retire_timer is not None:
                        slot.retire_timer.cancel()
                        slot.retire_timer = None
                else:
                    try:
                        slot = _Slot(self._channel_factory(address))
                    except Exception:
                        self._log.exception("cannot create a channel", address=address)
                        broken.add(address)
                        continue
                    created.append(slot.channel)
                self._slots[address] = slot
            for address in [a for a in self._slots if a not in wanted]:
                slot = self._slots.pop(address)
                if slot.in_flight:
                    self._retiring[address] = slot
                    assert self._loop is not None
                    slot.retire_timer = self._loop.call_later(
                        self._retire_grace, self._retire_expired, address, slot
                    )
                else:
                    to_close.append(slot)
            if broken:
                entries = tuple(e for e in entries if e.address not in broken)
            self._picker.update(
                entries, count_stats=count_stats, start=self._rng.randrange(max(1, len(entries)))
            )
        for slot in to_close:
            self._close_soon(slot)
        for channel in created:
            # Connect ahead of the first call.
            if _is_aio_channel(channel):
                channel.get_state(try_to_connect=True)  # type: ignore[attr-defined]
        self._notify()

    def _retire_expired(self, address: str, slot: _Slot[ChannelT]) -> None:
        with self._lock:
            if self._retiring.get(address) is not slot:
                return
            del self._retiring[address]
        self._log.info(
            "closing a removed backend's channel with calls still running",
            address=address,
            calls=slot.in_flight,
        )
        self._close_soon(slot)

    def _close_soon(self, slot: _Slot[ChannelT]) -> None:
        """Closes a channel on the loop; callable from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            result = self._close_fn(slot.channel)
            if inspect.iscoroutine(result):
                result.close()
            return
        if threading.get_ident() == self._loop_thread:
            self._spawn(self._close_one(slot.channel))
        else:
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                loop.call_soon_threadsafe(self._spawn, self._close_one(slot.channel))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close_fn(self, channel: ChannelT) -> object:
        if self._close_channel is not None:
            return self._close_channel(channel)
        if _is_aio_channel(channel):
            return channel.close(None)  # type: ignore[attr-defined]
        close = getattr(channel, "close", None)
        return close() if callable(close) else None

    async def _close_one(self, channel: ChannelT) -> None:
        try:
            result = self._close_fn(channel)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._log.exception("closing a backend channel failed")

    # ---- what the balancer stream tells (its ListSink) ----------------------------

    def on_server_list(self, new: tuple[ServerEntry, ...]) -> None:
        # gRPC ignores a list identical to the last one (keeping its position).
        if new == self._server_list and not self._in_fallback:
            return
        left_fallback = self._in_fallback
        self._server_list = new
        self._in_fallback = False
        self._cancel_fallback_timer()
        self._reconfigure()
        self._set_ready()
        self._log.info(
            "server list received",
            entries=len(new),
            backends=len({e.address for e in new if not e.drop}),
            drops=sum(e.drop for e in new),
            left_fallback=left_fallback,
        )

    def on_fallback_response(self) -> None:
        self._cancel_fallback_timer()
        if self._in_fallback:
            return
        self._in_fallback = True
        self._reconfigure()
        self._set_ready()
        if self._fallback:
            self._log.info("the balancer asked for fallback", fallback=list(self._fallback))
        elif self._server_list is not None:
            self._log.warning(
                "the balancer asked for fallback but there are no fallback addresses;"
                " keeping the last server list"
            )
        else:
            self._log.warning("the balancer asked for fallback but there are no fallback addresses")

    def _on_fallback_timeout(self) -> None:
        self._fallback_timer = None
        if self._server_list is not None or self._in_fallback or self._closed:
            return
        if self._fallback:
            self._log.warning(
                "no server list from the balancer in time; using the fallback addresses",
                timeout=self._fallback_timeout,
                fallback=list(self._fallback),
            )
            self._in_fallback = True
            self._reconfigure()
            self._set_ready()
        else:
            self._log.warning(
                "no server list from the balancer in time and no fallback addresses;"
                " calls fail until a list arrives",
                timeout=self._fallback_timeout,
            )
            self._set_settled()

    def _cancel_fallback_timer(self) -> None:
        if self._fallback_timer is not None:
            self._fallback_timer.cancel()
            self._fallback_timer = None

    def take_stats(self) -> StatsDelta:
        with self._lock:
            return self._picker.take_stats()

    def reset_stats(self) -> None:
        with self._lock:
            self._picker.reset_stats()
