"""One client run of bench/xds_weights, as its own process.

    python -m bench.xds_weights.client --target T --expect N --calls C --out R.json [--grpclb]

Opens one grpcio channel to `--target` (an `xds:///` target: the process's
GRPC_XDS_BOOTSTRAP says where the xDS server is; with `--grpclb`, a
`dns://` target whose `_grpclb._tcp` SRV record names the balancer), then:

1. warm-up: sequential calls until `--expect` different backends have
   answered (every locality's subchannel is then READY and in the picker),
   and `--settle` calls more; bounded by `--warmup-timeout` seconds;
2. measurement: `--calls` sequential unary calls of `/lbtest.Echo/Call`,
   each answered with the backend's name, counted per name.

Writes {"counts": {name: calls}, "failures": {code: calls}, ...} to --out.
A separate process per run because grpcio reads GRPC_XDS_BOOTSTRAP once per
process, and so that the client's CPU is not the driver's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from tests.support.backends import CALL_METHOD, grpclb_channel_options

CALL_TIMEOUT = 5.0


def _call(stub: grpc.UnaryUnaryMultiCallable[bytes, bytes]) -> tuple[str, str]:
    """(backend name, "OK") or ("", status code name)."""
    try:
        reply: bytes = stub(b"x", timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else None
        return "", code.name if code is not None else "UNKNOWN"
    return reply.decode(), "OK"


def run(
    target: str, grpclb: bool, expect: int, settle: int, calls: int, warmup_timeout: float
) -> dict[str, Any]:
    options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
    if grpclb:
        options = [*grpclb_channel_options(), *options]
    opened = time.monotonic()
    seen: set[str] = set()
    warmup_calls, warmup_failures = 0, Counter[str]()
    first_ok_after: float | None = None
    with grpc.insecure_channel(target, options=options) as channel:
        stub = channel.unary_unary(CALL_METHOD, request_serializer=None, response_deserializer=None)
        deadline = opened + warmup_timeout
        while len(seen) < expect:
            if time.monotonic() > deadline:
                return {
                    "error": f"only {sorted(seen)} answered within {warmup_timeout:g} s",
                    "warmup_calls": warmup_calls,
                    "warmup_failures": dict(warmup_failures),
                }
            name, code = _call(stub)
            warmup_calls += 1
            if code == "OK":
                seen.add(name)
                if first_ok_after is None:
                    first_ok_after = time.monotonic() - opened
            else:
                warmup_failures[code] += 1
                time.sleep(0.1)  # no server list yet: do not spin
        for _ in range(settle):
            _call(stub)
            warmup_calls += 1
        counts, failures = Counter[str](), Counter[str]()
        began = time.monotonic()
        for _ in range(calls):
            name, code = _call(stub)
            if code == "OK":
                counts[name] += 1
            else:
                failures[code] += 1
        seconds = time.monotonic() - began
    return {
        "counts": dict(counts),
        "failures": dict(failures),
        "calls": calls,
        "seconds": round(seconds, 3),
        "warmup_calls": warmup_calls,
        "warmup_failures": dict(warmup_failures),
        "first_ok_after": round(first_ok_after or 0.0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.xds_weights.client", description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--grpclb", action="store_true", help="use grpcio's grpclb policy")
    parser.add_argument("--expect", type=int, required=True, help="backends to see in warm-up")
    parser.add_argument("--settle", type=int, default=100, help="warm-up calls after that")
    parser.add_argument("--calls", type=int, required=True, help="measured calls")
    parser.add_argument("--warmup-timeout", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    result = run(
        args.target, args.grpclb, args.expect, args.settle, args.calls, args.warmup_timeout
    )
    args.out.write_text(json.dumps(result))
    print(f"client done: {json.dumps(result)}", flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
