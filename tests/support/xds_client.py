"""grpcio's own xDS client against lbserver, for end-to-end tests.

grpcio reads `GRPC_XDS_BOOTSTRAP` once per process, so the client runs in a
subprocess of its own: `python -m tests.support.xds_client --target
xds:///oap --out FILE` calls `/lbtest.Echo/Call` one call at a time at a
steady, bounded rate until SIGTERM (or `--max-seconds`), appending one line
per call to FILE: `<started> <ended> <backend or -> <status code or ->`,
times from `time.monotonic()` (CLOCK_MONOTONIC, the same clock in every
process of the machine, so the test compares them with its own). It prints
`ready` once started; its log (stdout and stderr, with gRPC's xDS trace
when asked) is captured like the lbserver processes'.

- `bootstrap_file(balancer_address, path)`: docs/xds/bootstrap.json, the
  file users copy, as written but for `server_uri`.
- `start_xds_client(processes, bootstrap, target, out)` -> `XdsClientProcess`
  (stopped by `processes.cleanup()`); `.outcomes()` reads the calls so far
  as `tests.support.traffic.Outcome`s.
- `EdsWatch`: the test's own raw ADS stream subscribed to one
  ClusterLoadAssignment, recording when each response arrived and which
  endpoints it listed (the moment the balancer pushed a change, seen from
  outside the client).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from tests.support.ads import endpoint_weights
from tests.support.backends import call_stub
from tests.support.processes import REPO_ROOT, ManagedProcess, ProcessManager, _base_env
from tests.support.started import Started
from tests.support.traffic import Outcome

BOOTSTRAP = REPO_ROOT / "docs" / "xds" / "bootstrap.json"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# gRPC's xDS client trace: why a resource was accepted or rejected (NACK).
TRACE_ENV = {"GRPC_TRACE": "xds_client", "GRPC_VERBOSITY": "debug"}

# The first call waits for the channel's xDS config (LDS, CDS, EDS round trips).
FIRST_CALL_TIMEOUT = 15.0

_seq = itertools.count(1)


def bootstrap_file(balancer_address: str, path: Path, source: Path = BOOTSTRAP) -> Path:
    """Writes `source` (docs/xds/bootstrap.json) to `path` with the first xDS
    server's `server_uri` set to `balancer_address`, nothing else changed."""
    document = json.loads(source.read_text())
    document["xds_servers"][0]["server_uri"] = balancer_address
    path.write_text(json.dumps(document, indent=2))
    return path


class XdsClientProcess(ManagedProcess):
    """The client subprocess and the file it records its calls in."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, out: Path
    ) -> None:
        super().__init__(name, argv, env, log_path)
        self.out = out

    def outcomes(self) -> list[Outcome]:
        """Every call recorded so far (a line still being written is skipped)."""
        if not self.out.exists():
            return []
        calls = []
        # Only whole lines: the last piece has no newline yet (or is empty).
        for line in self.out.read_text().split("\n")[:-1]:
            started, ended, backend, code = line.split()
            calls.append(
                Outcome(
                    float(started),
                    float(ended),
                    None if backend == "-" else backend,
                    None if code == "-" else grpc.StatusCode[code],
                )
            )
        return calls

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes() if o.backend is None]


def start_xds_client(
    processes: ProcessManager,
    *,
    bootstrap: Path,
    target: str,
    out: Path,
    pause: float = 0.005,
    call_timeout: float = 2.0,
    max_seconds: float = 60.0,
    trace: bool = True,
    name: str = "xds-client",
) -> XdsClientProcess:
    """Starts the client with `GRPC_XDS_BOOTSTRAP=bootstrap` calling `target`
    until stopped (or `max_seconds`); returns once it runs."""
    argv = [
        sys.executable,
        "-m",
        "tests.support.xds_client",
        "--target",
        target,
        "--out",
        str(out),
        "--pause",
        str(pause),
        "--call-timeout",
        str(call_timeout),
        "--max-seconds",
        str(max_seconds),
    ]
    env = {"GRPC_XDS_BOOTSTRAP": str(bootstrap), **(TRACE_ENV if trace else {})}
    unique = f"{name}-{next(_seq)}"
    proc = XdsClientProcess(unique, argv, _base_env(env), processes.log_dir / f"{unique}.log", out)
    processes.processes.append(proc)
    return proc


@dataclass(frozen=True)
class EdsUpdate:
    at: float  # time.monotonic() when the response arrived
    version: str
    ports: frozenset[int]  # of every endpoint listed
    weights: Mapping[int, int]  # port -> locality weight


class EdsWatch(Started):
    """A raw ADS stream (state of the world, v3) subscribed to the
    ClusterLoadAssignment `name`, ACKing every response and recording it."""

    def __init__(self, address: str, name: str, node_id: str = "e2e-eds-watch") -> None:
        self._address = address
        self._name = name
        self._node = base_pb2.Node(id=node_id)
        self._requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self._lock = threading.Lock()
        self._updates: list[EdsUpdate] = []
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._run, name="eds-watch", daemon=True)
        self.error: grpc.RpcError | None = None

    def _request(self, version: str = "", nonce: str = "") -> discovery_pb2.DiscoveryRequest:
        return discovery_pb2.DiscoveryRequest(
            node=self._node,
            type_url=ENDPOINT_TYPE,
            resource_names=[self._name],
            version_info=version,
            response_nonce=nonce,
        )

    def _outgoing(self) -> Iterator[discovery_pb2.DiscoveryRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _run(self) -> None:
        assert self._channel is not None
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        try:
            for response in stub.StreamAggregatedResources(self._outgoing()):
                at = time.monotonic()
                self._record(at, response)
                self._requests.put(self._request(response.version_info, response.nonce))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = error

    def _record(self, at: float, response: discovery_pb2.DiscoveryResponse) -> None:
        weights = endpoint_weights(response, self._name) if response.resources else {}
        with self._lock:
            self._updates.append(EdsUpdate(at, response.version_info, frozenset(weights), weights))

    def start(self) -> Self:
        self._channel = grpc.insecure_channel(
            self._address, options=[("grpc.enable_http_proxy", 0)]
        )
        self._requests.put(self._request())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._requests.put(None)
        if self._channel is not None:
            self._channel.close()
        self._thread.join(10)

    def updates(self) -> list[EdsUpdate]:
        with self._lock:
            return list(self._updates)

    def first_with(self, ports: set[int] | frozenset[int]) -> EdsUpdate | None:
        """The first response listing exactly the endpoints on `ports`."""
        return next((u for u in self.updates() if u.ports == ports), None)


# ---- the client subprocess ------------------------------------------------------------


def _main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pause", type=float, default=0.005)
    parser.add_argument("--call-timeout", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    end = time.monotonic() + args.max_seconds
    served = False
    with (
        grpc.insecure_channel(args.target) as channel,
        open(args.out, "a", buffering=1) as out,  # line-buffered: one write per call
    ):
        call = call_stub(channel)
        print("ready", flush=True)
        while not stop.is_set() and time.monotonic() < end:
            started = time.monotonic()
            try:
                # Until the first answer the channel is still fetching its
                # config: wait for it rather than record those calls as lost.
                reply = call(
                    b"xds",
                    timeout=args.call_timeout if served else FIRST_CALL_TIMEOUT,
                    wait_for_ready=not served,
                )
                served = True
                out.write(f"{started:.6f} {time.monotonic():.6f} {reply.decode()} -\n")
            except grpc.RpcError as error:
                code = error.code().name if isinstance(error, grpc.Call) else "UNKNOWN"
                out.write(f"{started:.6f} {time.monotonic():.6f} - {code}\n")
                if isinstance(error, grpc.Call):
                    print(f"call failed: {code} {error.details()}", flush=True)
            stop.wait(args.pause)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(_main())
