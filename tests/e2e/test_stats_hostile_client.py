"""A hostile grpclb client against a real `lbserver serve`: int64-max counters
and 200,000 made-up drop tokens in its ClientStats. The balancer's memory
stays put (RSS from /proc) and `lbserver status --json` keeps working."""

from __future__ import annotations

import json
import queue
import random
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from lbserver.domain.clientstats import INT64_MAX, MAX_CALLS_PER_REPORT
from lbserver.domain.serverlist import DROP_TOKEN
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb
from lbserver.proto.grpclb.v1 import load_balancer_pb2_grpc as lb_grpc
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.e2e.conftest import E2E_BALANCER_ENV
from tests.support.processes import REPO_ROOT, BalancerProcess, ProcessManager, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TOKENS = 200_000
# ~0.85 MB a message, under the balancer's 1 MiB message limit; 8 messages,
# well within any per-stream message rate limit's burst.
PER_MESSAGE = 25_000
RSS_GROWTH_LIMIT = 60 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def stats_request(counters: int, dropped: dict[str, int]) -> lb.LoadBalanceRequest:
    return lb.LoadBalanceRequest(
        client_stats=lb.ClientStats(
            num_calls_started=counters,
            num_calls_finished=counters,
            num_calls_finished_with_client_failed_to_send=counters,
            num_calls_finished_known_received=counters,
            calls_finished_with_drop=[
                lb.ClientStatsPerToken(load_balance_token=token, num_calls=calls)
                for token, calls in dropped.items()
            ],
        )
    )


def hostile_reports(token: str) -> Iterator[lb.LoadBalanceRequest]:
    """Twice the int64 maximum in every counter, and 200,000 made-up drop
    tokens with INT64_MAX dropped calls each."""
    rng = random.Random(99)
    alphabet = string.ascii_letters + string.digits
    for n in range(TOKENS // PER_MESSAGE):
        chunk = ("".join(rng.choices(alphabet, k=20)) for _ in range(PER_MESSAGE))
        dropped = dict.fromkeys(chunk, INT64_MAX)
        if n < 2:
            dropped.update({token: INT64_MAX, DROP_TOKEN: INT64_MAX})
        yield stats_request(INT64_MAX if n < 2 else 0, dropped)


def reports(balancer: BalancerProcess) -> int:
    try:
        state = balancer.service_state("oap")
    except grpc.RpcError:
        return -1
    return state.client_stats.reports if state is not None else -1


def test_hostile_client_stats_keep_memory_and_status_sane(processes: ProcessManager) -> None:
    balancer = processes.start_balancer(env=E2E_BALANCER_ENV)
    with balancer.channel() as channel:
        pb_grpc.RegistryStub(channel).Heartbeat(
            pb.HeartbeatRequest(
                service="oap",
                instance_id="pod-1",
                ip="10.0.0.1",
                port=11800,
                requested_ttl=duration_pb2.Duration(seconds=60),
            ),
            timeout=5,
        )
        requests: queue.Queue[lb.LoadBalanceRequest | None] = queue.Queue()
        call = lb_grpc.LoadBalancerStub(channel).BalanceLoad(iter(requests.get, None))
        responses = iter(call)
        requests.put(
            lb.LoadBalanceRequest(initial_request=lb.InitialLoadBalanceRequest(name="oap"))
        )
        assert next(responses).HasField("initial_response")
        token = next(responses).server_list.servers[0].load_balance_token
        assert reports(balancer) == 0
        before = rss_bytes(balancer.pid)

        sent = 0
        for request in hostile_reports(token):
            requests.put(request)
            sent += 1
        wait_until(lambda: reports(balancer) == sent, 60, 0.2, "every report to be counted")
        after = rss_bytes(balancer.pid)

        status = subprocess.run(
            [sys.executable, "-m", "lbserver", "status", "--balancer", balancer.address, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            env=balancer.env,
            check=False,
        )
        requests.put(None)  # the channel's close ends the call
    print(f"balancer RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    assert after - before < RSS_GROWTH_LIMIT
    assert status.returncode == 0, status.stderr
    (oap,) = json.loads(status.stdout)["services"]
    stats = oap["client_stats"]
    assert stats["calls_started"] == 2 * MAX_CALLS_PER_REPORT
    assert stats["calls_dropped_by_token"] == {
        DROP_TOKEN: 2 * MAX_CALLS_PER_REPORT,
        token: 2 * MAX_CALLS_PER_REPORT,
    }
    state = balancer.service_state("oap")
    assert state is not None and state.client_stats.drop_tokens_ignored == TOKENS
