"""`python -m bench.channel`: see the package docstring."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import grpc
import grpc.aio

import agent_shim
from bench.proxy.backend import UNARY

SERVICE = "bench"
# Per client: (wall, CPU) seconds per call of each round.
Results = dict[str, list[tuple[float, float]]]
PAYLOAD = b"x" * 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"bench.channel: nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def fleet() -> Iterator[tuple[str, str]]:
    """A backend, a balancer and a registrar; yields (backend, balancer)."""
    backend_port, balancer_port = free_port(), free_port()
    backend, balancer = f"127.0.0.1:{backend_port}", f"127.0.0.1:{balancer_port}"
    env = {**os.environ, "LBSERVER_STARTUP_GRACE": "0"}
    commands = [
        [sys.executable, "-m", "bench.proxy.backend", "--listen", backend],
        [
            sys.executable,
            "-m",
            "lbserver",
            "serve",
            "--listen",
            balancer,
            "--metrics-listen",
            "off",
            "--log-level",
            "warning",
        ],
        [
            sys.executable,
            "-m",
            "lbserver",
            "register",
            "--balancer",
            balancer,
            "--service",
            SERVICE,
            "--backend",
            backend,
            "--probe",
            "tcp",
            "--interval",
            "1",
            "--log-level",
            "warning",
        ],
    ]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for command, port in zip(commands, (backend_port, balancer_port, None), strict=True):
            processes.append(subprocess.Popen(command, env=env))
            if port is not None:
                wait_port(port)
        yield backend, balancer
    finally:
        # The registrar first (it deregisters while the balancer still runs).
        for process in reversed(processes):
            process.terminate()
            process.wait(15)


def timed(calls: int, run: Callable[[], None]) -> tuple[float, float]:
    """(wall, CPU) seconds per call of `calls` sequential calls of `run`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run()
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


async def timed_async(calls: int, run: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await run()
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def measure(backend: str, balancer: str, calls: int, rounds: int) -> Results:
    results: Results = {}

    def sync_round(name: str, channel: grpc.Channel) -> None:
        call = channel.unary_unary(UNARY, None, None)
        deadline = time.monotonic() + 30
        while True:  # warm up: connections, the balancer's list (registered yet?)
            try:
                for _ in range(50):
                    call(PAYLOAD, timeout=10)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        results.setdefault(name, []).append(timed(calls, lambda: call(PAYLOAD, timeout=10)))

    async def aio_round(name: str, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(UNARY, None, None)
        for _ in range(50):
            await call(PAYLOAD, timeout=10)
        result = await timed_async(calls, lambda: call(PAYLOAD, timeout=10))
        results.setdefault(name, []).append(result)

    async def aio_rounds() -> None:
        direct = grpc.aio.insecure_channel(backend)
        balanced = agent_shim.aio_balanced_channel(balancer, SERVICE)
        try:
            await aio_round("grpc.aio, direct", direct)
            await aio_round("aio_balanced_channel", balanced)
        finally:
            await direct.close(None)
            await balanced.close(None)

    for _ in range(rounds):
        with grpc.insecure_channel(backend) as direct:
            sync_round("grpc sync, direct", direct)
        with agent_shim.balanced_channel(balancer, SERVICE) as balanced:
            sync_round("balanced_channel", balanced)
        asyncio.run(aio_rounds())
    return results


def report(results: Results, calls: int, rounds: int) -> str:
    lines = [
        f"bench.channel: {calls} sequential unary calls x {rounds} rounds, medians",
        "",
        "| client | wall per call | client CPU per call |",
        "|---|---|---|",
    ]
    for name, samples in results.items():
        wall = statistics.median(s[0] for s in samples) * 1000
        cpu = statistics.median(s[1] for s in samples) * 1000
        lines.append(f"| {name} | {wall:.3f} ms | {cpu:.3f} ms |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.channel", description=__doc__)
    parser.add_argument("--calls", type=int, default=1000, help="calls per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args(argv)
    with fleet() as (backend, balancer):
        results = measure(backend, balancer, args.calls, args.rounds)
    print(report(results, args.calls, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
