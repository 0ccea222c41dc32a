"""`agent-shim demo`: the problem and the fix, side by side, in one process.

Two identical groups of three backends (one of them with half the capacity)
serve two groups of clients with long-lived channels and skewed call rates:

- "kubernetes-service": each client connects to one backend picked at random
  and keeps it, as behind a Kubernetes Service (kube-proxy balances
  connections, not calls);
- "lbserver": each client uses agent_shim's balanced channel, so every call is
  balanced by the weights a real lbserver computes from the backends' load
  reports (sent by real registrars).

The table shows each backend's share of the calls and its utilization (busy
capacity). lbserver evens out utilization, giving the slow backend half the
calls of the others; the connection-balanced group cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from agent_shim import aio_balanced_channel
from lbserver.config import Config
from lbserver.domain.model import LoadReport
from lbserver.registrar import Registrar
from lbserver.server import RunningServer, start

METHOD = "/lbserver.demo.Work/Do"
SERVICE_TIME = 0.02  # seconds per call on a full-speed backend
SLOTS = 4  # calls a backend works on at once
# Call rates of the clients of one group (calls/s): a few busy agents and a
# long tail, as in a real fleet.
CLIENT_RATES = (30.0, 20.0, 12.0, 8.0, 5.0, 3.0)


@dataclass
class DemoBackend:
    """A backend with SLOTS workers; `slowdown` 2 halves its capacity."""

    name: str
    slowdown: float = 1.0
    calls: int = 0
    busy: float = 0.0  # slot-seconds spent working since the last reset
    since: float = field(default_factory=time.monotonic)
    server: grpc.aio.Server | None = None
    port: int = 0
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(SLOTS))
    # For load reports: counters at the previous report.
    _reported: tuple[float, int, float] = (0.0, 0, 0.0)

    async def start(self) -> None:
        async def work(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
            async with self._slots:
                began = time.monotonic()
                await asyncio.sleep(SERVICE_TIME * self.slowdown)
                self.busy += time.monotonic() - began
                self.calls += 1
            return b"done"

        self.server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "lbserver.demo.Work", {"Do": grpc.unary_unary_rpc_method_handler(work)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def reset(self) -> None:
        self.calls, self.busy, self.since = 0, 0.0, time.monotonic()

    def utilization(self) -> float:
        elapsed = max(time.monotonic() - self.since, 1e-9)
        return self.busy / (SLOTS * elapsed)

    def load(self) -> LoadReport:
        """What a metrics scrape would say: busy share and calls/s since the
        last report."""
        now = time.monotonic()
        last_time, last_calls, last_busy = self._reported
        self._reported = (now, self.calls, self.busy)
        if not last_time or now - last_time <= 0 or self.calls < last_calls:
            return LoadReport()
        elapsed = now - last_time
        return LoadReport(
            cpu_utilization=(self.busy - last_busy) / (SLOTS * elapsed),
            requests_per_second=(self.calls - last_calls) / elapsed,
        )

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


@dataclass
class Group:
    name: str
    backends: list[DemoBackend]

    def rows(self) -> list[dict[str, object]]:
        total = sum(b.calls for b in self.backends) or 1
        return [
            {
                "backend": b.name,
                "capacity": "half" if b.slowdown > 1 else "full",
                "calls": b.calls,
                "share": b.calls / total,
                "utilization": b.utilization(),
            }
            for b in self.backends
        ]

    def imbalance(self) -> float:
        """max/mean utilization: 1.0 is perfect."""
        utilizations = [b.utilization() for b in self.backends]
        mean = sum(utilizations) / len(utilizations)
        return max(utilizations) / mean if mean > 0 else float("inf")


async def _client(call: grpc.aio.UnaryUnaryMultiCallable, rate: float, stop: asyncio.Event) -> None:  # type: ignore[type-arg]
    """Calls at `rate` per second (open loop, bounded concurrency)."""
    pending: set[asyncio.Task[object]] = set()
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        if len(pending) < 32:
            task: asyncio.Task[object] = asyncio.ensure_future(call(b"x", timeout=5))
            pending.add(task)
            task.add_done_callback(pending.discard)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _table(groups: Sequence[Group], elapsed: float) -> str:
    lines = [f"agent-shim demo — {elapsed:4.1f} s   (share of calls, utilization of capacity)"]
    for group in groups:
        lines.append(f"\n  {group.name}  (utilization max/mean {group.imbalance():.2f})")
        for row in group.rows():
            bar = "#" * round(float(row["utilization"]) * 40)  # type: ignore[arg-type]
            lines.append(
                f"    {row['backend']:<6} {row['capacity']:<4}  share {float(row['share']):6.1%}"  # type: ignore[arg-type]
                f"  util {float(row['utilization']):6.1%}  {bar}"  # type: ignore[arg-type]
            )
    return "\n".join(lines) + "\n"


async def run_demo(duration: float, seed: int, as_json: bool) -> int:
    config = Config(
        listen="127.0.0.1:0",
        metrics_listen="off",
        heartbeat_interval=0.5,
        blackout=1.0,
        min_push_interval=0.5,
        startup_grace=0.0,
        log_level="warning",
    )
    balancer: RunningServer = await start(config)
    address = f"127.0.0.1:{balancer.port}"
    groups = [
        Group(
            "kubernetes-service",
            [DemoBackend(f"k8s-{i}", 2.0 if i == 2 else 1.0) for i in range(3)],
        ),
        Group("lbserver", [DemoBackend(f"lb-{i}", 2.0 if i == 2 else 1.0) for i in range(3)]),
    ]
    for group in groups:
        for backend in group.backends:
            await backend.start()
    registrars = [
        Registrar(
            [address], "demo", "127.0.0.1", b.port, instance_id=b.name, interval=0.5, load=b.load
        )
        for b in groups[1].backends
    ]
    registrar_tasks = [asyncio.create_task(r.run()) for r in registrars]
    rng = random.Random(seed)
    channels: list[grpc.aio.Channel] = []
    stop = asyncio.Event()
    clients = []
    for rate in CLIENT_RATES:
        # Kubernetes Service: one connection, to one backend, for good.
        target = rng.choice(groups[0].backends)
        direct = grpc.aio.insecure_channel(f"127.0.0.1:{target.port}")
        balanced = aio_balanced_channel(address, "demo")
        channels += [direct, balanced]
        for channel in (direct, balanced):
            call = channel.unary_unary(METHOD, None, None)
            clients.append(asyncio.create_task(_client(call, rate, stop)))
    began = time.monotonic()
    reset_done = False
    interactive = sys.stdout.isatty() and not as_json
    try:
        while (elapsed := time.monotonic() - began) < duration:
            await asyncio.sleep(1.0)
            # Measure the second half only: the first lets weights settle.
            if not reset_done and elapsed >= duration / 2:
                for group in groups:
                    for backend in group.backends:
                        backend.reset()
                reset_done = True
            if interactive:
                print("\x1b[H\x1b[2J" + _table(groups, elapsed), end="", flush=True)
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        for channel in channels:
            await channel.close(None)
        for registrar in registrars:
            await registrar.stop()
        await asyncio.gather(*registrar_tasks, return_exceptions=True)
        for group in groups:
            for backend in group.backends:
                await backend.stop()
        await balancer.stop(grace=0)
    if as_json:
        print(
            json.dumps(
                {g.name: {"imbalance": g.imbalance(), "backends": g.rows()} for g in groups},
                indent=2,
            )
        )
    else:
        print(("\x1b[H\x1b[2J" if interactive else "") + _table(groups, duration), end="")
        print(
            "\nlbserver evens out utilization across unequal backends; "
            "connection-level balancing cannot.\n"
        )
    return 0


def main(duration: float = 20.0, seed: int = 7, as_json: bool = False) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run_demo(duration, seed, as_json))
    return 130
