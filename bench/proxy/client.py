"""Load generator of bench/proxy, run as its own process.

    python -m bench.proxy.client unary --target HOST:PORT --concurrency C --duration S
    python -m bench.proxy.client upload --target HOST:PORT --megabytes M --message-bytes B

`unary`: C workers on ONE grpc.aio channel each make `/bench.Echo/Unary` calls
(100-byte request) back to back for S seconds, after a 0.5 s warm-up; prints
JSON with calls/s and the latency percentiles (perf_counter around each call).

`upload`: one client-streaming `/bench.Echo/Upload` call (the shape of
SkyWalking's `TraceSegmentReportService/collect`) sending M MB in messages of
B bytes; prints JSON with MB/s (from the first write to the reply).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from bench.proxy.backend import UNARY, UPLOAD

CHANNEL_OPTIONS = (("grpc.max_receive_message_length", -1),)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def unary(target: str, concurrency: int, duration: float) -> dict[str, float]:
    payload = b"x" * 100
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = channel.unary_unary(UNARY, None, None)
        await stub(payload, timeout=10, wait_for_ready=True)
        latencies: list[float] = []
        errors = 0
        measuring = False
        stop_at = 0.0

        async def worker() -> None:
            nonlocal errors
            while True:
                started = time.perf_counter()
                if measuring and started >= stop_at:
                    return
                try:
                    await stub(payload, timeout=10)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - started)

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(0.5)  # warm-up: connections up, caches hot
        began = time.perf_counter()
        stop_at = began + duration
        measuring = True
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "concurrency": concurrency,
        "calls": len(latencies),
        "errors": errors,
        "calls_per_s": len(latencies) / elapsed,
        "p50_ms": _percentile(latencies, 0.50) * 1e3,
        "p99_ms": _percentile(latencies, 0.99) * 1e3,
    }


async def upload(
    target: str, megabytes: float, message_bytes: int, limit: float = 120.0
) -> dict[str, float]:
    total = int(megabytes * 1_000_000)
    count = max(1, total // message_bytes)
    message = b"s" * message_bytes

    async def messages() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield message

    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = channel.stream_unary(UPLOAD, None, None)
        await channel.unary_unary(UNARY, None, None)(b"w", timeout=10, wait_for_ready=True)
        began = time.perf_counter()
        reply = await stub(messages(), timeout=limit)
        elapsed = time.perf_counter() - began
    sent = count * message_bytes
    if int(reply) != sent:
        raise SystemExit(f"upload: the backend got {int(reply)} bytes, not {sent}")
    return {
        "bytes": sent,
        "message_bytes": message_bytes,
        "seconds": elapsed,
        "mb_per_s": sent / elapsed / 1e6,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bench/proxy load generator")
    modes = parser.add_subparsers(dest="mode", required=True)
    u = modes.add_parser("unary")
    u.add_argument("--target", required=True)
    u.add_argument("--concurrency", type=int, default=1)
    u.add_argument("--duration", type=float, default=5.0)
    s = modes.add_parser("upload")
    s.add_argument("--target", required=True)
    s.add_argument("--megabytes", type=float, default=100.0)
    s.add_argument("--message-bytes", type=int, default=16 * 1024)
    s.add_argument("--timeout", type=float, default=120.0, help="deadline of the upload (s)")
    args = parser.parse_args(argv)
    if args.mode == "unary":
        result = asyncio.run(unary(args.target, args.concurrency, args.duration))
    else:
        result = asyncio.run(upload(args.target, args.megabytes, args.message_bytes, args.timeout))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
