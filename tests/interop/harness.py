"""Processes of the interop tests: peer backends, client drivers, a balancer, the proxy.

- `start_backend(processes, impl, name)`: a backend (`aio`, `sync`: the
  Python ones in `peers.py`; `go`: the grpc-go peer) as a managed process on
  a free loopback port; `report()` asks it (directly) what calls it saw.
- `run_client(client, target, plan)`: runs a client driver (`python`, `go`,
  `node`) to completion and returns its JSON result; `start_client(...)`
  starts one whose stdin the test closes to end it (the `loop` plan).
- `BalancerLoop` + `ThreadedBalancer`: `tests.support.probe.FakeBalancer` (a
  scripted grpclb balancer) on an event loop in a thread, so the tests
  themselves stay synchronous.
- `Rig`: backends, a balancer listing them, and `agent-shim proxy` (the real
  CLI) in front, which is all the tests talk to; `RigPool`: one shared rig
  per backend implementation.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc

from tests.interop.protocol import REPORT, Json
from tests.support.probe import FakeBalancer
from tests.support.processes import (
    LOOPBACK,
    ManagedProcess,
    ProcessError,
    ProcessManager,
    _base_env,
)
from tests.support.proxy_process import ProxyProcess, start_proxy

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
TOOLS: Final = REPO_ROOT / ".tools"
GO_PEER: Final = TOOLS / "interop" / "interop-peer"
NODE_MODULES: Final = TOOLS / "node" / "node_modules"
NODE_CLIENT: Final = REPO_ROOT / "tests" / "interop" / "node" / "client.js"
INSTALL_SCRIPT: Final = REPO_ROOT / "scripts" / "install-interop-peers"

CLIENTS: Final = ("python", "go", "node")
BACKENDS: Final = ("aio", "sync", "go")
SERVICE: Final = "interop"

T = TypeVar("T")


def install_peers(timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    """Runs scripts/install-interop-peers (fast when everything is up to date)."""
    return subprocess.run(
        [str(INSTALL_SCRIPT)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def peer_env() -> dict[str, str]:
    return _base_env({"NODE_PATH": str(NODE_MODULES)})


# ---- backends ------------------------------------------------------------------------------------


def backend_argv(impl: str, name: str, grace_ms: int) -> list[str]:
    if impl == "go":
        return [str(GO_PEER), "serve", "--name", name, "--grace-ms", str(grace_ms)]
    if impl in ("aio", "sync"):
        return [
            *(sys.executable, "-m", "tests.interop.peers", "serve"),
            *("--impl", impl, "--name", name, "--grace-ms", str(grace_ms)),
        ]
    raise ValueError(f"unknown backend implementation {impl!r}")


def json_lines(text: str) -> list[Json]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
    return out


class PeerBackend(ManagedProcess):
    """One backend process; its stdout carries JSON event lines."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, impl: str
    ) -> None:
        super().__init__(name, argv, env, log_path)
        self.impl = impl
        self.backend_name = ""
        self.port = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def entry(self) -> tuple[str, int, str]:
        """Its server list entry; the token is `token-<name>`."""
        return (LOOPBACK, self.port, f"token-{self.backend_name}")

    def events(self) -> list[Json]:
        return [e for e in json_lines(self.logs(tail=None)) if "event" in e]

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if event["event"] == "listening":
                    self.port = int(event["port"])
                    self.backend_name = str(event["name"])
                    return
            if not self.alive():
                raise ProcessError(f"{self.name} exited before listening; log:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} not listening after {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def report(self, timeout: float = 5.0) -> Json:
        """What the backend saw (Control/Report, called directly, not through the proxy)."""
        with grpc.insecure_channel(self.address, options=[("grpc.enable_http_proxy", 0)]) as ch:
            reply = ch.unary_unary(REPORT, None, None)(b"", timeout=timeout)
        value: Json = json.loads(reply)
        return value

    def calls(self, prefix: str) -> dict[str, Json]:
        return {k: v for k, v in self.report()["calls"].items() if k.startswith(prefix)}


def start_backend(
    processes: ProcessManager, impl: str, name: str, *, grace_ms: int = 5000
) -> PeerBackend:
    proc = PeerBackend(
        f"backend-{name}",
        backend_argv(impl, name, grace_ms),
        peer_env(),
        processes.log_dir / f"backend-{name}.log",
        impl,
    )
    processes.processes.append(proc)
    proc.wait_listening()
    return proc


# ---- clients -------------------------------------------------------------------------------------


class ClientError(AssertionError):
    """A client driver did not produce a result."""


def client_argv(client: str, target: str, plan: Json) -> list[str]:
    text = json.dumps(plan)
    if client == "python":
        return [
            *(sys.executable, "-m", "tests.interop.peers", "client"),
            *("--target", target, "--plan", text),
        ]
    if client == "go":
        return [str(GO_PEER), "client", "--target", target, "--plan", text]
    if client == "node":
        return ["node", str(NODE_CLIENT), "--target", target, "--plan", text]
    raise ValueError(f"unknown client {client!r}")


def _result(client: str, code: int | None, stdout: str, stderr: str) -> Json:
    results = [r for r in json_lines(stdout) if "mode" in r or "fatal" in r]
    if code != 0 or not results or "fatal" in results[-1]:
        raise ClientError(
            f"{client} client exited with {code}\nstdout:\n{stdout[-5000:]}\n"
            f"stderr:\n{stderr[-5000:]}"
        )
    return results[-1]


def run_client(client: str, target: str, plan: Json, *, timeout: float = 90) -> Json:
    """Runs the `client` driver with `plan` against `target`; its JSON result."""
    try:
        done = subprocess.run(
            client_argv(client, target, plan),
            cwd=REPO_ROOT,
            env=peer_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise ClientError(f"{client} client still running after {timeout}s: {err}") from None
    return _result(client, done.returncode, done.stdout, done.stderr)


class RunningClient:
    """A client driver running in the background (`loop` plans end when stdin closes)."""

    def __init__(self, client: str, target: str, plan: Json) -> None:
        self.client = client
        self.popen = subprocess.Popen(
            client_argv(client, target, plan),
            cwd=REPO_ROOT,
            env=peer_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def finish(self, timeout: float = 60) -> Json:
        """Closes its stdin and waits for its result."""
        try:
            stdout, stderr = self.popen.communicate(input="", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            stdout, stderr = self.popen.communicate()
            raise ClientError(
                f"{self.client} client did not finish in {timeout}s\n{stdout}\n{stderr}"
            ) from None
        return _result(self.client, self.popen.returncode, stdout, stderr)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.communicate()


# ---- the balancer --------------------------------------------------------------------------------


class BalancerLoop:
    """An asyncio loop in a thread for the in-process scripted balancers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="balancers", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class ThreadedBalancer:
    """A `FakeBalancer` served on a `BalancerLoop`."""

    def __init__(self, loop: BalancerLoop) -> None:
        self._loop = loop

        async def make() -> FakeBalancer:
            return await FakeBalancer().start()

        self._balancer = loop.run(make())

    @property
    def address(self) -> str:
        return self._balancer.address

    def set_list(self, servers: Sequence[tuple[str, int, str]]) -> None:
        async def publish() -> None:
            self._balancer.set_list(servers)

        self._loop.run(publish())

    def stop(self) -> None:
        self._loop.run(self._balancer.stop())


# ---- a rig ---------------------------------------------------------------------------------------


class Rig:
    """Backends, a balancer listing them, and `agent-shim proxy` in front of them."""

    def __init__(self, processes: ProcessManager, loop: BalancerLoop) -> None:
        self.processes = processes
        self.balancer = ThreadedBalancer(loop)
        self.backends: list[PeerBackend] = []
        self.proxy: ProxyProcess | None = None

    def start(self, backends: Sequence[tuple[str, str]], *, proxy_args: Sequence[str] = ()) -> Rig:
        """Starts `(impl, name)` backends, lists them all, then starts the proxy."""
        for impl, name in backends:
            self.backends.append(start_backend(self.processes, impl, name))
        self.balancer.set_list([b.entry for b in self.backends])
        self.proxy = start_proxy(
            self.processes,
            balancers=[self.balancer.address],
            service=SERVICE,
            args=["--log-level", "info", *proxy_args],
        )
        return self

    @property
    def target(self) -> str:
        assert self.proxy is not None
        return self.proxy.address

    def backend(self, name: str) -> PeerBackend:
        return next(b for b in self.backends if b.backend_name == name)

    def close(self) -> None:
        self.balancer.stop()


RigFactory = Callable[[list[tuple[str, str]]], Rig]


class RigPool:
    """The shared rigs, one per backend implementation, started on first use."""

    def __init__(self, processes: ProcessManager, loop: BalancerLoop) -> None:
        self.processes = processes
        self._loop = loop
        self._rigs: dict[str, Rig] = {}

    def get(self, impl: str) -> Rig:
        assert impl in BACKENDS, impl
        if impl not in self._rigs:
            self._rigs[impl] = Rig(self.processes, self._loop).start([(impl, f"{impl}-1")])
        return self._rigs[impl]

    def close(self) -> None:
        try:
            self.processes.cleanup()
        finally:
            for rig in self._rigs.values():
                rig.close()
