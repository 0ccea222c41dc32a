"""Self-tests of the e2e harness (tests/support), without lbserver itself.

The last test runs gRPC's own grpclb client against a tiny in-test balancer,
found through the test DNS server: it proves the DNS records, channel options
and counting backends the e2e tests build on.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from dnslib import RCODE

from lbserver.proto.grpclb.v1 import load_balancer_pb2, load_balancer_pb2_grpc
from tests.support.backends import (
    CallLoop,
    CountingBackend,
    call_stub,
    call_until_served,
    grpclb_channel,
)
from tests.support.dns import DnsServer, query
from tests.support.eventually import eventually_blocking
from tests.support.processes import ProcessManager, free_port

from .conftest import FleetFactory

pytestmark = pytest.mark.timeout(60)


def test_dns_answers_srv_targets_and_fallback_addresses(dns_server: DnsServer) -> None:
    dns_server.set_balancers("svc.test", [("127.0.0.1", 4001), ("127.0.0.2", 4002)])
    dns_server.set_addresses("svc.test", ["127.0.0.1"])

    srv = query(dns_server, "_grpclb._tcp.svc.test", "SRV")
    targets = sorted((str(rr.rdata.target), rr.rdata.port) for rr in srv.rr)
    assert targets == [("lb0.svc.test.", 4001), ("lb1.svc.test.", 4002)]
    assert [str(rr.rdata) for rr in query(dns_server, "lb1.svc.test").rr] == ["127.0.0.2"]
    assert [str(rr.rdata) for rr in query(dns_server, "SVC.test.").rr] == ["127.0.0.1"]

    aaaa = query(dns_server, "svc.test", "AAAA")
    assert aaaa.header.rcode == RCODE.NOERROR
    assert aaaa.rr == []
    assert query(dns_server, "other.test").header.rcode == RCODE.NXDOMAIN

    # Records change at run time; old SRV target hosts go away with them.
    dns_server.set_balancers("svc.test", [("::1", 4003)])
    srv = query(dns_server, "_grpclb._tcp.svc.test", "SRV")
    assert [(str(rr.rdata.target), rr.rdata.port) for rr in srv.rr] == [("lb0.svc.test.", 4003)]
    assert [str(rr.rdata) for rr in query(dns_server, "lb0.svc.test", "AAAA").rr] == ["::1"]
    assert query(dns_server, "lb1.svc.test").header.rcode == RCODE.NXDOMAIN
    dns_server.remove("svc.test")
    assert query(dns_server, "svc.test").header.rcode == RCODE.NXDOMAIN
    assert ("_grpclb._tcp.svc.test", "SRV") in {(q.name, q.qtype) for q in dns_server.queries()}


def test_dns_server_is_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        DnsServer(host="0.0.0.0")


def test_counting_backend_records_tokens(backend_fleet: FleetFactory) -> None:
    fleet = backend_fleet(2)
    with grpc.insecure_channel(fleet[0].address) as channel:
        stub = call_stub(channel)
        assert stub(b"x", timeout=5, metadata=(("lb-token", "tok-a"),)) == b"backend-0"
        stub(b"x", timeout=5)
    assert fleet.counts() == [2, 0]
    assert fleet[0].tokens() == {"tok-a": 1, None: 1}
    t = time.monotonic()
    assert fleet[0].calls_since(t) == 0
    assert fleet[0].wait_for_calls(2, timeout=0.1)
    assert not fleet[1].wait_for_calls(1, timeout=0.1)
    fleet.reset()
    assert fleet.total() == 0


class _FakeBalancer(load_balancer_pb2_grpc.LoadBalancerServicer):
    """Sends one server list (backend i listed weights[i] times, token f"t{i}")."""

    def __init__(self, backends: list[CountingBackend], weights: list[int]) -> None:
        self.names: list[str] = []
        self._backends = backends
        self._weights = weights

    def BalanceLoad(
        self,
        request_iterator: Iterator[load_balancer_pb2.LoadBalanceRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[load_balancer_pb2.LoadBalanceResponse]:
        first = next(request_iterator)
        self.names.append(first.initial_request.name)
        yield load_balancer_pb2.LoadBalanceResponse(
            initial_response=load_balancer_pb2.InitialLoadBalanceResponse()
        )
        servers = []
        for i, (b, w) in enumerate(zip(self._backends, self._weights, strict=True)):
            servers += [
                load_balancer_pb2.Server(
                    ip_address=socket.inet_aton(b.host), port=b.port, load_balance_token=f"t{i}"
                )
            ] * w
        yield load_balancer_pb2.LoadBalanceResponse(
            server_list=load_balancer_pb2.ServerList(servers=servers)
        )
        # Holds the stream open until the client or the server ends it.
        ended = threading.Event()
        if context.add_callback(ended.set):
            ended.wait()


def test_native_grpclb_client_with_fake_balancer(
    dns_server: DnsServer, backend_fleet: FleetFactory
) -> None:
    fleet = backend_fleet(2)
    fallback = backend_fleet(1, prefix="fallback")[0]
    fake = _FakeBalancer(list(fleet), [1, 3])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    load_balancer_pb2_grpc.add_LoadBalancerServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        dns_server.set_balancers("svc.test", [("127.0.0.1", port)])
        dns_server.set_addresses("svc.test", ["127.0.0.1"])
        with grpclb_channel(dns_server.target("svc.test", fallback.port)) as channel:
            stub = call_stub(channel)
            call_until_served(stub, list(fleet), timeout=15)
            fleet.reset()
            for _ in range(100):
                stub(b"x", timeout=5)
        assert fleet.counts() == [25, 75]
        assert fleet[0].tokens() == {"t0": 25}
        assert fleet[1].tokens() == {"t1": 75}
        assert fallback.count == 0
        assert fake.names[0] == f"svc.test:{fallback.port}"
    finally:
        server.stop(None).wait(5)


def test_call_loop_counts_successes_and_failures(backend_fleet: FleetFactory) -> None:
    backend = backend_fleet(1)[0]
    with grpc.insecure_channel(backend.address) as channel, CallLoop(call_stub(channel)) as loop:
        assert backend.wait_for_calls(5, timeout=10)
        backend.stop()
        eventually_blocking(lambda: loop.snapshot()[1], "a failed call", within=10)
    successes, failures = loop.snapshot()
    assert successes >= 4  # the 5th may be cut off by the stop
    assert failures
    assert failures[0].code == grpc.StatusCode.UNAVAILABLE


def test_process_manager_reports_a_dead_process() -> None:
    with ProcessManager() as manager:
        proc = manager.start_balancer(args=["--no-such-flag"], wait=False)
        with pytest.raises(Exception, match=r"exited with code|not SERVING"):
            proc.wait_healthy(timeout=20)
        assert not proc.alive()
        assert proc.returncode != 0
        assert "--no-such-flag" in proc.logs()  # the command line heads the log


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
