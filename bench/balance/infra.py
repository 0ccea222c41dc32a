"""The processes of a bench/balance run, all on 127.0.0.1: lbserver, the
simulated backends, nginx, agent-shim proxy and client processes, plus an
in-process DNS server answering the `_grpclb._tcp` SRV lookups of grpclb
clients, and for mode (f) an in-process fake Kubernetes API
(tests/support/fake_kube.py) holding one EndpointSlice per backend.
`Infra.close()` stops every one of them (tests/support/processes
does the bookkeeping and keeps each process's log in the run's log folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tests.support.dns import DnsServer
from tests.support.fake_kube import FakeKubeApiServer, endpoint, endpoint_slice
from tests.support.processes import (
    REPO_ROOT,
    BalancerProcess,
    ManagedProcess,
    ProcessManager,
    free_port,
)

from .backend import DEREGISTER_METHOD, REQUESTS_METRIC, STATS_METHOD
from .modes import nginx_config

LOOPBACK = "127.0.0.1"
# The port grpclb clients put in their target; they never connect to it (the
# balancer's lists carry the backends' own ports).
SERVICE_PORT = 11800

# Short timings so that a run takes minutes, not hours (docs/benchmarks.md
# says so next to the figures).
LBSERVER_ENV: Mapping[str, str] = {
    "LBSERVER_HEARTBEAT_INTERVAL": "1",
    "LBSERVER_DEFAULT_TTL": "3",
    "LBSERVER_BLACKOUT": "2",
    "LBSERVER_SLOW_START": "5",
    "LBSERVER_MIN_PUSH_INTERVAL": "0.5",
    "LBSERVER_STARTUP_GRACE": "0",
}
REGISTRAR_INTERVAL = 1.0
REGISTRAR_TTL = 3.0
# Mode (f): lbserver scrapes each backend as often as a registrar heartbeats.
SCRAPE_INTERVAL = REGISTRAR_INTERVAL
KUBE_NAMESPACE = "bench"
# Backend i of a case is pod 127.0.0.(POD_IP_BASE + i) in its EndpointSlice:
# scrapes go to http://IP:port/, so every pod needs an address of its own.
POD_IP_BASE = 40


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: this checkout importable, no proxies."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(key, None)
    env["no_grpc_proxy"] = "*"
    env.update(extra or {})
    return env


def ensure_nginx() -> str:
    """The nginx binary; installs Debian's nginx-light (or nginx) when missing."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if found:
        return found
    print("nginx not found: installing it with apt-get (nginx-light)", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    for package in ("nginx-light", "nginx"):
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", package],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            check=False,
        )
        if done.returncode == 0:
            break
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise RuntimeError("could not install nginx (apt-get install nginx-light)")
    return found


def wait_listening(address: str, process: ManagedProcess, timeout: float = 20.0) -> None:
    """Until `address` accepts an HTTP/2 (gRPC) connection."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        while True:
            if not process.alive():
                raise RuntimeError(f"{process.name} exited; log:\n{process.logs(4000)}")
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{process.name} not listening on {address}; log:\n{process.logs(4000)}"
                    ) from None


@dataclass
class BackendProcess:
    """A running `bench.balance.backend`."""

    name: str
    slots: int
    process: ManagedProcess
    port: int
    pod_ip: str = ""  # its address in the EndpointSlice (mode f), if any

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _control(self, method: str, timeout: float = 5.0) -> dict[str, Any]:
        with grpc.insecure_channel(self.address, options=[("grpc.enable_http_proxy", 0)]) as ch:
            call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
            reply: bytes = call(b"", timeout=timeout)
        result: dict[str, Any] = json.loads(reply)
        return result

    def stats(self) -> dict[str, Any]:
        """Buckets of arrivals, completions and busy slot-seconds (see backend.py)."""
        return self._control(STATS_METHOD)

    def deregister(self) -> float:
        """Registrar.stop() in the backend; returns when it began (monotonic)."""
        at = self._control(DEREGISTER_METHOD)["at"]
        return float(at)


class Infra:
    """Owns every process of a run; use as a context manager."""

    def __init__(
        self,
        log_dir: Path,
        lbserver_env: Mapping[str, str] | None = None,
        kube_services: Sequence[str] = (),
    ) -> None:
        """`kube_services`: the lbserver services of mode (f), learned from
        the fake Kubernetes API (Kubernetes service of the same name) and
        scraped; lbserver is told of them at start."""
        self.log_dir = log_dir
        self.lbserver_env = {**LBSERVER_ENV, **(lbserver_env or {})}
        self.manager = ProcessManager(log_dir)
        self.dns = DnsServer().start()
        self.kube: FakeKubeApiServer | None = None
        self.telemetry_port = 0
        discovery = {}
        if kube_services:
            self.kube = FakeKubeApiServer()
            self.telemetry_port = free_port()
            discovery = self._kube_env(kube_services)
        self.balancer: BalancerProcess = self.manager.start_balancer(
            env={**self.lbserver_env, **discovery}
        )
        self._seq = 0

    def _kube_env(self, services: Sequence[str]) -> dict[str, str]:
        assert self.kube is not None
        kubeconfig = self.log_dir / "kubeconfig.json"
        kubeconfig.write_text(json.dumps(self.kube.kubeconfig()))
        scrape = {
            "port": self.telemetry_port,
            "interval": SCRAPE_INTERVAL,
            "timeout": SCRAPE_INTERVAL,
            "cpus": 1.0,
            "requests_metric": REQUESTS_METRIC,
        }
        watched = [
            {
                "service": name,
                "namespace": KUBE_NAMESPACE,
                "kubernetes_service": name,
                "port_name": "grpc",
                "mode": "kubernetes",
                "scrape": scrape,
            }
            for name in services
        ]
        return {
            "LBSERVER_KUBECONFIG": str(kubeconfig),
            "LBSERVER_KUBERNETES_SERVICES": json.dumps(watched),
        }

    def __enter__(self) -> Infra:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.manager.cleanup()
        self.dns.stop()
        if self.kube is not None:
            self.kube.close()

    def _spawn(self, name: str, argv: Sequence[str]) -> ManagedProcess:
        self._seq += 1
        unique = f"{self._seq:03d}-{name}"
        process = ManagedProcess(unique, argv, child_env(), self.log_dir / f"{unique}.log")
        self.manager.processes.append(process)
        return process

    def start_backends(
        self,
        names: Sequence[str],
        slots: Sequence[int],
        service_time: float,
        service: str,
        service_dist: str = "fixed",
        pods: bool = False,
    ) -> list[BackendProcess]:
        """Start backends (in parallel) registered for `service`; returns once
        each listens. With `pods`, each also serves on a pod IP of its own,
        with telemetry (mode f)."""
        started = []
        for index, (name, n) in enumerate(zip(names, slots, strict=True)):
            port = free_port()
            pod_ip = f"127.0.0.{POD_IP_BASE + index}" if pods else ""
            pod_args = ["--pod-ip", pod_ip, "--telemetry-port", str(self.telemetry_port)]
            argv = [
                sys.executable, "-m", "bench.balance.backend",
                "--listen", f"{LOOPBACK}:{port}", "--name", name,
                "--slots", str(n), "--service-time", str(service_time),
                "--service-dist", service_dist,
                "--balancer", self.balancer.address, "--service", service,
                "--interval", str(REGISTRAR_INTERVAL), "--ttl", str(REGISTRAR_TTL),
                *(pod_args if pods else ()),
            ]  # fmt: skip
            process = self._spawn(f"backend-{name}", argv)
            started.append(BackendProcess(name, n, process, port, pod_ip))
        for backend in started:
            wait_listening(backend.address, backend.process)
        return started

    def publish_pods(self, service: str, backends: Sequence[BackendProcess]) -> None:
        """One EndpointSlice per backend (each has its own port) of the
        Kubernetes service `service`, every endpoint ready."""
        assert self.kube is not None, "Infra without kube_services"
        for b in backends:
            self.kube.add_slice(
                KUBE_NAMESPACE,
                endpoint_slice(
                    f"{service}-{b.name}",
                    service,
                    [endpoint(b.pod_ip, pod=b.name)],
                    ports=(("grpc", b.port),),
                ),
            )

    def unpublish_pods(self, service: str, backends: Sequence[BackendProcess]) -> None:
        assert self.kube is not None
        for b in backends:
            self.kube.delete_slice(KUBE_NAMESPACE, f"{service}-{b.name}")

    def wait_listed(
        self, service: str, backends: Sequence[BackendProcess], timeout: float = 20.0
    ) -> None:
        self.balancer.wait_backends(service, [b.port for b in backends], timeout=timeout)

    def list_state(self, service: str) -> dict[int, tuple[int, float]]:
        """(server-list entries, effective weight) per backend port, as
        lbserver has them now."""
        state = self.balancer.service_state(service)
        if state is None:
            return {}
        return {b.port: (b.list_entries, round(b.effective_weight, 3)) for b in state.backends}

    def list_entries(self, service: str) -> dict[int, int]:
        """Server-list entries per backend port, as lbserver has it now."""
        return {port: entries for port, (entries, _) in self.list_state(service).items()}

    def setting(self, name: str) -> float:
        """A numeric lbserver option of this run (`heartbeat_interval`, ...)."""
        return float(self.lbserver_env[f"LBSERVER_{name.upper()}"])

    def start_nginx(
        self, backends: Sequence[BackendProcess], tag: str
    ) -> tuple[ManagedProcess, str]:
        binary = ensure_nginx()
        prefix = self.log_dir / f"nginx-{tag}"
        prefix.mkdir(parents=True, exist_ok=True)
        address = f"{LOOPBACK}:{free_port()}"
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config(str(prefix), address, [b.address for b in backends]))
        process = self._spawn(f"nginx-{tag}", [binary, "-p", str(prefix), "-c", str(conf)])
        wait_listening(address, process)
        return process, address

    def start_proxy(self, service: str, tag: str) -> tuple[ManagedProcess, str]:
        address = f"{LOOPBACK}:{free_port()}"
        argv = [
            sys.executable, "-m", "agent_shim.cli", "proxy",
            "--listen", address, "--balancer", self.balancer.address, "--service", service,
            "--log-level", "warning",
        ]  # fmt: skip
        process = self._spawn(f"proxy-{tag}", argv)
        wait_listening(address, process)
        return process, address

    def grpclb_target(self, service: str) -> str:
        """A target whose `_grpclb._tcp` SRV record names lbserver."""
        name = f"{service}.bench.test"
        self.dns.set_balancers(name, [(LOOPBACK, self.balancer.port)])
        return self.dns.target(name, SERVICE_PORT)

    def start_client(self, tag: str, plan_json: str) -> tuple[ManagedProcess, Path]:
        plan = self.log_dir / f"plan-{tag}.json"
        out = self.log_dir / f"result-{tag}.json"
        plan.write_text(plan_json)
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        argv = [
            sys.executable,
            "-m",
            "bench.balance.client",
            "--plan",
            str(plan),
            "--out",
            str(out),
        ]
        return self._spawn(f"client-{tag}", argv), out
