"""`python -m bench.xds_weights [--quick] [--out docs/benchmarks.md]`: runs
both cases under both layouts (see the package docstring), prints the report
section and, with --out, writes it into that file's `## xDS weights: locality
per backend vs per zone` section. Process logs and raw results stay in
--log-dir (a new temp folder by default).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench._report import machine, publish
from tests.support.dns import DnsServer

from .report import Report, render, write_section
from .run import CASES, LAYOUTS, LBSERVER_ENV, REGISTRAR_INTERVAL, ZONE, Measurement, measure

FULL_CALLS = 10000
QUICK_CALLS = 1000


def settings_text(calls: int) -> dict[str, str]:
    lb = ", ".join(f"{k}={v}" for k, v in LBSERVER_ENV.items())
    return {
        "lbserver": f"`lbserver serve` with {lb} and LBSERVER_XDS_LOCALITIES=backend or zone, "
        "a new balancer per case and layout",
        "registrars": f"`lbserver register --weight W --zone {ZONE} --probe tcp`, interval "
        f"{REGISTRAR_INTERVAL:g} s, one per backend",
        "backends": "counting gRPC servers answering with their name (tests/support/backends.py)",
        "clients": f"one process per client and layout, {calls} measured sequential unary calls "
        "on one channel after the warm-up; the xDS client with GRPC_XDS_BOOTSTRAP = "
        "docs/xds/bootstrap.json with `server_uri` replaced, the grpclb client finding "
        "lbserver through a DNS SRV record `_grpclb._tcp.oap.bench.test` (in-process DNS "
        "server), `grpclb` with `round_robin` child policy",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.xds_weights", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_CALLS} measured calls per client run instead of {FULL_CALLS}",
    )
    parser.add_argument("--calls", type=int, help="measured calls per client run (overrides)")
    parser.add_argument("--out", type=Path, help="Markdown file whose section to write")
    parser.add_argument("--log-dir", type=Path, help="where process logs and raw data go")
    args = parser.parse_args(argv)
    calls = args.calls or (QUICK_CALLS if args.quick else FULL_CALLS)
    if calls < 1:
        parser.error("--calls must be >= 1")

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-xds-weights-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.xds_weights " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    print(f"bench/xds_weights: logs in {log_dir}", flush=True)
    began = time.monotonic()
    info = machine()
    measurements: list[Measurement] = []
    with DnsServer() as dns:
        for case in CASES:
            for layout in LAYOUTS:
                print(f"weights {case.name}, layout {layout} ...", flush=True)
                measurements.append(measure(case, layout, calls, log_dir, dns))
    info["load average at end"] = f"{os.getloadavg()[0]:.2f}"
    info["run time"] = f"{time.monotonic() - began:.0f} s"

    report = Report(
        command=command.strip(),
        machine=info,
        settings=settings_text(calls),
        measurements=measurements,
    )
    publish(render(report), log_dir, args.out, write_section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
