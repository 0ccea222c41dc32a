"""`agent-shim proxy` as a real subprocess, managed by a `ProcessManager`.

`start_proxy(processes, balancers=[...], service=...)` runs
`python -m agent_shim.cli proxy --listen 127.0.0.1:PORT ...` with its log
captured like the lbserver processes (and stopped by `processes.cleanup()`),
and by default waits until the port accepts gRPC connections.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from tests.support.processes import (
    LOOPBACK,
    ManagedProcess,
    ProcessError,
    ProcessManager,
    _base_env,
    free_port,
)

_seq = itertools.count(1)


class ProxyProcess(ManagedProcess):
    """`agent-shim proxy` listening on `host:port`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        host: str,
        port: int,
    ) -> None:
        super().__init__(name, argv, env, log_path)
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Until the proxy accepts gRPC connections; ProcessError with its log
        if it exits first or does not get there in time."""
        with grpc.insecure_channel(self.address) as channel:
            future = grpc.channel_ready_future(channel)
            try:
                future.result(timeout=timeout)
            except grpc.FutureTimeoutError:
                future.cancel()
                state = "exited" if not self.alive() else "not listening"
                raise ProcessError(
                    f"{self.name} {state} after {timeout:.1f}s; log:\n{self.logs()}"
                ) from None


def start_proxy(
    processes: ProcessManager,
    *,
    balancers: Sequence[str],
    service: str,
    port: int | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    timeout: float = 20.0,
    name: str = "agent-shim-proxy",
    host: str = LOOPBACK,
) -> ProxyProcess:
    """Starts `agent-shim proxy --listen HOST:PORT --balancer ... --service ...`
    (HOST 127.0.0.1 unless given: another loopback address stands for a
    gateway's Service address)."""
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "agent_shim.cli",
        "proxy",
        "--listen",
        f"{host}:{port}",
        "--balancer",
        ",".join(balancers),
        "--service",
        service,
        *args,
    ]
    unique = f"{name}-{next(_seq)}"
    proc = ProxyProcess(
        unique, argv, _base_env(env), processes.log_dir / f"{unique}.log", host, port
    )
    processes.processes.append(proc)
    if wait:
        proc.wait_listening(timeout)
    return proc
