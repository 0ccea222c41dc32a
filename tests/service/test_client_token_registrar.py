"""lbserver.registrar with several registration tokens, against fake
Registry servers that accept only some tokens: unary heartbeats and
Deregister retry with the next token, stream opens likewise, each token at
most once per heartbeat, and a callable token source is followed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import grpc.aio
import pytest
from structlog.testing import capture_logs

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.registrar import Registrar
from tests.service.test_registrar import FakeRegistry, running, start_registry
from tests.support.eventually import eventually

pytestmark = pytest.mark.timeout(60)


def presented(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value if isinstance(value, str) else value.decode()
            return text.removeprefix("Bearer ")
    return ""


class TokenRegistry(FakeRegistry):
    """A fake balancer that checks the bearer token like lbserver: once per
    call, when it opens (a stream is checked only at its opening)."""

    def __init__(self, accepted: set[str]) -> None:
        super().__init__()
        self.accepted = accepted
        self.stream_tokens: list[str] = []
        self.unary_tokens: list[str] = []
        self.deregister_tokens: list[str] = []

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any], seen: list[str]) -> None:
        token = presented(context)
        seen.append(token)
        if token not in self.accepted:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong token")

    async def Heartbeat(
        self,
        request: pb.HeartbeatRequest,
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatResponse],
    ) -> pb.HeartbeatResponse:
        await self._check(context, self.unary_tokens)
        return await super().Heartbeat(request, context)

    async def HeartbeatStream(
        self,
        request_iterator: AsyncIterator[pb.HeartbeatRequest],
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatStreamResponse],
    ) -> AsyncIterator[pb.HeartbeatStreamResponse]:
        await self._check(context, self.stream_tokens)
        async for reply in super().HeartbeatStream(request_iterator, context):
            yield reply

    async def Deregister(
        self,
        request: pb.DeregisterRequest,
        context: grpc.aio.ServicerContext[pb.DeregisterRequest, pb.DeregisterResponse],
    ) -> pb.DeregisterResponse:
        await self._check(context, self.deregister_tokens)
        return await super().Deregister(request, context)


class UnaryOnlyTokenRegistry(TokenRegistry):
    """An lbserver from before HeartbeatStream, checking tokens."""

    HeartbeatStream = pb_grpc.RegistryServicer.HeartbeatStream  # type: ignore[assignment]


@contextlib.asynccontextmanager
async def serving(registry: FakeRegistry) -> AsyncIterator[str]:
    server, address = await start_registry(registry)
    try:
        yield address
    finally:
        await server.stop(None)


def registrar(
    address: str, token: str | Sequence[str] | Callable[[], Sequence[str]] | None
) -> Registrar:
    return Registrar([address], "oap", "127.0.0.1", 11800, interval=0.05, token=token)


async def test_unary_heartbeats_retry_with_the_next_token_and_keep_it() -> None:
    fake = UnaryOnlyTokenRegistry({"second"})
    async with serving(fake) as address:
        with capture_logs() as logs:
            async with running(registrar(address, ["first", "second"])):
                await eventually(lambda: len(fake.heartbeats) >= 3, "accepted heartbeats")
    assert fake.unary_tokens[:2] == ["first", "second"]
    assert set(fake.unary_tokens[2:]) == {"second"}  # the first token is not tried again
    assert fake.deregister_tokens == ["second"]
    assert fake.deregistrations
    assert not any(entry["event"] == "balancer rejected heartbeat" for entry in logs)
    switched = [e for e in logs if e["event"] == "switched registration token"]
    assert [(e["token_number"], e["tokens"]) for e in switched] == [(2, 2)]


async def test_each_token_at_most_once_per_heartbeat() -> None:
    fake = TokenRegistry(set())
    async with serving(fake) as address:
        with capture_logs() as logs:
            async with running(registrar(address, ("a", "b", "c"))):
                await eventually(lambda: len(fake.stream_tokens) >= 7, "three heartbeats")
    # Every heartbeat opens a stream with a, then b, then c; none twice.
    assert all(token == "abc"[i % 3] for i, token in enumerate(fake.stream_tokens))
    assert fake.heartbeats == []
    rejected = [e for e in logs if e["event"] == "balancer rejected heartbeat"]
    assert [e["code"] for e in rejected] == ["PERMISSION_DENIED"]


async def test_follows_a_callable_token_source() -> None:
    tokens = ["one"]
    fake = TokenRegistry({"two", "three"})
    async with serving(fake) as address, running(registrar(address, lambda: tokens)):
        await eventually(lambda: len(fake.stream_tokens) >= 2, "refused stream opens")
        assert fake.heartbeats == []
        tokens[:] = ["two", "one"]
        await eventually(lambda: bool(fake.heartbeats), "a heartbeat with the new token")
        assert fake.stream_tokens[-1] == "two"
        opened = fake.streams_opened
        # "two" leaves the source: the stream opened with it is replaced
        # by one opened with a token still offered.
        tokens[:] = ["three"]
        await eventually(lambda: fake.stream_tokens[-1] == "three", "a stream with three")
        assert fake.streams_opened == opened + 1
        before = len(fake.heartbeats)
        await eventually(lambda: len(fake.heartbeats) >= before + 3, "heartbeats go on")
    assert fake.stream_tokens.count("three") == 1  # one stream carries them all
    assert fake.deregister_tokens == ["three"]


async def test_a_failing_token_source_keeps_the_last_tokens() -> None:
    failing = False

    def tokens() -> Sequence[str]:
        if failing:
            raise OSError("secret store down")
        return ("t",)

    fake = UnaryOnlyTokenRegistry({"t"})
    async with serving(fake) as address:
        with capture_logs() as logs:
            async with running(registrar(address, tokens)):
                await eventually(lambda: bool(fake.heartbeats), "a heartbeat")
                failing = True
                before = len(fake.heartbeats)
                await eventually(lambda: len(fake.heartbeats) >= before + 3, "heartbeats go on")
                failing = False
    assert set(fake.unary_tokens) == {"t"}
    warnings = [e for e in logs if e["event"] == "token source failed; keeping the last tokens"]
    assert len(warnings) == 1


@pytest.mark.parametrize("token", [["a", ""], [""], ("a", 3)])
def test_a_token_sequence_must_hold_tokens(token: Any) -> None:
    with pytest.raises(ValueError, match=r"^token"):
        Registrar(["127.0.0.1:1"], "oap", "127.0.0.1", 11800, token=token)
