"""The Python peers of the interop tests: two backends and a client driver.

    python -m tests.interop.peers serve --impl aio|sync --name NAME [--port 0] [--grace-ms 5000]
    python -m tests.interop.peers client --target HOST:PORT --plan JSON

`serve --impl aio` is a `grpc.aio` server, `--impl sync` a `grpc.server` with
a thread pool; both speak the protocol of `tests.interop.protocol` with raw
bytes (generic handlers of each call type, no serializers), print a JSON line
`{"event": "listening", "port": P}` once serving, and stop gracefully on
SIGTERM (GOAWAY; running calls get the grace). `client` runs a plan with
`grpc.aio` raw-bytes multicallables and prints one JSON result line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc

from tests.interop.protocol import (
    BIDI,
    CLIENT_STREAM,
    DETAILS_SUFFIX,
    FAIL_BLOB,
    MAX_MESSAGE_BYTES,
    REPORT,
    SERVER_STREAM,
    UNARY,
    Json,
    describe,
    md_json,
    message_bytes,
    wire_metadata,
)

Metadata = tuple[tuple[str, str | bytes], ...]
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
MAX_RECORDED_CALLS = 20_000

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


def emit(value: Json) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


# ---- what both backends share --------------------------------------------------------------------


class Record:
    """One call a backend received (reported by Control/Report)."""

    __slots__ = ("headers_sent", "lb_token", "method", "reason", "received", "state")

    def __init__(self, method: str, lb_token: str) -> None:
        self.method = method
        self.state = "active"
        self.received = 0
        self.reason = ""
        self.lb_token = lb_token
        self.headers_sent = False

    def json(self) -> Json:
        out: Json = {"method": self.method, "state": self.state, "received": self.received}
        if self.reason:
            out["reason"] = self.reason
        if self.lb_token:
            out["lb_token"] = self.lb_token
        return out


class Ledger:
    """Calls received, by `x-call-id`; thread-safe (the sync backend's pool)."""

    def __init__(self, name: str, impl: str) -> None:
        self.name = name
        self.impl = impl
        self.total = 0
        self.active = 0
        self.calls: dict[str, Record] = {}
        self._lock = threading.Lock()

    def begin(self, method: str, md: Steer) -> Record:
        record = Record(method, md.first("lb-token") or "")
        with self._lock:
            self.total += 1
            self.active += 1
            call_id = md.first("x-call-id")
            if call_id and len(self.calls) < MAX_RECORDED_CALLS:
                self.calls[call_id] = record
        return record

    def finish(self, record: Record, state: str, reason: str = "", *, force: bool = False) -> None:
        """The first outcome counts (the handler's, or the cancellation's),
        unless `force`d (a cancellation seen after the handler finished)."""
        with self._lock:
            if record.state == "active":
                self.active -= 1
            elif not force:
                return
            record.state = state
            record.reason = reason

    def report(self) -> bytes:
        with self._lock:
            body = {
                "name": self.name,
                "impl": self.impl,
                "pid": os.getpid(),
                "total": self.total,
                "active": self.active,
                "calls": {k: r.json() for k, r in self.calls.items()},
            }
        return json.dumps(body).encode()


class Steer:
    """A call's request metadata, read as the protocol's controls."""

    def __init__(self, metadata: Any) -> None:
        self.pairs: Metadata = tuple((k, v) for k, v in (metadata or ()))

    def first(self, key: str) -> str | None:
        for k, v in self.pairs:
            if k == key:
                return v.decode("latin-1") if isinstance(v, bytes) else v
        return None

    def number(self, key: str, default: int) -> int:
        value = self.first(key)
        try:
            return default if value is None else int(value)
        except ValueError:
            return default

    @property
    def fail_code(self) -> grpc.StatusCode | None:
        number = self.number("x-fail", -1)
        if number < 0:
            return None
        return next(code for code in grpc.StatusCode if code.value[0] == number)

    @property
    def trailers_only(self) -> bool:
        return self.first("x-trailers-only") == "1"

    @property
    def read_first(self) -> bool:
        return self.first("x-read-first") == "1"

    def headers(self, name: str) -> Metadata:
        echoed = tuple((k, v) for k, v in self.pairs if k.startswith("x-md-"))
        return (("x-backend", name), *echoed)

    def trailers(self, name: str) -> Metadata:
        echoed = tuple(
            ("x-trailer-" + k.removeprefix("x-md-"), v)
            for k, v in self.pairs
            if k.startswith("x-md-")
        )
        return (("x-served-by", name), *echoed)

    def failure(self, name: str) -> tuple[grpc.StatusCode, str, Metadata]:
        code = self.fail_code
        assert code is not None
        details = self.first("x-fail-details") or ""
        trailing = (
            *self.trailers(name),
            ("x-fail-why", details),
            ("x-fail-blob-bin", FAIL_BLOB),
        )
        return code, details + DETAILS_SUFFIX, trailing


def summary(name: str, messages: list[bytes]) -> bytes:
    return json.dumps(
        {
            "backend": name,
            "count": len(messages),
            "bytes": sum(len(m) for m in messages),
            "sha256": [hashlib.sha256(m).hexdigest() for m in messages],
        }
    ).encode()


# ---- the grpc.aio backend ------------------------------------------------------------------------

AioContext = grpc.aio.ServicerContext[bytes, bytes]


class AioBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ledger = Ledger(name, "aio")

    def handlers(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        table: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            UNARY: grpc.unary_unary_rpc_method_handler(self._wrap(UNARY, self._unary)),
            SERVER_STREAM: grpc.unary_stream_rpc_method_handler(
                self._wrap(SERVER_STREAM, self._server_stream)
            ),
            CLIENT_STREAM: grpc.stream_unary_rpc_method_handler(
                self._wrap(CLIENT_STREAM, self._client_stream)
            ),
            BIDI: grpc.stream_stream_rpc_method_handler(self._wrap(BIDI, self._bidi)),
            REPORT: grpc.unary_unary_rpc_method_handler(self._report),
        }
        return _Generic(table)

    async def _report(self, _request: bytes, _context: AioContext) -> bytes:
        return self.ledger.report()

    def _wrap(
        self, method: str, behaviour: Callable[[Any, AioContext, Steer, Record], Any]
    ) -> Callable[[Any, AioContext], Any]:
        ledger = self.ledger

        async def handle(request: Any, context: AioContext) -> Any:
            steer = Steer(context.invocation_metadata())
            record = ledger.begin(method, steer)

            def done(ctx: Any) -> None:
                if ctx.cancelled():
                    ledger.finish(record, "cancelled", "cancelled", force=True)
                else:
                    ledger.finish(record, "cancelled", "ended before the handler")

            context.add_done_callback(done)  # type: ignore[arg-type]
            try:
                context.set_trailing_metadata(steer.trailers(self.name))
                sleep_ms = steer.number("x-sleep-ms", 0)
                if sleep_ms > 0:
                    await asyncio.sleep(sleep_ms / 1000)
                if steer.fail_code is not None and steer.trailers_only:
                    if steer.read_first and method in (CLIENT_STREAM, BIDI):
                        async for _ in request:
                            record.received += 1
                    return await self._fail(context, steer, record)
                reply = await behaviour(request, context, steer, record)
            except asyncio.CancelledError:
                ledger.finish(record, "cancelled", "handler cancelled")
                raise
            if steer.fail_code is not None:
                return await self._fail(context, steer, record, headers_first=True)
            ledger.finish(record, "ok")
            return reply

        return handle

    async def _fail(
        self, context: AioContext, steer: Steer, record: Record, *, headers_first: bool = False
    ) -> NoReturn:
        code, details, trailing = steer.failure(self.name)
        if headers_first:
            await self._send_headers(context, steer, record)
        self.ledger.finish(record, "failed", details)
        # abort(), not set_code(): a unary-response handler that returns with
        # a non-OK code still sends an empty message (DATA) before the status,
        # which makes a trailers-only answer three frames.
        await context.abort(code, details, trailing)

    async def _send_headers(self, context: AioContext, steer: Steer, record: Record) -> None:
        if not record.headers_sent:
            record.headers_sent = True
            await context.send_initial_metadata(steer.headers(self.name))

    async def _unary(
        self, request: bytes, context: AioContext, steer: Steer, record: Record
    ) -> bytes | None:
        record.received += 1
        if steer.fail_code is not None:
            return None
        await self._send_headers(context, steer, record)
        return request

    async def _server_stream(
        self, request: bytes, context: AioContext, steer: Steer, record: Record
    ) -> None:
        record.received += 1
        interval = steer.number("x-interval-ms", 0)
        for i in range(steer.number("x-count", 3)):
            if i and interval > 0:
                await asyncio.sleep(interval / 1000)
            await self._send_headers(context, steer, record)
            await context.write(request)

    async def _client_stream(
        self, requests: AsyncIterator[bytes], context: AioContext, steer: Steer, record: Record
    ) -> bytes | None:
        messages: list[bytes] = []
        async for message in requests:
            messages.append(message)
            record.received += 1
        if steer.fail_code is not None:
            return None
        await self._send_headers(context, steer, record)
        return summary(self.name, messages)

    async def _bidi(
        self, requests: AsyncIterator[bytes], context: AioContext, steer: Steer, record: Record
    ) -> None:
        async for message in requests:
            record.received += 1
            await self._send_headers(context, steer, record)
            await context.write(message)
        # A cancelled stream reads as the end of the requests too; its
        # cancellation reaches this task during the pause.
        await asyncio.sleep(0.05)


async def serve_aio(name: str, port: int, grace: float) -> None:
    backend = AioBackend(name)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((backend.handlers(),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emit({"event": "listening", "impl": "aio", "name": name, "port": bound, "pid": os.getpid()})
    await stop.wait()
    emit({"event": "stopping", "active": backend.ledger.active})
    started = time.monotonic()
    await server.stop(grace)  # GOAWAY; running calls get `grace`
    graceful = time.monotonic() - started < grace
    emit({"event": "stopped", "graceful": graceful, "total": backend.ledger.total})


# ---- the sync (thread pool) backend --------------------------------------------------------------

SyncContext = grpc.ServicerContext


class _CancelledError(Exception):
    pass


class SyncBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ledger = Ledger(name, "sync")

    def handlers(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        table: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            UNARY: grpc.unary_unary_rpc_method_handler(self._wrap(UNARY, self._unary)),
            SERVER_STREAM: grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(SERVER_STREAM, self._server_stream)
            ),
            CLIENT_STREAM: grpc.stream_unary_rpc_method_handler(
                self._wrap(CLIENT_STREAM, self._client_stream)
            ),
            BIDI: grpc.stream_stream_rpc_method_handler(self._wrap_stream(BIDI, self._bidi)),
            REPORT: grpc.unary_unary_rpc_method_handler(lambda _r, _c: self.ledger.report()),
        }
        return _Generic(table)

    def _begin(self, method: str, context: SyncContext) -> tuple[Steer, Record, threading.Event]:
        steer = Steer(context.invocation_metadata())
        record = self.ledger.begin(method, steer)
        ended = threading.Event()

        def on_end() -> None:  # runs when the RPC terminates, however it ends
            ended.set()
            self.ledger.finish(record, "cancelled", "ended before the handler")

        if not context.add_callback(on_end):
            on_end()
        context.set_trailing_metadata(steer.trailers(self.name))
        return steer, record, ended

    def _sleep(self, ms: int, context: SyncContext, ended: threading.Event) -> None:
        if ms > 0:
            ended.wait(ms / 1000)
        if not context.is_active():
            raise _CancelledError

    def _fail(self, context: SyncContext, steer: Steer, record: Record, headers: bool) -> NoReturn:
        code, details, trailing = steer.failure(self.name)
        if headers:
            context.send_initial_metadata(steer.headers(self.name))
        context.set_trailing_metadata(trailing)
        self.ledger.finish(record, "failed", details)
        context.abort(code, details)

    def _cancelled(self, context: SyncContext, record: Record) -> NoReturn:
        self.ledger.finish(record, "cancelled", "cancelled")
        context.abort(grpc.StatusCode.CANCELLED, "cancelled")

    def _wrap(
        self, method: str, behaviour: Callable[[Any, SyncContext, Steer, Record], bytes]
    ) -> Callable[[Any, SyncContext], bytes]:
        def handle(request: Any, context: SyncContext) -> bytes:
            steer, record, ended = self._begin(method, context)
            try:
                self._sleep(steer.number("x-sleep-ms", 0), context, ended)
                if steer.fail_code is not None and steer.trailers_only:
                    if steer.read_first and method in (CLIENT_STREAM, BIDI):
                        for _ in request:
                            record.received += 1
                    self._fail(context, steer, record, headers=False)
                reply = behaviour(request, context, steer, record)
            except (_CancelledError, grpc.RpcError):
                self._cancelled(context, record)
            if steer.fail_code is not None:
                self._fail(context, steer, record, headers=True)
            context.send_initial_metadata(steer.headers(self.name))
            self.ledger.finish(record, "ok")
            return reply

        return handle

    def _wrap_stream(
        self,
        method: str,
        behaviour: Callable[[Any, SyncContext, Steer, Record, threading.Event], Iterator[bytes]],
    ) -> Callable[[Any, SyncContext], Iterator[bytes]]:
        def handle(request: Any, context: SyncContext) -> Iterator[bytes]:
            steer, record, ended = self._begin(method, context)
            sent = False
            try:
                self._sleep(steer.number("x-sleep-ms", 0), context, ended)
                if steer.fail_code is not None and steer.trailers_only:
                    if steer.read_first and method in (CLIENT_STREAM, BIDI):
                        for _ in request:
                            record.received += 1
                    self._fail(context, steer, record, headers=False)
                for reply in behaviour(request, context, steer, record, ended):
                    if not sent:
                        context.send_initial_metadata(steer.headers(self.name))
                        sent = True
                    yield reply
            except (_CancelledError, grpc.RpcError):
                self._cancelled(context, record)
            if steer.fail_code is not None:
                self._fail(context, steer, record, headers=not sent)
            self.ledger.finish(record, "ok")

        return handle

    def _unary(self, request: bytes, _c: SyncContext, _s: Steer, record: Record) -> bytes:
        record.received += 1
        return request

    def _server_stream(
        self,
        request: bytes,
        context: SyncContext,
        steer: Steer,
        record: Record,
        ended: threading.Event,
    ) -> Iterator[bytes]:
        record.received += 1
        interval = steer.number("x-interval-ms", 0)
        for i in range(steer.number("x-count", 3)):
            if i:
                self._sleep(interval, context, ended)
            yield request

    def _client_stream(
        self, requests: Iterator[bytes], _c: SyncContext, _s: Steer, record: Record
    ) -> bytes:
        messages = []
        for message in requests:
            messages.append(message)
            record.received += 1
        return summary(self.name, messages)

    def _bidi(
        self,
        requests: Iterator[bytes],
        context: SyncContext,
        _s: Steer,
        record: Record,
        ended: threading.Event,
    ) -> Iterator[bytes]:
        for message in requests:
            record.received += 1
            yield message
        # A client that cancels may half-close first (grpc-js ends the stream,
        # then resets it): the reset lands during this pause.
        self._sleep(50, context, ended)


def serve_sync(name: str, port: int, grace: float) -> None:
    backend = SyncBackend(name)
    # A thread per running call: room for the 200-stream scenario and more.
    server = grpc.server(ThreadPoolExecutor(max_workers=400), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((backend.handlers(),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    emit({"event": "listening", "impl": "sync", "name": name, "port": bound, "pid": os.getpid()})
    while not stop.wait(0.2):
        pass
    emit({"event": "stopping", "active": backend.ledger.active})
    started = time.monotonic()
    server.stop(grace).wait()  # GOAWAY; running calls get `grace`
    graceful = time.monotonic() - started < grace
    emit({"event": "stopped", "graceful": graceful, "total": backend.ledger.total})


class _Generic(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, table: dict[str, grpc.RpcMethodHandler[bytes, bytes]]) -> None:
        self._table = table

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        return self._table.get(handler_call_details.method)


# ---- the client driver (grpc.aio) ----------------------------------------------------------------


def channel_options(plan: Json) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_http_proxy", 0),
    ]
    channel = plan.get("channel") or {}
    if channel.get("keepalive_ms"):
        options += [
            ("grpc.keepalive_time_ms", int(channel["keepalive_ms"])),
            ("grpc.keepalive_timeout_ms", int(channel.get("keepalive_timeout_ms") or 20_000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    return options


async def _metadata_or_empty(getter: Any) -> dict[str, list[str]]:
    try:
        return md_json(await getter())
    except (grpc.RpcError, asyncio.CancelledError):
        return {}


async def run_call(channel: grpc.aio.Channel, spec: Json) -> Json:
    method = str(spec["method"])
    metadata = tuple(wire_metadata(spec.get("metadata") or ()))
    timeout = int(spec.get("timeout_ms") or 10_000) / 1000
    interval = int(spec.get("interval_ms") or 0) / 1000
    pingpong = bool(spec.get("pingpong"))
    half_close = spec.get("half_close", True) is not False
    cancel_after = int(spec.get("cancel_after", -1))
    messages = [message_bytes(m) for m in spec.get("messages") or ()]
    received: list[bytes] = []
    result: Json = {"name": spec.get("name"), "method": method}
    cancelled = False

    def got(message: bytes) -> None:
        nonlocal cancelled
        received.append(message)
        if cancel_after >= 0 and len(received) == cancel_after:
            call.cancel()
            cancelled = True

    call: Any
    try:
        if method == UNARY:
            call = channel.unary_unary(method, None, None)(
                messages[0], metadata=metadata, timeout=timeout
            )
            got(await call)
        elif method == SERVER_STREAM:
            call = channel.unary_stream(method, None, None)(
                messages[0], metadata=metadata, timeout=timeout
            )
            while not cancelled and (message := await call.read()) is not _EOF:
                got(message)
        else:
            if method == CLIENT_STREAM:
                call = channel.stream_unary(method, None, None)(
                    None, metadata=metadata, timeout=timeout
                )
            else:
                call = channel.stream_stream(method, None, None)(
                    None, metadata=metadata, timeout=timeout
                )
            ended = False
            for i, message in enumerate(messages):
                if i and interval:
                    await asyncio.sleep(interval)
                try:
                    await call.write(message)
                except (grpc.RpcError, asyncio.InvalidStateError):
                    ended = True  # the call ended: its status is read below
                    break
                if pingpong:
                    reply = await call.read()
                    if reply is _EOF:
                        ended = True
                        break
                    got(reply)
            if not ended and not cancelled and 0 <= cancel_after <= len(received):
                call.cancel()
                cancelled = True
            if not ended and not cancelled and half_close:
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await call.done_writing()
            if method == CLIENT_STREAM:
                if not cancelled:
                    got(await call)
            else:
                while not cancelled and (message := await call.read()) is not _EOF:
                    got(message)
    except grpc.RpcError:
        pass  # the status comes from call.code() below
    except Exception as err:
        result["error"] = repr(err)
    code = await call.code()
    result["code"] = code.value[0]
    result["details"] = (await call.details()) or ""
    result["headers"] = await _metadata_or_empty(call.initial_metadata)
    result["trailers"] = await _metadata_or_empty(call.trailing_metadata)
    result["sent"] = [describe(m) for m in messages]
    result["received"] = [describe(m) for m in received]
    return result


async def watch_states(channel: grpc.aio.Channel, states: list[str]) -> None:
    state = channel.get_state(False)
    while True:
        await channel.wait_for_state_change(state)
        state = channel.get_state(False)
        states.append(state.name)


async def run_calls(channel: grpc.aio.Channel, plan: Json) -> Json:
    specs: list[Json] = list(plan.get("calls") or ())
    if plan.get("parallel"):
        results = list(await asyncio.gather(*(run_call(channel, s) for s in specs)))
        return {"calls": results}
    results = []
    states: list[str] = []
    watcher: asyncio.Task[None] | None = None
    for spec in specs:
        if not spec.get("method"):
            await asyncio.sleep(int(spec.get("sleep_ms") or 0) / 1000)
            continue
        results.append(await run_call(channel, spec))
        if plan.get("watch_state") and watcher is None:
            watcher = asyncio.create_task(watch_states(channel, states))
            await asyncio.sleep(0)
    out: Json = {"calls": results}
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        out["states"] = states
        out["final_state"] = channel.get_state(False).name
    return out


async def run_streams(channel: grpc.aio.Channel, plan: Json) -> Json:
    n = int(plan["streams"])
    prefix = str(plan["id_prefix"])
    timeout = int(plan.get("timeout_ms") or 60_000) / 1000
    first_echoes = 0
    all_open = asyncio.Event()
    waiting = n

    def arrive() -> None:
        nonlocal waiting
        waiting -= 1
        if waiting == 0:
            all_open.set()

    async def one(i: int) -> tuple[str | None, Json | None]:
        nonlocal first_echoes
        call_id = f"{prefix}-{i}"
        arrived = False
        call = channel.stream_stream(BIDI, None, None)(
            None, metadata=(("x-call-id", call_id),), timeout=timeout
        )
        try:
            for round_ in range(2):
                want = f"{call_id}-{round_}".encode()
                await call.write(want)
                got = await call.read()
                if got != want:
                    return None, {"index": i, "step": "echo", "got": repr(got)}
                if round_ == 0:
                    first_echoes += 1
                    arrived = True
                    arrive()
                    await all_open.wait()
            await call.done_writing()
            if await call.read() is not _EOF:
                return None, {"index": i, "step": "eof"}
            headers = md_json(await call.initial_metadata())
        except grpc.RpcError:
            code = await call.code()
            return None, {"index": i, "code": code.value[0], "details": await call.details()}
        finally:
            if not arrived:
                arrive()
        code = await call.code()
        if code is not grpc.StatusCode.OK:
            return None, {"index": i, "code": code.value[0], "details": await call.details()}
        return (headers.get("x-backend") or [""])[0], None

    outcomes = await asyncio.gather(*(one(i) for i in range(n)))
    backends: dict[str, int] = {}
    failures: list[Json] = []
    for backend, failure in outcomes:
        if failure is None and backend is not None:
            backends[backend] = backends.get(backend, 0) + 1
        elif failure is not None and len(failures) < 10:
            failures.append(failure)
    return {
        "streams": n,
        "first_echoes": first_echoes,
        "ok": sum(backends.values()),
        "failures": failures,
        "backends": backends,
    }


def loop_call(plan: Json, k: int) -> Json:
    call_id = f"{plan['id_prefix']}-{k}"
    metadata = [["x-call-id", call_id], ["x-sleep-ms", str(plan["sleep_ms"])]]
    count = 1 if k % 2 == 0 else 3
    return {
        "name": call_id,
        "method": UNARY if k % 2 == 0 else CLIENT_STREAM,
        "metadata": metadata,
        "messages": [{"text": call_id}] * count,
        "timeout_ms": 20_000,
    }


async def run_loop(channel: grpc.aio.Channel, plan: Json) -> Json:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def read_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_stdin, daemon=True).start()
    give_up = time.monotonic() + int(plan["max_seconds"])
    max_calls = int(plan["max_calls"])
    counter = 0
    total = ok = 0
    failures: list[Json] = []
    backends: dict[str, int] = {}
    reason = "stdin closed"

    async def worker() -> None:
        nonlocal counter, total, ok, reason
        while not stop.is_set():
            if time.monotonic() > give_up:
                reason = "max_seconds"
                return
            counter += 1
            if counter > max_calls:
                reason = "max_calls"
                return
            result = await run_call(channel, loop_call(plan, counter))
            total += 1
            if result["code"] == 0:
                ok += 1
                name = (result["headers"].get("x-backend") or [""])[0]
                backends[name] = backends.get(name, 0) + 1
            elif len(failures) < 10:
                failures.append(
                    {"name": result["name"], "code": result["code"], "details": result["details"]}
                )

    await asyncio.gather(*(worker() for _ in range(int(plan["concurrency"]))))
    return {
        "total": total,
        "ok": ok,
        "failed": total - ok,
        "failures": failures,
        "backends": backends,
        "stop_reason": reason,
    }


async def run_client(target: str, plan: Json) -> Json:
    async with grpc.aio.insecure_channel(target, options=channel_options(plan)) as channel:
        mode = plan.get("mode")
        if mode == "calls":
            out = await run_calls(channel, plan)
        elif mode == "streams":
            out = await run_streams(channel, plan)
        elif mode == "loop":
            out = await run_loop(channel, plan)
        else:
            out = {"fatal": f"unknown mode {mode!r}"}
    out["client"] = "python"
    out["mode"] = mode
    return out


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.interop.peers")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--impl", choices=("aio", "sync"), required=True)
    serve.add_argument("--name", required=True)
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--grace-ms", type=int, default=5000)
    client = commands.add_parser("client")
    client.add_argument("--target", required=True)
    client.add_argument("--plan", required=True)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.impl == "aio":
            asyncio.run(serve_aio(args.name, args.port, args.grace_ms / 1000))
        else:
            serve_sync(args.name, args.port, args.grace_ms / 1000)
        return 0
    try:
        plan = json.loads(args.plan)
    except ValueError as err:
        emit({"fatal": f"bad plan: {err}"})
        return 2
    emit(asyncio.run(run_client(args.target, plan)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
