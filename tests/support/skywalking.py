"""SkyWalking OAP stand-ins, built from the real agent's own generated stubs.

An `OapStandIn` is a `grpc.server` serving what a SkyWalking agent calls on its
collector, with the request types of the agent's `skywalking.protocol`
package (installed by `scripts/install-test-tools` from the
`apache-skywalking` sdist; its wheel lacks that package):

- `skywalking.v3.TraceSegmentReportService/collect` (client streaming) and
  `collectInSync`: every segment is recorded;
- `ManagementService/reportInstanceProperties`, `keepAlive` (the agent's
  heartbeat), `ProfileTask/getProfileTaskCommands`, `collectSnapshot`,
  `reportTaskFinish`, `LogReportService/collect`, `MeterReportService/collect`,
  `collectBatch`, `ConfigurationDiscoveryService/fetchConfigurations`,
  `JVMMetricReportService/collect`, `EventService/collect`: answered with an
  empty `Commands`, and counted as calls.

Everything a stand-in receives is appended, line by line and unbuffered, to a
record file, so the counts survive a SIGKILL of the stand-in:

    C <call> <method> <monotonic>          a call started
    S <call> <segment id> <trace id>       a segment arrived on that call
    E <call> <monotonic>                   the call returned

(`time.monotonic()` is system-wide on Linux, so a test compares it with its own
clock.) `StandInRecord.read(path)` parses a record file.

Run one as a process (what the e2e tests do, to be able to SIGKILL it):

    python -m tests.support.skywalking --listen 127.0.0.1:PORT --record FILE

`start_stand_in(processes, name)` does that under a `ProcessManager` and waits
until it accepts connections. SIGTERM stops it gracefully.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from tests.support.processes import (
    LOOPBACK,
    ManagedProcess,
    ProcessError,
    ProcessManager,
    _base_env,
    free_port,
)

INSTALL_HINT = (
    "the SkyWalking Python agent with its generated protocol package is needed: "
    "run scripts/install-test-tools (pip install --no-binary apache-skywalking apache-skywalking)"
)

COLLECT = "/skywalking.v3.TraceSegmentReportService/collect"


def agent_protocol_available() -> bool:
    """True if `skywalking.protocol` (sdist-only) can be imported."""
    try:
        _proto("language_agent.Tracing_pb2_grpc")
    except ImportError:
        return False
    return True


def _proto(name: str) -> ModuleType:
    """A module of the agent's generated `skywalking.protocol` package (untyped)."""
    return importlib.import_module(f"skywalking.protocol.{name}")


# ---- the record file ----------------------------------------------------------------


class _Recorder:
    """Appends record lines to a file with one write(2) each (O_APPEND)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._calls = itertools.count(1)
        self._lock = threading.Lock()

    def call_started(self, method: str) -> int:
        with self._lock:
            call = next(self._calls)
        self._write(f"C {call} {method} {time.monotonic():.6f}\n")
        return call

    def segment(self, call: int, segment_id: str, trace_id: str) -> None:
        self._write(f"S {call} {segment_id} {trace_id}\n")

    def call_ended(self, call: int) -> None:
        self._write(f"E {call} {time.monotonic():.6f}\n")

    def _write(self, line: str) -> None:
        os.write(self._fd, line.encode())

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class RecordedCall:
    number: int
    method: str
    started: float
    ended: float | None = None


@dataclass
class StandInRecord:
    """What one stand-in received, read back from its record file."""

    calls: dict[int, RecordedCall] = field(default_factory=dict)
    segments: list[tuple[int, str, str]] = field(default_factory=list)  # (call, seg, trace)

    @classmethod
    def read(cls, path: Path) -> StandInRecord:
        record = cls()
        if not path.exists():
            return record
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "C":
                number = int(parts[1])
                record.calls[number] = RecordedCall(number, parts[2], float(parts[3]))
            elif len(parts) == 4 and parts[0] == "S":
                record.segments.append((int(parts[1]), parts[2], parts[3]))
            elif len(parts) == 3 and parts[0] == "E":
                number = int(parts[1])
                if number in record.calls:
                    call = record.calls[number]
                    record.calls[number] = RecordedCall(
                        number, call.method, call.started, float(parts[2])
                    )
            # A partial last line (the stand-in was killed mid-write) is skipped.
        return record

    def segment_ids(self) -> Counter[str]:
        return Counter(seg for _, seg, _ in self.segments)

    def collect_calls(self) -> list[RecordedCall]:
        return [c for c in self.calls.values() if c.method == COLLECT]

    def calls_started_after(self, t: float) -> list[RecordedCall]:
        return [c for c in self.calls.values() if c.started > t]

    def open_collect_calls(self) -> list[RecordedCall]:
        return [c for c in self.collect_calls() if c.ended is None]


# ---- the servicers (duck-typed: the generated add_*_to_server only look up methods) ---


class _Base:
    def __init__(self, recorder: _Recorder, service: str) -> None:
        self._recorder = recorder
        self._service = service
        self._commands = _proto("common.Command_pb2").Commands

    def _unary(self, method: str) -> Any:
        call = self._recorder.call_started(f"/skywalking.v3.{self._service}/{method}")
        self._recorder.call_ended(call)
        return self._commands()

    def _drain(self, method: str, requests: Iterator[Any]) -> Any:
        call = self._recorder.call_started(f"/skywalking.v3.{self._service}/{method}")
        for _ in requests:
            pass
        self._recorder.call_ended(call)
        return self._commands()


class _TraceSegmentReportService(_Base):
    def collect(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        recorder = self._recorder
        call = recorder.call_started(COLLECT)
        for segment in request_iterator:
            recorder.segment(call, segment.traceSegmentId, segment.traceId)
        recorder.call_ended(call)
        return self._commands()

    def collectInSync(self, request: Any, context: grpc.ServicerContext) -> Any:
        recorder = self._recorder
        call = recorder.call_started("/skywalking.v3.TraceSegmentReportService/collectInSync")
        for segment in request.segments:
            recorder.segment(call, segment.traceSegmentId, segment.traceId)
        recorder.call_ended(call)
        return self._commands()


class _ManagementService(_Base):
    def reportInstanceProperties(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unary("reportInstanceProperties")

    def keepAlive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unary("keepAlive")


class _ProfileTask(_Base):
    def getProfileTaskCommands(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unary("getProfileTaskCommands")

    def collectSnapshot(self, request_iterator: Iterator[Any], context: Any) -> Any:
        return self._drain("collectSnapshot", request_iterator)

    def reportTaskFinish(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unary("reportTaskFinish")

    def goAwayProfileTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unary("goAwayProfileTask")


class _StreamCollect(_Base):
    """LogReportService, EventService: `collect` is client streaming."""

    def collect(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return self._drain("collect", request_iterator)


class _MeterReportService(_StreamCollect):
    def collectBatch(self, request_iterator: Iterator[Any], context: Any) -> Any:
        return self._drain("collectBatch", request_iterator)


class _UnaryCollect(_Base):
    """JVMMetricReportService: `collect` is unary."""

    def collect(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unary("collect")


class _ConfigurationDiscoveryService(_Base):
    def fetchConfigurations(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unary("fetchConfigurations")


_SERVICES: Sequence[tuple[str, str, type[_Base], str]] = (
    # (module, add function, servicer class, service name)
    (
        "language_agent.Tracing_pb2_grpc",
        "add_TraceSegmentReportServiceServicer_to_server",
        _TraceSegmentReportService,
        "TraceSegmentReportService",
    ),
    (
        "management.Management_pb2_grpc",
        "add_ManagementServiceServicer_to_server",
        _ManagementService,
        "ManagementService",
    ),
    ("profile.Profile_pb2_grpc", "add_ProfileTaskServicer_to_server", _ProfileTask, "ProfileTask"),
    (
        "logging.Logging_pb2_grpc",
        "add_LogReportServiceServicer_to_server",
        _StreamCollect,
        "LogReportService",
    ),
    (
        "language_agent.Meter_pb2_grpc",
        "add_MeterReportServiceServicer_to_server",
        _MeterReportService,
        "MeterReportService",
    ),
    (
        "language_agent.ConfigurationDiscoveryService_pb2_grpc",
        "add_ConfigurationDiscoveryServiceServicer_to_server",
        _ConfigurationDiscoveryService,
        "ConfigurationDiscoveryService",
    ),
    (
        "language_agent.JVMMetric_pb2_grpc",
        "add_JVMMetricReportServiceServicer_to_server",
        _UnaryCollect,
        "JVMMetricReportService",
    ),
    ("event.Event_pb2_grpc", "add_EventServiceServicer_to_server", _StreamCollect, "EventService"),
)


class OapStandIn:
    """A sync gRPC server answering a SkyWalking agent like an OAP collector."""

    def __init__(self, record_path: Path, host: str = LOOPBACK, max_workers: int = 16) -> None:
        self.host = host
        self.record_path = record_path
        self._recorder = _Recorder(record_path)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oap"),
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", -1)],
        )
        for module, add, servicer, service in _SERVICES:
            getattr(_proto(module), add)(servicer(self._recorder, service), self._server)
        self.port = 0

    def start(self, port: int = 0) -> OapStandIn:
        self.port = self._server.add_insecure_port(f"{self.host}:{port}")
        self._server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait(10)
        self._recorder.close()

    def wait(self) -> None:
        self._server.wait_for_termination()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


# ---- as a process ---------------------------------------------------------------------


class StandInProcess(ManagedProcess):
    """`python -m tests.support.skywalking` listening on `host:port`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        host: str,
        port: int,
        record_path: Path,
    ) -> None:
        super().__init__(name, argv, env, log_path)
        self.host = host
        self.port = port
        self.record_path = record_path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def record(self) -> StandInRecord:
        return StandInRecord.read(self.record_path)

    def wait_listening(self, timeout: float = 20.0) -> None:
        with grpc.insecure_channel(self.address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                raise ProcessError(
                    f"{self.name} not listening after {timeout:.1f}s; log:\n{self.logs()}"
                ) from None


def start_stand_in(
    processes: ProcessManager, name: str, *, wait: bool = True, timeout: float = 20.0
) -> StandInProcess:
    """Starts an OAP stand-in process on a free loopback port."""
    port = free_port()
    record_path = processes.log_dir / f"{name}.record"
    argv = [
        sys.executable,
        "-m",
        "tests.support.skywalking",
        "--listen",
        f"{LOOPBACK}:{port}",
        "--record",
        str(record_path),
    ]
    proc = StandInProcess(
        name,
        argv,
        _base_env(None),
        processes.log_dir / f"{name}.log",
        LOOPBACK,
        port,
        record_path,
    )
    processes.processes.append(proc)
    if wait:
        proc.wait_listening(timeout)
    return proc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A SkyWalking OAP stand-in for tests.")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--record", required=True, type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    stand_in = OapStandIn(args.record, host=host).start(int(port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"oap stand-in listening on {stand_in.address}", flush=True)
    stop.wait()
    stand_in.stop(grace=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
