"""Figures and the Markdown report of bench/balance.

Pure functions over what the backends and clients recorded: calls and busy
slot-seconds per backend in a time window (from the backends' 0.1 s
buckets), shares, max/mean and coefficient of variation, latency
percentiles, the convergence times, the issue's targets, and the
`## Balance (bench/balance)` section of docs/benchmarks.md.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._report import replace_section, run_lines

SECTION_TITLE = "## Balance (bench/balance)"


# --- backend windows ---------------------------------------------------------


def _bucket_range(stats: Mapping[str, Any], t0: float, t1: float) -> tuple[int, int]:
    """Indexes of the buckets lying wholly inside [t0, t1)."""
    origin, width = float(stats["origin"]), float(stats["bucket"])
    first = max(0, math.ceil((t0 - origin) / width - 1e-9))
    last = max(first, math.floor((t1 - origin) / width + 1e-9))
    return first, min(last, len(stats["arrivals"]))


Windows = Sequence[tuple[float, float]]


def window_calls(stats: Mapping[str, Any], windows: Windows) -> int:
    """Calls that arrived in the buckets inside the windows [t0, t1)."""
    total = 0
    for t0, t1 in windows:
        first, last = _bucket_range(stats, t0, t1)
        total += int(sum(stats["arrivals"][first:last]))
    return total


def window_utilization(stats: Mapping[str, Any], windows: Windows) -> float:
    """Busy slot-seconds / (slots x seconds) over the buckets inside the windows."""
    busy = seconds = 0.0
    for t0, t1 in windows:
        first, last = _bucket_range(stats, t0, t1)
        busy += math.fsum(stats["busy"][first:last])
        seconds += (last - first) * float(stats["bucket"])
    return busy / (int(stats["slots"]) * seconds) if seconds > 0 else 0.0


def window_lag(stats: Mapping[str, Any], windows: Windows) -> float:
    """The backend's worst event-loop lateness in the windows, seconds."""
    worst = 0.0
    for t0, t1 in windows:
        first, last = _bucket_range(stats, t0, t1)
        worst = max([worst, *(float(x) for x in stats["lag"][first:last])])
    return worst


def arrival_times(stats: Mapping[str, Any]) -> list[tuple[float, int]]:
    """(bucket start, arrivals) for every bucket."""
    origin, width = float(stats["origin"]), float(stats["bucket"])
    return [(origin + i * width, int(n)) for i, n in enumerate(stats["arrivals"])]


# --- one mode in one case ------------------------------------------------------


@dataclass(frozen=True)
class BackendFigures:
    name: str
    slots: int
    calls: int
    utilization: float
    # (fewest, most) entries in lbserver's list during the window (modes d, e)
    list_entries: tuple[int, int] | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class ModeResult:
    case: str
    mode: str  # Mode.key
    letter: str
    label: str
    seconds: float  # measurement window
    offered_rps: float
    backends: tuple[BackendFigures, ...]
    latencies_ms: tuple[float, ...]  # sorted
    # Sorted latencies of the successful calls each backend answered.
    backend_latencies_ms: Mapping[str, tuple[float, ...]]
    failures: Mapping[str, int]  # status code -> calls in the window
    deadline_ms: float
    # Worst event-loop lateness seen by any client / backend process in the
    # window: how much the machine itself delayed the processes.
    client_lag_ms: float = 0.0
    backend_lag_ms: float = 0.0
    list_changes: int | None = None  # lbserver list changes seen during the window

    @property
    def total_calls(self) -> int:
        return sum(b.calls for b in self.backends)

    @property
    def shares(self) -> list[float]:
        total = self.total_calls
        return [b.calls / total if total else 0.0 for b in self.backends]

    @property
    def per_capacity(self) -> list[float]:
        """Calls per capacity slot: equal backends, equal capacity, so this is
        calls; a half-capacity backend's calls count double."""
        return [b.calls / b.slots for b in self.backends]

    @property
    def max_over_mean(self) -> float:
        loads = self.per_capacity
        mean = statistics.fmean(loads) if loads else 0.0
        return max(loads) / mean if mean > 0 else math.nan

    @property
    def cv(self) -> float:
        loads = self.per_capacity
        mean = statistics.fmean(loads) if loads else 0.0
        return statistics.pstdev(loads) / mean if mean > 0 else math.nan

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def small_backend_p99(self) -> float:
        """p99 of the calls answered by the smallest backend(s)."""
        smallest = min(b.slots for b in self.backends)
        values = sorted(
            x
            for b in self.backends
            if b.slots == smallest
            for x in self.backend_latencies_ms.get(b.name, ())
        )
        return percentile(values, 99)

    def censored(self, q: float) -> bool:
        """True when the percentile falls on calls that hit their deadline:
        the real value is at least the one shown."""
        return self.p(q) >= self.deadline_ms

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def utilization_gap(self) -> float:
        """For a case with one smaller backend: |u_small - mean(u_others)| /
        mean(u_others), the relative difference of utilizations."""
        smallest = min(b.slots for b in self.backends)
        small = [b.utilization for b in self.backends if b.slots == smallest]
        others = [b.utilization for b in self.backends if b.slots != smallest]
        if not small or not others or statistics.fmean(others) <= 0:
            return math.nan
        mean = statistics.fmean(others)
        return abs(statistics.fmean(small) - mean) / mean


# --- convergence ----------------------------------------------------------------


@dataclass(frozen=True)
class Convergence:
    mode: str
    letter: str
    backends_before: int
    registered_at: float  # monotonic: the new backend's registrar started
    first_call_after: float | None  # seconds after registration
    share_90_after: float | None  # seconds until a 1 s window held >= 90% of its share
    share_timeline: tuple[tuple[float, float], ...]  # (seconds after registration, share / fair)
    drained_calls_after: int  # calls the drained backend got after Registrar.stop()
    drained_last_call_after: float | None
    killed_failures: int  # client calls failed after SIGKILL
    killed_failures_codes: Mapping[str, int]
    killed_last_failure_after: float | None
    killed_unlisted_after: float | None  # lbserver dropped it from its list (TTL)
    total_failures: int  # failed client calls in the whole phase


def first_time_at_share(
    new: Sequence[tuple[float, int]],
    everyone: Sequence[tuple[float, int]],
    start: float,
    fair: float,
    fraction: float = 0.9,
    window: float = 1.0,
    step: float = 0.1,
    until: float | None = None,
) -> tuple[float | None, list[tuple[float, float]]]:
    """When the new backend's share of calls over a trailing `window` first
    reached `fraction` of `fair` (seconds after `start`; None if never), and
    the share/fair timeline. `new` and `everyone` are (bucket start, calls)."""
    timeline: list[tuple[float, float]] = []
    reached: float | None = None
    end = until if until is not None else max((t for t, _ in everyone), default=start)
    t = start + window
    while t <= end + 1e-9:
        mine = sum(n for at, n in new if t - window <= at < t - 1e-9)
        total = sum(n for at, n in everyone if t - window <= at < t - 1e-9)
        ratio = (mine / total) / fair if total else 0.0
        timeline.append((round(t - start, 2), round(ratio, 3)))
        if reached is None and ratio >= fraction:
            reached = t - start
        t += step
    return reached, timeline


# --- targets -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    measured: str
    met: bool | None  # None: not measured in this run


@dataclass
class Report:
    command: str
    machine: Mapping[str, str]
    settings: Mapping[str, str]
    cases: Mapping[str, Sequence[ModeResult]] = field(default_factory=dict)
    case_notes: Mapping[str, str] = field(default_factory=dict)
    convergence: Sequence[Convergence] = ()
    slow_start: float = 5.0
    heartbeat: float = 1.0
    share_threshold: float = 0.02
    notes: Sequence[str] = ()

    def find(self, case: str, mode: str) -> ModeResult | None:
        return next((r for r in self.cases.get(case, ()) if r.mode == mode), None)

    def findings(self) -> list[str]:
        """Observations computed from this run's data."""
        found = []
        for case in self._named("equal"):
            for mode in ("grpclb", "proxy"):
                r = self.find(case, mode)
                if r is None or r.list_changes != 0:
                    continue
                entries = [b.list_entries[0] for b in r.backends if b.list_entries]
                if entries and len(set(entries)) > 1:
                    found.append(
                        f"{case} ({r.letter}): lbserver's list held "
                        f"{' / '.join(map(str, entries))} entries through every window (no push,"
                        f" as the weights moved less than share_threshold), and the shares "
                        f"follow it: max/mean {r.max_over_mean:.3f} is the list's, not the "
                        f"clients'."
                    )
        return found

    def _named(self, prefix: str) -> list[str]:
        return [name for name in self.cases if name.startswith(prefix)]

    def targets(self) -> list[Target]:
        found: list[Target] = []
        for mode, letter in (("grpclb", "d"), ("proxy", "e")):
            for case in self._named("equal") or ["equal-2, equal-5"]:
                r = self.find(case, mode)
                found.append(
                    Target(
                        f"({letter}) max/mean <= 1.05, {case}",
                        _ratio(r.max_over_mean) if r else "not run",
                        r.max_over_mean <= 1.05 if r else None,
                    )
                )
        for case in self._named("hetero") or ["hetero"]:
            c, d = self.find(case, "nginx"), self.find(case, "grpclb")
            text = f"{case}: p99 of (d) <= 0.8 x p99 of (c)"
            if c and d:
                ratio = d.p(99) / c.p(99)
                measured = f"{d.p(99):.0f} ms / {c.p(99):.0f} ms = {ratio:.2f}"
                if c.censored(99):
                    measured += " ((c) censored at the deadline)"
                found.append(Target(text, measured, ratio <= 0.8))
            else:
                found.append(Target(text, "not run", None))
            for mode, letter in (("grpclb", "d"), ("proxy", "e")):
                r = self.find(case, mode)
                found.append(
                    Target(
                        f"{case} ({letter}): half-capacity utilization within 10% of the others'",
                        f"{r.utilization_gap * 100:.1f}%" if r else "not run",
                        r.utilization_gap <= 0.10 if r else None,
                    )
                )
        limit = self.slow_start + 2 * self.heartbeat
        for conv in self.convergence:
            t = conv.share_90_after
            found.append(
                Target(
                    f"({conv.letter}) new backend at 90% of its share within "
                    f"slow start + 2 heartbeats = {limit:g} s",
                    f"{t:.1f} s" if t is not None else "never",
                    t is not None and t <= limit,
                )
            )
        return found


def general_notes(share_threshold: float) -> tuple[str, ...]:
    entries = share_threshold * 100
    return (
        "share: calls each backend received in the measured windows. utilization: busy "
        "slot-seconds / (slots x seconds), as the backend measured it. max/mean and CV "
        "(coefficient of variation): of calls per capacity slot, so equal backends compare "
        "calls and a half-capacity backend counts double.",
        "Latency: from each call's *scheduled* start (open loop) to its end, over every call "
        "scheduled in the windows; a call that hits its deadline fails and counts at the deadline, "
        "so a p99 shown as >= is at least that. The p99 of the calls b4½ answered counts its "
        "successful calls only.",
        "The backends sleep a fixed time per call unless run with --service-dist exp. Round "
        "robin then hands each backend evenly spaced calls, so even a backend at ~90% "
        "utilization queues little and the overall p99 moves little; variable service times or "
        "bursty traffic queue more. Past 100% (hetero-65) its queue grows until the deadline.",
        "stall: the worst lateness of a 20 ms asyncio timer in any client / backend process "
        "during the windows. Hundreds of ms mean the machine gave the processes no CPU for that "
        "long (other work on the 2 cores); latencies of every mode in that window suffer.",
        "lbserver list entries: fewest-most entries of each backend in lbserver's server list "
        "(polled every 0.2 s) during the (d)/(e)/(f) windows, and how often it changed. Their "
        "shares follow this list. lbserver pushes a weight-only change only when some share moves "
        f"by more than share_threshold ({share_threshold:g} = {entries:g} of 100 entries) from the "
        f"last pushed list, so a list can stay up to {entries:g} entries per backend off the "
        "current weights for good: with 5 equal backends (20 entries each) that is up to "
        f"{entries / 20:.0%} per backend.",
        "All modes of a case use the same backends; lbserver's weights come from the load "
        "reports of whatever traffic the backends had. (d) runs first in every round with a "
        "longer warm-up (first round: the backends' blackout and slow start end in it; later "
        "rounds: it follows (c), which in the hetero cases overloads b4 and lowers its measured "
        "capacity for a few heartbeats).",
        "Convergence: four equal backends under load; a fifth starts (first call = first 0.1 s "
        "bucket with a call after its Registrar started; at 90% = end of the first trailing 1 s "
        "window in which its share of all calls reached 90% of 1/5, so up to ~1 s conservative); "
        "then one backend's Registrar.stop() deregisters it while it keeps serving (calls it got "
        "afterwards); then one is killed with SIGKILL, registrar included (client calls that "
        "failed afterwards; lbserver keeps it listed until its TTL runs out, the clients skip the "
        "dead connection at once).",
    )


# --- Markdown --------------------------------------------------------------------------


def _ratio(value: float) -> str:
    """Three decimals, four next to the 1.05 target so the rounding never hides
    which side of it a value is on."""
    return f"{value:.4f}" if abs(value - 1.05) < 0.0005 else f"{value:.3f}"


def _ms(value: float, censored: bool) -> str:
    if math.isnan(value):
        return "-"
    return (">=" if censored else "") + f"{value:.0f}"


def _entries(r: ModeResult) -> str:
    spans = [b.list_entries for b in r.backends]
    if any(s is None for s in spans):
        return "-"
    text = " / ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in filter(None, spans))
    return f"{text} ({r.list_changes})"


def _mode_table(results: Sequence[ModeResult], hetero: bool) -> list[str]:
    names = [b.name + ("½" if b.slots < max(x.slots for x in results[0].backends) else "")
             for b in results[0].backends]  # fmt: skip
    head = ["mode", "calls/s", "share per backend (%)"]
    if hetero:
        head.append("utilization per backend (%)")
    head += ["max/mean", "CV", "p50 ms", "p99 ms"]
    if hetero:
        head.append("p99 ms of calls b4½ answered")
    head += ["failed", "stall ms (clients/backends)"]
    head.append("lbserver list entries (changes)")
    lines = [
        f"backends: {', '.join(names)}" + (" (½ = half capacity)" if hetero else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in results:
        row = [
            f"({r.letter}) {r.label}",
            f"{r.total_calls / r.seconds:.0f}",
            " / ".join(f"{s * 100:.1f}" for s in r.shares),
        ]
        if hetero:
            row.append(" / ".join(f"{b.utilization * 100:.0f}" for b in r.backends))
        row += [
            _ratio(r.max_over_mean),
            f"{r.cv:.3f}",
            _ms(r.p(50), r.censored(50)),
            _ms(r.p(99), r.censored(99)),
        ]
        if hetero:
            row.append(_ms(r.small_backend_p99(), False))
        row += [
            (
                ", ".join(f"{n} {code}" for code, n in sorted(r.failures.items()))
                if r.failures
                else "0"
            ),
            f"{r.client_lag_ms:.0f} / {r.backend_lag_ms:.0f}",
        ]
        row.append(_entries(r))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def render(report: Report) -> str:
    lines = [SECTION_TITLE, ""]
    lines += [
        "Reproduces the seed's situation on loopback with real processes: simulated OAP pods,",
        "20 long-lived client channels with skewed call rates, six ways of balancing them; "
        "(f) is (d) with the backends learned from a fake Kubernetes API and their load "
        "scraped by lbserver from their Prometheus telemetry (no registrar).",
        "Generated by `bench/balance` (see its module docstrings); rerun it to refresh.",
        "",
        *run_lines(report.command, report.machine, report.settings),
    ]
    lines += ["### Targets (issue 4)", "", "| target | measured | met |", "|---|---|---|"]
    for t in report.targets():
        met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.text} | {t.measured} | {met} |")
    lines.append("")
    for case, results in report.cases.items():
        if not results:
            continue
        lines += [f"### Case {case}", ""]
        if case in report.case_notes:
            lines += [report.case_notes[case], ""]
        lines += _mode_table(results, hetero=case.startswith("hetero"))
        lines.append("")
    if report.convergence:
        lines += [
            "### Convergence",
            "",
            "| mode | new backend: first call | at 90% of fair share | drained: calls after "
            "Registrar.stop() | last call after | killed: failed calls | last failure after | "
            "out of lbserver's list after | failed calls, whole phase |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in report.convergence:
            codes = ", ".join(f"{n} {k}" for k, n in sorted(c.killed_failures_codes.items()))
            lines.append(
                f"| ({c.letter}) {c.mode} | {_seconds(c.first_call_after)} | "
                f"{_seconds(c.share_90_after)} | {c.drained_calls_after} | "
                f"{_seconds(c.drained_last_call_after)} | {c.killed_failures}"
                f"{f' ({codes})' if codes else ''} | {_seconds(c.killed_last_failure_after)} | "
                f"{_seconds(c.killed_unlisted_after)} | {c.total_failures} |"
            )
        lines.append("")
        for c in report.convergence:
            marks = [f"{t:.1f}s: {r:.2f}" for t, r in c.share_timeline[::5]]
            lines.append(
                f"({c.letter}) new backend's share / fair share, trailing 1 s windows: "
                + ", ".join(marks)
            )
            lines.append("")
    lines += ["### How to read it", ""]
    notes = (*general_notes(report.share_threshold), *report.findings(), *report.notes)
    lines += [f"- {note}" for note in notes]
    lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, section: str) -> None:
    replace_section(path, SECTION_TITLE, section)
