"""A simulated OAP pod for bench/balance, run as its own process.

    python -m bench.balance.backend --listen 127.0.0.1:PORT --name b0 \\
        [--slots 4] [--service-time 0.05] [--service-dist fixed|exp] \\
        [--balancer HOST:PORT --service NAME [--interval 1] [--ttl 3]] \\
        [--pod-ip IP --telemetry-port PORT]

A grpc.aio server with one raw-bytes unary method, `/bench.Sim/Call`: the
handler takes one of `--slots` capacity slots (an asyncio semaphore, waiting
in line when all are taken) and holds it for `--service-time` seconds of
sleep (not CPU: the bench machine has 2 cores), so a backend with half the
slots has half the capacity. With `--service-dist exp` each hold is drawn
from an exponential distribution of that mean (seeded by the name) instead.

The backend measures itself, in 0.1 s buckets of `time.monotonic()` (one
clock for every process on the machine): calls that arrived, calls that
completed and busy slot-seconds.

With `--balancer` an in-process `lbserver.registrar.Registrar` heartbeats it to
lbserver and reports, each heartbeat, its utilization (busy slot-seconds /
(slots x wall seconds)) and completed requests/s since the previous heartbeat,
so lbserver's load-aware weights see the backend's real capacity.

With `--pod-ip IP --telemetry-port N` it is also a pod of mode (f): it serves
the same gRPC port on IP (its EndpointSlice address) and Prometheus text at
http://IP:N/metrics for lbserver's scrapes, the counters an OAP pod's
telemetry would have: `process_cpu_seconds_total` (busy slot-seconds over
slots, so that its rate per 1 CPU is the slot utilization the registrar
reports) and `bench_calls_completed_total`.

Control methods (raw bytes, JSON replies) for the bench driver:
`/bench.Control/Stats` (the buckets and registration times) and
`/bench.Control/Deregister` (Registrar.stop(): the backend leaves the lists but
keeps serving, as an OAP pod does while it drains). SIGTERM deregisters too,
then stops the server after a short grace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from lbserver.addresses import parse_host_port
from lbserver.domain.model import LoadReport
from lbserver.logs import configure_logging
from lbserver.registrar import Registrar

SIM_SERVICE = "bench.Sim"
CALL_METHOD = f"/{SIM_SERVICE}/Call"
CONTROL_SERVICE = "bench.Control"
STATS_METHOD = f"/{CONTROL_SERVICE}/Stats"
DEREGISTER_METHOD = f"/{CONTROL_SERVICE}/Deregister"
REQUESTS_METRIC = "bench_calls_completed_total"
BUCKET_SECONDS = 0.1
LAG_PERIOD = 0.02


async def probe_lag(record: Callable[[float, float], None], period: float = LAG_PERIOD) -> None:
    """Forever: sleeps `period` and calls record(now, lateness) with how much
    later than asked the event loop woke up. Seconds of lateness mean the
    process did not get a CPU (the machine is busy), not that the balancing
    is wrong."""
    while True:
        asked = time.monotonic() + period
        await asyncio.sleep(period)
        now = time.monotonic()
        record(now, max(0.0, now - asked))


@dataclass
class Meter:
    """Arrivals, completions and busy slot-seconds per time bucket, plus the
    running totals the load callback turns into rates."""

    slots: int
    clock: Callable[[], float] = time.monotonic
    origin: float = field(init=False)
    arrivals: list[int] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)  # worst event-loop lateness per bucket
    busy_total: float = 0.0
    completed_total: int = 0
    waiting: int = 0
    _holding: dict[int, float] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _last_sample: tuple[float, float, int] | None = None

    def __post_init__(self) -> None:
        self.origin = self.clock()

    def _bucket(self, now: float) -> int:
        index = int((now - self.origin) / BUCKET_SECONDS)
        while len(self.arrivals) <= index:
            self.arrivals.append(0)
            self.completed.append(0)
            self.busy.append(0.0)
            self.lag.append(0.0)
        return index

    def note_lag(self, now: float, lateness: float) -> None:
        index = self._bucket(now)
        self.lag[index] = max(self.lag[index], lateness)

    def arrived(self) -> None:
        self.arrivals[self._bucket(self.clock())] += 1
        self.waiting += 1

    def acquired(self) -> int:
        self.waiting -= 1
        holder = next(self._ids)
        self._holding[holder] = self.clock()
        return holder

    def abandoned(self) -> None:
        """A call cancelled while it waited for a slot."""
        self.waiting -= 1

    def released(self, holder: int, *, completed: bool) -> None:
        now = self.clock()
        held = now - self._holding.pop(holder)
        index = self._bucket(now)
        self.busy[index] += held
        self.busy_total += held
        if completed:
            self.completed[index] += 1
            self.completed_total += 1

    def load_report(self) -> LoadReport:
        """Utilization and completed calls/s since the previous report (the
        Registrar's load callback: one call per heartbeat).

        Both come from the calls that released their slot in the interval
        (busy time counted when a call ends, like the completion), so that a
        nearly idle interval holding the tail of a few calls does not pair
        whole completions with slivers of busy time: that would make
        rps / utilization, lbserver's capacity estimate, absurdly high. A call
        cancelled while it held a slot adds busy time but no completion, so an
        overloaded backend whose calls time out reports its goodput."""
        now = self.clock()
        busy, done = self.busy_total, self.completed_total
        previous, self._last_sample = self._last_sample, (now, busy, done)
        in_flight = len(self._holding) + self.waiting
        if previous is None or now - previous[0] <= 0:
            return LoadReport(in_flight=in_flight)
        elapsed = now - previous[0]
        return LoadReport(
            cpu_utilization=min(1.0, (busy - previous[1]) / (self.slots * elapsed)),
            requests_per_second=(done - previous[2]) / elapsed,
            errors_per_second=0.0,
            in_flight=in_flight,
        )


def telemetry_page(meter: Meter) -> bytes:
    """Prometheus text of the meter's totals; busy time counts when a call
    ends, as in load_report, so the scraped rates pair the same way."""
    return (
        "# TYPE process_cpu_seconds_total counter\n"
        f"process_cpu_seconds_total {meter.busy_total / meter.slots}\n"
        f"# TYPE {REQUESTS_METRIC} counter\n"
        f"{REQUESTS_METRIC} {meter.completed_total}\n"
    ).encode()


async def serve_telemetry(meter: Meter, host: str, port: int) -> asyncio.Server:
    """A minimal HTTP/1.1 server answering every GET with `telemetry_page`."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = telemetry_page(meter)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)


class SimBackend:
    """The simulated pod: capacity slots, its meter and its registrar."""

    def __init__(
        self, name: str, slots: int, service_time: float, service_dist: str = "fixed"
    ) -> None:
        self.name = name
        self.slots = slots
        self.service_time = service_time
        self.service_dist = service_dist
        self._rng = random.Random(name)
        self.meter = Meter(slots)
        self.registrar: Registrar | None = None
        self.registered_at: float | None = None
        self.deregistered_at: float | None = None
        # Calls that arrived after Registrar.stop() began, and the last one's time.
        self.calls_after_deregister = 0
        self.last_arrival: float | None = None
        self._semaphore = asyncio.Semaphore(slots)
        self._registrar_task: asyncio.Task[None] | None = None

    async def call(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        del request, context
        self.meter.arrived()
        self.last_arrival = self.meter.clock()
        if self.deregistered_at is not None:
            self.calls_after_deregister += 1
        try:
            await self._semaphore.acquire()
        except asyncio.CancelledError:
            self.meter.abandoned()
            raise
        holder = self.meter.acquired()
        completed = False
        try:
            await asyncio.sleep(self._hold_time())
            completed = True
        finally:
            self._semaphore.release()
            self.meter.released(holder, completed=completed)
        return self.name.encode()

    def _hold_time(self) -> float:
        if self.service_dist == "exp":
            return self._rng.expovariate(1 / self.service_time)
        return self.service_time

    async def stats(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        del request, context
        meter = self.meter
        now = meter.clock()
        meter._bucket(now)  # bring the buckets up to now
        return json.dumps(
            {
                "name": self.name,
                "pid": os.getpid(),
                "slots": self.slots,
                "service_time": self.service_time,
                "origin": meter.origin,
                "bucket": BUCKET_SECONDS,
                "now": now,
                "arrivals": meter.arrivals,
                "completed": meter.completed,
                "busy": [round(b, 6) for b in meter.busy],
                "lag": [round(x, 4) for x in meter.lag],
                "registered_at": self.registered_at,
                "deregistered_at": self.deregistered_at,
                "calls_after_deregister": self.calls_after_deregister,
                "last_arrival": self.last_arrival,
            }
        ).encode()

    async def deregister(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        del request, context
        at = await self.stop_registrar()
        return json.dumps({"at": at}).encode()

    def start_registrar(
        self,
        balancers: Sequence[str],
        service: str,
        port: int,
        *,
        interval: float,
        ttl: float,
    ) -> None:
        self.registrar = Registrar(
            balancers,
            service,
            "127.0.0.1",
            port,
            instance_id=self.name,
            interval=interval,
            ttl=ttl,
            load=self.meter.load_report,
        )
        self.registered_at = time.monotonic()
        self._registrar_task = asyncio.create_task(self.registrar.run(), name="registrar")

    async def stop_registrar(self) -> float | None:
        """Registrar.stop(): deregisters from every balancer. Returns when it
        began (monotonic), None without a registrar."""
        if self.registrar is None:
            return None
        if self.deregistered_at is None:
            self.deregistered_at = time.monotonic()
        await self.registrar.stop()
        if self._registrar_task is not None:
            await self._registrar_task
        return self.deregistered_at

    def handlers(self) -> list[grpc.GenericRpcHandler[Any, Any]]:
        def unary(fn: Any) -> grpc.RpcMethodHandler[bytes, bytes]:
            return grpc.unary_unary_rpc_method_handler(fn)

        return [
            grpc.method_handlers_generic_handler(SIM_SERVICE, {"Call": unary(self.call)}),
            grpc.method_handlers_generic_handler(
                CONTROL_SERVICE,
                {"Stats": unary(self.stats), "Deregister": unary(self.deregister)},
            ),
        ]


async def serve(args: argparse.Namespace) -> int:
    host, port = parse_host_port(args.listen)
    backend = SimBackend(args.name, args.slots, args.service_time, args.service_dist)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(backend.handlers())
    if server.add_insecure_port(f"{host}:{port}") == 0:
        print(f"cannot listen on {args.listen}", flush=True)
        return 1
    if args.pod_ip and server.add_insecure_port(f"{args.pod_ip}:{port}") == 0:
        print(f"cannot listen on {args.pod_ip}:{port}", flush=True)
        return 1
    await server.start()
    telemetry = None
    if args.pod_ip and args.telemetry_port:
        telemetry = await serve_telemetry(backend.meter, args.pod_ip, args.telemetry_port)
    lag_probe = asyncio.create_task(probe_lag(backend.meter.note_lag))
    if args.balancer:
        backend.start_registrar(
            args.balancer.split(","), args.service, port, interval=args.interval, ttl=args.ttl
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"backend {args.name} serving on {host}:{port}", flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await backend.stop_registrar()
    if telemetry is not None:
        telemetry.close()
    await server.stop(1.0)
    lag_probe.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.balance.backend", description=__doc__)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--name", required=True)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--service-time", type=float, default=0.05, metavar="SECONDS")
    parser.add_argument("--service-dist", choices=("fixed", "exp"), default="fixed")
    parser.add_argument("--balancer", default="", metavar="HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--service", default="oap")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--pod-ip", default="", metavar="IP", help="mode (f): also serve on IP")
    parser.add_argument("--telemetry-port", type=int, default=0, metavar="PORT")
    args = parser.parse_args(argv)
    if args.slots < 1 or args.service_time <= 0:
        parser.error("--slots must be >= 1 and --service-time > 0")
    configure_logging("info", "json")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
