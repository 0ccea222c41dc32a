"""The real SkyWalking Python agent (`apache-skywalking`), producing traces.

    python -m tests.support.skywalking_agent [--collector HOST:PORT] --segments N
        [--rate PER_SECOND] [--queue-timeout S] --out FILE|- [--linger S]

(`--collector` defaults to SW_AGENT_COLLECTOR_BACKEND_SERVICES, the variable
the agent itself reads; `--out -` writes to standard output.)

Starts the agent (gRPC protocol, `agent_collector_backend_services` = the
collector address, i.e. the `agent-shim proxy`), creates N trace segments (an
entry span with a local child span each) at the given rate, and writes the
segment id and trace id of each one to FILE as it finishes it. Then it waits
until the agent's reporter has taken every segment off its queue and lingers
(reporting goes on) until SIGTERM/SIGINT or `--linger` seconds, and exits 0
through the agent's own shutdown, which flushes what is left.

How the agent reports (skywalking/agent/__init__.py, agent/protocol/grpc.py):
one reporter thread takes segments off a queue and streams them to
`TraceSegmentReportService/collect`, one client-streaming call per batch; a
call goes on while segments keep coming, for up to `agent_queue_timeout`
seconds (an int, default 1). With `--queue-timeout 0` every collect call
carries exactly one segment, so a proxy that balances per call balances per
segment; the default 1 makes long streams of many segments.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO


def _output(path: str) -> contextlib.AbstractContextManager[TextIO]:
    if path == "-":
        return contextlib.nullcontext(sys.stdout)
    return Path(path).open("w", buffering=1)


def _agent_queue(agent: Any) -> Any:
    """The agent's segment queue (a queue.Queue; private, name-mangled)."""
    return agent._SkyWalkingAgent__segment_queue


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--collector",
        default=os.environ.get("SW_AGENT_COLLECTOR_BACKEND_SERVICES"),
        metavar="HOST:PORT",
    )
    parser.add_argument("--segments", type=int, required=True)
    parser.add_argument("--rate", type=float, default=200.0, help="segments per second")
    parser.add_argument("--queue-timeout", type=int, default=0)
    parser.add_argument("--out", required=True, help="file for the segment ids, or -")
    parser.add_argument("--linger", type=float, default=60.0)
    parser.add_argument("--name", default="shim-e2e")
    args = parser.parse_args(argv)
    if not args.collector:
        parser.error("--collector or SW_AGENT_COLLECTOR_BACKEND_SERVICES is required")

    config = importlib.import_module("skywalking.config")
    config.init(
        agent_collector_backend_services=args.collector,
        agent_protocol="grpc",
        agent_name=args.name,
        agent_instance_name=f"{args.name}-instance",
        agent_queue_timeout=args.queue_timeout,
        agent_logging_level="WARNING",
        # Heartbeats (ManagementService) every second: more unary calls through the proxy.
        agent_collector_heartbeat_period=1,
        agent_meter_reporter_active=False,
        agent_log_reporter_active=False,
        # No library plugins: this process has nothing for them to instrument.
        agent_disable_plugins="sw_.*",
    )
    agent_module = importlib.import_module("skywalking.agent")
    agent_module.agent.start()
    get_context = importlib.import_module("skywalking.trace.context").get_context

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    started = time.monotonic()
    with _output(args.out) as out:
        for i in range(args.segments):
            if stop.is_set():
                break
            context = get_context()
            with context.new_entry_span(op=f"/e2e/{i}") as span:
                span.layer = importlib.import_module("skywalking").Layer.Http
                with context.new_local_span(op=f"work-{i}"):
                    pass
                segment = context.segment
                ids = f"{segment.segment_id} {segment.related_traces[0]}"
            out.write(ids + "\n")  # after the span ended: the segment is queued
            out.flush()
            pause = started + (i + 1) * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    print(f"produced {i + 1} segments", flush=True)

    queue = _agent_queue(agent_module.agent)
    deadline = time.monotonic() + args.linger
    while queue.unfinished_tasks and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.05)
    print(f"segment queue drained (left: {queue.unfinished_tasks})", flush=True)
    stop.wait(max(0.0, deadline - time.monotonic()))
    print("exiting", flush=True)
    return 0  # the agent's atexit hook reports anything left


if __name__ == "__main__":
    sys.exit(main())
