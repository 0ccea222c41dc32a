"""The `apache/skywalking-oap-server` stand-in for the cluster tests.

Serves what a SkyWalking agent calls on its collector (tests.support.skywalking
OapStandIn: the real protocol, from the agent package's own stubs) on
SW_CORE_GRPC_PORT (11800), answers HTTP on SW_CORE_REST_PORT (12800, what the
official chart probes), and — like the real OAP only when
SW_TELEMETRY=prometheus — serves Prometheus telemetry on
SW_TELEMETRY_PROMETHEUS_PORT (1234) with the metrics the registrar reads:

    process_cpu_seconds_total     CPU this OAP spent: STANDIN_CPU_PER_SEGMENT
                                  seconds (default 0.002) per segment received,
                                  so equal pods report equal load
    trace_in_latency_count        segments received (a histogram's count)
    trace_analysis_error_count    0
    process_start_time_seconds

Every call and segment is written to standard output as record lines
(`C <call> <method> <t>`, `S <call> <segment> <trace>`, `E <call> <t>`; see
StandInRecord), so `kubectl logs` and the harness read what each pod got,
also after the pod is gone. SIGTERM stops it gracefully.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.skywalking import OapStandIn


class _Counts:
    def __init__(self) -> None:
        self.segments = 0
        self.lock = threading.Lock()


def _serve_http(port: int, body: Any) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            payload = body(self.path).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    started = time.time()
    counts = _Counts()
    cost = float(os.environ.get("STANDIN_CPU_PER_SEGMENT", "0.002"))
    stand_in = OapStandIn(Path("/dev/stdout"), host="0.0.0.0", max_workers=32)
    recorder = stand_in._recorder
    record_segment = recorder.segment

    def segment(call: int, segment_id: str, trace_id: str) -> None:
        with counts.lock:
            counts.segments += 1
        record_segment(call, segment_id, trace_id)

    recorder.segment = segment  # type: ignore[method-assign]
    stand_in.start(int(os.environ.get("SW_CORE_GRPC_PORT", "11800")))
    servers = [_serve_http(int(os.environ.get("SW_CORE_REST_PORT", "12800")), lambda _: "ok\n")]

    def telemetry(_: str) -> str:
        with counts.lock:
            segments = counts.segments
        return (
            "# TYPE process_cpu_seconds_total counter\n"
            f"process_cpu_seconds_total {segments * cost:.6f}\n"
            "# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {started:.3f}\n"
            "# TYPE trace_in_latency histogram\n"
            f'trace_in_latency_count{{protocol="grpc"}} {segments}\n'
            f'trace_in_latency_sum{{protocol="grpc"}} {segments * 0.001:.6f}\n'
            "# TYPE trace_analysis_error_count counter\n"
            'trace_analysis_error_count{protocol="grpc"} 0\n'
        )

    if os.environ.get("SW_TELEMETRY") == "prometheus":
        port = int(os.environ.get("SW_TELEMETRY_PROMETHEUS_PORT", "1234"))
        servers.append(_serve_http(port, telemetry))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"oap stand-in listening on 0.0.0.0:{stand_in.port}", flush=True)
    stop.wait()
    stand_in.stop(grace=5)
    for server in servers:
        server.shutdown()
    print("oap stand-in stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
