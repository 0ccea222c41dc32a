"""The `## Control-plane scale (bench/scale)` section of docs/benchmarks.md.

Everything between the `bench/scale` markers is rewritten by each run: the
generated figures, then the hand-written analysis kept in
bench/scale/notes.md, then (when the run measured xDS streams) the
subsection "xDS streams beside BalanceLoad" between its own markers, with
its analysis from bench/scale/notes-xds.md. A run with `--section xds`
rewrites only that subsection; a full run that measured no xDS streams
keeps the one there is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .results import Results, StreamsResult

BEGIN = "<!-- bench/scale:begin -->"
END = "<!-- bench/scale:end -->"
XDS_BEGIN = "<!-- bench/scale/xds:begin -->"
XDS_END = "<!-- bench/scale/xds:end -->"
TITLE = "## Control-plane scale (bench/scale)"
XDS_TITLE = "### xDS streams beside BalanceLoad"
NOTES = Path(__file__).with_name("notes.md")
XDS_NOTES = Path(__file__).with_name("notes-xds.md")

# Issue 8's targets on this 2-core machine.
MAX_RSS_MIB = 1024.0
MAX_FANOUT_P99_MS = 1000.0
MIN_HEARTBEATS_PER_CORE = 5000.0
MAX_IDLE_CPU_PERCENT = 5.0


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _ratio(new: float, old: float) -> str:
    if math.isnan(new) or math.isnan(old) or old <= 0:
        return "-"
    return f"{new / old:.2f}x"


def _machine(results: Results) -> str:
    m = results.machine
    return (
        f"Measured {m['date']} on {m['CPU']}, {m['RAM']} RAM, Linux {m['kernel']}, "
        f"Python {m['Python']}, grpcio {m['grpcio']}; load average (1/5/15 min) "
        f"{m['load average at start']} at the start, {results.load_at_end} at the end; "
        f"the run took {results.seconds:.0f} s."
    )


def _settings(results: Results) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in results.settings["lbserver_env"].items())


def _per_change(s: StreamsResult) -> str:
    return ", ".join(
        f"{c.kind} {_ms(c.p99_ms)}/{_ms(c.max_ms)}"
        + (f" ({c.missing} missing)" if c.missing else "")
        for c in s.changes
    )


def _comparison(results: Results, before: Mapping[str, Any], source: str, change: str) -> list[str]:
    """Before/after rows: the same run on the balancer before a change."""
    lines = [
        "",
        f"Before and after {change}: the same command, run on the code before it ({source}).",
        "",
        "| measure | before | after |",
        "|---|---|---|",
    ]
    old_streams = {
        (s.get("protocol", "grpclb"), s["streams"]): s for s in before.get("streams", [])
    }
    for new in results.streams:
        old = old_streams.get((new.protocol, new.streams))
        if old is None:
            continue
        n = f"{new.streams:,} {'xDS ' if new.protocol == 'xds' else ''}streams"
        lines += [
            f"| {n}: fan-out p50 / p99 / max | {_ms(old['fanout_p50_ms'])} / "
            f"{_ms(old['fanout_p99_ms'])} / {_ms(old['fanout_max_ms'])} "
            f"| {_ms(new.fanout_p50_ms)} / {_ms(new.fanout_p99_ms)} / {_ms(new.fanout_max_ms)} |",
            f"| {n}: lbserver CPU per change | "
            f"{old['fanout_server_cpu_ms_per_change']:,.0f} ms "
            f"| {new.fanout_server_cpu_ms_per_change:,.0f} ms |",
            f"| {n}: lbserver RSS, idle CPU | {old['rss_mib']:,.0f} MiB, "
            f"{old['idle_cpu_percent']:.2f} % | {new.rss_mib:,.0f} MiB, "
            f"{new.idle_cpu_percent:.2f} % |",
        ]
    old_shapes = {
        (h["services"], h["backends"], h.get("mode", "unary")): h
        for h in before.get("heartbeats", [])
        if h.get("server", "lbserver") == "lbserver"
    }
    for shape in results.heartbeats:
        if shape.server != "lbserver":
            continue
        old = old_shapes.get((shape.services, shape.backends, shape.mode))
        if old is None:
            continue
        label = f"{shape.mode}, {shape.services} x {shape.backends // shape.services} backends"
        lines += [
            f"| heartbeats/s at one core, {label} | {old['at_one_core']:,.0f}/s "
            f"| {shape.at_one_core:,.0f}/s |",
            f"| CPU per heartbeat at the fastest step, {label} "
            f"| {old['cpu_us_per_heartbeat']:,.0f} µs | {shape.cpu_us_per_heartbeat:,.0f} µs |",
        ]
    return lines


def render(
    results: Results,
    before: Mapping[str, Any] | None = None,
    before_source: str = "",
    change: str = "the change",
) -> str:
    grpclb = [s for s in results.streams if s.protocol == "grpclb"]
    lines = [
        TITLE,
        "",
        _machine(results),
        "",
        f"Command: `{results.command.strip()}`. One `lbserver serve` process "
        "(settings: "
        + _settings(results)
        + f", everything else default); {results.settings['client_processes']} client "
        "processes each holding a share of the N BalanceLoad streams, every stream on its own "
        "channel and TCP connection; the client processes share the machine's two cores with "
        "the balancer. Service `oap` has "
        f"{results.settings['base_backends']} backends; a fan-out change is one backend "
        "joining (Registry.Heartbeat) or leaving (Registry.Deregister), timed from just "
        "before the orchestrator's call to each stream's arrival of the new list "
        f"({results.settings['trials']} joins and as many leaves per N).",
        "",
    ]
    if grpclb:
        lines += [
            "| streams | live | open time | lbserver RSS | peak RSS | idle CPU | fan-out p50 "
            "| fan-out p99 | fan-out max | lbserver CPU per change | clients' CPU per change "
            "| client RSS (all) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines.append(
            "No BalanceLoad streams in this run (`--protocol xds`): see the xDS subsection."
        )
    for s in grpclb:
        lines.append(
            f"| {s.streams:,} | {s.live:,} | {s.open_seconds:.1f} s | {s.rss_mib:,.0f} MiB "
            f"| {s.peak_rss_mib:,.0f} MiB | {s.idle_cpu_percent:.2f} % "
            f"| {_ms(s.fanout_p50_ms)} | {_ms(s.fanout_p99_ms)} | {_ms(s.fanout_max_ms)} "
            f"| {s.fanout_server_cpu_ms_per_change:,.0f} ms "
            f"| {s.fanout_clients_cpu_ms_per_change:,.0f} ms | {s.client_rss_mib:,.0f} MiB |"
        )
    lines.append("")
    for s in grpclb:
        lines.append(f"- {s.streams:,} streams, p99/max per change: {_per_change(s)}.")
        if s.errors or s.failed:
            lines.append(f"  Streams that ended: {s.failed} ({s.errors}).")
    if results.heartbeats:
        lines += [
            "",
            "Heartbeat throughput: "
            f"{results.settings['hb_generators']} generator processes (`unary`: grpc.aio "
            f"Registry.Heartbeat calls, {results.settings['hb_concurrency']} in flight each; "
            "`stream`: one Registry.HeartbeatStream per backend, as `lbserver register` keeps, "
            "one heartbeat in flight on each; every "
            "heartbeat with a load report jittered around a per-backend level), first as fast "
            "as they go (`max`), then paced at fractions of that rate; "
            f"{results.settings['hb_window'][1]:g} s windows after "
            f"{results.settings['hb_window'][0]:g} s warm-up. lbserver CPU is the process's "
            "utime+stime over the window, in % of one core; the generators run on the same "
            "two cores.",
            "",
            "| server | transport | backends (services x per service) | offered | achieved "
            "| server CPU | generators' CPU | p50 | p99 | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for shape in results.heartbeats:
            label = f"{shape.backends:,} ({shape.services} x {shape.backends // shape.services})"
            for step in shape.steps:
                offered = "max" if not step.offered else f"{step.offered:,.0f}/s"
                errors = sum(step.errors.values())
                lines.append(
                    f"| {shape.server} | {shape.mode} | {label} | {offered} "
                    f"| {step.achieved:,.0f}/s "
                    f"| {step.server_cpu_percent:.0f} % | {step.generators_cpu_percent:.0f} % "
                    f"| {_ms(step.p50_ms)} | {_ms(step.p99_ms)} | {errors} |"
                )
        lines.append("")
        for shape in results.heartbeats:
            who = (
                "lbserver"
                if shape.server == "lbserver"
                else "the no-op grpc.aio server (bench/scale/noop.py: the floor)"
            )
            lines.append(
                f"- {who}, {shape.mode} heartbeats, {shape.backends:,} backends in "
                f"{shape.services} services: CPU reaches "
                f"one core at **{shape.at_one_core:,.0f} heartbeats/s** (least-squares line of "
                f"CPU over rate through the steps); {shape.cpu_us_per_heartbeat:,.0f} µs of "
                f"server CPU per "
                f"call at the fastest step; highest paced rate kept up with: "
                f"{shape.max_sustained:,.0f}/s."
            )
    lines += ["", "Targets (issue 8):", "", "| target | measured | |", "|---|---|---|"]
    largest = max(grpclb, key=lambda s: s.streams, default=None)
    if largest is not None:
        n = f"{largest.streams:,}"
        fanout_ok = largest.fanout_p99_ms <= MAX_FANOUT_P99_MS and not largest.fanout_missing
        lines += [
            f"| {n} streams held, RSS <= 1 GiB | {largest.live:,} live, "
            f"{largest.rss_mib:,.0f} MiB | "
            f"{_met(largest.live == largest.streams and largest.rss_mib <= MAX_RSS_MIB)} |",
            f"| fan-out p99 <= 1 s ({n} streams) | {_ms(largest.fanout_p99_ms)} "
            f"| {_met(fanout_ok)} |",
            f"| idle CPU < 5 % of a core ({n} streams) | {largest.idle_cpu_percent:.2f} % "
            f"| {_met(largest.idle_cpu_percent < MAX_IDLE_CPU_PERCENT)} |",
        ]
    for mode in dict.fromkeys(h.mode for h in results.heartbeats):
        served = [h for h in results.heartbeats if h.server == "lbserver" and h.mode == mode]
        if not served:
            continue
        worst = min(served, key=lambda h: h.at_one_core)
        best = max(served, key=lambda h: h.at_one_core)
        lines.append(
            f"| >= 5,000 heartbeats/s on one core ({mode}) "
            f"| {best.at_one_core:,.0f}/s ({best.backends // best.services} backends per "
            f"service) to {worst.at_one_core:,.0f}/s ({worst.backends // worst.services} per "
            f"service) at one core | {_met(worst.at_one_core >= MIN_HEARTBEATS_PER_CORE)} |"
        )
    if before is not None:
        lines += _comparison(results, before, before_source, change)
    if NOTES.exists():
        lines += ["", NOTES.read_text().strip()]
    xds = render_xds(results)
    if xds:
        lines += ["", xds.rstrip()]
    return "\n".join(lines) + "\n"


def render_xds(results: Results) -> str:
    """The subsection "xDS streams beside BalanceLoad", between its markers
    ("" when the run measured no xDS streams)."""
    xds = [s for s in results.streams if s.protocol == "xds"]
    if not xds:
        return ""
    grpclb = {s.streams: s for s in results.streams if s.protocol == "grpclb"}
    rows = sorted(results.streams, key=lambda s: (s.streams, s.protocol != "grpclb"))
    clients = results.settings["client_processes"]
    lines = [
        XDS_BEGIN,
        XDS_TITLE,
        "",
        _machine(results),
        "",
        f"Command: `{results.command.strip()}`. "
        + (
            "Two `lbserver serve` processes side by side, one holding the BalanceLoad "
            "streams, the other the xDS streams, "
            if grpclb
            else "One `lbserver serve` process holding the xDS streams, "
        )
        + f"with the same settings ({_settings(results)}, everything else default); "
        f"{clients} client processes per balancer, every stream on its own channel and TCP "
        "connection, all on the machine's two cores. An xDS stream is a raw ADS client "
        "(`StreamAggregatedResources`, state of the world, bench/scale/xds.py) that "
        "subscribes as gRPC does: LDS for `oap`, then CDS for the cluster the listener "
        "routes to, then EDS for the ClusterLoadAssignment the cluster names; it ACKs every "
        "response. Its fan-out time is the arrival of the EDS response with the new "
        "endpoints; a BalanceLoad stream's, that of the new server list. "
        + (
            "At each N the BalanceLoad balancer is measured first, then the xDS one, with the "
            "same changes (one backend joining by heartbeat, then leaving by deregistration, "
            f"{results.settings['trials']} times each). "
            if grpclb
            else f"{results.settings['trials']} joins and as many leaves per N. "
        )
        + "RSS per stream is the balancer's RSS with N streams less its RSS before any "
        "stream, over N.",
        "",
        "| streams | protocol | live | open time | lbserver RSS | RSS per stream | idle CPU "
        "| fan-out p50 | fan-out p99 | fan-out max | lbserver CPU per change "
        "| clients' CPU per change |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        protocol = "xDS (ADS)" if s.protocol == "xds" else "BalanceLoad"
        per_stream = s.rss_kib_per_stream
        lines.append(
            f"| {s.streams:,} | {protocol} | {s.live:,} | {s.open_seconds:.1f} s "
            f"| {s.rss_mib:,.0f} MiB "
            f"| {'-' if math.isnan(per_stream) else f'{per_stream:,.1f} KiB'} "
            f"| {s.idle_cpu_percent:.2f} % | {_ms(s.fanout_p50_ms)} | {_ms(s.fanout_p99_ms)} "
            f"| {_ms(s.fanout_max_ms)} | {s.fanout_server_cpu_ms_per_change:,.0f} ms "
            f"| {s.fanout_clients_cpu_ms_per_change:,.0f} ms |"
        )
    paired = [(x, grpclb[x.streams]) for x in xds if x.streams in grpclb]
    if paired:
        lines += [
            "",
            "xDS over BalanceLoad, same run:",
            "",
            "| streams | RSS per stream | fan-out p50 | fan-out p99 | lbserver CPU per change "
            "| clients' CPU per change |",
            "|---|---|---|---|---|---|",
        ]
        for x, g in paired:
            server_cpu = _ratio(
                x.fanout_server_cpu_ms_per_change, g.fanout_server_cpu_ms_per_change
            )
            clients_cpu = _ratio(
                x.fanout_clients_cpu_ms_per_change, g.fanout_clients_cpu_ms_per_change
            )
            lines.append(
                f"| {x.streams:,} | {_ratio(x.rss_kib_per_stream, g.rss_kib_per_stream)} "
                f"| {_ratio(x.fanout_p50_ms, g.fanout_p50_ms)} "
                f"| {_ratio(x.fanout_p99_ms, g.fanout_p99_ms)} | {server_cpu} | {clients_cpu} |"
            )
    lines.append("")
    for s in rows:
        protocol = "xDS" if s.protocol == "xds" else "BalanceLoad"
        lines.append(f"- {s.streams:,} {protocol} streams, p99/max per change: {_per_change(s)}.")
        if s.errors or s.failed:
            lines.append(f"  Streams that ended: {s.failed} ({s.errors}).")
    if XDS_NOTES.exists():
        lines += ["", XDS_NOTES.read_text().strip()]
    lines += ["", XDS_END]
    return "\n".join(lines) + "\n"


# bench/balance rewrites its section from its heading to the next "## "
# line, which would take a begin marker placed after it: a new bench/scale
# section goes in front of it.
BALANCE_TITLE = "## Balance (bench/balance)"


def _xds_block(text: str) -> str:
    """The xDS subsection of `text`, markers included ("" if none)."""
    if XDS_BEGIN not in text or XDS_END not in text:
        return ""
    _, _, rest = text.partition(XDS_BEGIN)
    inner, _, _ = rest.partition(XDS_END)
    return f"{XDS_BEGIN}{inner}{XDS_END}"


def write_section(path: Path, text: str) -> None:
    """Replaces the text between the bench/scale markers; without them, adds
    the section before bench/balance's (or at the end). Other sections are
    left alone. When `text` has no xDS subsection, the one there is stays
    (at the end of the section)."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if not _xds_block(text):
        kept = _xds_block(current.partition(BEGIN)[2].partition(END)[0])
        if kept:
            text = f"{text.rstrip()}\n\n{kept}\n"
    block = f"{BEGIN}\n{text.rstrip()}\n\n{END}"
    if BEGIN in current and END in current:
        head, _, rest = current.partition(BEGIN)
        _, _, tail = rest.partition(END)
        updated = head + block + tail
    elif f"\n{BALANCE_TITLE}\n" in current:
        head, _, tail = current.partition(f"\n{BALANCE_TITLE}\n")
        updated = f"{head.rstrip()}\n\n{block}\n\n{BALANCE_TITLE}\n{tail}"
    else:
        updated = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(updated)


def write_xds_section(path: Path, text: str) -> None:
    """Replaces only the xDS subsection of the bench/scale section (`text`,
    as render_xds returns it); without one, adds it at the end of the
    section. The rest of the file is left alone."""
    current = path.read_text()
    if BEGIN not in current or END not in current:
        raise SystemExit(f"{path} has no bench/scale section to add the xDS subsection to")
    head, _, rest = current.partition(BEGIN)
    section, _, tail = rest.partition(END)
    old = _xds_block(section)
    block = text.strip()
    section = section.replace(old, block) if old else f"{section.rstrip()}\n\n{block}\n\n"
    path.write_text(f"{head}{BEGIN}{section}{END}{tail}")
