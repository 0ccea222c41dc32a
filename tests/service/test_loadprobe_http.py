"""PrometheusLoadProbe against a real HTTP server on 127.0.0.1, and `lbserver
register` load options against a real in-process balancer."""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from structlog.testing import capture_logs

from lbserver.cli import build_parser
from lbserver.cli.register import build_registrar
from lbserver.domain.model import LoadReport
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.registrar import PrometheusLoadProbe
from lbserver.server import RunningServer
from tests.service.conftest import Harness
from tests.support.eventually import eventually

WAIT = 10.0


class MetricsServer:
    """Serves `page` (a function of the request number) at /metrics; `status`
    other than 200 answers with that error, `stall` holds requests until set."""

    def __init__(self) -> None:
        self.page: Callable[[int], str | bytes] = lambda n: ""
        self.status = 200
        self.requests = 0
        self.stall = threading.Event()
        self.stall.set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.requests += 1
                    number = server.requests
                    status, page = server.status, server.page
                server.stall.wait(WAIT)
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                if status != 200:
                    self.send_error(status)
                    return
                raw = page(number)
                body = raw if isinstance(raw, bytes) else raw.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def close(self) -> None:
        self.stall.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(WAIT)


@pytest.fixture
def metrics() -> Iterator[MetricsServer]:
    server = MetricsServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def page(cpu: float, requests: float, errors: float, inflight: int) -> str:
    return (
        "# TYPE process_cpu_seconds_total counter\n"
        f"process_cpu_seconds_total {cpu}\n"
        "# TYPE grpc_requests counter\n"
        f'grpc_requests_total{{method="collect"}} {requests}\n'
        f'grpc_requests_total{{method="report"}} {requests / 2}\n'
        "# TYPE grpc_errors counter\n"
        f"grpc_errors_total {errors}\n"
        "# TYPE grpc_inflight gauge\n"
        f"grpc_inflight {inflight}\n"
    )


def make_probe(
    url: str, clock: FakeClock, *, timeout: float = 2.0, min_interval: float = 0.0
) -> PrometheusLoadProbe:
    return PrometheusLoadProbe(
        url,
        requests_metric="grpc_requests_total",
        errors_metric="grpc_errors",
        inflight_metric="grpc_inflight",
        cpus=4,
        clock=clock,
        timeout=timeout,
        min_interval=min_interval,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_probe_reports_rates_from_a_live_endpoint(metrics: MetricsServer) -> None:
    clock = FakeClock()
    probe = make_probe(metrics.url, clock)
    # Request n: 2n CPU seconds, 100n + 50n requests, n errors, n in flight.
    metrics.page = lambda n: page(cpu=2 * n, requests=100 * n, errors=n, inflight=n)
    assert await probe() == LoadReport(in_flight=1)
    clock.now = 10.0
    assert await probe() == LoadReport(
        cpu_utilization=0.05, requests_per_second=15.0, errors_per_second=0.1, in_flight=2
    )
    clock.now = 12.0
    assert await probe() == LoadReport(
        cpu_utilization=0.25, requests_per_second=75.0, errors_per_second=0.5, in_flight=3
    )
    assert metrics.requests == 3


async def test_http_error_then_recovery(metrics: MetricsServer) -> None:
    clock = FakeClock()
    probe = make_probe(metrics.url, clock)
    metrics.page = lambda n: page(cpu=n, requests=10 * n, errors=0, inflight=0)
    with capture_logs() as logs:
        await probe()
        metrics.status = 503
        for step in (1, 2, 3):
            clock.now = step
            assert await probe() == LoadReport()
        metrics.status = 200
        clock.now = 4
        assert await probe() == LoadReport(in_flight=0)  # no baseline after a failure
        clock.now = 5
        report = await probe()
    assert (report.cpu_utilization, report.requests_per_second) == (0.25, 15.0)
    assert [(log["log_level"], log["event"]) for log in logs] == [
        ("warning", "load scrape failed; reporting unknown load until it works again"),
        ("info", "load scrape works again"),
    ]
    assert "503" in logs[0]["error"]


@pytest.mark.parametrize(
    "body", ["<html><body>Sign in</body></html>", "up{ 1 2 3\n", b"up \xff\xfe\n"]
)
async def test_unparsable_page_is_all_unknown(metrics: MetricsServer, body: str | bytes) -> None:
    probe = make_probe(metrics.url, FakeClock())
    metrics.page = lambda n: body
    with capture_logs() as logs:
        assert await probe() == LoadReport()
    assert [log["event"] for log in logs] == [
        "load scrape failed; reporting unknown load until it works again"
    ]


async def test_connection_refused_is_all_unknown() -> None:
    clock = FakeClock()
    probe = make_probe(f"http://127.0.0.1:{closed_port()}/metrics", clock)
    with capture_logs() as logs:
        assert await probe() == LoadReport()
        clock.now = 1
        assert await probe() == LoadReport()
    assert len(logs) == 1
    assert logs[0]["log_level"] == "warning"


async def test_wrong_path_is_all_unknown(metrics: MetricsServer) -> None:
    url = metrics.url.replace("/metrics", "/nothing")
    assert await make_probe(url, FakeClock())() == LoadReport()


async def test_stalled_endpoint_times_out(metrics: MetricsServer) -> None:
    probe = make_probe(metrics.url, FakeClock(), timeout=0.2)
    metrics.page = lambda n: page(cpu=n, requests=n, errors=n, inflight=n)
    metrics.stall.clear()
    with capture_logs() as logs:
        assert await probe() == LoadReport()
    metrics.stall.set()
    assert logs[0]["event"] == "load scrape failed; reporting unknown load until it works again"


async def test_calls_within_min_interval_share_one_scrape(metrics: MetricsServer) -> None:
    clock = FakeClock()
    probe = make_probe(metrics.url, clock, min_interval=1.5)
    metrics.page = lambda n: page(cpu=n, requests=n, errors=n, inflight=n)
    # Heartbeats to three balancers at once: one scrape.
    reports = await asyncio.gather(probe(), probe(), probe())
    assert list(reports) == [LoadReport(in_flight=1)] * 3
    assert metrics.requests == 1
    clock.now = 1.0
    assert await probe() == LoadReport(in_flight=1)
    assert metrics.requests == 1
    clock.now = 2.0
    report = await probe()
    assert metrics.requests == 2
    assert (report.requests_per_second, report.in_flight) == (0.75, 2)


# --- lbserver register against a real balancer -----------------------------


def register_args(running: RunningServer, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        [
            "register",
            "--balancer", f"127.0.0.1:{running.port}",
            "--service", "oap",
            "--backend", "10.0.0.7:11800",
            "--interval", "0.2",
            *extra,
        ]
    )  # fmt: skip


async def wait_for_load(
    harness: Harness, running: RunningServer, ready: Callable[[pb.LoadReport], bool]
) -> pb.LoadReport:
    """The load the balancer holds for the backend, once `ready` accepts it."""
    admin = pb_grpc.AdminStub(harness.channel(running))

    async def held() -> pb.LoadReport | None:
        state = await admin.GetState(pb.GetStateRequest(service="oap"))
        backends = [backend for service in state.services for backend in service.backends]
        return backends[0].load if backends and ready(backends[0].load) else None

    return await eventually(held, "the load at the balancer", within=WAIT)


async def test_register_sends_static_load(harness: Harness) -> None:
    running = await harness.start(heartbeat_interval=0.2)
    args = register_args(running, "--load-static", "cpu=0.5,rps=10")
    async with build_registrar(args):
        load = await wait_for_load(harness, running, lambda load: load.HasField("cpu_utilization"))
    assert (load.cpu_utilization, load.requests_per_second) == (0.5, 10.0)
    assert not load.HasField("errors_per_second") and not load.HasField("in_flight")


async def test_register_sends_scraped_load(harness: Harness, metrics: MetricsServer) -> None:
    # Every scrape sees more CPU seconds and requests, so every rate is > 0.
    metrics.page = lambda n: page(cpu=0.5 * n, requests=100 * n, errors=0, inflight=3)
    running = await harness.start(heartbeat_interval=0.2)
    args = register_args(
        running,
        "--load-url", metrics.url,
        "--requests-metric", 'grpc_requests_total{method="collect"}',
        "--inflight-metric", "grpc_inflight",
        "--cpus", "2",
    )  # fmt: skip
    async with build_registrar(args):
        load = await wait_for_load(
            harness, running, lambda load: load.HasField("requests_per_second")
        )
    assert load.cpu_utilization > 0 and load.requests_per_second > 0
    assert load.in_flight == 3
    # Not configured: unknown, not zero.
    assert not load.HasField("errors_per_second")
