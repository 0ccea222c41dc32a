"""One call of `aio_balanced_channel`: a supervisor task picks a backend,
starts grpcio's call there and, if that call fails before reaching the
backend, starts it once more on another backend, replaying the requests
written so far (kept up to a bound). The call object the user holds delegates
to whichever attempt is current, so a retry is invisible to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Generator,
    Iterable,
)
from typing import Any, Protocol

import grpc

from agent_shim._common import (
    StartCall,
    attempt_ended,
    deadline_after,
    expired,
    remaining,
    start_attempt,
)
from agent_shim._selector import Choice, Selector
from lbserver.grpc_compat import EOF_MARKER
from lbserver.logs import get_logger

log = get_logger("agent_shim.aio_channel")


class CallOwner(Protocol):
    """What a call needs of its channel (AioBalancedChannel): the Selector,
    a backend per attempt, the replay bound, the set of running calls."""

    selector: Selector[grpc.aio.Channel]
    retry_buffer_messages: int
    calls: set[BalancedCall]

    async def choose(
        self,
        deadline: float | None,
        wait_for_ready: bool | None,
        exclude: Collection[str] = (),
    ) -> Choice[grpc.aio.Channel]: ...


_WRITE_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


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


class BalancedCall:
    """The part of a balanced call shared by the four call types."""

    def __init__(
        self,
        owner: CallOwner,
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
            if message is EOF_MARKER:
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


class UnaryUnaryCall(BalancedCall, grpc.aio.UnaryUnaryCall[Any, Any]):
    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()


class UnaryStreamCall(BalancedCall, grpc.aio.UnaryStreamCall[Any, Any]):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()


class StreamUnaryCall(BalancedCall, grpc.aio.StreamUnaryCall[Any, Any]):
    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()


class StreamStreamCall(BalancedCall, grpc.aio.StreamStreamCall[Any, Any]):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()
