"""The registrar's side of one Registry.HeartbeatStream.

Heartbeats are written as they come. The balancer answers only news (the
first heartbeat of a backend, a changed outcome) and heartbeats that ask
with a reply_token; a background task reads the answers, completes the
waiting sends and hands the news to a callback.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import grpc

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc

_Call = grpc.aio.StreamStreamCall[pb.HeartbeatRequest, pb.HeartbeatStreamResponse]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a unary Heartbeat would have raised, so that failures are
    handled alike whichever way the heartbeat went."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, "")


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def refusal(answer: pb.HeartbeatStreamResponse) -> grpc.aio.AioRpcError | None:
    """The error of an answer that refuses its heartbeat; None if accepted."""
    if answer.code == grpc.StatusCode.OK.value[0]:
        return None
    return rpc_error(_CODES.get(answer.code, grpc.StatusCode.UNKNOWN), answer.message)


class HeartbeatStream:
    def __init__(
        self,
        stub: pb_grpc.RegistryAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        on_news: Callable[[pb.HeartbeatStreamResponse], None],
    ) -> None:
        # No request iterator: heartbeats are written one by one.
        self._call: _Call = stub.HeartbeatStream(None, metadata=metadata)
        self._on_news = on_news
        self._tokens = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[pb.HeartbeatStreamResponse]] = {}
        self._error: grpc.aio.AioRpcError | None = None
        self._reader = asyncio.create_task(self._read(), name="heartbeat stream reader")

    @property
    def ended(self) -> bool:
        return self._error is not None or self._call.done()

    async def send(
        self, request: pb.HeartbeatRequest, *, reply_within: float | None
    ) -> pb.HeartbeatStreamResponse | None:
        """Writes one heartbeat; with reply_within, asks for its answer and
        waits that long for it. AioRpcError when the stream failed."""
        if self._error is not None:
            raise self._error
        token = 0
        if reply_within is not None:
            token = request.reply_token = next(self._tokens)
            self._waiting[token] = asyncio.get_running_loop().create_future()
        try:
            try:
                await self._call.write(request)
            except asyncio.InvalidStateError:
                # Written to a stream that had already ended.
                raise await self._ending() from None
            if not token:
                return None
            try:
                return await asyncio.wait_for(self._waiting[token], reply_within)
            except TimeoutError:
                raise rpc_error(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "no heartbeat answer in time"
                ) from None
        finally:
            self._waiting.pop(token, None)

    async def _ending(self) -> grpc.aio.AioRpcError:
        if self._error is None:
            code = await self._call.code()
            if code == grpc.StatusCode.OK:
                code = grpc.StatusCode.UNAVAILABLE
            self._error = rpc_error(code, await self._call.details() or "heartbeat stream ended")
        return self._error

    async def _read(self) -> None:
        try:
            while True:
                reply = await self._call.read()
                if not isinstance(reply, pb.HeartbeatStreamResponse):
                    break
                waiting = self._waiting.get(reply.reply_token) if reply.reply_token else None
                if waiting is not None and not waiting.done():
                    waiting.set_result(reply)
                else:
                    self._on_news(reply)
        except grpc.aio.AioRpcError as err:
            self._error = err
        except asyncio.InvalidStateError:
            pass
        error = self._error or await self._ending()
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(error)

    def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
