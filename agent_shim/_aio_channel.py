"""`aio_balanced_channel`: a `grpc.aio.Channel` whose every call goes to the
next backend of a grpclb balancer's list.

The Selector runs on the loop the channel is first used on, with `grpc.aio`
channels to the backends; each call is a `BalancedCall` (agent_shim._aio_call)
that retries once on another backend a call that could not reach its own.
`balanced_channel`, the sync variant, runs one of these on a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, Unpack

import grpc

from agent_shim._aio_call import (
    BalancedCall,
    StreamStreamCall,
    StreamUnaryCall,
    UnaryStreamCall,
    UnaryUnaryCall,
    local_error,
)
from agent_shim._common import (
    DEFAULT_RETRY_BUFFER_MESSAGES,
    NO_LIST_BEFORE_DEADLINE,
    ChannelArguments,
    ChannelFactories,
    ChannelOptions,
    Deserializer,
    Serializer,
    StartCall,
    balancer_addresses,
    check_retry_buffer,
    remaining,
    with_token,
)
from agent_shim._errors import ShimError
from agent_shim._selector import Choice, Selector


class _MultiCallable:
    """grpcio's multicallable of the same method on each backend channel, and
    starting an attempt there."""

    call_class: ClassVar[type[BalancedCall]]
    request_stream: ClassVar[bool] = False

    def __init__(
        self,
        owner: AioBalancedChannel,
        kind: str,
        method: str,
        request_serializer: Serializer,
        response_deserializer: Deserializer,
        registered: bool | None,
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._serializer = request_serializer
        self._deserializer = response_deserializer
        self._registered = registered
        # One multicallable per backend channel, made on first use: creating
        # one costs about as much as a small call.
        self._per_channel: weakref.WeakKeyDictionary[grpc.aio.Channel, Any] = (
            weakref.WeakKeyDictionary()
        )

    def _on(self, channel: grpc.aio.Channel) -> Any:
        multicallable = self._per_channel.get(channel)
        if multicallable is None:
            multicallable = getattr(channel, self._kind)(
                self._method,
                request_serializer=self._serializer,
                response_deserializer=self._deserializer,
                _registered_method=self._registered,
            )
            self._per_channel[channel] = multicallable
        return multicallable

    def _call(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        request_stream = self.request_stream
        self._owner.ensure_started()

        def start(choice: Choice[grpc.aio.Channel], left: float | None) -> Any:
            # Request-stream attempts always use the write() API; a given
            # iterator is fed in by the balanced call.
            return self._on(choice.channel)(
                None if request_stream else request,
                timeout=left,
                metadata=with_token(metadata, choice),
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )

        starter: StartCall[grpc.aio.Channel] = start
        if not request_stream:
            return self.call_class(self._owner, starter, timeout, wait_for_ready)
        return self.call_class(
            self._owner,
            starter,
            timeout,
            wait_for_ready,
            request_stream=True,
            request_iterator=request,
        )


class _UnaryRequest(_MultiCallable):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._call(request, timeout, metadata, credentials, wait_for_ready, compression)


class _RequestStream(_MultiCallable):
    request_stream = True

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        # grpc.aio's signature: the requests may also come through write().
        stream = request_iterator
        return self._call(stream, timeout, metadata, credentials, wait_for_ready, compression)


class _UnaryUnary(_UnaryRequest, grpc.aio.UnaryUnaryMultiCallable[Any, Any]):
    call_class = UnaryUnaryCall


class _UnaryStream(_UnaryRequest, grpc.aio.UnaryStreamMultiCallable[Any, Any]):
    call_class = UnaryStreamCall


class _StreamUnary(_RequestStream, grpc.aio.StreamUnaryMultiCallable[Any, Any]):
    call_class = StreamUnaryCall


class _StreamStream(_RequestStream, grpc.aio.StreamStreamMultiCallable[Any, Any]):
    call_class = StreamStreamCall


def _backend_channel_factory(
    credentials: grpc.ChannelCredentials | None, options: ChannelOptions
) -> Callable[[str], grpc.aio.Channel]:
    """How the Selector opens a channel to a backend address."""
    backend_options = tuple(options)

    # A plain closure, not a bound method: the Selector must not keep the
    # balanced channel alive, so that an unclosed channel can be collected.
    def backend_channel(address: str) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=backend_options)
        return grpc.aio.secure_channel(address, credentials, options=backend_options)

    return backend_channel


class AioBalancedChannel(ChannelFactories, grpc.aio.Channel):
    """See `aio_balanced_channel`."""

    multicallables = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)

    def __init__(
        self,
        balancer: str | Sequence[str],
        service: str,
        *,
        fallback: Sequence[str] = (),
        fallback_timeout: float = 10.0,
        options: ChannelOptions = (),
        credentials: grpc.ChannelCredentials | None = None,
        retry_buffer_messages: int = DEFAULT_RETRY_BUFFER_MESSAGES,
        selector_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`selector_options` go to the Selector (e.g. retire_grace, rng)."""
        self.retry_buffer_messages = check_retry_buffer(retry_buffer_messages)
        self.selector: Selector[grpc.aio.Channel] = Selector(
            balancer_addresses(balancer),
            service,
            fallback=fallback,
            channel_factory=_backend_channel_factory(credentials, options),
            fallback_timeout=fallback_timeout,
            **(selector_options or {}),
        )
        self.selector.add_listener(self._state_changed)
        self.calls: set[BalancedCall] = set()
        self._state_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        with contextlib.suppress(RuntimeError):  # no running loop: start on first use
            asyncio.get_running_loop()
            self.ensure_started()

    def ensure_started(self) -> None:
        if self._closed:
            raise grpc.aio.UsageError("Cannot invoke RPC: Channel closed!")
        if not self.selector.started:
            self.selector.start_nowait()

    async def choose(
        self,
        deadline: float | None,
        wait_for_ready: bool | None,
        exclude: Collection[str] = (),
    ) -> Choice[grpc.aio.Channel]:
        """A backend for one attempt; raises AioRpcError."""
        selector = self.selector
        if not selector.ready:
            left = remaining(deadline)
            waited = await (
                selector.wait_ready(left) if wait_for_ready else selector.wait_settled(left)
            )
            if not waited:
                raise local_error(grpc.StatusCode.DEADLINE_EXCEEDED, NO_LIST_BEFORE_DEADLINE)
        try:
            return selector.choose(exclude)
        except ShimError as error:
            raise local_error(grpc.StatusCode.UNAVAILABLE, str(error)) from None

    # ---- grpc.aio.Channel ------------------------------------------------------------------

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        if not self.selector.started:
            if not (try_to_connect and not self._closed):
                return (
                    grpc.ChannelConnectivity.SHUTDOWN
                    if self._closed
                    else grpc.ChannelConnectivity.IDLE
                )
            self.ensure_started()
        return self.selector.connectivity()

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while self.get_state() is last_observed_state:
            waiter = asyncio.get_running_loop().create_future()
            self._state_waiters.append(waiter)
            await waiter

    def _state_changed(self) -> None:
        waiters, self._state_waiters = self._state_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def channel_ready(self) -> None:
        state = self.get_state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.SHUTDOWN:
                raise grpc.aio.UsageError("the channel is closed")
            await self.wait_for_state_change(state)
            state = self.get_state()

    async def close(self, grace: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if grace and self.calls:
            await asyncio.wait({call.supervisor for call in self.calls}, timeout=grace)
        for call in list(self.calls):
            call.cancel()
        await self.selector.close()
        self._state_changed()

    async def __aenter__(self) -> AioBalancedChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(None)


def aio_balanced_channel(
    balancer: str | Sequence[str], service: str, **arguments: Unpack[ChannelArguments]
) -> grpc.aio.Channel:
    """The asyncio variant of `balanced_channel` (same arguments and
    behaviour), a `grpc.aio.Channel`. It belongs to the event loop it is first
    used on; `await channel.close()` stops its balancer stream."""
    channel: grpc.aio.Channel = AioBalancedChannel(balancer, service, **arguments)
    return channel
