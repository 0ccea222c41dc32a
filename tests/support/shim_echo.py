"""A four-method test service for the balanced channels, with real protobuf
messages (`google.protobuf.wrappers_pb2.StringValue`), and `EchoStub`, which is
what grpcio-tools would generate for it: a class calling
`channel.unary_unary(...)` etc. with the messages' (de)serializers.

`EchoBackend` is a sync `grpc.server` on 127.0.0.1 serving `shimtest.Echo`:

- `Unary(v)` -> `"<name>:<v>"`
- `ServerStream(v)` -> `int(v)` replies `"<name>:<i>"`
- `ClientStream(v...)` -> `"<name>:<count>:<joined values>"`
- `Bidi(v...)` -> `"<name>:<v>"` for each request

Every handler records the call (method, invocation metadata, the deadline it
saw) and sets trailing metadata `served-by: <name>`. A request value
`fail:<CODE>` makes the handler end with that status code, details
`asked to fail` and trailing metadata `why: asked`; `hang` makes it wait (at
most 10 s) until the client cancels or its deadline passes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Self

import grpc
from google.protobuf.wrappers_pb2 import StringValue

from tests.support.started import Started

SERVICE = "shimtest.Echo"
METHODS = ("Unary", "ServerStream", "ClientStream", "Bidi")


class EchoStub:
    """Exactly the shape of a generated stub."""

    def __init__(self, channel: Any) -> None:
        def path(name: str) -> str:
            return f"/{SERVICE}/{name}"

        codec: dict[str, Any] = {
            "request_serializer": StringValue.SerializeToString,
            "response_deserializer": StringValue.FromString,
            "_registered_method": True,
        }
        self.Unary = channel.unary_unary(path("Unary"), **codec)
        self.ServerStream = channel.unary_stream(path("ServerStream"), **codec)
        self.ClientStream = channel.stream_unary(path("ClientStream"), **codec)
        self.Bidi = channel.stream_stream(path("Bidi"), **codec)


@dataclass(frozen=True)
class Received:
    method: str
    metadata: dict[str, str] = field(hash=False)
    time_remaining: float | None


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {
        key: value.decode() if isinstance(value, bytes) else value
        for key, value in context.invocation_metadata()
    }


class EchoBackend(Started):
    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._calls: list[Received] = []
        self._server: grpc.Server | None = None
        self.port = 0

    def start(self) -> Self:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"echo-{self.name}"),
            options=[("grpc.so_reuseport", 0)],
        )
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(
                self._unary, StringValue.FromString, StringValue.SerializeToString
            ),
            "ServerStream": grpc.unary_stream_rpc_method_handler(
                self._server_stream, StringValue.FromString, StringValue.SerializeToString
            ),
            "ClientStream": grpc.stream_unary_rpc_method_handler(
                self._client_stream, StringValue.FromString, StringValue.SerializeToString
            ),
            "Bidi": grpc.stream_stream_rpc_method_handler(
                self._bidi, StringValue.FromString, StringValue.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(None).wait(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- what it saw ---------------------------------------------------------------

    def calls(self) -> list[Received]:
        with self._lock:
            return list(self._calls)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(c.method for c in self._calls)

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()

    # ---- handlers ------------------------------------------------------------------------

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._calls.append(Received(method, _metadata(context), context.time_remaining()))
        context.set_trailing_metadata((("served-by", self.name),))

    def _act(self, value: str, context: grpc.ServicerContext) -> None:
        if value.startswith("fail:"):
            context.set_trailing_metadata((("served-by", self.name), ("why", "asked")))
            context.abort(grpc.StatusCode[value.removeprefix("fail:")], "asked to fail")
        if value == "hang":
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)

    def _reply(self, text: str) -> StringValue:
        return StringValue(value=f"{self.name}:{text}")

    def _unary(self, request: StringValue, context: grpc.ServicerContext) -> StringValue:
        self._record("Unary", context)
        self._act(request.value, context)
        return self._reply(request.value)

    def _server_stream(
        self, request: StringValue, context: grpc.ServicerContext
    ) -> Iterator[StringValue]:
        self._record("ServerStream", context)
        self._act(request.value, context)
        for i in range(int(request.value)):
            yield self._reply(str(i))

    def _client_stream(
        self, requests: Iterable[StringValue], context: grpc.ServicerContext
    ) -> StringValue:
        self._record("ClientStream", context)
        values = []
        for request in requests:
            self._act(request.value, context)
            values.append(request.value)
        return self._reply(f"{len(values)}:{','.join(values)}")

    def _bidi(
        self, requests: Iterable[StringValue], context: grpc.ServicerContext
    ) -> Iterator[StringValue]:
        self._record("Bidi", context)
        for request in requests:
            self._act(request.value, context)
            yield self._reply(request.value)


def values(n: int, prefix: str = "m") -> list[StringValue]:
    return [StringValue(value=f"{prefix}{i}") for i in range(n)]
