"""`balanced_channel`: a `grpc.Channel` that balances every call over the
backends a grpclb balancer lists.

It is `aio_balanced_channel` run on an event-loop thread of its own: every
sync call becomes a call of the asyncio channel there, which picks the
backend, retries on another one a call that could not reach its own, and
replays request streams (up to a bound); the caller's thread waits for it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, Unpack

import grpc

from agent_shim._aio_channel import AioBalancedChannel
from agent_shim._common import (
    ChannelArguments,
    ChannelFactories,
    Deserializer,
    Serializer,
    deadline_after,
    remaining,
)
from agent_shim._selector import Selector
from agent_shim._sync_call import (
    CLOSED,
    ChannelClosedError,
    EndedCall,
    LoopThread,
    SyncCall,
    pulled,
)
from lbserver.logs import get_logger

log = get_logger("agent_shim.channel")

T = TypeVar("T")
ConnectivityCallback = Callable[[grpc.ChannelConnectivity], None]

# grpcio's classes are generic only in their type stubs.
if TYPE_CHECKING:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.StreamStreamMultiCallable[Any, Any]
else:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.StreamStreamMultiCallable


class _MultiCallable:
    """The asyncio channel's multicallable of the same method, called on the
    loop thread."""

    request_stream: ClassVar[bool] = False

    def __init__(
        self,
        owner: BalancedChannel,
        kind: str,
        method: str,
        request_serializer: Serializer,
        response_deserializer: Deserializer,
        registered: bool | None,
    ) -> None:
        self._owner = owner
        self._aio = getattr(owner.aio, kind)(
            method, request_serializer, response_deserializer, registered
        )

    def _start(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        *,
        unary_response: bool,
    ) -> SyncCall | EndedCall:
        deadline = deadline_after(timeout)
        make = self._maker(request, deadline, metadata, credentials, wait_for_ready, compression)
        return self._owner.start(make, deadline, unary_response=unary_response)

    def _maker(
        self,
        request: Any,
        deadline: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Callable[[], Any]:
        """What starts the asyncio call on the loop thread."""
        requests = pulled(request) if self.request_stream else request

        def make() -> Any:
            return self._aio(
                requests,
                timeout=remaining(deadline),
                metadata=metadata,
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )

        return make


class _UnaryResponse(_MultiCallable):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        args = (request, timeout, metadata, credentials, wait_for_ready, compression)
        return self.with_call(*args)[0]

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        ended = self._owner.blocking(
            self._maker(
                request, deadline_after(timeout), metadata, credentials, wait_for_ready, compression
            )
        )
        return ended.result(), ended

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        args = (request, timeout, metadata, credentials, wait_for_ready, compression)
        return self._start(*args, unary_response=True)


class _StreamResponse(_MultiCallable):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        args = (request, timeout, metadata, credentials, wait_for_ready, compression)
        return self._start(*args, unary_response=False)


class _UnaryUnary(_UnaryResponse, _UnaryUnaryBase):
    pass


class _UnaryStream(_StreamResponse, _UnaryStreamBase):
    pass


class _StreamUnary(_UnaryResponse, _StreamUnaryBase):
    request_stream = True


class _StreamStream(_StreamResponse, _StreamStreamBase):
    request_stream = True


def _shutdown(loop: LoopThread, channel: AioBalancedChannel) -> None:
    loop.shutdown(channel.close(None))


def _never(channel: object) -> bool:
    return False


def _safely(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:
        log.exception("a callback failed")


class BalancedChannel(ChannelFactories, grpc.Channel):
    """See `balanced_channel`."""

    multicallables = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)

    def __init__(
        self, balancer: str | Sequence[str], service: str, **arguments: Unpack[ChannelArguments]
    ) -> None:
        # Backends are skipped only for calls that failed to reach them, not
        # for connection attempts made ahead of any call, as always with the
        # sync channel (whose backend channels were grpc's sync ones).
        arguments["selector_options"] = {
            "connection_failing": _never,
            **(arguments.get("selector_options") or {}),
        }
        self._loop = LoopThread(f"agent-shim-{service}")
        try:
            # Made on its loop, where it starts at once.
            self.aio = self._loop.call(lambda: AioBalancedChannel(balancer, service, **arguments))
        except BaseException:
            self._loop.shutdown()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self.aio)
        # One lock orders connectivity deliveries and guards the executor.
        self._lock = threading.RLock()
        self._closed = False
        self._subscribers: dict[ConnectivityCallback, grpc.ChannelConnectivity | None] = {}
        # The users' callbacks run here, in order, never on the loop thread.
        self._callbacks: concurrent.futures.ThreadPoolExecutor | None = None
        me = weakref.ref(self)

        def on_change() -> None:
            channel = me()
            if channel is not None:
                channel._deliver_connectivity()

        self.aio.selector.add_listener(on_change)

    @property
    def selector(self) -> Selector[grpc.aio.Channel]:
        return self.aio.selector

    def start(
        self, make: Callable[[], Any], deadline: float | None, *, unary_response: bool
    ) -> SyncCall | EndedCall:
        """A call of the asyncio channel, made by `make` on the loop thread."""
        try:
            return SyncCall(
                self._loop, make, deadline, unary_response=unary_response, dispatch=self.dispatch
            )
        except ChannelClosedError:
            return EndedCall(grpc.StatusCode.UNAVAILABLE, CLOSED)

    def blocking(self, make: Callable[[], Any]) -> EndedCall:
        """A unary-response call of the asyncio channel, waited for."""
        return SyncCall.blocking(self._loop, make)

    def dispatch(self, callback: Callable[[], object]) -> None:
        """Runs a user's callback on the callback thread."""
        with self._lock:
            if self._callbacks is None and not self._closed:
                self._callbacks = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="agent-shim-callbacks"
                )
            if self._callbacks is not None:
                self._callbacks.submit(_safely, callback)
                return
        # Closed: calls still ending get a thread each.
        threading.Thread(target=_safely, args=(callback,), daemon=True).start()

    # ---- grpc.Channel ---------------------------------------------------------------

    def subscribe(self, callback: ConnectivityCallback, try_to_connect: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._subscribers[callback] = None
        self._deliver_connectivity()

    def unsubscribe(self, callback: ConnectivityCallback) -> None:
        with self._lock:
            self._subscribers.pop(callback, None)

    def _deliver_connectivity(self) -> None:
        state = self.selector.connectivity()
        with self._lock:
            for callback, seen in list(self._subscribers.items()):
                if seen is not state:
                    self._subscribers[callback] = state
                    self.dispatch(functools.partial(callback, state))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            callbacks, self._callbacks = self._callbacks, None
            self._subscribers.clear()
        self._finalizer()
        if callbacks is not None:
            callbacks.shutdown(wait=False)

    def __enter__(self) -> BalancedChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def balanced_channel(
    balancer: str | Sequence[str], service: str, **arguments: Unpack[ChannelArguments]
) -> grpc.Channel:
    """A `grpc.Channel` that asks the grpclb balancer(s) at `balancer`
    ("host:port", comma separated or a sequence) for `service`'s server list
    and sends each call to the next backend of that list.

    `fallback` addresses (default none) are used only when no list arrived
    within `fallback_timeout` seconds (default 10) of creation, or when the
    balancer says so. `options` and `credentials` apply to the channels to the
    backends. Calls made before the first list wait for it (until their
    deadline; without `wait_for_ready`, at most until the fallback timeout). A
    call that fails before reaching its backend is retried once on another one
    (request streams only while no more than `retry_buffer_messages`, default
    1000, were sent). `selector_options` go to the Selector (e.g. retire_grace,
    rng). Close it (or use it as a context manager) to stop its background
    thread.
    """
    channel: grpc.Channel = BalancedChannel(balancer, service, **arguments)
    return channel
