"""The orchestrator of bench/scale (see the package docstring).

One `lbserver serve` process per protocol measured (`--protocol`: grpclb,
xds or both; default both); for each, `--clients` client processes
(bench.scale.client) that together hold N streams of that protocol, ramped
up through the N of `--streams` (BalanceLoad) or `--xds-streams` (ADS:
LDS -> CDS -> EDS, every response ACKed); at each N: the balancer's RSS
(and per stream, over its RSS before any stream), its CPU while nothing
changes, and the fan-out latency of membership changes (a backend joins by
heartbeat, then leaves by deregistration, `--trials` times) to every
stream's new server list or ClusterLoadAssignment. With both protocols the
two balancers run side by side and each N is measured on one, then the
other, so their ratio comes from the same minutes of the same machine. Then
the streams close, the xDS balancer stops, and heartbeat load generators
(bench.scale.heartbeat) find how many Registry heartbeats per second the
(first) balancer takes per core.

`--section xds` writes only the subsection "xDS streams beside BalanceLoad"
of docs/benchmarks.md (and bench/scale/results-xds.json), leaving the rest
of the section as the last full run wrote it: e.g. `python -m bench.scale
--streams 1000,5000 --no-heartbeats --section xds`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc

from . import procinfo
from .client import PROTOCOLS
from .procinfo import CpuMeter, raise_fd_limit, status_kib
from .results import (
    FanoutChange,
    HeartbeatShape,
    HeartbeatStep,
    Results,
    StreamsResult,
    results_from_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
SERVICE = "oap"
BASE_PORT = 20000
EXTRA_PORT = 21000
REGISTRATION_TTL = 3600
BLACKOUT_WARMUP = 11.0

# The balancer's settings for the run; everything else is lbserver's default.
LBSERVER_ENV: Mapping[str, str] = {
    "LBSERVER_MAX_STREAMS": "20000",
    "LBSERVER_STARTUP_GRACE": "0",
    # One load generator on 127.0.0.1 sends thousands of heartbeats/s.
    "LBSERVER_HEARTBEAT_RATE_PER_PEER": "0",
    # Every client process and generator is on 127.0.0.1: one peer address
    # for all the streams (the NAT case of docs/operations.md).
    "LBSERVER_MAX_STREAMS_PER_PEER": "20000",
    # The fan-out backends are registered once and must not expire mid-run.
    "LBSERVER_MAX_TTL": str(REGISTRATION_TTL),
    "LBSERVER_LOG_FORMAT": "json",
}


def child_env(extra: Mapping[str, str] | None = None, root: Path = REPO_ROOT) -> dict[str, str]:
    """The environment of every child: `root` importable first, no proxies."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(key, None)
    env["no_grpc_proxy"] = "*"
    env.update(extra or {})
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _raise_fd_limit_in_child() -> None:
    raise_fd_limit()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


# --- processes -----------------------------------------------------------------


class Lbserver:
    def __init__(
        self,
        log_dir: Path,
        env: Mapping[str, str],
        root: Path = REPO_ROOT,
        log_name: str = "lbserver.log",
    ) -> None:
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.log = open(log_dir / log_name, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lbserver",
                "serve",
                "--listen",
                self.address,
                "--metrics-listen",
                "off",
            ],
            env=child_env(env, root),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_raise_fd_limit_in_child,
            cwd=root,
        )
        self.pid = self.process.pid
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.enable_http_proxy", 0)])
        self.registry = pb_grpc.RegistryStub(self.channel)
        self._wait_serving()

    def _wait_serving(self, timeout: float = 30.0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"lbserver exited with {self.process.returncode}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("lbserver did not become SERVING")
            time.sleep(0.1)

    def heartbeat(self, instance: str, port: int) -> None:
        request = pb.HeartbeatRequest(
            service=SERVICE, instance_id=instance, ip="10.1.0.1", port=port
        )
        request.requested_ttl.FromSeconds(REGISTRATION_TTL)
        self.registry.Heartbeat(request, timeout=10)

    def deregister(self, instance: str) -> None:
        self.registry.Deregister(
            pb.DeregisterRequest(service=SERVICE, instance_id=instance), timeout=10
        )

    def rss_mib(self) -> float:
        return status_kib(self.pid, "VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        return status_kib(self.pid, "VmHWM") / 1024

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class ClientProcess:
    def __init__(self, index: int, target: str, log_dir: Path, protocol: str = "grpclb") -> None:
        prefix = "client" if protocol == "grpclb" else f"{protocol}-client"
        self.log = open(log_dir / f"{prefix}-{index}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.scale.client",
                "--target",
                target,
                "--name",
                SERVICE,
                "--protocol",
                protocol,
            ],
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,
            cwd=REPO_ROOT,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin: IO[bytes] = self.process.stdin
        self._stdout: IO[bytes] = self.process.stdout

    def send(self, command: Mapping[str, Any]) -> None:
        self._stdin.write(json.dumps(command).encode() + b"\n")
        self._stdin.flush()

    def receive(self) -> dict[str, Any]:
        line = self._stdout.readline()
        if not line:
            raise RuntimeError(f"client process {self.process.pid} exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def cpu_seconds(self) -> float:
        return procinfo.cpu_seconds(self.process.pid)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.send({"cmd": "quit"})
            self._stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def broadcast(
    clients: Sequence[ClientProcess], commands: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    for client, command in zip(clients, commands, strict=True):
        client.send(command)
    return [client.receive() for client in clients]


# --- phases --------------------------------------------------------------------


def open_streams(clients: Sequence[ClientProcess], count: int) -> None:
    share, rest = divmod(count, len(clients))
    broadcast(
        clients,
        [{"cmd": "open", "count": share + (1 if i < rest else 0)} for i in range(len(clients))],
    )


@dataclass
class Side:
    """One protocol's balancer and the client processes holding its streams."""

    protocol: str
    server: Lbserver
    counts: list[int]
    # The balancer's RSS with its backends registered, before any stream.
    base_rss_mib: float
    clients: list[ClientProcess]
    current: int = 0

    def stop_clients(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.stop()
        self.clients = []


def measure_streams(
    server: Lbserver,
    clients: Sequence[ClientProcess],
    target: int,
    current: int,
    base_ports: list[int],
    trials: int,
    idle_seconds: float,
    protocol: str = "grpclb",
    base_rss_mib: float = 0.0,
) -> StreamsResult:
    meter = CpuMeter(server.pid)
    started = time.monotonic()
    open_streams(clients, target - current)
    open_seconds = time.monotonic() - started
    open_cpu, _ = meter.seconds()
    stats = broadcast(clients, [{"cmd": "stats"}] * len(clients))
    live = sum(s["live"] for s in stats)
    failed = sum(s["failed"] for s in stats)
    errors: dict[str, int] = {}
    for s in stats:
        for key, value in s["errors"].items():
            errors[key] = errors.get(key, 0) + value
    print(f"  {live} streams live ({failed} failed) after {open_seconds:.1f} s", flush=True)
    time.sleep(2.0)
    rss = server.rss_mib()
    meter.start()
    time.sleep(idle_seconds)
    idle_cpu = meter.percent()
    print(f"  RSS {rss:.0f} MiB, idle CPU {idle_cpu:.2f} %", flush=True)

    changes: list[FanoutChange] = []
    latencies: list[float] = []
    missing_total = 0
    server_meter = CpuMeter(server.pid)
    clients_cpu = sum(c.cpu_seconds() for c in clients)
    for trial in range(trials):
        extra = EXTRA_PORT + trial
        for kind in ("join", "leave"):
            expected = sorted([*base_ports, extra]) if kind == "join" else base_ports
            changed_at = time.monotonic()
            if kind == "join":
                server.heartbeat(f"fanout-{trial}", extra)
            else:
                server.deregister(f"fanout-{trial}")
            replies = broadcast(
                clients,
                [{"cmd": "expect", "ports": expected, "since": changed_at, "timeout": 30}]
                * len(clients),
            )
            values = [v for r in replies for v in r["latencies"]]
            missing = sum(r["missing"] for r in replies)
            missing_total += missing
            latencies.extend(values)
            changes.append(
                FanoutChange(
                    kind=kind,
                    streams=len(values),
                    missing=missing,
                    p50_ms=1000 * percentile(values, 0.5),
                    p99_ms=1000 * percentile(values, 0.99),
                    max_ms=1000 * max(values, default=float("nan")),
                )
            )
            print(
                f"  {kind}: {len(values)} streams, p50 {changes[-1].p50_ms:.0f} ms, "
                f"p99 {changes[-1].p99_ms:.0f} ms, max {changes[-1].max_ms:.0f} ms"
                + (f", {missing} missing" if missing else ""),
                flush=True,
            )
            time.sleep(0.3)
    fanout_cpu, _ = server_meter.seconds()
    clients_cpu = sum(c.cpu_seconds() for c in clients) - clients_cpu
    client_rss = sum(s["rss_kib"] for s in stats) / 1024
    return StreamsResult(
        protocol=protocol,
        base_rss_mib=base_rss_mib,
        streams=target,
        live=live,
        failed=failed,
        open_seconds=open_seconds,
        open_cpu_seconds=open_cpu,
        rss_mib=rss,
        peak_rss_mib=server.peak_rss_mib(),
        threads=procinfo.threads(server.pid),
        idle_cpu_percent=idle_cpu,
        idle_seconds=idle_seconds,
        client_rss_mib=client_rss,
        fanout_p50_ms=1000 * percentile(latencies, 0.5),
        fanout_p99_ms=1000 * percentile(latencies, 0.99),
        fanout_max_ms=1000 * max(latencies, default=float("nan")),
        fanout_missing=missing_total,
        fanout_server_cpu_ms_per_change=1000 * fanout_cpu / max(1, len(changes)),
        fanout_clients_cpu_ms_per_change=1000 * clients_cpu / max(1, len(changes)),
        changes=changes,
        errors=errors,
    )


@dataclass
class Target:
    """A process the heartbeat generators call: lbserver, or the no-op floor."""

    address: str
    pid: int


def heartbeat_step(
    server: Target,
    log_dir: Path,
    *,
    prefix_first: int,
    services: int,
    backends: int,
    rate: float,
    generators: int,
    concurrency: int,
    warmup: float,
    duration: float,
    mode: str,
) -> HeartbeatStep:
    start = time.monotonic() + 1.5
    processes = []
    share, rest = divmod(backends, generators)
    first = prefix_first
    for g in range(generators):
        count = share + (1 if g < rest else 0)
        log = open(log_dir / "heartbeat.log", "ab")  # noqa: SIM115 - closed below
        processes.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.scale.heartbeat",
                        "--target",
                        server.address,
                        "--services",
                        str(services),
                        "--backends",
                        str(count),
                        "--first",
                        str(first),
                        "--prefix",
                        f"hb{prefix_first // 100_000}",
                        "--mode",
                        mode,
                        "--rate",
                        str(rate / generators),
                        "--concurrency",
                        str(concurrency),
                        "--start",
                        str(start),
                        "--warmup",
                        str(warmup),
                        "--duration",
                        str(duration),
                    ],
                    env=child_env(),
                    stdout=subprocess.PIPE,
                    stderr=log,
                    cwd=REPO_ROOT,
                ),
                log,
            )
        )
        first += count
    time.sleep(max(0.0, start + warmup - time.monotonic()))
    meter = CpuMeter(server.pid)
    time.sleep(max(0.0, start + warmup + duration - time.monotonic()))
    server_cpu = meter.percent()
    outputs = []
    for process, log in processes:
        out, _ = process.communicate(timeout=60)
        log.close()
        outputs.append(json.loads(out.decode().strip().splitlines()[-1]))
    errors: dict[str, int] = {}
    for output in outputs:
        for key, value in output["errors"].items():
            errors[key] = errors.get(key, 0) + value
    step = HeartbeatStep(
        offered=rate,
        achieved=sum(o["rate"] for o in outputs),
        server_cpu_percent=server_cpu,
        generators_cpu_percent=sum(o["cpu_percent"] for o in outputs),
        p50_ms=statistics.median(o["p50_ms"] for o in outputs),
        p99_ms=max(o["p99_ms"] for o in outputs),
        errors=errors,
    )
    print(
        f"  offered {'max' if not rate else f'{rate:.0f}/s'}: {step.achieved:.0f}/s, "
        f"lbserver CPU {server_cpu:.0f} %, generators {step.generators_cpu_percent:.0f} %, "
        f"p50 {step.p50_ms:.1f} ms, p99 {step.p99_ms:.1f} ms"
        + (f", errors {errors}" if errors else ""),
        flush=True,
    )
    return step


def measure_heartbeats(
    server: Target,
    log_dir: Path,
    *,
    shape_index: int,
    services: int,
    backends: int,
    generators: int,
    concurrency: int,
    fractions: Sequence[float],
    warmup: float,
    duration: float,
    first_warmup: float,
    mode: str,
    label: str = "lbserver",
) -> HeartbeatShape:
    shape = HeartbeatShape(services=services, backends=backends, server=label, mode=mode)
    common: dict[str, Any] = {
        "mode": mode,
        "prefix_first": 100_000 * (shape_index + 1),
        "services": services,
        "backends": backends,
        "generators": generators,
        "concurrency": concurrency,
        "warmup": warmup,
        "duration": duration,
    }
    # The first step's warm-up outlasts lbserver's load-report blackout (10 s),
    # so every measured window sees load-aware weights (lists rebuilt from
    # moving capacities), not the blackout's mean weights.
    top = heartbeat_step(server, log_dir, rate=0.0, **{**common, "warmup": first_warmup})
    shape.steps.append(top)
    for fraction in fractions:
        wait_idle(server.pid)
        rate = round(top.achieved * fraction, -1)
        shape.steps.append(heartbeat_step(server, log_dir, rate=rate, **common))
    wait_idle(server.pid)
    if top.achieved > 0:
        shape.cpu_us_per_heartbeat = 1e6 * top.server_cpu_percent / 100 / top.achieved
    shape.at_one_core = rate_at_one_core(shape.steps)
    kept = [s for s in shape.steps if not s.offered or s.achieved >= 0.95 * s.offered]
    shape.max_sustained = max((s.achieved for s in kept), default=0.0)
    return shape


def rate_at_one_core(steps: Sequence[HeartbeatStep]) -> float:
    """The heartbeat rate at which the server's CPU is 100 % of one core, on
    the least-squares line CPU = a + b * rate through every step (one noisy
    5 s window moves it less than interpolating between two steps would)."""
    points = [(s.achieved, s.server_cpu_percent) for s in steps if s.achieved > 0]
    if len(points) >= 2:
        fit = statistics.linear_regression([r for r, _ in points], [c for _, c in points])
        if fit.slope > 0:
            return (100 - fit.intercept) / fit.slope
    if not points:
        return 0.0
    rate, cpu = max(points)
    return rate * 100 / cpu if cpu > 0 else 0.0


def wait_idle(pid: int, limit: float = 15.0) -> None:
    """Until the server has drained the previous step's backlog (its CPU
    over half a second is under 15 %), so it does not count in the next."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        meter = CpuMeter(pid)
        time.sleep(0.5)
        if meter.percent() < 15:
            return


def measure_floor(
    log_dir: Path,
    services: int,
    backends: int,
    args: argparse.Namespace,
    window: tuple[float, float],
    mode: str,
    shape_index: int,
) -> HeartbeatShape:
    """The same generators against bench/scale/noop.py: what one grpc.aio
    unary call costs a server that does nothing."""
    port = free_port()
    with open(log_dir / "noop.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.scale.noop", "--listen", f"{LOOPBACK}:{port}"],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            cwd=REPO_ROOT,
        )
        try:
            assert process.stdout is not None
            process.stdout.readline()
            return measure_heartbeats(
                Target(f"{LOOPBACK}:{port}", process.pid),
                log_dir,
                shape_index=shape_index,
                services=services,
                backends=backends,
                generators=args.hb_generators,
                concurrency=args.hb_concurrency,
                fractions=(0.5,),
                warmup=window[0],
                duration=window[1],
                first_warmup=window[0],
                mode=mode,
                label="no-op",
            )
        finally:
            process.kill()
            process.wait()


# --- main ----------------------------------------------------------------------


def wait_quiet(limit: float) -> None:
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        print(f"load average {procinfo.load_average()}: waiting for a quiet machine", flush=True)
        time.sleep(15)


def parse_shape(text: str) -> tuple[int, int]:
    services, _, per_service = text.partition("x")
    return int(services), int(services) * int(per_service)


def main(argv: Sequence[str] | None = None) -> Results:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument(
        "--protocol",
        choices=("grpclb", "xds", "both"),
        default="both",
        help="streams to measure: BalanceLoad (grpclb), ADS (xds), or both side by side, "
        "each against its own lbserver process (default both)",
    )
    parser.add_argument(
        "--streams", default="1000,5000,10000", help="N values of BalanceLoad streams"
    )
    parser.add_argument(
        "--xds-streams",
        default="1000,5000",
        help="N values of xDS (ADS) streams; the ratios xDS/BalanceLoad are given at the N "
        "measured for both",
    )
    parser.add_argument("--quick", action="store_true", help="fewer trials and shorter windows")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--trials", type=int, default=5, help="join+leave changes per N")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--base-backends", type=int, default=10, help="backends of 'oap'")
    parser.add_argument(
        "--hb-shapes",
        default="50x20,4x250",
        help="heartbeat runs: SERVICESxBACKENDS_PER_SERVICE, comma separated",
    )
    parser.add_argument(
        "--hb-modes",
        default="stream,unary",
        help="heartbeat transports to measure: stream (Registry.HeartbeatStream, what "
        "`lbserver register` uses), unary (Registry.Heartbeat)",
    )
    parser.add_argument("--hb-generators", type=int, default=2)
    parser.add_argument("--hb-concurrency", type=int, default=64, help="in-flight per generator")
    parser.add_argument("--no-heartbeats", action="store_true")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the no-op grpc.aio heartbeat floor"
    )
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, help="seconds to wait for load < 1"
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    parser.add_argument(
        "--section",
        choices=("all", "xds"),
        default="all",
        help="what to write into --out: the whole bench/scale section (all), or only its "
        "subsection 'xDS streams beside BalanceLoad' (xds: the rest stays as the last full "
        "run wrote it; results go to bench/scale/results-xds.json instead of results.json)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--log-dir", default="")
    parser.add_argument(
        "--render",
        default="",
        help="no measuring: write the section again from this results.json (e.g. after "
        "editing bench/scale/notes.md)",
    )
    parser.add_argument(
        "--compare",
        default="",
        help="results.json of an earlier run (e.g. with --lbserver-root on the code before a "
        "change): adds a before/after table",
    )
    parser.add_argument(
        "--change",
        default="the change",
        help="with --compare: what the code before lacks, for the table's title",
    )
    parser.add_argument(
        "--lbserver-root",
        default=str(REPO_ROOT),
        help="import the balancer from this checkout (before/after comparisons)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.trials = min(args.trials, 2)
        args.idle_seconds = min(args.idle_seconds, 5.0)
    if args.render:
        results = results_from_json(json.loads(Path(args.render).read_text()))
        write_report(results, args)
        return results
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    counts_of = {
        "grpclb": sorted(int(n) for n in args.streams.split(",") if n),
        "xds": sorted(int(n) for n in args.xds_streams.split(",") if n),
    }
    shapes = (
        [parse_shape(s) for s in args.hb_shapes.split(",") if s] if not args.no_heartbeats else []
    )
    fractions = (0.5, 0.9) if args.quick else (0.25, 0.5, 0.75, 0.9)
    hb_window = (1.5, 3.0) if args.quick else (2.0, 5.0)

    # SIGTERM ends the run like Ctrl-C: the finally below stops every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench-scale-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    wait_quiet(args.wait_quiet)
    began = time.monotonic()
    results = Results(
        machine=procinfo.machine(),
        command="python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings={
            "lbserver_env": dict(LBSERVER_ENV),
            "client_processes": args.clients,
            "base_backends": args.base_backends,
            "trials": args.trials,
            "idle_seconds": args.idle_seconds,
            "hb_generators": args.hb_generators,
            "hb_concurrency": args.hb_concurrency,
            "hb_window": list(hb_window),
            "lbserver_root": args.lbserver_root,
            "protocols": protocols,
        },
    )
    print(f"logs in {log_dir}; machine {results.machine}", flush=True)
    sides: list[Side] = []
    base_ports = [BASE_PORT + i for i in range(args.base_backends)]
    try:
        for protocol in protocols:
            log_name = "lbserver.log" if protocol == "grpclb" else f"lbserver-{protocol}.log"
            server = Lbserver(log_dir, LBSERVER_ENV, Path(args.lbserver_root), log_name)
            sides.append(Side(protocol, server, counts_of[protocol], 0.0, []))
            print(f"lbserver ({protocol}) pid {server.pid} on {server.address}", flush=True)
            for port in base_ports:
                server.heartbeat(f"oap-{port}", port)
            sides[-1].clients = [
                ClientProcess(i, server.address, log_dir, protocol) for i in range(args.clients)
            ]
        time.sleep(1.0)
        for side in sides:
            side.base_rss_mib = side.server.rss_mib()
        # Each N on one protocol's balancer, then the other's: the ratios
        # come from the same minutes of the same machine.
        for target in sorted({n for side in sides for n in side.counts}):
            for side in sides:
                if target not in side.counts:
                    continue
                print(f"{target} {side.protocol} streams", flush=True)
                result = measure_streams(
                    side.server,
                    side.clients,
                    target,
                    side.current,
                    base_ports,
                    args.trials,
                    args.idle_seconds,
                    protocol=side.protocol,
                    base_rss_mib=side.base_rss_mib,
                )
                results.streams.append(result)
                side.current = target
        for side in sides:
            side.stop_clients()
        # The heartbeat runs below measure the first balancer alone.
        for side in sides[1:]:
            side.server.stop()
        server = sides[0].server
        time.sleep(2.0)
        modes = [m for m in args.hb_modes.split(",") if m]
        for index, (mode, (services, backends)) in enumerate(
            (mode, shape) for mode in modes for shape in shapes
        ):
            print(f"{mode} heartbeats: {backends} backends in {services} services", flush=True)
            results.heartbeats.append(
                measure_heartbeats(
                    Target(server.address, server.pid),
                    log_dir,
                    shape_index=index,
                    mode=mode,
                    services=services,
                    backends=backends,
                    generators=args.hb_generators,
                    concurrency=args.hb_concurrency,
                    fractions=fractions,
                    warmup=hb_window[0],
                    duration=hb_window[1],
                    first_warmup=BLACKOUT_WARMUP,
                )
            )
        for offset, mode in enumerate(modes if shapes and not args.no_floor else []):
            services, backends = shapes[0]
            print(f"{mode} heartbeats to a no-op grpc.aio server: {backends} backends", flush=True)
            results.heartbeats.append(
                measure_floor(
                    log_dir,
                    services,
                    backends,
                    args,
                    hb_window,
                    mode=mode,
                    shape_index=len(modes) * len(shapes) + offset,
                )
            )
    finally:
        for side in sides:
            side.stop_clients()
            side.server.stop()
    results.load_at_end = procinfo.load_average()
    results.seconds = time.monotonic() - began
    (log_dir / "results.json").write_text(json.dumps(asdict(results), indent=2))
    write_report(results, args)
    if not args.no_write:
        kept = "results-xds.json" if args.section == "xds" else "results.json"
        (Path(__file__).parent / kept).write_text(json.dumps(asdict(results), indent=2))
        print(f"wrote bench/scale/{kept}", flush=True)
    return results


def write_report(results: Results, args: argparse.Namespace) -> None:
    """Prints the section (or, with --section xds, its xDS subsection) and,
    unless --no-write, puts it into --out."""
    from .report import render, render_xds, write_section, write_xds_section

    if args.section == "xds":
        text = render_xds(results)
        print(text)
        if not text:
            print("no xDS streams measured: nothing to write", flush=True)
        elif not args.no_write:
            write_xds_section(Path(args.out), text)
            print(f"wrote the xDS subsection of {args.out}", flush=True)
        return

    before = json.loads(Path(args.compare).read_text()) if args.compare else None
    source = ""
    if before is not None:
        root = before.get("settings", {}).get("lbserver_root", "?")
        source = f"`--lbserver-root {root}`, {before['machine']['date']}; `{args.compare}`"
    text = render(results, before, source, args.change)
    print(text)
    if not args.no_write:
        write_section(Path(args.out), text)
        print(f"wrote {args.out}", flush=True)
