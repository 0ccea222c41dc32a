"""`aio_balanced_channel`: the asyncio variant of `balanced_channel`, a
`grpc.aio.Channel` whose every call goes to the next backend of a grpclb
balancer's list.

The Selector runs on the loop the channel is first used on, with `grpc.aio`
channels to the backends. Each call object runs a small supervisor task: it
picks a backend, starts grpcio's call there and, if that call fails before
reaching the backend, starts it once more on another backend, replaying the
requests written so far (kept up to a bound). The call object the user holds
delegates to whichever attempt is current, so a retry is invisible to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import grpc

from agent_shim._common import (
    DEFAULT_RETRY_BUFFER_MESSAGES,
    NO_LIST_BEFORE_DEADLINE,
    ChannelFactories,
    ChannelOptions,
    MultiCallableBase,
    StartCall,
    attempt_ended,
    backend_channel_factory,
    balancer_addresses,
    check_retry_buffer,
    deadline_after,
    expired,
    remaining,
    start_attempt,
)
from agent_shim._selector import Choice, Selector, ShimError
from lbserver.logs import get_logger

log = get_logger("agent_shim.aio_channel")


_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
_WRITE_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError)

# grpcio's classes are generic only in their type stubs.
if TYPE_CHECKING:
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall[Any, Any]
    _UnaryStreamCallBase = grpc.aio.UnaryStreamCall[Any, Any]
    _StreamUnaryCallBase = grpc.aio.StreamUnaryCall[Any, Any]
    _StreamStreamCallBase = grpc.aio.StreamStreamCall[Any, Any]
    _UnaryUnaryBase = grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.aio.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.aio.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.aio.StreamStreamMultiCallable[Any, Any]
else:
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall
    _UnaryStreamCallBase = grpc.aio.UnaryStreamCall
    _StreamUnaryCallBase = grpc.aio.StreamUnaryCall
    _StreamStreamCallBase = grpc.aio.StreamStreamCall
    _UnaryUnaryBase = grpc.aio.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.aio.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.aio.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.aio.StreamStreamMultiCallable


def local_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error of a call that ended before any backend was tried."""
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, f"{code.name}: {details}"
    )


class _Tape:
    """The requests written to a call, kept so that a retry can replay them.
    Item i is `items[i]` while the tape is replayable; past `limit` items it
    stops keeping them (and the call is no longer retried)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[Any] = []
        self.count = 0
        self.closed = False
        self.overflowed = False

    def append(self, item: Any, *, keep: bool) -> int:
        """`keep`: the first attempt has not started yet and must get it."""
        index = self.count
        self.count += 1
        if not self.overflowed:
            self.items.append(item)
            if not keep:
                self.trim()
        return index

    def trim(self) -> None:
        if len(self.items) > self.limit:
            self.overflowed = True
            self.items.clear()


class _Attempt:
    __slots__ = ("call", "choice", "delivered", "half_closed", "next")

    def __init__(self, choice: Choice[grpc.aio.Channel], call: Any) -> None:
        self.choice = choice
        self.call = call
        self.delivered = 0  # tape items written to this attempt
        self.half_closed = False
        # The attempt that replaced this one, or None when this one is final.
        self.next: asyncio.Future[_Attempt | None] = asyncio.get_running_loop().create_future()


class _BalancedCall:
    """The part of a balanced call shared by the four call types."""

    def __init__(
        self,
        owner: AioBalancedChannel,
        start: StartCall[grpc.aio.Channel],
        timeout: float | None,
        wait_for_ready: bool | None,
        *,
        request_stream: bool = False,
        request_iterator: Any = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._owner = owner
        self._start = start
        self._deadline = deadline_after(timeout)
        self._wait_for_ready = wait_for_ready
        self._tape = _Tape(owner.retry_buffer_messages) if request_stream else None
        self._iterator_given = request_iterator is not None
        self._first: asyncio.Future[_Attempt | None] = loop.create_future()
        self._attempt: _Attempt | None = None
        self._error: grpc.aio.AioRpcError | None = None
        self._cancel_requested = False
        self._done = False
        self._done_callbacks: list[Callable[[Any], None]] = []
        owner.calls.add(self)
        self.supervisor = loop.create_task(self._supervise())
        self._feeder = (
            loop.create_task(self._feed(request_iterator)) if self._iterator_given else None
        )

    # ---- the attempts ------------------------------------------------------------------

    async def _supervise(self) -> None:
        previous: _Attempt | None = None
        exclude: Collection[str] = ()
        try:
            while True:
                try:
                    choice = await self._owner.choose(self._deadline, self._wait_for_ready, exclude)
                except grpc.aio.AioRpcError as error:
                    self._end(previous, error)
                    return
                attempt = await self._launch(choice, first=previous is None)
                if previous is None:
                    self._first.set_result(attempt)
                else:
                    previous.next.set_result(attempt)
                code = await attempt.call.code()
                metadata = await attempt.call.initial_metadata()
                early = attempt_ended(self._owner.selector, choice, code, metadata)
                if not early or not self._may_retry(previous):
                    attempt.next.set_result(None)
                    return
                previous, exclude = attempt, {choice.address}
        except asyncio.CancelledError:
            # Only cancel() before any attempt started, or the loop's end.
            self._end(previous, local_error(grpc.StatusCode.CANCELLED, "Locally cancelled"))
            raise
        except Exception:
            log.exception("a balanced call failed")
            self._end(previous, local_error(grpc.StatusCode.INTERNAL, "agent_shim call failed"))
        finally:
            self._done = True
            self._owner.calls.discard(self)
            if self._feeder is not None and not self._feeder.done():
                self._feeder.cancel()
            callbacks, self._done_callbacks = self._done_callbacks, []
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:
                    log.exception("a done callback failed")

    def _may_retry(self, previous: _Attempt | None) -> bool:
        return (
            previous is None
            and not self._cancel_requested
            and not expired(self._deadline)
            and (self._tape is None or not self._tape.overflowed)
        )

    def _end(self, last: _Attempt | None, error: grpc.aio.AioRpcError) -> None:
        """No (further) attempt: the call's outcome is `last`'s, else `error`."""
        if last is None:
            self._error = error
            if not self._first.done():
                self._first.set_result(None)
        elif not last.next.done():
            last.next.set_result(None)

    async def _launch(self, choice: Choice[grpc.aio.Channel], *, first: bool) -> _Attempt:
        call = start_attempt(self._owner.selector, self._start, choice, self._deadline)
        attempt = _Attempt(choice, call)
        tape = self._tape
        if tape is not None:
            # No await between the last check of the tape and publishing the
            # attempt, so every request reaches it exactly once: from here,
            # or from write() once it is published.
            try:
                while attempt.delivered < tape.count:
                    await call.write(tape.items[attempt.delivered])
                    attempt.delivered += 1
                if tape.closed:
                    await call.done_writing()
                    attempt.half_closed = True
            except _WRITE_ERRORS:
                pass  # the attempt failed; its status says how
            except asyncio.CancelledError:
                # cancel() before the attempt was published.
                call.cancel()
                self._owner.selector.finished(choice, reached_backend=True, failed=True)
                raise
            if first:
                tape.trim()
        self._attempt = attempt
        return attempt

    async def _first_attempt(self) -> _Attempt:
        attempt = await asyncio.shield(self._first)
        if attempt is None:
            assert self._error is not None
            if self._error.code() is grpc.StatusCode.CANCELLED:
                raise asyncio.CancelledError()
            raise self._error
        return attempt

    async def _after(self, attempt: _Attempt) -> _Attempt | None:
        """Once `attempt` ended: the attempt that replaced it, if any."""
        return await asyncio.shield(attempt.next)

    async def _final_attempt(self) -> _Attempt | None:
        attempt = await asyncio.shield(self._first)
        while attempt is not None:
            successor = await self._after(attempt)
            if successor is None:
                return attempt
            attempt = successor
        return None

    # ---- grpc.aio.Call ------------------------------------------------------------------

    async def initial_metadata(self) -> grpc.aio.Metadata:
        attempt = await asyncio.shield(self._first)
        if attempt is None:
            return grpc.aio.Metadata()
        while True:
            metadata: grpc.aio.Metadata = await attempt.call.initial_metadata()
            if metadata or not attempt.call.done():
                return metadata
            successor = await self._after(attempt)
            if successor is None:
                return metadata
            attempt = successor

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        final = await self._final_attempt()
        if final is None:
            assert self._error is not None
            trailing: grpc.aio.Metadata = self._error.trailing_metadata()  # type: ignore[assignment]
            return trailing
        metadata: grpc.aio.Metadata = await final.call.trailing_metadata()
        return metadata

    async def code(self) -> grpc.StatusCode:
        final = await self._final_attempt()
        if final is None:
            assert self._error is not None
            return self._error.code()
        code: grpc.StatusCode = await final.call.code()
        return code

    async def details(self) -> str:
        final = await self._final_attempt()
        if final is None:
            assert self._error is not None
            return self._error.details() or ""
        details: str = await final.call.details()
        return details

    async def wait_for_connection(self) -> None:
        await self._on_current(lambda call: call.wait_for_connection())

    def cancelled(self) -> bool:
        if self._attempt is not None:
            cancelled: bool = self._attempt.call.cancelled()
            return cancelled
        return self._done and self._cancel_requested

    def done(self) -> bool:
        return self._done

    def time_remaining(self) -> float | None:
        return remaining(self._deadline)

    def cancel(self) -> bool:
        if self._done:
            return False
        self._cancel_requested = True
        if self._feeder is not None:
            self._feeder.cancel()
        if self._attempt is not None:
            cancelled: bool = self._attempt.call.cancel()
            return cancelled
        return self.supervisor.cancel()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._done:
            callback(self)
        else:
            self._done_callbacks.append(callback)

    # ---- responses ----------------------------------------------------------------------

    async def _on_current(self, operation: Callable[[Any], Awaitable[Any]]) -> Any:
        """`operation` on the current attempt's call; when that attempt fails
        and a retry replaced it, on the retry's call instead."""
        attempt = await self._first_attempt()
        while True:
            try:
                return await operation(attempt.call)
            except grpc.aio.AioRpcError:
                successor = await self._after(attempt)
                if successor is None:
                    raise
                attempt = successor

    async def _response(self) -> Any:
        return await self._on_current(lambda call: call)

    async def read(self) -> Any:
        return await self._on_current(lambda call: call.read())

    async def _responses(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is _EOF:
                return
            yield message

    # ---- requests -------------------------------------------------------------------------

    async def write(self, request: Any) -> None:
        if self._iterator_given:
            raise grpc.aio.UsageError("write() cannot be mixed with a request iterator")
        await self._write(request)

    async def done_writing(self) -> None:
        if self._iterator_given:
            raise grpc.aio.UsageError("done_writing() cannot be mixed with a request iterator")
        await self._done_writing()

    async def _write(self, request: Any) -> None:
        tape = self._tape
        assert tape is not None
        if tape.closed:
            raise asyncio.InvalidStateError("RPC is half closed after calling done_writing.")
        index = tape.append(request, keep=self._attempt is None)
        attempt = self._attempt or await self._first_attempt()
        while attempt.delivered <= index:
            try:
                await attempt.call.write(request)
            except _WRITE_ERRORS:
                successor = await self._after(attempt)
                if successor is None:
                    raise
                attempt = successor  # which got the request in its replay
            else:
                attempt.delivered += 1

    async def _done_writing(self) -> None:
        tape = self._tape
        assert tape is not None
        tape.closed = True
        attempt: _Attempt | None = self._attempt or await self._first_attempt()
        while attempt is not None and not attempt.half_closed:
            try:
                await attempt.call.done_writing()
            except _WRITE_ERRORS:
                attempt = await self._after(attempt)
            else:
                attempt.half_closed = True

    async def _feed(self, requests: AsyncIterable[Any] | Iterable[Any]) -> None:
        try:
            if isinstance(requests, AsyncIterable):
                async for request in requests:
                    await self._write(request)
            else:
                for request in requests:
                    await self._write(request)
            await self._done_writing()
        except (*_WRITE_ERRORS, asyncio.CancelledError):
            return  # the call ended; its status tells why
        except Exception:
            log.exception("the request iterator failed; cancelling the call")
            self.cancel()


class _UnaryUnaryCall(_BalancedCall, _UnaryUnaryCallBase):
    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()


class _UnaryStreamCall(_BalancedCall, _UnaryStreamCallBase):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()


class _StreamUnaryCall(_BalancedCall, _StreamUnaryCallBase):
    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()


class _StreamStreamCall(_BalancedCall, _StreamStreamCallBase):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()


class _MultiCallable(MultiCallableBase["AioBalancedChannel", grpc.aio.Channel]):
    call_class: ClassVar[type[_BalancedCall]]


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
        self._owner.ensure_started()
        start = self._starter(lambda: request, metadata, credentials, wait_for_ready, compression)
        return self.call_class(self._owner, start, timeout, wait_for_ready)


class _RequestStream(_MultiCallable):
    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        self._owner.ensure_started()
        # Attempts always use the write() API; a given iterator is fed in.
        start = self._starter(lambda: None, metadata, credentials, wait_for_ready, compression)
        return self.call_class(
            self._owner,
            start,
            timeout,
            wait_for_ready,
            request_stream=True,
            request_iterator=request_iterator,
        )


class _UnaryUnary(_UnaryRequest, _UnaryUnaryBase):
    kind = "unary_unary"
    call_class = _UnaryUnaryCall


class _UnaryStream(_UnaryRequest, _UnaryStreamBase):
    kind = "unary_stream"
    call_class = _UnaryStreamCall


class _StreamUnary(_RequestStream, _StreamUnaryBase):
    kind = "stream_unary"
    call_class = _StreamUnaryCall


class _StreamStream(_RequestStream, _StreamStreamBase):
    kind = "stream_stream"
    call_class = _StreamStreamCall


class AioBalancedChannel(ChannelFactories, grpc.aio.Channel):
    """See `aio_balanced_channel`."""

    unary_unary_class = _UnaryUnary
    unary_stream_class = _UnaryStream
    stream_unary_class = _StreamUnary
    stream_stream_class = _StreamStream

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
        self.retry_buffer_messages = check_retry_buffer(retry_buffer_messages)
        self.selector: Selector[grpc.aio.Channel] = Selector(
            balancer_addresses(balancer),
            service,
            fallback=fallback,
            channel_factory=backend_channel_factory(
                grpc.aio.insecure_channel, grpc.aio.secure_channel, credentials, options
            ),
            fallback_timeout=fallback_timeout,
            **(selector_options or {}),
        )
        self.selector.add_listener(self._state_changed)
        self.calls: set[_BalancedCall] = set()
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(None)


def aio_balanced_channel(
    balancer: str | Sequence[str],
    service: str,
    *,
    fallback: Sequence[str] = (),
    fallback_timeout: float = 10.0,
    options: ChannelOptions = (),
    credentials: grpc.ChannelCredentials | None = None,
    retry_buffer_messages: int = DEFAULT_RETRY_BUFFER_MESSAGES,
    selector_options: Mapping[str, Any] | None = None,
) -> grpc.aio.Channel:
    """The asyncio variant of `balanced_channel` (same arguments and
    behaviour), a `grpc.aio.Channel`. It belongs to the event loop it is first
    used on; `await channel.close()` stops its balancer stream."""
    channel: grpc.aio.Channel = AioBalancedChannel(
        balancer,
        service,
        fallback=fallback,
        fallback_timeout=fallback_timeout,
        options=options,
        credentials=credentials,
        retry_buffer_messages=retry_buffer_messages,
        selector_options=selector_options,
    )
    return channel
