"""What hostile clients can make a real server log: floods of refused calls
give a bounded number of lines and one suppression line, client-supplied
values are clipped, and an exposed unauthenticated Registry is announced."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from structlog.testing import LogCapture

from lbserver.logs import EVENTS_PER_WINDOW, LogLimiter
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.service.harness import Harness
from tests.support.log_capture import captured_logs

HEARTBEAT = pb.HeartbeatRequest(service="oap", instance_id="a", ip="10.0.0.1", port=11800)
MEBIBYTE = 1024 * 1024
SUPPRESSING = LogLimiter.SUPPRESSING


@pytest.fixture
def events() -> Iterator[LogCapture]:
    with captured_logs() as capture:
        yield capture


def named(capture: LogCapture, event: str) -> list[dict[str, Any]]:
    return [dict(entry) for entry in capture.entries if entry["event"] == event]


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def logged_bytes(capture: LogCapture) -> int:
    """The size of the captured lines as the JSON renderer would write them."""
    return sum(len(json.dumps(entry, default=str)) + 1 for entry in capture.entries)


async def test_a_bad_token_flood_logs_a_bounded_number_of_lines(
    harness: Harness, events: LogCapture
) -> None:
    running = await harness.start(auth_token="right", heartbeat_rate_per_peer=0.0)
    registry = pb_grpc.RegistryStub(harness.channel(running))
    labels = {"call": "heartbeat", "reason": "wrong_token"}
    before = sample("lbserver_auth_failures_total", labels)
    suppressed_before = sample("lbserver_log_events_suppressed_total", {"event": "auth failure"})
    for _ in range(300):
        with pytest.raises(grpc.aio.AioRpcError):
            await registry.Heartbeat(HEARTBEAT, metadata=(("authorization", "Bearer wrong"),))
    assert len(named(events, "auth failure")) == EVENTS_PER_WINDOW
    suppressing = named(events, SUPPRESSING)
    assert [entry["kind"] for entry in suppressing] == ["auth failure"]
    # The metrics carry the totals.
    assert sample("lbserver_auth_failures_total", labels) - before == 300
    suppressed = sample("lbserver_log_events_suppressed_total", {"event": "auth failure"})
    assert suppressed - suppressed_before == 300 - EVENTS_PER_WINDOW


async def test_a_rejected_stream_flood_logs_a_bounded_number_of_lines(
    harness: Harness, events: LogCapture
) -> None:
    running = await harness.start()
    channel = harness.channel(running)
    for _ in range(100):
        call = channel.stream_stream(
            "/grpc.lb.v1.LoadBalancer/BalanceLoad",
            lb.LoadBalanceRequest.SerializeToString,
            lb.LoadBalanceResponse.FromString,
        )(iter([lb.LoadBalanceRequest(client_stats=lb.ClientStats())]))
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in call:
                pass
    assert len(named(events, "rejected BalanceLoad stream")) == EVENTS_PER_WINDOW
    assert [e["kind"] for e in named(events, SUPPRESSING)] == ["rejected BalanceLoad stream"]


async def test_huge_client_names_are_clipped_in_the_log(
    harness: Harness, events: LogCapture
) -> None:
    """20 heartbeats with a 1 MB service name (unary and streamed) and one
    with a 1 MB address: well under 1 MiB of log, each value named by its
    prefix, length and hash."""
    running = await harness.start(heartbeat_rate_per_peer=0.0)
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    service = "oap" + "x" * 1_000_000
    for _ in range(10):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await registry.Heartbeat(pb.HeartbeatRequest(service=service, ip="10.0.0.1", port=1))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stream = registry.HeartbeatStream(None)
    for token in range(10):
        await stream.write(
            pb.HeartbeatRequest(service=service, ip="10.0.0.1", port=1, reply_token=token + 1)
        )
        reply = await stream.read()
        assert isinstance(reply, pb.HeartbeatStreamResponse)
        assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    stream.cancel()
    assert logged_bytes(events) < MEBIBYTE
    rejected = named(events, "heartbeat rejected")
    assert rejected
    assert rejected[0]["service"].startswith("oapxxx")
    assert "(1000003 bytes, sha256:" in rejected[0]["service"]
    # An error message that embeds the value (the address) is clipped too,
    # in the log and in the status (whole, it was more than gRPC's metadata
    # limit: the client got RESOURCE_EXHAUSTED "Stream removed").
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await registry.Heartbeat(pb.HeartbeatRequest(service="oap", ip="1" * 1_000_000, port=1))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.value.details() or "") < 1024
    assert logged_bytes(events) < MEBIBYTE


@pytest.mark.parametrize(
    ("changes", "exposed"),
    [
        ({"listen": "0.0.0.0:0"}, True),
        ({"listen": "0.0.0.0:0", "auth_token": "t"}, False),
        ({"listen": "127.0.0.1:0"}, False),
        ({"listen": "localhost:0"}, False),
    ],
)
async def test_an_unauthenticated_registry_on_the_network_is_announced(
    harness: Harness, events: LogCapture, changes: dict[str, Any], exposed: bool
) -> None:
    await harness.start(None, **changes)
    warnings = [
        entry
        for entry in events.entries
        if entry["log_level"] == "warning" and "WITHOUT AUTHENTICATION" in entry["event"]
    ]
    assert len(warnings) == (1 if exposed else 0)
    assert sample("lbserver_registry_unauthenticated") == (1.0 if exposed else 0.0)
