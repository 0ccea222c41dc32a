"""`python -m bench.balance [--quick] [--out docs/benchmarks.md]`: runs every
case and mode (see the package docstring), prints the report section and,
with --out, writes it into that file's `## Balance (bench/balance)` section.
Process logs, plans and raw results stay in --log-dir (a new temp folder by
default).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench._report import machine as base_machine
from bench._report import publish

from .cases import Settings, cases, describe_rates, kube_service, run_case, run_convergence
from .infra import REGISTRAR_INTERVAL, REGISTRAR_TTL, SCRAPE_INTERVAL, Infra, ensure_nginx
from .modes import GRPCLB, PROXY
from .report import ModeResult, Report, render, write_section


def _nginx_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def machine(nginx: str) -> dict[str, str]:
    info = base_machine()
    load = info.pop("load average at start")
    return {**info, "nginx": _nginx_version(nginx), "load average at start": load}


def settings_text(settings: Settings, lbserver_env: Mapping[str, str]) -> dict[str, str]:
    lb = ", ".join(f"{k}={v}" for k, v in lbserver_env.items())
    return {
        "lbserver": f"{lb} (short timings so a run takes minutes; defaults are 3 s heartbeats, "
        "10 s blackout, no slow start)",
        "registrar": f"in-process Registrar, interval {REGISTRAR_INTERVAL:g} s, "
        f"TTL {REGISTRAR_TTL:g} s, load = slot utilization and completed calls/s",
        "scrape (f)": "lbserver reads each backend's Prometheus text every "
        f"{SCRAPE_INTERVAL:g} s (process_cpu_seconds_total = busy slot-seconds / slots, "
        "completed calls), the same load the registrar reports; members from one "
        "EndpointSlice per backend in a fake Kubernetes API",
        "backends": f"{settings.slots} slots x {settings.service_time * 1000:.0f} ms sleep "
        f"({'fixed' if settings.service_dist == 'fixed' else 'exponentially distributed'}; "
        f"{settings.slots / settings.service_time:.0f} calls/s capacity each)",
        "clients": f"{settings.clients} channels in {settings.client_processes} processes, "
        f"open loop (Poisson), {describe_rates(settings)}; seed {settings.seed}",
        "offered load": "a share of the case's total capacity, given per case",
        "deadline": f"{settings.deadline:g} s per call (a call that hits it counts as failed "
        "and as that latency, so p99 shown as >=)",
        "windows": f"each mode measured {settings.measure:g} s per case, in {settings.rounds} "
        f"slice(s) of {settings.measure / settings.rounds:g} s, the modes taking turns "
        "(d e f a b c, d e f a b c, ...) against the same backends; every slice opens new channels "
        f"and starts with an unmeasured warm-up ({settings.lbserver_warmup:g} s for (d), which "
        f"follows (c): lbserver's weights recover from it; {settings.warmup:g} s otherwise); "
        f"slices are {settings.gap:g} s apart, so the previous slice's calls have ended and "
        "no backend queue is left",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.balance", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short windows, cases equal-5 and hetero-50, convergence under (d) only (< 2 min)",
    )
    parser.add_argument("--out", type=Path, help="Markdown file whose section to write")
    parser.add_argument("--log-dir", type=Path, help="where process logs and raw data go")
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated subset of: equal-2, equal-5, hetero-50, hetero-65, convergence",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LBSERVER_OPTION=VALUE",
        help="override one of lbserver's environment settings (experiments; the report shows it)",
    )
    parser.add_argument(
        "--service-dist",
        choices=("fixed", "exp"),
        default="fixed",
        help="backend hold times: fixed (default) or exponential with the same mean",
    )
    args = parser.parse_args(argv)
    for item in args.set:
        if "=" not in item or not item.startswith("LBSERVER_"):
            parser.error(f"--set takes LBSERVER_OPTION=VALUE, not {item!r}")

    if args.quick:
        settings = Settings(warmup=1.2, lbserver_warmup=4.0, measure=2.5, convergence_observe=2.0)
    else:
        settings = Settings(
            warmup=1.5,
            lbserver_warmup=5.0,
            measure=10.0,
            rounds=2,
            service_dist=args.service_dist,
        )
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-balance-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.balance " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"bench/balance: logs in {log_dir}", flush=True)
    began = time.monotonic()

    nginx = ensure_nginx()
    info = machine(nginx)
    wanted = args.cases.split(",") if args.cases else []
    if args.quick and not wanted:
        wanted = ["equal-5", "hetero-50", "convergence"]
    selected = [c for c in cases(settings) if not wanted or c.name in wanted]
    results: dict[str, list[ModeResult]] = {}
    convergence = []
    overrides = dict(item.split("=", 1) for item in args.set)
    kube_services = [kube_service(c.name) for c in selected]
    with Infra(log_dir, overrides, kube_services) as infra:
        for case in selected:
            print(f"case {case.name} ...", flush=True)
            results[case.name] = run_case(infra, case, settings)
        if not wanted or "convergence" in wanted:
            for mode in (GRPCLB,) if args.quick else (GRPCLB, PROXY):
                print(f"convergence ({mode.letter}) ...", flush=True)
                convergence.append(run_convergence(infra, mode, settings))
    info["load average at end"] = f"{os.getloadavg()[0]:.2f}"
    info["run time"] = f"{time.monotonic() - began:.0f} s"

    report = Report(
        command=command.strip(),
        machine=info,
        settings=settings_text(settings, infra.lbserver_env),
        cases=results,
        case_notes={c.name: c.note for c in selected},
        convergence=convergence,
        slow_start=infra.setting("slow_start"),
        heartbeat=infra.setting("heartbeat_interval"),
        share_threshold=float(infra.lbserver_env.get("LBSERVER_SHARE_THRESHOLD", "0.02")),
    )
    publish(render(report), log_dir, args.out, write_section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
