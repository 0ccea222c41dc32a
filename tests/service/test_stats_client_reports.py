"""Hostile ClientStats on a real BalanceLoad stream (grpc.aio server on
127.0.0.1): int64-max counters and 200,000 made-up drop tokens leave
Admin.GetState working and small, and the stats go with their service."""

from __future__ import annotations

import random
import string

from lbserver.domain.clientstats import INT64_MAX, MAX_CALLS_PER_REPORT
from lbserver.domain.serverlist import DROP_TOKEN
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.service.conftest import Harness
from tests.service.test_balance_load import Stream, heartbeat
from tests.support.eventually import eventually

TOKENS = 200_000
# ~0.85 MB a message, under the server's 1 MiB message limit; 8 messages,
# well within any per-stream message rate limit's burst.
PER_MESSAGE = 25_000


def random_tokens(n: int) -> list[str]:
    rng = random.Random(20240501)
    alphabet = string.ascii_letters + string.digits
    return ["".join(rng.choices(alphabet, k=20)) for _ in range(n)]


def stats_message(
    counters: int = 0, dropped: dict[str, int] | None = None
) -> lb.LoadBalanceRequest:
    return lb.LoadBalanceRequest(
        client_stats=lb.ClientStats(
            num_calls_started=counters,
            num_calls_finished=counters,
            num_calls_finished_with_client_failed_to_send=counters,
            num_calls_finished_known_received=counters,
            calls_finished_with_drop=[
                lb.ClientStatsPerToken(load_balance_token=token, num_calls=calls)
                for token, calls in (dropped or {}).items()
            ],
        )
    )


async def state_once(admin: pb_grpc.AdminAsyncStub, service: str = "oap") -> pb.GetStateResponse:
    return await admin.GetState(pb.GetStateRequest(service=service))


async def test_hostile_reports_leave_get_state_working_and_bounded(harness: Harness) -> None:
    running = await harness.start()
    channel = harness.channel(running)
    await pb_grpc.RegistryStub(channel).Heartbeat(heartbeat("oap", 1))
    admin = pb_grpc.AdminStub(channel)
    token = (await state_once(admin)).services[0].backends[0].load_balance_token
    stream = Stream(channel)
    await stream.send_initial("oap")
    await stream.read()
    assert (await stream.read()).server_list.servers[0].load_balance_token == token
    # Twice the int64 maximum (as in the reports that broke GetState for
    # good), and the made-up tokens, INT64_MAX dropped calls each.
    noise = random_tokens(TOKENS)
    for n, start in enumerate(range(0, TOKENS, PER_MESSAGE)):
        dropped = dict.fromkeys(noise[start : start + PER_MESSAGE], INT64_MAX)
        if n < 2:
            dropped.update({token: INT64_MAX, DROP_TOKEN: INT64_MAX})
        await stream.requests.put(stats_message(INT64_MAX if n < 2 else 0, dropped))
    reports = TOKENS // PER_MESSAGE

    async def all_reports() -> pb.GetStateResponse | None:
        state = await state_once(admin)
        return state if state.services[0].client_stats.reports == reports else None

    state = await eventually(all_reports, f"{reports} reports counted")
    stats = state.services[0].client_stats
    assert stats.reports == reports
    assert stats.calls_started == 2 * MAX_CALLS_PER_REPORT
    assert stats.calls_finished_known_received == 2 * MAX_CALLS_PER_REPORT
    assert dict(stats.calls_dropped_by_token) == {
        token: 2 * MAX_CALLS_PER_REPORT,
        DROP_TOKEN: 2 * MAX_CALLS_PER_REPORT,
    }
    assert stats.drop_tokens_ignored == TOKENS
    assert stats.calls_dropped_other_tokens == TOKENS * MAX_CALLS_PER_REPORT
    assert stats.counters_clamped == 2 * 6 + TOKENS
    assert state.ByteSize() < 2000
    # The whole state too, not just the service's.
    everything = await admin.GetState(pb.GetStateRequest())
    assert [s.name for s in everything.services] == ["oap"]

    # The service goes away (no backends, no clients): so do its stats.
    await pb_grpc.RegistryStub(channel).Deregister(
        pb.DeregisterRequest(service="oap", instance_id="pod-1")
    )
    assert (await stream.read()).HasField("fallback_response")
    await stream.requests.put(None)
    stream.call.cancel()
    assert (await admin.GetState(pb.GetStateRequest())).services == []
    # And it starts again from nothing when it comes back.
    await pb_grpc.RegistryStub(channel).Heartbeat(heartbeat("oap", 1))
    back = (await state_once(admin)).services[0].client_stats
    assert back == pb.ClientCallStats()
