"""bench/proxy: the `agent-shim proxy` against a direct connection and nginx.

    python -m bench.proxy.run [--duration 5] [--upload-mb 100] [--repeat 2]
                              [--slow-mb 1024] [--slow-rate 10] [--from-checkout]
                              [--no-docs]

On loopback, with one echo backend (`bench.proxy.backend`), it measures three
paths to the backend:

- direct: the client connects to the backend;
- agent-shim: through `agent-shim proxy` (a real process) whose balancer is a
  real `lbserver serve` with the backend registered by `lbserver register`;
- nginx: through nginx `grpc_pass` (Debian's nginx-light, installed with
  apt-get if missing; one worker process, upstream keepalive, generated config).

For each: unary calls (100-byte request) at concurrency 1 and 32 (p50/p99
latency, calls/s), client-streaming uploads of `--upload-mb` MB in 16 KiB and
in 256 KiB messages (MB/s), each workload run `--repeat` times keeping the
best run, and for the proxies the CPU time they used per call
(utime+stime from /proc, so 1 / that = the calls/s one proxy process can carry
on one core of this machine) and their resident memory (VmRSS, peak VmHWM).
Every process (client, backend, proxy, lbserver) shares the machine's cores,
so the calls/s measured end to end are bounded by the client and the backend
too; the CPU-per-call figure isolates the proxy.

Results go to bench/proxy/results.json and, unless --no-docs, replace the
section between the `bench/proxy` markers in docs/benchmarks.md. Runs in about
two minutes; it is not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.proxy.backend import UNARY

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "bench" / "proxy" / "results.json"
BEGIN = "<!-- bench/proxy:begin -->"
END = "<!-- bench/proxy:end -->"
LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Client-streaming uploads: SkyWalking segments are a few KiB each; bigger
# messages show the per-byte rather than the per-message cost.
UPLOADS = {"upload_16k": 16 * 1024, "upload_256k": 256 * 1024}

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    client_max_body_size 0;
    upstream backend {{
        server {backend};
        keepalive 64;
    }}
    server {{
        listen {listen} http2;
        http2_max_concurrent_streams 1024;
        location / {{
            grpc_pass grpc://backend;
            grpc_read_timeout 120s;
            grpc_send_timeout 120s;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH", "")]))
    for key in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        e.pop(key, None)
    e["no_grpc_proxy"] = "*"
    return e


@dataclass
class Processes:
    logs: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], *, own_path: bool = False, **extra_env: str
    ) -> subprocess.Popen[bytes]:
        """`own_path`: the program finds its modules itself (an installed
        script), without this checkout on PYTHONPATH."""
        log = (self.logs / f"{name}.log").open("wb")
        environment = {**env(), **extra_env}
        if own_path:
            environment.pop("PYTHONPATH", None)
        proc = subprocess.Popen(
            list(argv),
            cwd=REPO,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.started):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def wait_serving(target: str, timeout: float = 30.0) -> None:
    """Until a unary call through `target` succeeds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with grpc.insecure_channel(target) as channel:
        stub = channel.unary_unary(UNARY, None, None)
        while time.monotonic() < deadline:
            try:
                stub(b"ready?", timeout=2, wait_for_ready=True)
                return
            except grpc.RpcError as err:
                last = err
                time.sleep(0.2)
    raise RuntimeError(f"{target} is not serving: {last!r}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def ensure_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if found:
        return found
    print("installing nginx-light with apt-get ...", flush=True)
    subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
    for package in ("nginx-light", "nginx"):
        done = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", package],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode == 0:
            break
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise RuntimeError("could not install nginx")
    return found


def run_client(*args: str, timeout: float = 300) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.proxy.client", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(
    name: str,
    target: str,
    pids: Sequence[int],
    duration: float,
    upload_mb: float,
    repeat: int,
) -> dict[str, Any]:
    """The workloads against one target, each run `repeat` times keeping the
    best run (the machine is shared: the best run is the least disturbed);
    CPU of `pids` (the proxy's processes) per call / per 100 MB."""
    result: dict[str, Any] = {"path": name, "target": target}
    for concurrency in (1, 32):
        runs = []
        for _ in range(repeat):
            before = sum(cpu_seconds(p) for p in pids)
            r = run_client(
                "unary", "--target", target, "--concurrency", str(concurrency),
                "--duration", str(duration),
            )  # fmt: skip
            used = sum(cpu_seconds(p) for p in pids) - before
            if pids and r["calls"]:
                # Counts the 0.5 s warm-up's calls too (at the measured rate).
                r["proxy_cpu_ms_per_call"] = used / (r["calls"] * (1 + 0.5 / duration)) * 1e3
            runs.append(r)
        best = max(runs, key=lambda r: r["calls_per_s"])
        best["runs_calls_per_s"] = [round(r["calls_per_s"]) for r in runs]
        result[f"unary_c{concurrency}"] = best
        print(f"  {name} unary c={concurrency}: {json.dumps(best)}", flush=True)
    for key, message_bytes in UPLOADS.items():
        runs = []
        for _ in range(repeat):
            before = sum(cpu_seconds(p) for p in pids)
            r = run_client(
                "upload", "--target", target, "--megabytes", str(upload_mb),
                "--message-bytes", str(message_bytes),
            )  # fmt: skip
            used = sum(cpu_seconds(p) for p in pids) - before
            if pids:
                r["proxy_cpu_s_per_100mb"] = used / (r["bytes"] / 1e8)
            runs.append(r)
        best = max(runs, key=lambda r: r["mb_per_s"])
        result[key] = best
        print(f"  {name} {key}: {json.dumps(best)}", flush=True)
    if pids:
        mem = [memory_kib(p) for p in pids]
        result["rss_mib"] = sum(m.get("VmRSS", 0) for m in mem) / 1024
        result["peak_rss_mib"] = sum(m.get("VmHWM", 0) for m in mem) / 1024
    return result


def slow_backend_case(target: str, pid: int, megabytes: float, rate: float) -> dict[str, float]:
    """`megabytes` uploaded through a proxy to a backend reading `rate` MB/s,
    with the proxy's RSS sampled every 0.2 s."""
    print(f"slow backend: {megabytes:g} MB at {rate:g} MB/s through {target}", flush=True)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append(memory_kib(pid).get("VmRSS", 0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = run_client(
            "upload", "--target", target, "--megabytes", str(megabytes),
            "--message-bytes", str(16 * 1024), "--timeout", str(megabytes / rate * 2 + 60),
            timeout=megabytes / rate * 2 + 120,
        )  # fmt: skip
    finally:
        done.set()
        sampler.join()
    result = {
        "megabytes": r["bytes"] / 1e6,
        "rate_mb_per_s": rate,
        "seconds": r["seconds"],
        "mb_per_s": r["mb_per_s"],
        "max_rss_mib": max(samples, default=0) / 1024,
        "peak_rss_mib": memory_kib(pid).get("VmHWM", 0) / 1024,
    }
    print(f"  slow backend: {json.dumps(result)}", flush=True)
    return result


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    nginx_version = subprocess.run(
        [ensure_nginx(), "-v"], capture_output=True, text=True, check=False
    ).stderr.strip()
    return {
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory": f"{mem_kib / 1024 / 1024:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "nginx": nginx_version.replace("nginx version: ", ""),
        "load_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def image_venv(tmp: Path) -> list[str]:
    """`agent-shim` installed as the Dockerfile installs it (a venv without
    pip, the project installed with --compile, no editable-install hooks or
    other .pth files), so its memory is what a sidecar container's is."""
    venv = tmp / "image-venv"
    print("installing the project into a venv as the Dockerfile does ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
            "install", "--quiet", "--compile", str(REPO),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return [str(venv / "bin" / "agent-shim")]


@contextlib.contextmanager
def deployment(tmp: Path, slow_rate: float, from_image: bool) -> Iterator[dict[str, Any]]:
    procs = Processes(tmp)
    try:
        backend_port = free_port()
        procs.start(
            "backend",
            [sys.executable, "-m", "bench.proxy.backend", "--listen", f"{LOOPBACK}:{backend_port}"],
        )
        backend = f"{LOOPBACK}:{backend_port}"
        wait_serving(backend)

        lb_port = free_port()
        procs.start(
            "lbserver",
            [
                sys.executable, "-m", "lbserver", "serve",
                "--listen", f"{LOOPBACK}:{lb_port}", "--metrics-listen", f"{LOOPBACK}:0",
                "--log-level", "warning",
            ],
            LBSERVER_STARTUP_GRACE="0",
            LBSERVER_HEARTBEAT_INTERVAL="1",
        )  # fmt: skip
        procs.start(
            "register",
            [
                sys.executable, "-m", "lbserver", "register",
                "--balancer", f"{LOOPBACK}:{lb_port}", "--service", "bench",
                "--backend", backend, "--interval", "1", "--log-level", "warning",
            ],
        )  # fmt: skip
        shim = image_venv(tmp) if from_image else [sys.executable, "-m", "agent_shim.cli"]
        proxy_port = free_port()
        proxy = procs.start(
            "agent-shim-proxy",
            own_path=from_image,
            argv=[
                *shim, "proxy",
                "--listen", f"{LOOPBACK}:{proxy_port}",
                "--balancer", f"{LOOPBACK}:{lb_port}", "--service", "bench",
                "--log-level", "warning",
            ],
        )  # fmt: skip
        wait_serving(f"{LOOPBACK}:{proxy_port}")
        # A sidecar at rest: its balancer stream up, one call made.
        time.sleep(2)
        idle = memory_kib(proxy.pid)

        # The slow-backend case: a second service whose one backend reads
        # uploads at `slow_rate` MB/s, behind its own proxy.
        slow_backend_port = free_port()
        procs.start(
            "slow-backend",
            [
                sys.executable, "-m", "bench.proxy.backend",
                "--listen", f"{LOOPBACK}:{slow_backend_port}",
                "--read-mb-per-s", str(slow_rate),
            ],
        )  # fmt: skip
        slow_backend = f"{LOOPBACK}:{slow_backend_port}"
        wait_serving(slow_backend)
        procs.start(
            "register-slow",
            [
                sys.executable, "-m", "lbserver", "register",
                "--balancer", f"{LOOPBACK}:{lb_port}", "--service", "bench-slow",
                "--backend", slow_backend, "--interval", "1", "--log-level", "warning",
            ],
        )  # fmt: skip
        slow_proxy_port = free_port()
        slow_proxy = procs.start(
            "agent-shim-proxy-slow",
            own_path=from_image,
            argv=[
                *shim, "proxy",
                "--listen", f"{LOOPBACK}:{slow_proxy_port}",
                "--balancer", f"{LOOPBACK}:{lb_port}", "--service", "bench-slow",
                "--log-level", "warning",
            ],
        )  # fmt: skip
        wait_serving(f"{LOOPBACK}:{slow_proxy_port}")

        nginx_port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(tmp=tmp, backend=backend, listen=f"{LOOPBACK}:{nginx_port}")
        )
        nginx = procs.start("nginx", [ensure_nginx(), "-c", str(conf)])
        wait_serving(f"{LOOPBACK}:{nginx_port}")
        workers = children(nginx.pid)
        yield {
            "paths": {
                "direct": (backend, []),
                "agent-shim proxy": (f"{LOOPBACK}:{proxy_port}", [proxy.pid]),
                "nginx grpc_pass": (f"{LOOPBACK}:{nginx_port}", workers),
            },
            "idle_rss_mib": idle.get("VmRSS", 0) / 1024,
            "slow": (f"{LOOPBACK}:{slow_proxy_port}", slow_proxy.pid),
        }
    finally:
        procs.stop_all()


def markdown(report: dict[str, Any]) -> str:
    rows = {r["path"]: r for r in report["results"]}
    direct = rows["direct"]

    lines = [
        BEGIN,
        "## agent-shim proxy (`bench/proxy`)",
        "",
        f"Measured {report['date']} on {report['machine']['cpu']}, {report['machine']['memory']},"
        f" Linux {report['machine']['kernel']}, Python {report['machine']['python']},"
        f" grpcio {report['machine']['grpcio']}, {report['machine']['nginx']};"
        f" load average {report['machine']['load_before']} when it started.",
        "",
        f"Command: `{report['command']}` (loopback; client, backend, proxies and lbserver"
        " share the machine's cores; the client and the echo backend are Python grpc.aio"
        " processes; nginx runs one worker; agent-shim runs from a venv installed as the"
        " container image installs it; each figure is the best of"
        f" {report['repeat']} runs).",
        "",
        "| path | c=1 p50 | c=1 p99 | added p50 (c=1) | c=32 p50 | c=32 p99 | calls/s (c=32)"
        " | proxy CPU per call (c=1) | proxy CPU per call (c=32) | calls/s per proxy core"
        " | upload MB/s, 16 KiB msgs | upload MB/s, 256 KiB msgs | proxy RSS (peak) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        c1, c32 = r["unary_c1"], r["unary_c32"]
        proxied = r is not direct
        added = f"{c1['p50_ms'] - direct['unary_c1']['p50_ms']:+.3f} ms" if proxied else "-"
        cpu = c32.get("proxy_cpu_ms_per_call")
        cpu1 = c1.get("proxy_cpu_ms_per_call")
        rss = f"{r['rss_mib']:.1f} MiB ({r['peak_rss_mib']:.1f} MiB)" if "rss_mib" in r else "-"
        lines.append(
            f"| {r['path']} | {c1['p50_ms']:.3f} ms | {c1['p99_ms']:.3f} ms | {added}"
            f" | {c32['p50_ms']:.2f} ms | {c32['p99_ms']:.2f} ms | {c32['calls_per_s']:,.0f}"
            f" | {f'{cpu1:.3f} ms' if cpu1 else '-'}"
            f" | {f'{cpu:.3f} ms' if cpu else '-'} | {f'{1e3 / cpu:,.0f}' if cpu else '-'}"
            f" | {r['upload_16k']['mb_per_s']:.1f} | {r['upload_256k']['mb_per_s']:.1f} | {rss} |"
        )
    lines += [
        "",
        "agent-shim at rest (balancer stream up, before the load):"
        f" {report['idle_rss_mib']:.1f} MiB RSS.",
    ]
    slow = report.get("slow_backend")
    if slow:
        lines += [
            "",
            f"Slow backend: {slow['megabytes']:,.0f} MB uploaded in 16 KiB messages through"
            f" agent-shim to a backend reading {slow['rate_mb_per_s']:g} MB/s took"
            f" {slow['seconds']:.0f} s ({slow['mb_per_s']:.1f} MB/s); the proxy's RSS stayed"
            f" at most {slow['max_rss_mib']:.1f} MiB (peak {slow['peak_rss_mib']:.1f} MiB):"
            " flow control held the client back instead of buffering.",
        ]
    lines += ["", *report.get("notes", []), END]
    return "\n".join(lines) + "\n"


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per unary run")
    parser.add_argument("--upload-mb", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=2, help="runs per workload; best kept")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument(
        "--slow-mb", type=float, default=1024.0, help="MB uploaded to the slow backend (0: skip)"
    )
    parser.add_argument("--slow-rate", type=float, default=10.0, help="MB/s the slow backend reads")
    parser.add_argument(
        "--from-checkout",
        action="store_true",
        help="run agent-shim from this checkout's interpreter instead of a venv installed "
        "as the container image installs it",
    )
    args = parser.parse_args(argv)
    ensure_nginx()
    host = machine()  # before the load: it records the load average
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp,
        deployment(Path(tmp), args.slow_rate, not args.from_checkout) as setup,
    ):
        results = []
        for name, (target, pids) in setup["paths"].items():
            print(f"{name} ({target})", flush=True)
            results.append(measure(name, target, pids, args.duration, args.upload_mb, args.repeat))
        slow = None
        if args.slow_mb > 0:
            slow_target, slow_pid = setup["slow"]
            slow = slow_backend_case(slow_target, slow_pid, args.slow_mb, args.slow_rate)
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.proxy.run" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "machine": host,
        "results": results,
        "idle_rss_mib": setup["idle_rss_mib"],
        "slow_backend": slow,
        "seconds": round(time.monotonic() - started, 1),
        "repeat": args.repeat,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    print(section)
    if not args.no_docs:
        write_doc(section)
    print(f"done in {report['seconds']} s; results in {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
