"""In-process pieces for proxy tests: a scripted grpclb balancer and probe backends.

- `FakeBalancer`: a `grpc.aio` server speaking `grpc.lb.v1.LoadBalancer/BalanceLoad`
  that sends `initial_response` and then whatever server list the test sets
  (`set_list([("127.0.0.1", port, "token"), ...])`, `DROP` entries, or
  `send_fallback()`), so a test controls exactly what the shim's Selector sees.
- `ProbeBackend`: a `grpc.aio` server with raw-bytes methods of every call type
  that records what it received (metadata, deadline, messages, cancellation):

  | method (`/probe.Probe/...`) | type          | behaviour                                  |
  |-----------------------------|---------------|--------------------------------------------|
  | `Unary`                     | unary-unary   | replies `name:request`; initial metadata   |
  |                             |               | `x-init`, trailing `x-trail` + `x-trail-bin`|
  | `ServerStream`              | unary-stream  | request `b"3"` -> `b"0"`, `b"1"`, `b"2"`     |
  | `ClientStream`              | stream-unary  | replies `name:<count>:<bytes>`             |
  | `Bidi`                      | stream-stream | echoes each message as it arrives; ends    |
  |                             |               | 0.1 s after the client half-closes         |
  | `Fail`                      | unary-unary   | request `CODE:details` -> that status, with |
  |                             |               | trailing metadata `x-why` (a trailers-only |
  |                             |               | answer); `!CODE:details` sends response    |
  |                             |               | headers first                              |
  | `Slow`                      | unary-unary   | sleeps until cancelled (records it)        |
  | `ServerFirst`               | stream-stream | sends `hello from <name>` before reading,  |
  |                             |               | then behaves as `Bidi`                     |

  `refuse=True` makes every method answer UNAVAILABLE with no response headers
  after reading the whole request stream (a backend that never accepted the
  call); `refuse_calls=N` does so for the first N calls only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb_pb2
from lbserver.proto.grpclb.v1 import load_balancer_pb2_grpc as lb_grpc

SERVICE = "probe.Probe"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"
FAIL = f"/{SERVICE}/Fail"
SLOW = f"/{SERVICE}/Slow"
SERVER_FIRST = f"/{SERVICE}/ServerFirst"

DROP = ("", 0, "drop")  # a list entry that tells clients to drop the call

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

if TYPE_CHECKING:
    _HandlerBase = grpc.GenericRpcHandler[bytes, bytes]
    Context = grpc.aio.ServicerContext[bytes, bytes]
else:
    _HandlerBase = grpc.GenericRpcHandler
    Context = Any


# ---- the balancer ---------------------------------------------------------------------


class FakeBalancer(lb_grpc.LoadBalancerServicer):
    """Sends the server list the test sets to every BalanceLoad stream."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.stats: list[lb_pb2.ClientStats] = []
        self._message: lb_pb2.LoadBalanceResponse | None = None
        self._changed = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeBalancer:
        server = grpc.aio.server()
        lb_grpc.add_LoadBalancerServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    def set_list(self, servers: Sequence[tuple[str, int, str]]) -> None:
        """Entries (ip, port, token); `DROP` for a drop entry."""
        entries = []
        for ip, port, token in servers:
            if (ip, port) == ("", 0):
                entries.append(lb_pb2.Server(drop=True, load_balance_token=token))
            else:
                entries.append(
                    lb_pb2.Server(
                        ip_address=bytes(int(part) for part in ip.split(".")),
                        port=port,
                        load_balance_token=token,
                    )
                )
        self._publish(lb_pb2.LoadBalanceResponse(server_list=lb_pb2.ServerList(servers=entries)))

    def send_fallback(self) -> None:
        self._publish(lb_pb2.LoadBalanceResponse(fallback_response=lb_pb2.FallbackResponse()))

    def _publish(self, message: lb_pb2.LoadBalanceResponse) -> None:
        self._message = message
        self._changed.set()
        self._changed = asyncio.Event()

    async def BalanceLoad(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[lb_pb2.LoadBalanceResponse]:
        async for first in request_iterator:
            self.names.append(first.initial_request.name)
            break
        yield lb_pb2.LoadBalanceResponse(initial_response=lb_pb2.InitialLoadBalanceResponse())
        sent: lb_pb2.LoadBalanceResponse | None = None
        while True:
            changed = self._changed
            if self._message is not None and self._message is not sent:
                sent = self._message
                yield sent
            await changed.wait()


# ---- the backends -----------------------------------------------------------------------


@dataclass
class Received:
    """One call a probe backend received."""

    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    time_remaining: float | None
    started: float = field(default_factory=time.monotonic)
    messages: list[bytes] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False

    def value(self, key: str) -> str | bytes | None:
        for k, v in self.metadata:
            if k == key:
                return v
        return None


class ProbeBackend(_HandlerBase):
    def __init__(self, name: str, *, refuse: bool = False, refuse_calls: int = 0) -> None:
        self.name = name
        self.refuse = refuse
        self.refuse_calls = refuse_calls
        self.calls: list[Received] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._call_event = asyncio.Event()
        behaviours: dict[str, Callable[[Received, Context], Awaitable[None]]] = {
            UNARY: self._unary,
            SERVER_STREAM: self._server_stream,
            CLIENT_STREAM: self._client_stream,
            BIDI: self._bidi,
            FAIL: self._fail,
            SLOW: self._slow,
            SERVER_FIRST: self._server_first,
        }
        self._handlers = {
            method: grpc.stream_stream_rpc_method_handler(self._wrap(method, behaviour))
            for method, behaviour in behaviours.items()
        }

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def entry(self, token: str | None = None) -> tuple[str, int, str]:
        return ("127.0.0.1", self.port, self.name if token is None else token)

    async def start(self, port: int = 0) -> ProbeBackend:
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", -1), ("grpc.so_reuseport", 0)]
        )
        server.add_generic_rpc_handlers((self,))
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        self._server = server
        return self

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handlers.get(handler_call_details.method)

    async def wait_calls(self, n: int, limit: float = 5.0) -> None:
        """Until `n` calls arrived (TimeoutError after `limit` seconds)."""
        async with asyncio.timeout(limit):
            while len(self.calls) < n:
                event = self._call_event
                await event.wait()

    def messages(self) -> list[bytes]:
        return [m for call in self.calls for m in call.messages]

    def _wrap(
        self, method: str, behaviour: Callable[[Received, Context], Awaitable[None]]
    ) -> Callable[[object, Context], Awaitable[None]]:
        async def handle(_requests: object, context: Context) -> None:
            record = Received(
                method,
                tuple((k, v) for k, v in (context.invocation_metadata() or ())),
                context.time_remaining(),
            )
            self.calls.append(record)

            def on_done(ctx: Context) -> None:
                record.cancelled = record.cancelled or ctx.cancelled()

            context.add_done_callback(on_done)  # type: ignore[arg-type]  # stub is a class
            self._call_event.set()
            self._call_event = asyncio.Event()
            refuse = self.refuse or len(self.calls) <= self.refuse_calls
            try:
                if refuse:
                    while (message := await context.read()) is not _EOF:
                        record.messages.append(message)
                    context.set_code(grpc.StatusCode.UNAVAILABLE)
                    context.set_details(f"{self.name} refuses")
                    return
                await behaviour(record, context)
                record.finished = True
            except asyncio.CancelledError:
                record.cancelled = True
                raise

        return handle

    async def _read_all(self, record: Received, context: Context) -> None:
        while (message := await context.read()) is not _EOF:
            record.messages.append(message)

    async def _unary(self, record: Received, context: Context) -> None:
        await self._read_all(record, context)
        await context.send_initial_metadata((("x-init", self.name),))
        await context.write(f"{self.name}:".encode() + b"".join(record.messages))
        context.set_trailing_metadata((("x-trail", self.name), ("x-trail-bin", b"\x00\xff")))

    async def _server_stream(self, record: Received, context: Context) -> None:
        await self._read_all(record, context)
        for i in range(int(record.messages[0])):
            await context.write(str(i).encode())

    async def _client_stream(self, record: Received, context: Context) -> None:
        await self._read_all(record, context)
        size = sum(len(m) for m in record.messages)
        await context.write(f"{self.name}:{len(record.messages)}:{size}".encode())

    async def _bidi(self, record: Received, context: Context) -> None:
        while (message := await context.read()) is not _EOF:
            record.messages.append(message)
            await context.write(message)
        # A cancelled stream also reads as EOF here; its cancellation lands
        # during this pause (and is recorded), a half-closed one finishes.
        await asyncio.sleep(0.1)

    async def _fail(self, record: Received, context: Context) -> None:
        await self._read_all(record, context)
        text = record.messages[0].decode()
        if text.startswith("!"):  # answer with response headers first: the call was taken
            await context.send_initial_metadata((("x-init", self.name),))
            text = text[1:]
        code_name, _, details = text.partition(":")
        context.set_trailing_metadata((("x-why", details),))
        context.set_code(grpc.StatusCode[code_name])
        context.set_details(details)

    async def _server_first(self, record: Received, context: Context) -> None:
        await context.write(f"hello from {self.name}".encode())
        await self._bidi(record, context)

    async def _slow(self, record: Received, context: Context) -> None:
        await self._read_all(record, context)
        await asyncio.sleep(3600)
