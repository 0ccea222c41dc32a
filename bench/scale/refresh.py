"""`python -m bench.scale.refresh [SERVICES PER_SERVICE HEARTBEATS]`: the
balancer's own cost of one heartbeat, in process and without gRPC.

A Balancer built from lbserver's default config (as `lbserver serve` builds
it), SERVICES x PER_SERVICE backends heartbeating with jittered load reports
on a fake clock; after warm-up rounds past the load-report blackout, times
HEARTBEATS calls of `parse_registration` + `Balancer.heartbeat` (validation,
membership, weights) at 5,000 a second of fake time, with the timer's ticks
(list rebuilds) in between. To measure another checkout's
balancer, run it from outside the repository with that checkout first on
the path: `cd /tmp && PYTHONPATH=OTHER:/work/main python -m bench.scale.refresh`.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import Any

import structlog

from lbserver.config import Config
from lbserver.domain.validation import parse_load, parse_registration
from lbserver.server import build_balancer


def main(argv: list[str]) -> None:
    services, per_service, count = (int(a) for a in (argv + ["50", "20", "5000"][len(argv) :]))
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    now = [0.0]
    balancer = build_balancer(Config())
    balancer._clock = lambda: now[0]
    rng = random.Random(1)
    backends = services * per_service
    levels = [(rng.uniform(0.3, 0.7), rng.uniform(50, 150)) for _ in range(backends)]

    def fields(i: int) -> dict[str, Any]:
        cpu, rps = levels[i]
        return {
            "service": f"hb-{i % services}",
            "instance_id": f"hb-{i}",
            "ip": f"10.0.{i >> 8}.{i & 255}",
            "port": 9000,
            "zone": "a",
            "load": parse_load(
                cpu_utilization=cpu * rng.uniform(0.9, 1.1),
                requests_per_second=rps * rng.uniform(0.9, 1.1),
                errors_per_second=0.0,
                in_flight=3,
            ),
        }

    for _ in range(22):  # 11 s of fake time: past the 10 s blackout
        now[0] += 0.5
        for i in range(backends):
            balancer.heartbeat(parse_registration(**fields(i)))
    calls = [fields(i % backends) for i in range(count)]
    next_tick = now[0]
    started = time.perf_counter()
    for call in calls:
        # 5,000 heartbeats per second of fake time, and the timer's tick
        # every 0.25 s (it rebuilds the lists of load-only heartbeats).
        now[0] += 0.0002
        if now[0] >= next_tick:
            balancer.tick()
            next_tick += 0.25
        balancer.heartbeat(parse_registration(**call))
    elapsed = time.perf_counter() - started
    print(
        f"{services} x {per_service} backends: {1e6 * elapsed / count:.0f} µs per heartbeat "
        "(validation + Balancer.heartbeat + ticks, no gRPC)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
