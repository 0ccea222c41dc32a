"""lbserver.registrar against fake Registry servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from structlog.testing import capture_logs

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.registrar import LoadReport, Registrar
from tests.support.eventually import eventually

WAIT = 10.0


class FakeRegistry(pb_grpc.RegistryServicer):
    def __init__(self, interval: float = 0.0, reject: grpc.StatusCode | None = None) -> None:
        self.heartbeats: list[pb.HeartbeatRequest] = []
        self.deregistrations: list[pb.DeregisterRequest] = []
        self.interval = interval
        self.reject = reject
        self.unary_calls = 0
        self.streams_opened = 0
        self.stream_answers = 0

    def _reply(self) -> pb.HeartbeatResponse:
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(self.interval * 1e9))
        return pb.HeartbeatResponse(
            granted_ttl=duration_pb2.Duration(seconds=9), heartbeat_interval=interval
        )

    async def Heartbeat(
        self,
        request: pb.HeartbeatRequest,
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatResponse],
    ) -> pb.HeartbeatResponse:
        self.unary_calls += 1
        self.heartbeats.append(request)
        if self.reject is not None:
            await context.abort(self.reject, "not today")
        return self._reply()

    async def HeartbeatStream(
        self,
        request_iterator: AsyncIterator[pb.HeartbeatRequest],
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatStreamResponse],
    ) -> AsyncIterator[pb.HeartbeatStreamResponse]:
        """Answers like lbserver: news (first heartbeat, changed outcome) and
        heartbeats that ask."""
        self.streams_opened += 1
        last: pb.HeartbeatStreamResponse | None = None
        async for request in request_iterator:
            self.heartbeats.append(request)
            if self.reject is not None:
                reply = pb.HeartbeatStreamResponse(code=self.reject.value[0], message="not today")
            else:
                reply = pb.HeartbeatStreamResponse(accepted=self._reply())
            if reply == last and not request.reply_token:
                continue
            last = pb.HeartbeatStreamResponse()
            last.CopyFrom(reply)
            reply.reply_token = request.reply_token
            self.stream_answers += 1
            yield reply

    async def Deregister(
        self,
        request: pb.DeregisterRequest,
        context: grpc.aio.ServicerContext[pb.DeregisterRequest, pb.DeregisterResponse],
    ) -> pb.DeregisterResponse:
        self.deregistrations.append(request)
        return pb.DeregisterResponse(removed=True)


class UnaryOnlyRegistry(FakeRegistry):
    """An lbserver from before HeartbeatStream: grpc's generated default
    answers UNIMPLEMENTED."""

    HeartbeatStream = pb_grpc.RegistryServicer.HeartbeatStream  # type: ignore[assignment]


async def start_registry(registry: FakeRegistry, port: int = 0) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_RegistryServicer_to_server(registry, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{bound}"


@contextlib.asynccontextmanager
async def running(registrar: Registrar) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(registrar.run())
    try:
        yield task
    finally:
        await registrar.stop()
        await task


@pytest.fixture(params=["stream", "unary-only"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeRegistry, str]]:
    fake = FakeRegistry() if request.param == "stream" else UnaryOnlyRegistry()
    server, address = await start_registry(fake)
    yield fake, address
    await server.stop(None)


async def test_heartbeat_carries_every_field(registry: tuple[FakeRegistry, str]) -> None:
    fake, address = registry
    registrar = Registrar(
        [address],
        "oap",
        "127.0.0.1",
        11800,
        weight=3,
        zone="zone-a",
        labels={"pod": "oap-0"},
        interval=30,
        ttl=45,
        load=lambda: LoadReport(cpu_utilization=0.25, in_flight=4),
    )
    async with running(registrar):
        await eventually(lambda: bool(fake.heartbeats), "a heartbeat")
    beat = fake.heartbeats[0]
    assert beat.service == "oap"
    assert beat.instance_id == "127.0.0.1:11800"
    assert (beat.ip, beat.port, beat.weight, beat.zone) == ("127.0.0.1", 11800, 3, "zone-a")
    assert dict(beat.labels) == {"pod": "oap-0"}
    assert beat.state == pb.BACKEND_STATE_SERVING
    assert beat.requested_ttl.ToNanoseconds() == 45 * 10**9
    assert beat.HasField("load")
    assert beat.load.HasField("cpu_utilization")
    assert beat.load.cpu_utilization == 0.25
    assert beat.load.HasField("in_flight")
    assert beat.load.in_flight == 4
    assert not beat.load.HasField("requests_per_second")
    assert not beat.load.HasField("errors_per_second")


async def test_without_load_or_ttl_those_fields_are_absent(
    registry: tuple[FakeRegistry, str],
) -> None:
    fake, address = registry
    registrar = Registrar([address], "oap", "::1", 11800, instance_id="oap-0", interval=30)
    async with running(registrar):
        await eventually(lambda: bool(fake.heartbeats), "a heartbeat")
    beat = fake.heartbeats[0]
    assert beat.instance_id == "oap-0"
    assert beat.ip == "::1"
    assert beat.weight == 1
    assert not beat.HasField("load")
    assert not beat.HasField("requested_ttl")


async def test_default_instance_id_of_an_ipv6_backend_is_bracketed() -> None:
    registrar = Registrar(["127.0.0.1:1"], "oap", "fd00::0007", 11800)
    assert registrar.ip == "fd00::7"
    assert registrar.instance_id == "[fd00::7]:11800"


async def test_async_load_callback(registry: tuple[FakeRegistry, str]) -> None:
    fake, address = registry

    async def load() -> LoadReport:
        return LoadReport(requests_per_second=12.5, errors_per_second=0.5)

    async with running(Registrar([address], "oap", "127.0.0.1", 11800, interval=30, load=load)):
        await eventually(lambda: bool(fake.heartbeats), "a heartbeat")
    beat = fake.heartbeats[0]
    assert beat.load.requests_per_second == 12.5
    assert beat.load.errors_per_second == 0.5
    assert not beat.load.HasField("cpu_utilization")


async def test_failing_load_callback_still_heartbeats(
    registry: tuple[FakeRegistry, str],
) -> None:
    fake, address = registry

    def load() -> LoadReport:
        raise RuntimeError("metrics unavailable")

    async with running(Registrar([address], "oap", "127.0.0.1", 11800, interval=30, load=load)):
        await eventually(lambda: bool(fake.heartbeats), "a heartbeat")
    assert not fake.heartbeats[0].HasField("load")


async def test_adopts_the_interval_the_balancer_gives(
    registry: tuple[FakeRegistry, str],
) -> None:
    fake, address = registry
    fake.interval = 0.05
    # With its own 60 s interval the registrar would send one heartbeat only.
    async with running(Registrar([address], "oap", "127.0.0.1", 11800, interval=60)):
        await eventually(lambda: len(fake.heartbeats) >= 3, "heartbeats at the reply's interval")


async def test_heartbeats_and_deregisters_with_every_balancer() -> None:
    fakes = [FakeRegistry(), FakeRegistry()]
    started = [await start_registry(fake) for fake in fakes]
    try:
        registrar = Registrar([a for _, a in started], "oap", "127.0.0.1", 11800, interval=30)
        async with running(registrar):
            await eventually(lambda: all(f.heartbeats for f in fakes), "heartbeats to both")
        for fake in fakes:
            assert [(d.service, d.instance_id) for d in fake.deregistrations] == [
                ("oap", "127.0.0.1:11800")
            ]
    finally:
        for server, _ in started:
            await server.stop(None)


async def test_stop_without_deregister(registry: tuple[FakeRegistry, str]) -> None:
    fake, address = registry
    registrar = Registrar([address], "oap", "127.0.0.1", 11800, interval=30)
    task = asyncio.create_task(registrar.run())
    await eventually(lambda: bool(fake.heartbeats), "a heartbeat")
    await registrar.stop(deregister=False)
    await task
    assert fake.deregistrations == []


async def test_registers_once_a_balancer_that_was_down_comes_up() -> None:
    fake = FakeRegistry()
    server, address = await start_registry(fake)
    port = int(address.rpartition(":")[2])
    await server.stop(None)
    attempts = 0

    def load() -> LoadReport:
        # Read for each heartbeat, before it is sent: counts the attempts.
        nonlocal attempts
        attempts += 1
        return LoadReport()

    with capture_logs() as logs:
        registrar = Registrar([address], "oap", "127.0.0.1", 11800, interval=0.5, load=load)

        def events(name: str) -> list[MutableMapping[str, Any]]:
            return [entry for entry in logs if entry["event"] == name]

        async with running(registrar):
            await eventually(lambda: bool(events("balancer unreachable")), "a failure logged")
            # Let it retry a few times while the balancer is still down: the
            # next attempt begins after the previous one's failure was handled.
            tried = attempts
            await eventually(lambda: attempts >= tried + 3, "retries while down")
            server, _ = await start_registry(fake, port)
            try:
                await eventually(lambda: bool(fake.heartbeats), "a heartbeat after the restart")
                await eventually(
                    lambda: bool(events("balancer reachable again")), "recovery logged"
                )
            finally:
                await server.stop(None)
    assert len(events("balancer unreachable")) == 1
    assert events("balancer unreachable")[0]["log_level"] == "warning"
    assert events("balancer unreachable")[0]["balancer"] == address


async def test_rejection_is_logged_once(registry: tuple[FakeRegistry, str]) -> None:
    fake, address = registry
    fake.reject = grpc.StatusCode.INVALID_ARGUMENT
    with capture_logs() as logs:
        registrar = Registrar([address], "oap", "127.0.0.1", 11800, interval=0.2)
        async with running(registrar):
            await eventually(lambda: len(fake.heartbeats) >= 3, "retries after a rejection")
    rejected = [entry for entry in logs if entry["event"] == "balancer rejected heartbeat"]
    assert len(rejected) == 1
    assert rejected[0]["code"] == "INVALID_ARGUMENT"


async def test_drain_sends_draining_at_once(registry: tuple[FakeRegistry, str]) -> None:
    fake, address = registry
    registrar = Registrar([address], "oap", "127.0.0.1", 11800, interval=60)
    async with running(registrar):
        await eventually(lambda: bool(fake.heartbeats), "a heartbeat")
        assert fake.heartbeats[-1].state == pb.BACKEND_STATE_SERVING
        assert await registrar.drain() == 1
        assert registrar.draining
        assert len(fake.heartbeats) == 2
        assert fake.heartbeats[-1].state == pb.BACKEND_STATE_DRAINING


async def test_async_with_runs_and_deregisters(registry: tuple[FakeRegistry, str]) -> None:
    fake, address = registry
    async with Registrar([address], "oap", "127.0.0.1", 11800, interval=30):
        await eventually(lambda: bool(fake.heartbeats), "a heartbeat")
    assert len(fake.deregistrations) == 1


async def test_stop_before_run_returns_at_once() -> None:
    registrar = Registrar(["127.0.0.1:1"], "oap", "127.0.0.1", 11800)
    await registrar.stop()
    await registrar.run()
    await registrar.stop()


async def test_run_twice_is_refused(registry: tuple[FakeRegistry, str]) -> None:
    fake, address = registry
    registrar = Registrar([address], "oap", "127.0.0.1", 11800, interval=30)
    async with running(registrar):
        await eventually(lambda: bool(fake.heartbeats), "running")
        with pytest.raises(RuntimeError, match="only once"):
            await registrar.run()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"balancers": []}, "balancers"),
        ({"balancers": ["nohost"]}, "balancers"),
        ({"balancers": ["h:0"]}, "balancers"),
        ({"balancers": "h:1"}, "balancers"),
        ({"service": ""}, "service"),
        ({"ip": "oap.local"}, "ip"),
        ({"ip": "0.0.0.0"}, "ip"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"weight": 0}, "weight"),
        ({"interval": 0}, "interval"),
        ({"interval": float("nan")}, "interval"),
        ({"ttl": 2.0}, "ttl"),
        ({"instance_id": ""}, "instance_id"),
        ({"labels": {"": "x"}}, "labels"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "balancers": ["127.0.0.1:11810"],
        "service": "oap",
        "ip": "10.0.0.1",
        "port": 11800,
        "interval": 3.0,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=f"^{message}"):
        Registrar(**arguments)


async def test_heartbeats_go_over_one_stream() -> None:
    fake = FakeRegistry()
    server, address = await start_registry(fake)
    try:
        registrar = Registrar([address], "oap", "127.0.0.1", 11800, interval=0.05)
        async with running(registrar):
            await eventually(lambda: len(fake.heartbeats) >= 4, "four heartbeats")
            assert await registrar.drain() == 1
        assert fake.streams_opened == 1
        assert fake.unary_calls == 0
        assert fake.heartbeats[-1].state == pb.BACKEND_STATE_DRAINING
        # Most heartbeats went unanswered: the first, every fifth and the
        # drain asked.
        asked = [h for h in fake.heartbeats if h.reply_token]
        assert fake.heartbeats[0].reply_token and fake.heartbeats[-1].reply_token
        assert len(asked) <= 2 + len(fake.heartbeats) // 5
        assert fake.stream_answers == len(asked)
        assert fake.deregistrations
    finally:
        await server.stop(None)


async def test_a_refused_heartbeat_keeps_the_stream() -> None:
    fake = FakeRegistry(reject=grpc.StatusCode.PERMISSION_DENIED)
    server, address = await start_registry(fake)
    try:
        with capture_logs() as logs:
            registrar = Registrar([address], "oap", "127.0.0.1", 11800, interval=0.2)
            async with running(registrar):
                await eventually(lambda: len(fake.heartbeats) >= 3, "retries after a refusal")
                fake.reject = None
                await eventually(
                    lambda: any(e["event"] == "balancer reachable again" for e in logs),
                    "accepted again",
                )
        assert fake.streams_opened == 1
        rejected = [entry for entry in logs if entry["event"] == "balancer rejected heartbeat"]
        assert [entry["code"] for entry in rejected] == ["PERMISSION_DENIED"]
    finally:
        await server.stop(None)


async def test_falls_back_to_unary_heartbeats_once() -> None:
    fake = UnaryOnlyRegistry()
    server, address = await start_registry(fake)
    try:
        with capture_logs() as logs:
            registrar = Registrar([address], "oap", "127.0.0.1", 11800, interval=0.05)
            async with running(registrar):
                await eventually(lambda: fake.unary_calls >= 3, "unary heartbeats")
        fallbacks = [e for e in logs if e["event"].startswith("balancer has no HeartbeatStream")]
        assert len(fallbacks) == 1
        assert not any(e["event"] == "balancer rejected heartbeat" for e in logs)
    finally:
        await server.stop(None)


async def test_a_restarted_balancer_gets_a_new_stream() -> None:
    fake = FakeRegistry()
    server, address = await start_registry(fake)
    port = int(address.rsplit(":", 1)[1])
    registrar = Registrar([address], "oap", "127.0.0.1", 11800, interval=0.1)
    try:
        async with running(registrar):
            await eventually(lambda: len(fake.heartbeats) >= 2, "heartbeats")
            await server.stop(None)
            before = len(fake.heartbeats)
            server, _ = await start_registry(fake, port)
            await eventually(lambda: len(fake.heartbeats) >= before + 2, "heartbeats again")
    finally:
        await server.stop(None)
    assert fake.streams_opened == 2
