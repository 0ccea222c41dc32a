"""Load generator for bench/balance, run as its own process.

    python -m bench.balance.client --plan PLAN.json --out RESULT.json

A plan is a list of phases (one per balancing mode); each phase lists the
channels this process drives, each ONE long-lived grpc.aio channel (an agent)
with its own target and call rate. Calls are open loop: Poisson arrivals at
the channel's rate from a fixed seed, each call a unary `/bench.Sim/Call` with
a deadline, its latency measured from its *scheduled* start (a lagging event
loop or a queueing backend both show up). Times in the plan are
`time.monotonic()` values, shared by every process on the machine, so the
driver lines up the phases of several client processes and the backends'
buckets.

Calls scheduled in [measure_from, end) make the phase's latency figures;
failures are recorded with their time whatever the window (the convergence
phase needs them). A phase stops issuing at `end` and waits for its calls,
which end by their deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from .backend import CALL_METHOD, probe_lag

# Channels are opened this long before their phase starts.
CONNECT_LEAD = 1.5

GRPCLB_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"grpclb": {"childPolicy": [{"round_robin": {}}]}}]}
)


@dataclass(frozen=True)
class ChannelSpec:
    """One client channel: where it connects, how (grpclb or plain) and how
    many calls per second it makes."""

    id: int
    target: str
    rate: float
    grpclb: bool = False


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    start: float
    measure_from: float
    end: float
    channels: tuple[ChannelSpec, ...]


@dataclass(frozen=True)
class Plan:
    seed: int
    deadline: float
    phases: tuple[PhaseSpec, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = json.loads(text)
        phases = tuple(
            PhaseSpec(
                name=p["name"],
                start=p["start"],
                measure_from=p["measure_from"],
                end=p["end"],
                channels=tuple(ChannelSpec(**c) for c in p["channels"]),
            )
            for p in raw["phases"]
        )
        return cls(seed=raw["seed"], deadline=raw["deadline"], phases=phases)


@dataclass
class PhaseResult:
    """What one process saw in one phase."""

    # (scheduled monotonic time, latency ms, backend that answered or "" if
    # the call failed) of the calls scheduled in the window
    samples: list[tuple[float, float, str]] = field(default_factory=list)
    window_failures: dict[str, int] = field(default_factory=dict)  # status code -> count
    calls: int = 0  # every call the phase made
    failures: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, code), all
    # Seconds from opening each channel to READY (None: not ready by the phase start).
    ready_after: list[float | None] = field(default_factory=list)
    # Worst event-loop lateness of this process during the window, seconds.
    max_lag: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def channel_options(spec: ChannelSpec) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        # One connection per channel, as separate agents would have, even
        # when several channels of this process share a target.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_http_proxy", 0),
    ]
    if spec.grpclb:
        options += [
            ("grpc.dns_enable_srv_queries", 1),
            ("grpc.service_config", GRPCLB_SERVICE_CONFIG),
        ]
    return options


async def _one_call(
    stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    scheduled: float,
    phase: PhaseSpec,
    deadline: float,
    result: PhaseResult,
) -> None:
    code, backend = "OK", ""
    try:
        backend = (await stub(b"x", timeout=deadline)).decode()
    except grpc.aio.AioRpcError as err:
        code = err.code().name
    except asyncio.CancelledError:
        code = "CANCELLED"
    finished = time.monotonic()
    result.calls += 1
    if code != "OK":
        result.failures.append((round(finished, 4), code))
    if phase.measure_from <= scheduled < phase.end:
        latency = round((finished - scheduled) * 1000, 2)
        result.samples.append((round(scheduled, 4), latency, backend))
        if code != "OK":
            result.window_failures[code] = result.window_failures.get(code, 0) + 1


async def _drive(spec: ChannelSpec, phase: PhaseSpec, plan: Plan, result: PhaseResult) -> None:
    rng = random.Random(f"{plan.seed}/{phase.name}/{spec.id}")
    calls: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(spec.target, options=channel_options(spec)) as channel:
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            CALL_METHOD, request_serializer=None, response_deserializer=None
        )
        # Connect before the phase starts, as an agent that has been up a while.
        opened = time.monotonic()
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=max(0.1, phase.start - opened))
            result.ready_after.append(round(time.monotonic() - opened, 3))
        except TimeoutError:
            result.ready_after.append(None)
        scheduled = phase.start + rng.expovariate(spec.rate)
        while scheduled < phase.end:
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one_call(stub, scheduled, phase, plan.deadline, result))
            calls.add(task)
            task.add_done_callback(calls.discard)
            scheduled += rng.expovariate(spec.rate)
        if calls:
            await asyncio.wait(list(calls), timeout=plan.deadline + 1.0)


async def run_phase(phase: PhaseSpec, plan: Plan, result: PhaseResult) -> None:
    # Open the channels just before the phase, like agents that are already up.
    delay = phase.start - CONNECT_LEAD - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    await asyncio.gather(*(_drive(spec, phase, plan, result) for spec in phase.channels))


async def run_plan(plan: Plan) -> dict[str, PhaseResult]:
    results = {phase.name: PhaseResult() for phase in plan.phases}

    def record_lag(now: float, lateness: float) -> None:
        for phase in plan.phases:
            if phase.measure_from <= now < phase.end:
                result = results[phase.name]
                result.max_lag = max(result.max_lag, round(lateness, 4))

    lag = asyncio.create_task(probe_lag(record_lag))
    await asyncio.gather(*(run_phase(phase, plan, results[phase.name]) for phase in plan.phases))
    lag.cancel()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.balance.client", description=__doc__)
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    plan = Plan.from_json(args.plan.read_text())
    results = asyncio.run(run_plan(plan))
    summary = {name: r.to_json() for name, r in results.items()}
    args.out.write_text(json.dumps(summary))
    codes = Counter(code for r in results.values() for _, code in r.failures)
    print(f"client done: {sum(r.calls for r in results.values())} calls, failures {dict(codes)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
