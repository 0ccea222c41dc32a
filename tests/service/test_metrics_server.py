"""The metrics server on real sockets (127.0.0.1): scrapes, HTTP errors, and
what it does against slow and too many clients."""

from __future__ import annotations

import asyncio
import errno
import gzip
import re
import resource
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from lbserver.metrics_server import MetricsServer, start_metrics_server
from tests.support.eventually import eventually

HOST = "127.0.0.1"
# Bounded waits: how long a test waits for something the server must do
# within a much shorter timeout (a loaded 2-core CI machine is slow).
PATIENCE = 20.0
ATTACKERS = 500


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("demo_scrapes", "A counter to scrape.", registry=registry).inc(7)
    return registry


@pytest.fixture
async def server(registry: CollectorRegistry) -> AsyncIterator[MetricsServer]:
    async with await start_metrics_server(HOST, 0, registry) as running:
        yield running


@pytest.fixture
def many_files() -> None:
    """Room for ATTACKERS connections, each end of them a descriptor here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * ATTACKERS + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def exchange(port: int, data: bytes) -> bytes:
    """Sends `data` and reads everything until the server closes."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        return await asyncio.wait_for(closed(reader), PATIENCE)
    finally:
        writer.close()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


async def scrape(
    port: int, path: str = "/metrics", *extra: str
) -> tuple[int, dict[str, str], bytes]:
    request = "\r\n".join([f"GET {path} HTTP/1.1", "Host: lb", *extra, "Connection: close"])
    return split_response(await exchange(port, (request + "\r\n\r\n").encode()))


async def closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Polls the server's counters (it has no events to wait on)."""
    await eventually(condition, what, within=PATIENCE)


class Slowloris:
    """Connections that each send half a request line and stall; `answers`
    gets what the server sent on each before it closed it."""

    def __init__(self) -> None:
        self.answers: list[asyncio.Task[bytes]] = []
        self._writers: list[asyncio.StreamWriter] = []

    @classmethod
    async def attack(cls, port: int, count: int) -> Slowloris:
        attack = cls()
        for _ in range(count):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /metr")
            attack.answers.append(asyncio.create_task(closed(reader)))
            attack._writers.append(writer)  # a writer collected closes its socket
        return attack

    def closed_by_server(self) -> int:
        return sum(answer.done() for answer in self.answers)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        for answer in self.answers:
            answer.cancel()


# --- scrapes ---------------------------------------------------------------


async def test_scrape_returns_the_registry(server: MetricsServer) -> None:
    status, headers, body = await scrape(server.port)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert b"demo_scrapes_total 7.0" in body
    assert int(headers["content-length"]) == len(body)


async def test_scrape_negotiates_as_prometheus_client(server: MetricsServer) -> None:
    status, headers, body = await scrape(server.port, "/metrics", "Accept-Encoding: gzip")
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert b"demo_scrapes_total 7.0" in gzip.decompress(body)
    accept = "Accept: application/openmetrics-text; version=1.0.0"
    status, headers, body = await scrape(server.port, "/metrics", accept)
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    status, _, body = await scrape(server.port, "/metrics?name[]=nothing_here")
    assert status == 200 and b"demo_scrapes" not in body


async def test_scrape_sees_everything_before_it(
    server: MetricsServer, registry: CollectorRegistry
) -> None:
    counter = Counter("demo_events", "Counted between scrapes.", registry=registry)
    for n in range(1, 4):
        counter.inc()
        _, _, body = await scrape(server.port)
        assert f"demo_events_total {n}.0".encode() in body


class ThreadRecorder:
    """A collector like the balancer's: it must run on the event loop's
    thread, and records where and how often it runs."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def collect(self) -> Iterable[Metric]:
        self.threads.append(threading.get_ident())
        yield GaugeMetricFamily("demo_collections", "Collections so far.", len(self.threads))


async def test_collectors_run_on_the_event_loop_and_scrapes_share_them(
    server: MetricsServer, registry: CollectorRegistry
) -> None:
    recorder = ThreadRecorder()
    registry.register(recorder)
    results = await asyncio.gather(*(scrape(server.port) for _ in range(20)))
    assert all(status == 200 for status, _, _ in results)
    assert set(recorder.threads) == {threading.get_ident()}
    # 20 concurrent scrapes, each answered by a collection started after it
    # asked: one or two rounds of collection at most per wave of arrivals.
    assert len(recorder.threads) < 20


async def test_head_and_other_paths(server: MetricsServer) -> None:
    raw = await exchange(
        server.port, b"HEAD /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )
    status, headers, body = split_response(raw)
    assert status == 200 and int(headers["content-length"]) > 0 and body == b""
    status, _, body = await scrape(server.port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, _, body = await scrape(server.port, "/")
    assert status == 200 and b"/metrics" in body


# --- bad requests ----------------------------------------------------------


async def test_bad_request_is_400_and_closed(server: MetricsServer) -> None:
    status, headers, _ = split_response(await exchange(server.port, b"GARBAGE\r\n\r\n"))
    assert status == 400 and headers["connection"] == "close"
    status, _, _ = split_response(await exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert status == 400  # HTTP/1.1 without Host


async def test_wrong_path_is_404_and_the_connection_serves_on(server: MetricsServer) -> None:
    raw = await exchange(
        server.port,
        b"GET /nothing HTTP/1.1\r\nHost: lb\r\n\r\n"
        b"POST /metrics HTTP/1.1\r\nHost: lb\r\n\r\n"
        b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n",
    )
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]
    assert statuses == [404, 405, 200]
    assert b"Allow: GET, HEAD" in raw and b"demo_scrapes_total 7.0" in raw


async def test_oversized_head_is_431(registry: CollectorRegistry) -> None:
    async with await start_metrics_server(HOST, 0, registry, max_request_bytes=1024) as server:
        request = b"GET /metrics HTTP/1.1\r\nHost: lb\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
        status, _, _ = split_response(await exchange(server.port, request))
        assert status == 431


# --- slow and too many clients --------------------------------------------


async def test_slowloris_connections_are_closed_while_scrapes_go_on(
    registry: CollectorRegistry, many_files: None
) -> None:
    async with await start_metrics_server(
        HOST, 0, registry, header_timeout=3.0, max_connections=ATTACKERS + 10
    ) as server:
        attack = await Slowloris.attack(server.port, ATTACKERS)
        try:
            await wait_for(lambda: server.connections == ATTACKERS, "attackers not all held")
            status, _, body = await scrape(server.port)  # during the attack
            assert status == 200 and b"demo_scrapes_total 7.0" in body
            assert server.timed_out_connections == 0  # it was during the attack
            async with asyncio.timeout(PATIENCE):
                answers = await asyncio.gather(*attack.answers)
            assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers)
            assert server.timed_out_connections == ATTACKERS
            await wait_for(lambda: server.connections == 0, "connections left open")
        finally:
            attack.close()


async def test_past_the_cap_connections_are_closed_at_once(
    registry: CollectorRegistry, many_files: None
) -> None:
    cap = 64
    async with await start_metrics_server(
        HOST, 0, registry, header_timeout=PATIENCE * 3, max_connections=cap
    ) as server:
        attack = await Slowloris.attack(server.port, ATTACKERS)
        try:
            # Long before header_timeout, all but `cap` of them are closed.
            await wait_for(lambda: attack.closed_by_server() == ATTACKERS - cap, "not refused")
            assert server.refused_connections == ATTACKERS - cap
            assert server.connections == cap
            # A new connection is refused too, request or not.
            status = await exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n")
            assert status == b""
            assert server.refused_connections == ATTACKERS - cap + 1
            assert server.connections == cap
            assert attack.closed_by_server() == ATTACKERS - cap
        finally:
            attack.close()
        # Once the held ones go away, scrapes are served again.
        await wait_for(lambda: server.connections == 0, "attackers' connections left open")
        status_code, _, _ = await scrape(server.port)
        assert status_code == 200


async def test_a_trickle_does_not_extend_the_header_timeout(registry: CollectorRegistry) -> None:
    async with await start_metrics_server(HOST, 0, registry, header_timeout=1.0) as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        request = b"GET /metrics HTTP/1.1\r\nHost: lb\r\n" + b"X: y\r\n" * 10_000
        try:
            async with asyncio.timeout(PATIENCE):
                for byte in request:  # one byte every 10 ms: 10 minutes to send
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                    if reader.at_eof() or server.timed_out_connections:
                        break
        except ConnectionError:
            pass
        assert server.timed_out_connections == 1
        assert (await closed(reader)).startswith(b"HTTP/1.1 408 ")
        writer.close()


async def test_silent_and_idle_connections_are_closed(registry: CollectorRegistry) -> None:
    async with await start_metrics_server(
        HOST, 0, registry, header_timeout=1.0, idle_timeout=1.0
    ) as server:
        silent, silent_writer = await asyncio.open_connection(HOST, server.port)
        idle, idle_writer = await asyncio.open_connection(HOST, server.port)
        idle_writer.write(b"GET /healthz HTTP/1.1\r\nHost: lb\r\n\r\n")
        async with asyncio.timeout(PATIENCE):
            assert await closed(silent) == b""  # no request, no 408
            answer = await closed(idle)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok\n")
        silent_writer.close()
        idle_writer.close()


async def test_a_kept_alive_connection_gets_the_header_timeout_not_the_idle_one(
    registry: CollectorRegistry,
) -> None:
    async with await start_metrics_server(
        HOST, 0, registry, header_timeout=1.0, idle_timeout=PATIENCE * 3
    ) as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: lb\r\n\r\nGET /metr")
        async with asyncio.timeout(PATIENCE):
            answer = await closed(reader)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in answer
        writer.close()


async def test_a_client_that_does_not_read_is_closed(registry: CollectorRegistry) -> None:
    # Bigger than every socket buffer between the two ends.
    registry.register(BigCollector(size=16 * 1024 * 1024))
    async with await start_metrics_server(HOST, 0, registry, write_timeout=1.0) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, server.port))
        sock.send(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n")
        await wait_for(lambda: server.connections == 1, "never connected")
        await wait_for(lambda: server.connections == 0, "a stalled reader holds its connection")
        sock.close()


class BigCollector:
    def __init__(self, size: int) -> None:
        self.size = size

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("demo_big", "Padding.", labels=["pad"])
        pad = "x" * 1000
        for n in range(self.size // 1000):
            family.add_metric([f"{n}{pad}"], n)
        yield family


# --- listening and closing -------------------------------------------------


async def test_address_in_use_is_an_oserror_naming_it(registry: CollectorRegistry) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}") as error:
            await start_metrics_server(HOST, port, registry)
        assert error.value.errno == errno.EADDRINUSE


async def test_close_ends_connections_and_listening(registry: CollectorRegistry) -> None:
    server = await start_metrics_server(HOST, 0, registry, header_timeout=PATIENCE * 3)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    await wait_for(lambda: server.connections == 1, "never connected")
    await server.close()
    assert await asyncio.wait_for(closed(reader), PATIENCE) == b""
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, server.port)
