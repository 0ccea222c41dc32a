"""What a bench/scale run measured: the records run.py fills in, report.py
renders and results.json keeps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FanoutChange:
    kind: str  # "join" or "leave"
    streams: int
    missing: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class StreamsResult:
    streams: int
    live: int
    failed: int
    open_seconds: float
    open_cpu_seconds: float
    rss_mib: float
    peak_rss_mib: float
    threads: int
    idle_cpu_percent: float
    idle_seconds: float
    client_rss_mib: float
    fanout_p50_ms: float
    fanout_p99_ms: float
    fanout_max_ms: float
    fanout_missing: int
    fanout_server_cpu_ms_per_change: float
    fanout_clients_cpu_ms_per_change: float
    changes: list[FanoutChange] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    # "grpclb" (BalanceLoad streams) or "xds" (ADS streams).
    protocol: str = "grpclb"
    # The balancer's RSS before any stream (0: not measured, older runs).
    base_rss_mib: float = 0.0

    @property
    def rss_kib_per_stream(self) -> float:
        """What each stream adds to the balancer's RSS, over its RSS before
        any stream (NaN when that was not measured)."""
        if not self.base_rss_mib or not self.streams:
            return float("nan")
        return (self.rss_mib - self.base_rss_mib) * 1024 / self.streams


@dataclass
class HeartbeatStep:
    offered: float  # 0 = unpaced
    achieved: float
    server_cpu_percent: float
    generators_cpu_percent: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]


@dataclass
class HeartbeatShape:
    services: int
    backends: int
    # "lbserver", or "no-op" for the grpc.aio floor (bench/scale/noop.py).
    server: str = "lbserver"
    # "unary" (Registry.Heartbeat calls) or "stream" (HeartbeatStream).
    mode: str = "unary"
    steps: list[HeartbeatStep] = field(default_factory=list)
    # Server CPU per call at the fastest (unpaced) step.
    cpu_us_per_heartbeat: float = 0.0
    # Heartbeats/s at which the server's CPU reaches one core (rate_at_one_core).
    at_one_core: float = 0.0
    # Highest achieved rate among the steps that kept up with their pace.
    max_sustained: float = 0.0


@dataclass
class Results:
    machine: dict[str, str]
    command: str
    settings: dict[str, Any]
    streams: list[StreamsResult] = field(default_factory=list)
    heartbeats: list[HeartbeatShape] = field(default_factory=list)
    load_at_end: str = ""
    seconds: float = 0.0


def results_from_json(data: Mapping[str, Any]) -> Results:
    """A Results back from the results.json a run wrote."""
    streams = [
        StreamsResult(
            **{
                **s,
                "changes": [FanoutChange(**c) for c in s["changes"]],
            }
        )
        for s in data["streams"]
    ]
    heartbeats = [
        HeartbeatShape(**{**h, "steps": [HeartbeatStep(**step) for step in h["steps"]]})
        for h in data["heartbeats"]
    ]
    return Results(
        machine=dict(data["machine"]),
        command=data["command"],
        settings=dict(data["settings"]),
        streams=streams,
        heartbeats=heartbeats,
        load_at_end=data["load_at_end"],
        seconds=data["seconds"],
    )
