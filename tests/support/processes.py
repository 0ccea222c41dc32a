"""`lbserver serve` and `lbserver register` as real subprocesses.

`ProcessManager` starts every process (`[sys.executable, "-m", "lbserver", ...]`)
with stdout and stderr captured to a log file, remembers it, and `cleanup()`
stops all of them (SIGTERM, bounded wait, then SIGKILL), so a failing test
leaves no orphans. Each child runs in its own session so a Ctrl-C on the test
terminal does not reach it before the harness does.

- `start_balancer(...) -> BalancerProcess`: picks free loopback ports (or uses
  the given ones), waits until `grpc.health.v1.Health/Check("")` says SERVING,
  and fails with the process's log if it exits or does not get ready in time.
- `start_registrar(...) -> RegistrarProcess`: `lbserver register` with the
  usual flags; it heartbeats until stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbserver.proto.v1 import lbserver_pb2, lbserver_pb2_grpc
from tests.support.eventually import eventually_blocking

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

T = TypeVar("T")


class ProcessError(RuntimeError):
    """A managed process died or did not get ready; the message carries its log."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on `host` a moment ago."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` different TCP ports that were free on `host` a moment ago
    (all bound at once: the kernel may hand out a port again as soon as it is
    closed, so two free_port() calls can return the same one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """`eventually_blocking` with the process tests' argument names."""
    return eventually_blocking(
        predicate,
        message if isinstance(message, str) else "the condition",
        within=timeout,
        interval=interval,
        detail=message if callable(message) else None,
    )


def _base_env(overrides: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # Make `python -m lbserver` import this checkout even when not installed.
    paths = [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    # No proxy for loopback gRPC, whatever the machine's environment says.
    for key in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(key, None)
    env["no_grpc_proxy"] = "*"
    if overrides:
        env.update(overrides)
    return env


class ManagedProcess:
    """One child process with its log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in _reap
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.popen: subprocess.Popen[bytes] = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def logs(self, tail: int | None = 20000) -> str:
        """The captured stdout+stderr (the last `tail` characters)."""
        with contextlib.suppress(ValueError):
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text if tail is None or len(text) <= tail else "...\n" + text[-tail:]

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the exit code; raises subprocess.TimeoutExpired."""
        code = self.popen.wait(timeout=timeout)
        self._close_log()
        return code

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait at most `timeout`, then SIGKILL. Returns the exit code
        (negative signal number if killed by a signal)."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.returncode

    def kill(self) -> int:
        """SIGKILL (to the whole session, in case the child started others) and reap."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        code = self.popen.wait(timeout=10)
        self._close_log()
        return code

    def _close_log(self) -> None:
        with contextlib.suppress(Exception):
            self._log.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} rc={self.returncode}>"


class BalancerProcess(ManagedProcess):
    """`lbserver serve` listening on `host:port` (gRPC) and `host:metrics_port`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        host: str,
        port: int,
        metrics_port: int,
    ) -> None:
        super().__init__(name, argv, env, log_path)
        self.host = host
        self.port = port
        self.metrics_port = metrics_port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.host}:{self.metrics_port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=[("grpc.enable_http_proxy", 0)])

    def health(self, service: str = "", timeout: float = 1.0) -> int | None:
        """The `HealthCheckResponse.ServingStatus` of `service`; None if unreachable."""
        with self.channel() as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout
                )
            except grpc.RpcError:
                return None
            status: int = reply.status
            return status

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Wait until Health/Check("") is SERVING; ProcessError with the log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ProcessError(
                    f"{self.name} exited with code {self.returncode} before it was healthy;"
                    f" log:\n{self.logs()}"
                )
            if self.health(timeout=0.5) == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() >= deadline:
                raise ProcessError(
                    f"{self.name} not SERVING after {timeout:.1f}s; log:\n{self.logs()}"
                )
            time.sleep(0.1)

    def get_state(self, service: str = "", timeout: float = 5.0) -> lbserver_pb2.GetStateResponse:
        with self.channel() as ch:
            reply: lbserver_pb2.GetStateResponse = lbserver_pb2_grpc.AdminStub(ch).GetState(
                lbserver_pb2.GetStateRequest(service=service), timeout=timeout
            )
            return reply

    def service_state(self, service: str) -> lbserver_pb2.ServiceStatus | None:
        """The state of one service (None if the balancer does not know it)."""
        for s in self.get_state().services:
            if s.name == service:
                return s
        return None

    def backend_ports(self, service: str, listed_only: bool = True) -> set[int]:
        """Ports of the backends of `service` (only those in the server list by default)."""
        try:
            state = self.service_state(service)
        except grpc.RpcError:
            return set()
        if state is None:
            return set()
        return {b.port for b in state.backends if b.list_entries > 0 or not listed_only}

    def wait_backends(
        self, service: str, ports: Iterable[int], timeout: float = 15.0, exact: bool = True
    ) -> lbserver_pb2.ServiceStatus:
        """Wait until the server list of `service` holds the backends on `ports`
        (and only those if `exact`); returns the service's state."""
        want = set(ports)

        def ready() -> lbserver_pb2.ServiceStatus | None:
            if not self.alive():
                raise ProcessError(f"{self.name} died; log:\n{self.logs()}")
            try:
                state = self.service_state(service)
            except grpc.RpcError:
                return None
            if state is None:
                return None
            have = {b.port for b in state.backends if b.list_entries > 0}
            return state if have == want or (not exact and want <= have) else None

        return wait_until(
            ready,
            timeout,
            interval=0.1,
            message=lambda: (
                f"{self.name}: service {service!r} to list ports {sorted(want)}"
                f" (has {sorted(self.backend_ports(service))})"
            ),
        )


class BackendProcess(ManagedProcess):
    """A counting test backend in its own process."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        backend_name: str,
        port: int,
    ) -> None:
        super().__init__(name, argv, env, log_path)
        self.backend_name = backend_name
        self.port = port

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


class RegistrarProcess(ManagedProcess):
    """`lbserver register` heartbeating one backend."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        service: str,
        backend: str,
    ) -> None:
        super().__init__(name, argv, env, log_path)
        self.service = service
        self.backend = backend


class ProcessManager:
    """Starts lbserver processes and guarantees they are all stopped in `cleanup()`."""

    def __init__(self, log_dir: Path | None = None) -> None:
        if log_dir is None:
            log_dir = Path(tempfile.mkdtemp(prefix="lbserver-e2e-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.processes: list[ManagedProcess] = []
        self._seq = 0
        _live_managers.add(self)

    def _log_path(self, name: str) -> tuple[str, Path]:
        self._seq += 1
        unique = f"{self._seq:02d}-{name}"
        return unique, self.log_dir / f"{unique}.log"

    def start_balancer(
        self,
        *,
        port: int | None = None,
        metrics_port: int | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        wait: bool = True,
        timeout: float = 20.0,
        name: str = "balancer",
    ) -> BalancerProcess:
        """Start `lbserver serve --listen 127.0.0.1:PORT --metrics-listen 127.0.0.1:PORT2`.

        Ports default to free ones; `env` adds or overrides environment variables
        (e.g. `LBSERVER_STARTUP_GRACE`). With `wait`, returns once it is SERVING.
        """
        spare = free_ports(3)
        port = port or next(p for p in spare if p != metrics_port)
        metrics_port = metrics_port or next(p for p in spare if p != port)
        argv = [
            sys.executable,
            "-m",
            "lbserver",
            "serve",
            "--listen",
            f"{LOOPBACK}:{port}",
            "--metrics-listen",
            f"{LOOPBACK}:{metrics_port}",
            *args,
        ]
        unique, log_path = self._log_path(name)
        proc = BalancerProcess(unique, argv, _base_env(env), log_path, LOOPBACK, port, metrics_port)
        self.processes.append(proc)
        if wait:
            proc.wait_healthy(timeout)
        return proc

    def restart_balancer(
        self, old: BalancerProcess, *, wait: bool = True, timeout: float = 20.0
    ) -> BalancerProcess:
        """Start a new balancer with the same ports, env and args as `old` (which
        must have exited). Binding may race the old socket's release: retried."""
        if old.alive():
            raise ProcessError(f"{old.name} is still running")
        deadline = time.monotonic() + timeout
        while True:
            unique, log_path = self._log_path("balancer-restarted")
            proc = BalancerProcess(
                unique, old.argv, old.env, log_path, old.host, old.port, old.metrics_port
            )
            self.processes.append(proc)
            if not wait:
                return proc
            try:
                proc.wait_healthy(max(1.0, deadline - time.monotonic()))
                return proc
            except ProcessError:
                if proc.alive() or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)  # died early (e.g. port still busy): try again

    def start_registrar(
        self,
        *,
        balancers: Sequence[str] | str,
        service: str,
        backend: str,
        weight: int | None = None,
        interval: float | None = None,
        ttl: float | None = None,
        zone: str | None = None,
        drain_seconds: float = 0.0,
        probe: str = "grpc",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> RegistrarProcess:
        """Start `lbserver register --balancer ... --service ... --backend ...`.

        Tests drain for 0 s unless they ask otherwise: a SIGTERM then
        deregisters at once and cleanup stays fast. A backend address where
        nothing listens needs `probe="none"`, or it is reported DRAINING."""
        balancer_arg = balancers if isinstance(balancers, str) else ",".join(balancers)
        argv = [
            sys.executable,
            "-m",
            "lbserver",
            "register",
            "--balancer",
            balancer_arg,
            "--service",
            service,
            "--backend",
            backend,
        ]
        if weight is not None:
            argv += ["--weight", str(weight)]
        if interval is not None:
            argv += ["--interval", _num(interval)]
        if ttl is not None:
            argv += ["--ttl", _num(ttl)]
        if zone is not None:
            argv += ["--zone", zone]
        argv += ["--drain-seconds", _num(drain_seconds), "--probe", probe]
        argv += list(args)
        unique, log_path = self._log_path(name or f"register-{backend.replace(':', '-')}")
        proc = RegistrarProcess(unique, argv, _base_env(env), log_path, service, backend)
        self.processes.append(proc)
        return proc

    def start_backend(self, name: str, port: int | None = None) -> BackendProcess:
        """A counting backend in its own process (see backend_process.py),
        answering with `name`; returns once it listens."""
        port = port or free_port()
        argv = [
            sys.executable,
            "-m",
            "tests.support.backend_process",
            "--port",
            str(port),
            "--name",
            name,
        ]
        unique, log_path = self._log_path(f"backend-{name}")
        proc = BackendProcess(unique, argv, _base_env(None), log_path, name, port)
        self.processes.append(proc)
        wait_until(lambda: "ready" in proc.logs() or not proc.alive(), 20, message="backend")
        if not proc.alive():
            raise ProcessError(f"backend {name} died:\n{proc.logs()}")
        return proc

    def all_logs(self, tail: int | None = 8000) -> str:
        parts = []
        for p in self.processes:
            parts.append(f"===== {p.name} (pid {p.pid}, rc {p.returncode}) =====\n{p.logs(tail)}")
        return "\n".join(parts)

    def cleanup(self, timeout: float = 5.0) -> None:
        """Stop every process still running: SIGTERM all, wait, SIGKILL stragglers."""
        running = [p for p in self.processes if p.alive()]
        for p in running:
            with contextlib.suppress(Exception):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in running:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(Exception):
                    p.kill()
        for p in self.processes:
            if p.alive():  # pragma: no cover - belt and braces
                with contextlib.suppress(Exception):
                    p.kill()
            p._close_log()
        _live_managers.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_live_managers: weakref.WeakSet[ProcessManager] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort when the interpreter exits without the fixtures' teardown."""
    for manager in list(_live_managers):
        for p in manager.processes:
            with contextlib.suppress(Exception):
                if p.alive():
                    p.kill()
