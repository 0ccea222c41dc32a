"""A native grpcio client with the grpclb load-balancing policy, set up by
the documentation's own code: the README's Python block (which creates
`channel`) is executed as written, then the client reports segments through
that channel.

    python -m tests.cluster.images.grpclb_client --snippet FILE --calls N
        [--rate PER_SECOND] [--timeout S] [--name NAME]

Each call is `TraceSegmentReportService/collectInSync` with one segment whose
id is `<name>-<n>`, so the OAP stand-ins' records show which backend got
which call. At the end it prints `RESULT {"ok": N, "failed": {CODE: N}}` and
exits 0 (the test judges the counts), then waits for SIGTERM when --linger.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--snippet", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--name", default="native")
    parser.add_argument("--linger", action="store_true")
    args = parser.parse_args(argv)

    namespace: dict[str, object] = {"grpc": grpc, "__name__": "readme_snippet"}
    exec(compile(args.snippet.read_text(), str(args.snippet), "exec"), namespace)
    channel = namespace["channel"]
    assert isinstance(channel, grpc.Channel), f"the snippet made no channel: {channel!r}"

    tracing = importlib.import_module("skywalking.protocol.language_agent.Tracing_pb2")
    stubs = importlib.import_module("skywalking.protocol.language_agent.Tracing_pb2_grpc")
    stub = stubs.TraceSegmentReportServiceStub(channel)
    ok = 0
    failed: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    for i in range(args.calls):
        segment = tracing.SegmentObject(
            traceId=f"{args.name}-trace-{i}",
            traceSegmentId=f"{args.name}-{i}",
            service=args.name,
            serviceInstance=args.name,
        )
        try:
            stub.collectInSync(
                tracing.SegmentCollection(segments=[segment]),
                timeout=args.timeout,
                wait_for_ready=False,
            )
            ok += 1
        except grpc.RpcError as err:
            failed[err.code().name] += 1
            print(f"call {i} failed: {err.code().name} {err.details()}", flush=True)
        pause = started + (i + 1) / args.rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    print("RESULT " + json.dumps({"ok": ok, "failed": dict(failed)}), flush=True)
    if args.linger:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
