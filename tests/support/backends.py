"""Counting test backends and grpclb client helpers.

A `CountingBackend` is a sync `grpc.server` on 127.0.0.1 serving one raw-bytes
unary method, `/lbtest.Echo/Call` (`CALL_METHOD`). For every call it records the
`lb-token` metadata value the client sent (grpclb clients attach the token of
the server-list entry they picked) and a `time.monotonic()` timestamp taken when
the call started; the reply is the backend's name, so clients can tell who
served them. `BackendFleet` starts N of them.

`grpclb_channel` / `grpclb_aio_channel` build a channel that discovers its
balancer the native way (DNS SRV `_grpclb._tcp.<name>` through a test DNS
server) and uses gRPC's own grpclb policy.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Self

import grpc

from tests.support.started import Started

LB_TOKEN_KEY = "lb-token"
SERVICE_NAME = "lbtest.Echo"
CALL_METHOD = f"/{SERVICE_NAME}/Call"

GRPCLB_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"grpclb": {"childPolicy": [{"round_robin": {}}]}}]}
)


def grpclb_channel_options(extra: Sequence[tuple[str, object]] = ()) -> list[tuple[str, object]]:
    """Options making a grpcio channel discover its balancer via DNS SRV and use grpclb."""
    return [
        ("grpc.dns_enable_srv_queries", 1),
        ("grpc.service_config", GRPCLB_SERVICE_CONFIG),
        # Each test wants its own subchannels, not ones shared with earlier tests.
        ("grpc.use_local_subchannel_pool", 1),
        *extra,
    ]


def grpclb_channel(target: str, extra: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    return grpc.insecure_channel(target, options=grpclb_channel_options(extra))


def grpclb_aio_channel(target: str, extra: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=grpclb_channel_options(extra))


def call_stub(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """The raw-bytes `/lbtest.Echo/Call` method on `channel` (request and reply are bytes)."""
    return channel.unary_unary(CALL_METHOD, request_serializer=None, response_deserializer=None)


def aio_call_stub(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(CALL_METHOD, request_serializer=None, response_deserializer=None)


@dataclass(frozen=True)
class CallRecord:
    """One call a backend received."""

    token: str | None  # the `lb-token` metadata value, None when absent
    started: float  # time.monotonic() when the handler began
    peer: str


class CountingBackend(Started):
    """A gRPC server counting calls to `/lbtest.Echo/Call`, per `lb-token`."""

    def __init__(self, name: str = "", host: str = "127.0.0.1", max_workers: int = 16) -> None:
        self.host = host
        self.name = name
        self._max_workers = max_workers
        self._lock = threading.Condition()
        self._records: list[CallRecord] = []
        self._server: grpc.Server | None = None
        self._port = 0

    # ---- lifecycle ---------------------------------------------------------------

    def start(self, port: int = 0) -> Self:
        """Listen on `host:port` (0 = any free port) and serve."""
        if self._server is not None:
            return self
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix=f"backend-{self.name}"
            ),
            options=[("grpc.so_reuseport", 0)],
        )
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Call": grpc.unary_unary_rpc_method_handler(self._handle)}
        )
        server.add_generic_rpc_handlers((handler,))
        bound = server.add_insecure_port(f"{self.host}:{port}")
        if bound == 0:
            raise RuntimeError(f"backend {self.name!r} could not bind {self.host}:{port}")
        server.start()
        self._port = bound
        if not self.name:
            self.name = f"backend-{bound}"
        self._server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait(timeout=10)

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("backend is not started")
        return self._port

    @property
    def address(self) -> str:
        """`host:port`, e.g. for `lbserver register --backend`."""
        return f"{self.host}:{self.port}"

    # ---- the handler -----------------------------------------------------------------

    def _handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        started = time.monotonic()
        token: str | None = None
        for key, value in context.invocation_metadata():
            if key == LB_TOKEN_KEY:
                token = value.decode() if isinstance(value, bytes) else value
        with self._lock:
            self._records.append(CallRecord(token=token, started=started, peer=context.peer()))
            self._lock.notify_all()
        return self.name.encode()

    # ---- reading the counts -----------------------------------------------------------

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._records)

    def records(self) -> list[CallRecord]:
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        with self._lock:
            self._records.clear()

    def tokens(self) -> Counter[str | None]:
        """Calls per `lb-token` value (None: calls without a token)."""
        with self._lock:
            return Counter(r.token for r in self._records)

    def calls_since(self, t: float) -> int:
        """Calls that started after monotonic time `t`."""
        with self._lock:
            return sum(1 for r in self._records if r.started > t)

    def wait_for_calls(self, n: int = 1, timeout: float = 10.0) -> bool:
        """Block until at least `n` calls have been recorded; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._records) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True


class BackendFleet(Started):
    """N counting backends, started and stopped together."""

    def __init__(self, n: int, prefix: str = "backend") -> None:
        self.backends = [CountingBackend(name=f"{prefix}-{i}") for i in range(n)]

    def start(self) -> Self:
        try:
            for b in self.backends:
                b.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for b in self.backends:
            b.stop()

    def __iter__(self) -> Iterator[CountingBackend]:
        return iter(self.backends)

    def __len__(self) -> int:
        return len(self.backends)

    def __getitem__(self, i: int) -> CountingBackend:
        return self.backends[i]

    def counts(self) -> list[int]:
        return [b.count for b in self.backends]

    def total(self) -> int:
        return sum(self.counts())

    def reset(self) -> None:
        for b in self.backends:
            b.reset()

    def by_name(self) -> dict[str, CountingBackend]:
        return {b.name: b for b in self.backends}


def call_until_served(
    stub: grpc.UnaryUnaryMultiCallable[bytes, bytes],
    backends: Sequence[CountingBackend],
    *,
    timeout: float = 15.0,
    max_calls: int = 2000,
    call_timeout: float = 5.0,
) -> int:
    """Make calls until every one of `backends` has received at least one.

    Returns the number of calls made; raises TimeoutError (with the counts) when
    `timeout` or `max_calls` runs out first. Failed calls are retried.
    """
    deadline = time.monotonic() + timeout
    made = 0
    last_error: grpc.RpcError | None = None
    while not all(b.count for b in backends):
        if made >= max_calls or time.monotonic() >= deadline:
            counts = {b.name: b.count for b in backends}
            raise TimeoutError(
                f"not every backend served within {timeout}s/{max_calls} calls: {counts};"
                f" last error: {last_error!r}"
            )
        made += 1
        try:
            stub(b"warm-up", timeout=call_timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            last_error = e
            time.sleep(0.05)
    return made


@dataclass(frozen=True)
class CallFailure:
    at: float  # time.monotonic() when the call ended
    code: grpc.StatusCode | None
    details: str | None


class CallLoop(Started):
    """Calls `stub` over and over in a background thread until stopped.

    Counts successes and records every failure (`failures`) with its time, so a
    test can assert "zero failed calls while X happened".
    """

    def __init__(
        self,
        stub: grpc.UnaryUnaryMultiCallable[bytes, bytes],
        pause: float = 0.005,
        call_timeout: float = 5.0,
    ) -> None:
        self._stub = stub
        self._pause = pause
        self._call_timeout = call_timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="call-loop", daemon=True)
        self.successes = 0
        self.failures: list[CallFailure] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._stub(b"loop", timeout=self._call_timeout)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                with self._lock:
                    self.failures.append(CallFailure(time.monotonic(), code, details))
            else:
                with self._lock:
                    self.successes += 1
            self._stop.wait(self._pause)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self) -> tuple[int, list[CallFailure]]:
        with self._lock:
            return self.successes, list(self.failures)
