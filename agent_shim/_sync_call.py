"""The sync side of `balanced_channel`: the event-loop thread its asyncio
channel runs on, and the objects a sync call hands back.

A call runs as an `aio_balanced_channel` call on the loop thread; the caller's
thread waits for it. `SyncCall` is what grpcio's non-blocking calls return (a
Call, a Future and, for response streams, an iterator); `EndedCall` is a call
that is over: what a blocking call returns with its response or raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from agent_shim._common import remaining
from agent_shim._errors import ShimError
from lbserver.grpc_compat import EOF_MARKER
from lbserver.logs import get_logger

log = get_logger("agent_shim.channel")

T = TypeVar("T")

# grpcio's classes are generic only in their type stubs.
if TYPE_CHECKING:
    _Future = grpc.Future[Any]
else:
    _Future = grpc.Future

CLOSED = "the channel is closed"
_CLOSE_TIMEOUT = 10.0
_END = object()


class LoopThread:
    """An asyncio loop on a daemon thread, home of the asyncio channel. Once it
    stops, `submit` refuses (ChannelClosedError) rather than queue work no loop
    will run; work still pending then is cancelled."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with self._lock:
                self._closed = True
            # Everything submitted before the flag was set runs (cancelled).
            self.loop.run_until_complete(asyncio.sleep(0))
            while pending := [t for t in asyncio.all_tasks(self.loop) if not t.done()]:
                for task in pending:
                    task.cancel()
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._closed:
                coro.close()
                raise ChannelClosedError()
            return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the loop (grpc.aio objects belong to it)."""

        async def on_loop() -> T:
            return fn()

        return self.run(on_loop())

    def shutdown(self, closing: Coroutine[Any, Any, object] | None = None) -> None:
        """Runs `closing`, then stops the loop and its thread; safe to call twice."""
        closing = closing or asyncio.sleep(0)
        if threading.current_thread() is self._thread:
            # A finalizer run by the collector on the loop thread itself.
            task = self.loop.create_task(closing)
            task.add_done_callback(lambda _: self.loop.stop())
            return
        try:
            self.run(closing, _CLOSE_TIMEOUT)
        except ChannelClosedError:
            return
        except Exception:
            log.exception("closing the balanced channel failed")
        with self._lock:
            if not self._closed:
                self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_CLOSE_TIMEOUT)


class ChannelClosedError(ShimError):
    """LoopThread.submit once the loop stopped (the channel was closed)."""


class EndedCall(grpc.RpcError, grpc.Call, _Future):
    """A call that is over, with its status, metadata and (when OK) response.
    Like grpcio's own, a failed one is the error raised, and also the call's
    Call and Future; iterating it raises it."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        initial_metadata: tuple[Any, ...] = (),
        trailing_metadata: tuple[Any, ...] = (),
        response: Any = None,
    ) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._initial_metadata = initial_metadata
        self._trailing_metadata = trailing_metadata
        self._response = response

    def __repr__(self) -> str:
        return f"<EndedCall {self._code.name}: {self._details!r}>"

    # grpc.Call
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def debug_error_string(self) -> str:
        return f"{self._code.name}: {self._details}"

    def initial_metadata(self) -> Any:
        return self._initial_metadata

    def trailing_metadata(self) -> Any:
        return self._trailing_metadata

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
        return self._code is grpc.StatusCode.CANCELLED

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        if self._code is not grpc.StatusCode.OK:
            raise self
        return self._response

    def exception(self, timeout: float | None = None) -> Exception | None:
        return None if self._code is grpc.StatusCode.OK else self

    def traceback(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def outcome(self) -> EndedCall:
        return self

    # a response iterator
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._code is grpc.StatusCode.OK:
            raise StopIteration
        raise self


async def ended(call: Any, *, unary_response: bool) -> EndedCall:
    """Waits for an asyncio balanced call to end; what it ended with."""
    code: grpc.StatusCode = await call.code()
    response = await call if unary_response and code is grpc.StatusCode.OK else None
    return EndedCall(
        code,
        await call.details() or "",
        initial_metadata=tuple(await call.initial_metadata()),
        trailing_metadata=tuple(await call.trailing_metadata()),
        response=response,
    )


async def run_call(
    make: Callable[[], Any],
    *,
    unary_response: bool,
    made: Callable[[Any], object] | None = None,
) -> EndedCall:
    """On the loop: starts the asyncio call with `make` and waits for its end.
    `made` gets the call as soon as it exists (None: the channel closed first)."""
    try:
        call = make()
    except grpc.aio.UsageError:  # closed meanwhile
        call = None
    if made is not None:
        made(call)
    if call is None:
        return EndedCall(grpc.StatusCode.UNAVAILABLE, CLOSED)
    return await ended(call, unary_response=unary_response)


async def pulled(requests: Iterable[Any]) -> AsyncIterator[Any]:
    """A sync request iterator for an asyncio call. It may block (until the
    application has the next request), so it is read on a thread of its own,
    as grpcio reads it."""
    iterator = iter(requests)
    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-shim-requests")
    loop = asyncio.get_running_loop()
    try:
        while (request := await loop.run_in_executor(reader, next, iterator, _END)) is not _END:
            yield request
    finally:
        reader.shutdown(wait=False)


Dispatch = Callable[[Callable[[], object]], None]


class SyncCall(grpc.RpcError, grpc.Call, _Future):
    """A non-blocking call (`.future()`, response streams) running on the
    loop thread: its Call, Future and response iterator."""

    def __init__(
        self,
        loop: LoopThread,
        make: Callable[[], Any],
        deadline: float | None,
        *,
        unary_response: bool,
        dispatch: Dispatch,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._deadline = deadline
        self._dispatch = dispatch
        self._call: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._ended = loop.submit(self._run(make, unary_response))

    async def _run(self, make: Callable[[], Any], unary_response: bool) -> EndedCall:
        return await run_call(make, unary_response=unary_response, made=self._call.set_result)

    @staticmethod
    def blocking(loop: LoopThread, make: Callable[[], Any]) -> EndedCall:
        """A unary-response call waited for at once (`__call__`, `with_call`):
        what `SyncCall(...).outcome()` returns, with one hand-off to the loop
        and back instead of a call object the caller never sees."""

        try:
            return loop.run(run_call(make, unary_response=True))
        except ChannelClosedError:
            return EndedCall(grpc.StatusCode.UNAVAILABLE, CLOSED)
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            # The channel was closed while the call ran.
            return EndedCall(grpc.StatusCode.CANCELLED, CLOSED)

    def _made(self) -> Any:
        """The asyncio call, once made; None if it never will be."""
        concurrent.futures.wait(
            (self._call, self._ended), return_when=concurrent.futures.FIRST_COMPLETED
        )
        return self._call.result() if self._call.done() else None

    def outcome(self, timeout: float | None = None) -> EndedCall:
        """The call once it ended."""
        try:
            return self._ended.result(timeout)
        except concurrent.futures.TimeoutError:
            raise grpc.FutureTimeoutError() from None
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            # The channel was closed while the call ran.
            return EndedCall(grpc.StatusCode.CANCELLED, CLOSED)

    def _on_call(self, operation: Callable[[Any], Coroutine[Any, Any, T]]) -> T | None:
        """`operation(call)` on the loop; None once it cannot be done there
        (the call failed or the channel closed): the outcome tells the rest."""
        call = self._made()
        if call is None:
            return None
        try:
            return self._loop.run(operation(call))
        except (
            grpc.RpcError,
            ChannelClosedError,
            asyncio.CancelledError,
            concurrent.futures.CancelledError,
        ):
            return None

    # ---- the response iterator ------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        message = self._on_call(lambda call: call.read())
        if message is not None and message is not EOF_MARKER:
            return message
        if self.outcome().code() is grpc.StatusCode.OK:
            raise StopIteration
        raise self

    # ---- grpc.Call --------------------------------------------------------------

    def initial_metadata(self) -> Any:
        if not self._ended.done():
            metadata = self._on_call(lambda call: call.initial_metadata())
            if metadata is not None:
                return tuple(metadata)
        return self.outcome().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self.outcome().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self.outcome().code()

    def details(self) -> str:
        return self.outcome().details()

    def debug_error_string(self) -> str:
        return self.outcome().debug_error_string()

    def is_active(self) -> bool:
        return not self._ended.done()

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return remaining(self._deadline)

    def cancel(self) -> bool:
        if self._ended.done():
            return False
        call = self._made()
        try:
            return call is not None and bool(self._loop.call(call.cancel))
        except ChannelClosedError:
            return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._ended.done():
            return False
        self._ended.add_done_callback(lambda _: self._dispatch(callback))
        return True

    # ---- grpc.Future ----------------------------------------------------------------

    def cancelled(self) -> bool:
        return self._ended.done() and self.outcome().cancelled()

    def running(self) -> bool:
        return not self._ended.done()

    def done(self) -> bool:
        return self._ended.done()

    def result(self, timeout: float | None = None) -> Any:
        return self.outcome(timeout).result()

    def exception(self, timeout: float | None = None) -> Exception | None:
        return self.outcome(timeout).exception()

    def traceback(self, timeout: float | None = None) -> None:
        return self.outcome(timeout).traceback()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        # Not on the loop thread, which the user's callback must not block.
        self._ended.add_done_callback(lambda _: self._dispatch(lambda: fn(self)))

    def __repr__(self) -> str:
        state = "active" if self.is_active() else self.outcome().code().name
        return f"<SyncCall {state}>"
