"""Fuzzing every message of the balancer's API against a live `lbserver
serve`: Registry (Heartbeat, HeartbeatStream, Deregister), Admin (GetState)
and grpclb's BalanceLoad, with random fields, sizes and sequences (and bytes
that do not decode), with a valid, wrong, malformed or missing token.

Every call must end with one of the statuses docs/operations.md documents —
never UNKNOWN, INTERNAL or a crash — the balancer must stay healthy and
answer GetState afterwards, and its memory must stay bounded."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.support.processes import BalancerProcess, ProcessManager
from tests.support.proto_strategies import payload

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TOKEN = "fuzz-token-0123456789"
# What a call may end with (docs/operations.md, "Errors and limits").
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    # The client's own deadline on streams the balancer keeps open.
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
TOKENS = st.sampled_from(
    [
        (("authorization", f"Bearer {TOKEN}"),),
        (("authorization", "Bearer wrong"),),
        (("authorization", "Basic abc"),),
        (),
    ]
)
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _identity(data: bytes) -> bytes:
    return data


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[BalancerProcess, grpc.Channel, int]]:
    with ProcessManager() as processes:
        balancer = processes.start_balancer(
            env={
                "LBSERVER_AUTH_TOKEN": TOKEN,
                "LBSERVER_STARTUP_GRACE": "0",
                "LBSERVER_INITIAL_REQUEST_TIMEOUT": "1",
                "LBSERVER_HEARTBEAT_RATE_PER_PEER": "0",
            }
        )
        channel = grpc.insecure_channel(balancer.address)
        yield balancer, channel, _rss_kib(balancer.pid)
        channel.close()


def _unary(
    channel: grpc.Channel, method: str, data: bytes, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    call = channel.unary_unary(
        method, request_serializer=_identity, response_deserializer=_identity
    )
    try:
        call(data, metadata=metadata, timeout=5)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def _stream(
    channel: grpc.Channel, method: str, messages: list[bytes], metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    call = channel.stream_stream(
        method, request_serializer=_identity, response_deserializer=_identity
    )
    try:
        for _ in call(iter(messages), metadata=metadata, timeout=2):
            pass
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def _check(status: grpc.StatusCode, what: str) -> None:
    assert status in DOCUMENTED, f"{what} ended with {status.name}"


@SETTINGS
@given(
    method=st.sampled_from(
        [
            ("/lbserver.v1.Registry/Heartbeat", pb.HeartbeatRequest.DESCRIPTOR),
            ("/lbserver.v1.Registry/Deregister", pb.DeregisterRequest.DESCRIPTOR),
            ("/lbserver.v1.Admin/GetState", pb.GetStateRequest.DESCRIPTOR),
        ]
    ),
    data=st.data(),
    metadata=TOKENS,
)
def test_unary_calls_end_with_documented_statuses(
    live: tuple[BalancerProcess, grpc.Channel, int],
    method: tuple[str, Descriptor],
    data: st.DataObject,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    _, channel, _ = live
    name, descriptor = method
    message = data.draw(payload(descriptor))
    _check(_unary(channel, name, message, metadata), name)


@SETTINGS
@given(
    method=st.sampled_from(
        [
            ("/lbserver.v1.Registry/HeartbeatStream", pb.HeartbeatRequest.DESCRIPTOR),
            ("/grpc.lb.v1.LoadBalancer/BalanceLoad", lb.LoadBalanceRequest.DESCRIPTOR),
        ]
    ),
    data=st.data(),
    metadata=TOKENS,
)
def test_streams_end_with_documented_statuses(
    live: tuple[BalancerProcess, grpc.Channel, int],
    method: tuple[str, Descriptor],
    data: st.DataObject,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    _, channel, _ = live
    name, descriptor = method
    messages = data.draw(st.lists(payload(descriptor), max_size=6))
    if name.endswith("BalanceLoad") and data.draw(st.booleans()):
        # Mostly a real initial request first, so that stats get through.
        initial = lb.LoadBalanceRequest(
            initial_request=lb.InitialLoadBalanceRequest(
                name=data.draw(st.sampled_from(["oap", "x" * 300]))
            )
        )
        messages.insert(0, initial.SerializeToString())
    _check(_stream(channel, name, messages, metadata), name)


def test_the_balancer_is_healthy_and_bounded_after_the_fuzzing(
    live: tuple[BalancerProcess, grpc.Channel, int],
) -> None:
    """Runs last in this module (pytest keeps file order)."""
    balancer, _, rss_before = live
    assert balancer.alive()
    assert balancer.health() == health_pb2.HealthCheckResponse.SERVING
    channel = live[1]
    state = pb_grpc.AdminStub(channel).GetState(
        pb.GetStateRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10
    )
    assert state.version
    grown_mib = (_rss_kib(balancer.pid) - rss_before) / 1024
    assert grown_mib < 64, f"RSS grew by {grown_mib:.0f} MiB"
