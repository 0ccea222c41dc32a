"""`balanced_channel`: a `grpc.Channel` that balances every call over the
backends a grpclb balancer lists.

The Selector (asyncio) runs on a private event-loop thread; calls go over
ordinary sync `grpc` channels to the backends, one per address, so every
multicallable hands back grpcio's own response, Call and Future objects. A call
that fails before reaching its backend is retried once on another backend;
request streams are buffered (up to a bound) so that they can be replayed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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
    failed_before_backend,
    remaining,
    start_attempt,
)
from agent_shim._selector import Choice, Selector, ShimError
from lbserver.logs import get_logger

log = get_logger("agent_shim.channel")

T = TypeVar("T")
ConnectivityCallback = Callable[[grpc.ChannelConnectivity], None]

# grpcio's classes are generic only in their type stubs.
if TYPE_CHECKING:
    _Future = grpc.Future[Any]
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.StreamStreamMultiCallable[Any, Any]
else:
    _Future = grpc.Future
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.StreamStreamMultiCallable

_START_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 10.0


class LocalRpcError(grpc.RpcError, grpc.Call, _Future):
    """A call that ended before any backend was tried: no list, a drop, the
    deadline passed while waiting for the balancer. Like grpcio's own errors
    it is also the call's Call and Future, and iterating it raises it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def __repr__(self) -> str:
        return f"<LocalRpcError {self._code.name}: {self._details!r}>"

    # grpc.Call
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def debug_error_string(self) -> str:
        return f"{self._code.name}: {self._details}"

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    # grpc.Future
    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> Exception:
        return self

    def traceback(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    # a response iterator
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        raise self


def local_error(error: ShimError) -> LocalRpcError:
    return LocalRpcError(grpc.StatusCode.UNAVAILABLE, str(error))


class RequestTape(Generic[T]):
    """Replays a request iterator: every attempt of a call reads its own view,
    which first yields what earlier views consumed (kept up to `limit`
    messages), then continues with the source. Starting a new view retires the
    old one, so the source is never read by two attempts at once."""

    def __init__(self, source: Iterable[T], limit: int) -> None:
        self._source = iter(source)
        self._limit = limit
        self._lock = threading.Lock()
        self._kept: list[T] = []
        self._overflowed = False
        self._exhausted = False
        self._generation = 0

    def replayable(self) -> bool:
        return not self._overflowed

    def view(self) -> Iterator[T]:
        with self._lock:
            self._generation += 1
            return self._replay(self._generation)

    def _replay(self, generation: int) -> Iterator[T]:
        position = 0
        while True:
            with self._lock:
                if generation != self._generation:
                    return
                if position < len(self._kept):
                    item = self._kept[position]
                elif self._exhausted:
                    return
                else:
                    try:
                        item = next(self._source)
                    except StopIteration:
                        self._exhausted = True
                        return
                    if not self._overflowed:
                        if len(self._kept) < self._limit:
                            self._kept.append(item)
                        else:
                            self._overflowed = True
                            self._kept.clear()
                position += 1
            yield item


class _Attempt:
    __slots__ = ("call", "choice", "decided", "successor")

    def __init__(self, choice: Choice[grpc.Channel], call: Any) -> None:
        self.choice = choice
        self.call = call
        self.decided = False
        self.successor: _Attempt | None = None


class RetryingCall(grpc.RpcError, grpc.Call, _Future):
    """The Call/Future/response iterator of a non-blocking call (`.future()`,
    response streams). It delegates to grpcio's call object of the current
    attempt; when that attempt fails before reaching its backend, a second one
    is started on another backend from the first one's done callback, and the
    user's view moves over to it."""

    def __init__(
        self,
        owner: BalancedChannel,
        start: StartCall[grpc.Channel],
        choice: Choice[grpc.Channel],
        deadline: float | None,
        can_retry: Callable[[], bool],
    ) -> None:
        super().__init__()
        self._owner = owner
        self._start = start
        self._deadline = deadline
        self._can_retry = can_retry
        self._cond = threading.Condition()
        self._retried = False
        self._cancel_requested = False
        self._final = False
        self._done_callbacks: list[Callable[[Any], None]] = []
        self._rpc_callbacks: list[Callable[[], None]] = []
        self._attempt = self._launch(choice)

    def _launch(self, choice: Choice[grpc.Channel]) -> _Attempt:
        call = start_attempt(self._owner.selector, self._start, choice, self._deadline)
        attempt = _Attempt(choice, call)
        self._attempt = attempt
        # grpcio runs done callbacks on the thread that also delivers the
        # call's initial metadata, which the decision has to wait for.
        call.add_done_callback(lambda _: self._owner.run_soon(self._attempt_done, attempt))
        return attempt

    def _attempt_done(self, attempt: _Attempt) -> None:
        call = attempt.call
        failed_early = attempt_ended(
            self._owner.selector, attempt.choice, call.code(), call.initial_metadata()
        )
        successor = None
        if (
            failed_early
            and not self._retried
            and not self._cancel_requested
            and not expired(self._deadline)
            and self._can_retry()
        ):
            self._retried = True
            try:
                choice = self._owner.selector.choose(exclude={attempt.choice.address})
                successor = self._launch(choice)
            except ShimError:
                successor = None
            except Exception:
                log.exception("could not retry a call on another backend")
                successor = None
            else:
                if self._cancel_requested:
                    successor.call.cancel()
        with self._cond:
            attempt.successor = successor
            attempt.decided = True
            if successor is None:
                self._final = True
                done_callbacks, self._done_callbacks = self._done_callbacks, []
                rpc_callbacks, self._rpc_callbacks = self._rpc_callbacks, []
            else:
                done_callbacks, rpc_callbacks = [], []
            self._cond.notify_all()
        for rpc_callback in rpc_callbacks:
            rpc_callback()
        for done_callback in done_callbacks:
            done_callback(self)

    def _next_attempt(self, attempt: _Attempt) -> _Attempt | None:
        """Waits until the ended `attempt` was either retried or final."""
        with self._cond:
            self._cond.wait_for(lambda: attempt.decided)
        return attempt.successor

    def _final_call(self, timeout: float | None = None) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._final, timeout):
                raise grpc.FutureTimeoutError()
        return self._attempt.call

    # ---- the response iterator ------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        attempt = self._attempt
        while True:
            try:
                return next(attempt.call)
            except grpc.RpcError:
                successor = self._next_attempt(attempt)
                if successor is None:
                    raise
                attempt = successor

    # ---- grpc.Call -------------------------------------------------------------

    def initial_metadata(self) -> Any:
        attempt = self._attempt
        while True:
            metadata = attempt.call.initial_metadata()
            if metadata or not attempt.call.done():
                return metadata
            successor = self._next_attempt(attempt)
            if successor is None:
                return metadata
            attempt = successor

    def trailing_metadata(self) -> Any:
        return self._final_call().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self._final_call().code()
        return code

    def details(self) -> str:
        details: str = self._final_call().details()
        return details

    def debug_error_string(self) -> str:
        text: str = self._final_call().debug_error_string()
        return text

    def is_active(self) -> bool:
        return not self._final

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return remaining(self._deadline)

    def cancel(self) -> bool:
        with self._cond:
            if self._final:
                return False
            self._cancel_requested = True
            attempt = self._attempt
        cancelled: bool = attempt.call.cancel()
        return cancelled

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._cond:
            if self._final:
                return False
            self._rpc_callbacks.append(callback)
            return True

    # ---- grpc.Future -------------------------------------------------------------

    def cancelled(self) -> bool:
        cancelled: bool = self._final and self._attempt.call.cancelled()
        return cancelled

    def running(self) -> bool:
        return not self._final

    def done(self) -> bool:
        return self._final

    def result(self, timeout: float | None = None) -> Any:
        return self._final_call(timeout).result()

    def exception(self, timeout: float | None = None) -> Any:
        return self._final_call(timeout).exception()

    def traceback(self, timeout: float | None = None) -> Any:
        return self._final_call(timeout).traceback()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._cond:
            if not self._final:
                self._done_callbacks.append(fn)
                return
        fn(self)

    def __repr__(self) -> str:
        return f"<RetryingCall to {self._attempt.choice.address}: {self._attempt.call!r}>"


def _always() -> bool:
    return True


class _MultiCallable(MultiCallableBase["BalancedChannel", grpc.Channel]):
    def _requests(self, request: Any) -> tuple[Callable[[], Any], Callable[[], bool]]:
        """What each attempt sends, and whether a failed call may still be
        retried (by what it has sent so far)."""
        return (lambda: request), _always

    def _blocking(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> tuple[Any, grpc.Call]:
        requests, can_retry = self._requests(request)
        invoke = self._starter(
            requests, metadata, credentials, wait_for_ready, compression, via="with_call"
        )
        result: tuple[Any, grpc.Call] = self._owner.blocking_call(
            invoke, deadline_after(timeout), wait_for_ready, can_retry
        )
        return result

    def _retrying(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        *,
        via: str | None = None,
    ) -> Any:
        requests, can_retry = self._requests(request)
        start = self._starter(requests, metadata, credentials, wait_for_ready, compression, via=via)
        return self._owner.retrying_call(start, deadline_after(timeout), wait_for_ready, can_retry)


class _RequestStream(_MultiCallable):
    def _requests(
        self, request_iterator: Iterable[Any]
    ) -> tuple[Callable[[], Any], Callable[[], bool]]:
        tape = RequestTape(request_iterator, self._owner.retry_buffer_messages)
        return tape.view, tape.replayable


class _UnaryUnary(_MultiCallable, _UnaryUnaryBase):
    kind = "unary_unary"

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        response, _ = self._blocking(
            request, timeout, metadata, credentials, wait_for_ready, compression
        )
        return response

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        return self._blocking(request, timeout, metadata, credentials, wait_for_ready, compression)

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._retrying(
            request, timeout, metadata, credentials, wait_for_ready, compression, via="future"
        )


class _UnaryStream(_MultiCallable, _UnaryStreamBase):
    kind = "unary_stream"

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._retrying(request, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamUnary(_RequestStream, _StreamUnaryBase):
    kind = "stream_unary"

    def __call__(
        self,
        request_iterator: Iterable[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        response, _ = self._blocking(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )
        return response

    def with_call(
        self,
        request_iterator: Iterable[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        return self._blocking(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )

    def future(
        self,
        request_iterator: Iterable[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._retrying(
            request_iterator,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
            via="future",
        )


class _StreamStream(_RequestStream, _StreamStreamBase):
    kind = "stream_stream"

    def __call__(
        self,
        request_iterator: Iterable[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._retrying(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


class _LoopThread:
    """An asyncio loop on a daemon thread, home of the Selector."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return  # already closed
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


def _shutdown(loop_thread: _LoopThread, selector: Selector[grpc.Channel]) -> None:
    """Closes the selector and stops its thread; safe to call twice."""
    try:
        if not loop_thread.loop.is_closed():
            loop_thread.run(selector.close(), _CLOSE_TIMEOUT)
    except Exception:
        log.exception("closing the balanced channel failed")
    finally:
        loop_thread.stop()


class BalancedChannel(ChannelFactories, grpc.Channel):
    """See `balanced_channel`."""

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
        """`selector_options` go to the Selector (e.g. retire_grace, rng)."""
        self.retry_buffer_messages = check_retry_buffer(retry_buffer_messages)
        self.selector: Selector[grpc.Channel] = Selector(
            balancer_addresses(balancer),
            service,
            fallback=fallback,
            channel_factory=backend_channel_factory(
                grpc.insecure_channel, grpc.secure_channel, credentials, options
            ),
            close_channel=lambda channel: channel.close(),
            fallback_timeout=fallback_timeout,
            **(selector_options or {}),
        )
        self._lock = threading.Lock()
        self._closed = False
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="agent-shim-calls"
        )
        self._subscribers: dict[ConnectivityCallback, grpc.ChannelConnectivity | None] = {}
        self._delivery: concurrent.futures.ThreadPoolExecutor | None = None
        me = weakref.ref(self)

        def on_change() -> None:
            channel = me()
            if channel is not None:
                channel._deliver_connectivity()

        self.selector.add_listener(on_change)
        self._loop = _LoopThread(f"agent-shim-{service}")
        try:
            self._loop.run(self.selector.start(), _START_TIMEOUT)
        except BaseException:
            self._loop.stop()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self.selector)

    # ---- calls -------------------------------------------------------------------

    def choose(
        self,
        deadline: float | None,
        wait_for_ready: bool | None,
        exclude: Collection[str] = (),
    ) -> Choice[grpc.Channel]:
        """A backend for one attempt; raises LocalRpcError."""
        selector = self.selector
        if not selector.ready:
            left = remaining(deadline)
            waited = (
                selector.wait_ready_blocking(left)
                if wait_for_ready
                else selector.wait_settled_blocking(left)
            )
            if not waited:
                raise LocalRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, NO_LIST_BEFORE_DEADLINE)
        try:
            return selector.choose(exclude)
        except ShimError as error:
            raise local_error(error) from None

    def blocking_call(
        self,
        invoke: Callable[[Choice[grpc.Channel], float | None], T],
        deadline: float | None,
        wait_for_ready: bool | None,
        can_retry: Callable[[], bool] = lambda: True,
    ) -> T:
        choice = self.choose(deadline, wait_for_ready)
        try:
            return self._attempt(invoke, choice, deadline)
        except grpc.RpcError as error:
            if not _failed_early(error) or expired(deadline) or not can_retry():
                raise
            first = error
        try:
            retry = self.choose(deadline, wait_for_ready, exclude={choice.address})
        except LocalRpcError:
            raise first from None
        return self._attempt(invoke, retry, deadline)

    def _attempt(
        self,
        invoke: Callable[[Choice[grpc.Channel], float | None], T],
        choice: Choice[grpc.Channel],
        deadline: float | None,
    ) -> T:
        try:
            result = invoke(choice, remaining(deadline))
        except grpc.RpcError as error:
            early = _failed_early(error)
            self.selector.finished(choice, reached_backend=not early, failed=True)
            raise
        except BaseException:
            self.selector.finished(choice, reached_backend=True, failed=True)
            raise
        self.selector.finished(choice, reached_backend=True)
        return result

    def run_soon(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            self._workers.submit(fn, *args)
        except RuntimeError:  # closed: calls still ending get a thread each
            threading.Thread(target=fn, args=args, daemon=True).start()

    def retrying_call(
        self,
        start: StartCall[grpc.Channel],
        deadline: float | None,
        wait_for_ready: bool | None,
        can_retry: Callable[[], bool] = lambda: True,
    ) -> Any:
        try:
            choice = self.choose(deadline, wait_for_ready)
        except LocalRpcError as error:
            return error
        return RetryingCall(self, start, choice, deadline, can_retry)

    # ---- grpc.Channel ---------------------------------------------------------------

    def subscribe(self, callback: ConnectivityCallback, try_to_connect: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._subscribers[callback] = None
            if self._delivery is None:
                self._delivery = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="agent-shim-connectivity"
                )
        self._deliver_connectivity()

    def unsubscribe(self, callback: ConnectivityCallback) -> None:
        with self._lock:
            self._subscribers.pop(callback, None)

    def _deliver_connectivity(self) -> None:
        state = self.selector.connectivity()
        with self._lock:
            if self._delivery is None:
                return
            due = [cb for cb, seen in self._subscribers.items() if seen is not state]
            for callback in due:
                self._subscribers[callback] = state
                self._delivery.submit(_notify, callback, state)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            delivery, self._delivery = self._delivery, None
            self._subscribers.clear()
        self._finalizer()
        self._workers.shutdown(wait=False)
        if delivery is not None:
            delivery.shutdown(wait=False)

    def __enter__(self) -> BalancedChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _failed_early(error: grpc.RpcError) -> bool:
    if not isinstance(error, grpc.Call):
        return False
    return failed_before_backend(error.code(), error.initial_metadata())


def _notify(callback: ConnectivityCallback, state: grpc.ChannelConnectivity) -> None:
    try:
        callback(state)
    except Exception:
        log.exception("a connectivity callback failed")


def balanced_channel(
    balancer: str | Sequence[str],
    service: str,
    *,
    fallback: Sequence[str] = (),
    fallback_timeout: float = 10.0,
    options: ChannelOptions = (),
    credentials: grpc.ChannelCredentials | None = None,
    retry_buffer_messages: int = DEFAULT_RETRY_BUFFER_MESSAGES,
    selector_options: Mapping[str, Any] | None = None,
) -> grpc.Channel:
    """A `grpc.Channel` that asks the grpclb balancer(s) at `balancer`
    ("host:port", comma separated or a sequence) for `service`'s server list
    and sends each call to the next backend of that list.

    `fallback` addresses are used only when no list arrived within
    `fallback_timeout` seconds of creation, or when the balancer says so.
    `options` and `credentials` apply to the channels to the backends.
    Calls made before the first list wait for it (until their deadline; without
    `wait_for_ready`, at most until the fallback timeout). A call that fails
    before reaching its backend is retried once on another one (request
    streams only while no more than `retry_buffer_messages` were sent).
    Close it (or use it as a context manager) to stop its background thread.
    """
    channel: grpc.Channel = BalancedChannel(
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
