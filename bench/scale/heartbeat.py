"""`python -m bench.scale.heartbeat --target HOST:PORT ...`: a Registry
Heartbeat load generator.

Heartbeats for `--backends` distinct backends (global indexes `--first` ..
`--first + --backends - 1`) spread round-robin over `--services` services
(`PREFIX-0`, `PREFIX-1`, ... for `--prefix`), each with a load report (CPU utilization and
requests/s jittered around a per-backend level, so load-aware weights move
as they do in production). Requests are serialized up front (a few load
variants per backend) so the generator spends its CPU on calls, not on
building messages.

`--mode unary` sends Registry.Heartbeat calls; `--mode stream` gives every
backend its own Registry.HeartbeatStream (as each `lbserver register`
holds one per balancer), its heartbeats one after another on it.

`--rate R` paces the heartbeats open-loop at R/s (0: as fast as
`--concurrency` in-flight calls allow, or, streaming, one in flight per
backend). Calls completing between `--start + --warmup` and
`--start + --warmup + --duration` (CLOCK_MONOTONIC, comparable with the
orchestrator's clock) are counted; one JSON line with the counts, latency
percentiles and this process's CPU is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from typing import Any

import grpc

from lbserver.proto.v1 import lbserver_pb2 as pb

from .procinfo import cpu_seconds, raise_fd_limit

METHOD = "/lbserver.v1.Registry/Heartbeat"
STREAM_METHOD = "/lbserver.v1.Registry/HeartbeatStream"
VARIANTS = 8
# As lbserver's registrar: one heartbeat in this many asks for an answer.
CONFIRM_EVERY = 5
# HeartbeatRequest.reply_token = 1 (field 11, varint), appended to a
# serialized request: a parser takes the last value of a repeated field.
ASK = bytes([11 << 3, 1])
CODE_NAMES = {int(code.value[0]): code.name for code in grpc.StatusCode}


def backend_ip(index: int) -> str:
    """A distinct address per backend (a heartbeat for an address another
    instance holds would replace that instance)."""
    index += 1
    return f"10.{100 + (index >> 16)}.{(index >> 8) & 255}.{index & 255}"


def requests_for(
    index: int, services: int, prefix: str, ttl: float, rng: random.Random
) -> list[bytes]:
    service = f"{prefix}-{index % services}"
    level_cpu = rng.uniform(0.3, 0.7)
    level_rps = rng.uniform(50, 150)
    out = []
    for _ in range(VARIANTS):
        request = pb.HeartbeatRequest(
            service=service,
            instance_id=f"{service}-{index}",
            ip=backend_ip(index),
            port=9000,
            zone="zone-a",
            load=pb.LoadReport(
                cpu_utilization=level_cpu * rng.uniform(0.9, 1.1),
                requests_per_second=level_rps * rng.uniform(0.9, 1.1),
                errors_per_second=0.0,
                in_flight=rng.randint(0, 20),
            ),
        )
        request.requested_ttl.FromSeconds(int(ttl))
        out.append(request.SerializeToString())
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.first)
    requests = [
        requests_for(index, args.services, args.prefix, args.ttl, rng)
        for index in range(args.first, args.first + args.backends)
    ]
    channels = [
        grpc.aio.insecure_channel(
            args.target,
            options=[("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)],
        )
        for _ in range(args.channels)
    ]
    calls = [channel.unary_unary(METHOD, None, None) for channel in channels]
    for channel in channels:
        await channel.channel_ready()
    window_from = args.start + args.warmup
    window_to = window_from + args.duration
    stop_at = window_to + 0.2
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counted = 0
    sent = 0
    next_index = 0
    now = time.monotonic()
    if args.start > now:
        await asyncio.sleep(args.start - now)
    cpu_from = cpu_to = 0.0

    async def worker(worker_id: int) -> None:
        nonlocal next_index, counted, sent
        call = calls[worker_id % len(calls)]
        while True:
            i = next_index
            next_index += 1
            if args.rate > 0:
                due = args.start + i / args.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            began = time.monotonic()
            if began >= stop_at:
                return
            backend = i % args.backends
            request = requests[backend][(i // args.backends) % VARIANTS]
            sent += 1
            try:
                await call(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            done = time.monotonic()
            if window_from <= done < window_to:
                counted += 1
                latencies.append(done - began)

    async def meter() -> None:
        nonlocal cpu_from, cpu_to
        await asyncio.sleep(max(0.0, window_from - time.monotonic()))
        cpu_from = cpu_seconds(os.getpid())
        await asyncio.sleep(max(0.0, window_to - time.monotonic()))
        cpu_to = cpu_seconds(os.getpid())

    async def streamer(backend: int) -> None:
        """One backend's heartbeats, in order, on its own stream, as the
        registrar sends them: every CONFIRM_EVERY-th (the first included)
        asks for an answer and waits for it, the others are only written
        (the balancer answers only news, and there is none here after the
        first). Latencies are those of the asking heartbeats."""
        nonlocal counted, sent
        channel = channels[backend % len(channels)]
        call = channel.stream_stream(STREAM_METHOD, None, None)(None)
        beat = 0
        try:
            while True:
                if args.rate > 0:
                    due = args.start + (beat * args.backends + backend) / args.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                began = time.monotonic()
                if began >= stop_at:
                    return
                sent += 1
                request = requests[backend][beat % VARIANTS]
                ask = beat % CONFIRM_EVERY == 0
                await call.write(request + ASK if ask else request)
                beat += 1
                while ask:
                    reply = await call.read()
                    if not isinstance(reply, bytes):
                        errors["stream ended"] += 1
                        return
                    answer = pb.HeartbeatStreamResponse.FromString(reply)
                    if answer.code:
                        errors[CODE_NAMES.get(answer.code, str(answer.code))] += 1
                    ask = not answer.reply_token
                done = time.monotonic()
                if window_from <= done < window_to:
                    counted += 1
                    if beat % CONFIRM_EVERY == 1:
                        latencies.append(done - began)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1
        finally:
            call.cancel()

    if args.mode == "stream":
        workers = [streamer(b) for b in range(args.backends)]
    else:
        workers = [worker(w) for w in range(args.concurrency)]
    await asyncio.gather(meter(), *workers)
    for channel in channels:
        await channel.close(None)
    return {
        "ok": counted,
        "rate": counted / args.duration,
        "sent": sent,
        "errors": dict(errors),
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "cpu_percent": 100 * (cpu_to - cpu_from) / args.duration,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--services", type=int, default=10)
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary")
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--prefix", default="hb")
    # Long enough that no backend expires between two of its heartbeats at
    # the slowest paced rate (backends / rate seconds).
    parser.add_argument("--ttl", type=float, default=3600.0)
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=6.0)
    args = parser.parse_args()
    if args.start <= 0:
        args.start = time.monotonic() + 1.0
    raise_fd_limit()
    print(json.dumps(asyncio.run(generate(args))), flush=True)


if __name__ == "__main__":
    main()
