"""Figures and the docs/benchmarks.md section of bench/xds_weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._report import replace_section, run_lines

from .run import LAYOUTS, ZONE, ClientRun, Measurement

SECTION_TITLE = "## xDS weights: locality per backend vs per zone"
# A share within this many binomial standard deviations of its target counts
# as reproduced (gRPC's weighted_target picks a locality at random in
# proportion to its weight, so even a perfect layout scatters).
SIGMAS = 3.0
CLIENT_LABELS = {"xds": "grpcio xDS (`xds:///oap`)", "grpclb": "grpcio grpclb (reference)"}


def targets(weights: Sequence[int]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def shares(run: ClientRun) -> list[float]:
    total = sum(run.counts)
    return [c / total if total else 0.0 for c in run.counts]


def errors(run: ClientRun, weights: Sequence[int]) -> list[float]:
    """|share - target| per backend, in percentage points."""
    return [abs(s - t) * 100 for s, t in zip(shares(run), targets(weights), strict=True)]


def tolerance(weights: Sequence[int], calls: int) -> list[float]:
    """SIGMAS binomial standard deviations of each target share, in points."""
    return [SIGMAS * math.sqrt(p * (1 - p) / calls) * 100 for p in targets(weights)]


def reproduces(run: ClientRun, weights: Sequence[int]) -> bool:
    total = sum(run.counts)
    if total == 0:
        return False
    return all(e <= t for e, t in zip(errors(run, weights), tolerance(weights, total), strict=True))


def even_split_error(weights: Sequence[int]) -> float:
    """Max error in points of an even split over the backends: what a client
    gets that ignores endpoint weights inside one locality."""
    n = len(weights)
    return max(abs(1 / n - t) for t in targets(weights)) * 100


@dataclass
class Report:
    command: str
    machine: Mapping[str, str]
    settings: Mapping[str, str]
    measurements: Sequence[Measurement]

    def runs(self, layout: str, client: str) -> list[tuple[Measurement, ClientRun]]:
        return [
            (m, r)
            for m in self.measurements
            if m.layout == layout
            for r in m.runs
            if r.client == client
        ]

    def verdict(self, layout: str, client: str) -> bool | None:
        runs = self.runs(layout, client)
        return all(reproduces(r, m.case.weights) for m, r in runs) if runs else None

    def worst(self, layout: str, client: str) -> float:
        return max(
            (max(errors(r, m.case.weights)) for m, r in self.runs(layout, client)), default=0.0
        )


def _pct(values: Sequence[float]) -> str:
    return " / ".join(f"{v * 100:.1f}" for v in values)


def _localities(m: Measurement) -> str:
    return ", ".join(
        f"{weight} ({' / '.join(map(str, endpoints))})" for weight, endpoints in m.localities
    )


def _case_table(measurements: Sequence[Measurement]) -> list[str]:
    case = measurements[0].case
    lines = [
        f"### Weights {case.name}",
        "",
        f"Target shares {_pct(targets(case.weights))} %; an even split (endpoint weights "
        f"ignored) would be off by {even_split_error(case.weights):.1f} points.",
        "",
        "| layout | client | lbserver list entries | xDS localities served: weight "
        "(endpoint weights) | measured calls | share per backend (%) | "
        "error per backend (points) | max error (points) | within 3 sd | failed | calls/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measurements:
        for r in m.runs:
            total = sum(r.counts)
            errs = errors(r, case.weights)
            failed = ", ".join(f"{n} {k}" for k, n in sorted(r.failures.items())) or "0"
            lines.append(
                f"| {m.layout} | {CLIENT_LABELS.get(r.client, r.client)} | "
                f"{' / '.join(map(str, m.list_entries))} | {_localities(m)} | {total} | "
                f"{_pct(shares(r))} | "
                f"{' / '.join(f'{e:.1f}' for e in errs)} | {max(errs):.1f} | "
                f"{'yes' if reproduces(r, case.weights) else '**no**'} | {failed} | "
                f"{r.calls / r.seconds:.0f} |"
            )
    lines.append("")
    return lines


def findings(report: Report) -> list[str]:
    """The conclusion, from this run's figures."""
    backend_xds = report.verdict("backend", "xds")
    zone_xds = report.verdict("zone", "xds")
    grpclb = all(report.verdict(layout, "grpclb") for layout in LAYOUTS)
    lines = [
        f"- `xds_localities: backend`: grpcio's xDS client "
        f"{'reproduces' if backend_xds else '**does not reproduce**'} the weights "
        f"(max error {report.worst('backend', 'xds'):.1f} points over both cases).",
        f"- `xds_localities: zone`: grpcio's xDS client "
        f"{'reproduces' if zone_xds else '**does not reproduce**'} the weights "
        f"(max error {report.worst('zone', 'xds'):.1f} points).",
        f"- grpcio's grpclb client against the same balancers "
        f"{'reproduces' if grpclb else '**does not reproduce**'} them (max error "
        f"{max(report.worst(layout, 'grpclb') for layout in LAYOUTS):.1f} points).",
        "",
    ]
    if backend_xds and zone_xds is False:
        lines += [
            "**Conclusion: one locality per backend (`xds_localities: backend`, the default) is "
            "the layout that reproduces lbserver's weights with grpcio's xDS client; one "
            "locality per zone splits a zone evenly.** Why: for a cluster whose `lb_policy` is "
            "ROUND_ROBIN, gRPC's xDS client (gRFC A27, and since gRFC A52 through the "
            "`xds_wrr_locality` policy) builds a `weighted_target` over the localities of the "
            "ClusterLoadAssignment, weighted by each locality's `load_balancing_weight`, with "
            "`round_robin` as the child policy inside each locality. `round_robin` has no "
            "notion of weight: an endpoint's `load_balancing_weight` is parsed but only "
            "policies such as `ring_hash` use it (gRPC's maintainers on grpc/grpc#32004: the "
            "xDS client ignores it; the proposal to honour it, A34 in grpc/proposal#202, "
            "is still open). So the only weight gRPC's round robin honours is the locality's, "
            "and a locality holding one backend carries that backend's weight exactly. With "
            "every backend in one zone, the zone layout gives one locality whose endpoints "
            "round_robin visits in turn: each backend gets 1/n whatever its weight, the even "
            "split the tables predict. Envoy, in contrast, weighs endpoints inside a locality "
            "(its ROUND_ROBIN is weighted), which is why both layouts also put the weight on "
            "the endpoint.",
            "",
            "The scatter of the xDS rows around their targets (the grpclb rows have almost "
            "none) is the weighted_target picker's: it picks a locality at random in "
            "proportion to the weights for every call, where grpclb's round robin walks "
            'lbserver\'s interleaved list in order. It shrinks as 1/√calls; "within 3 sd" '
            "checks each share against that binomial spread.",
        ]
    else:
        lines.append(
            "**The measurement does not match the expected behaviour (the locality-per-backend "
            "layout reproducing the weights, the zone layout splitting evenly): check the "
            "grpcio version and the raw results in the log folder before drawing a "
            "conclusion.**"
        )
    return lines


def render(report: Report) -> str:
    lines = [
        SECTION_TITLE,
        "",
        "Issue 17: gRPC's xDS round_robin ignores per-endpoint `load_balancing_weight` but "
        "honours locality weights. lbserver's `xds_localities` option lays a service out as "
        "one locality per backend (`backend`, the default: locality weight = endpoint weight "
        "= the backend's entries in the grpclb list) or one per registration zone (`zone`: "
        "weight = the sum, endpoints weighted). This measures which one grpcio's own xDS "
        "client turns into the intended shares, against grpcio's grpclb client on the same "
        "balancer. Generated by `bench/xds_weights` (see its module docstrings); rerun it to "
        "refresh.",
        "",
        *run_lines(report.command, report.machine, report.settings),
        "| layout | client | weights reproduced (both cases) | max error (points) |",
        "|---|---|---|---|",
    ]
    for layout in LAYOUTS:
        for client in ("xds", "grpclb"):
            verdict = report.verdict(layout, client)
            text = "n/a" if verdict is None else ("yes" if verdict else "**no**")
            lines.append(
                f"| {layout} | {CLIENT_LABELS[client]} | {text} | "
                f"{report.worst(layout, client):.1f} |"
            )
    lines.append("")
    by_case: dict[str, list[Measurement]] = {}
    for m in report.measurements:
        by_case.setdefault(m.case.name, []).append(m)
    for measurements in by_case.values():
        lines += _case_table(measurements)
    lines += ["### xDS weights: conclusion", "", *findings(report), ""]
    lines += [
        "### xDS weights: how to read it",
        "",
        "- share: the calls each backend answered among the measured calls of one client "
        "process (sequential unary calls on one channel, after a warm-up that lasts until "
        "every backend has answered, plus 100 calls); target: its static weight over the sum. "
        "error: |share - target| in percentage points.",
        "- within 3 sd: every backend's error is at most 3 binomial standard deviations of its "
        "target share for that many calls (√(p(1-p)/n)), the spread a client picking at "
        "random by the right weights shows; a layout that splits evenly is far outside it.",
        f"- lbserver list entries: each backend's entries in lbserver's grpclb list (the "
        f"weights the xDS resources carry too), checked to be in the weights' proportions "
        f"before the clients start. Every backend registers in zone `{ZONE}`, so the zone "
        f"layout has a single locality.",
        "- calls/s: of the sequential measured calls, client and backends sharing the "
        "machine's cores; not a throughput figure, only there to show nothing stalled.",
        "- Sizes: `--quick` makes 1000 measured calls per client run; the scatter of the xDS "
        "rows is then about 3x larger (3 sd of a 50% share: 4.7 points), still far below the "
        "15-17 points of an even split, so the verdict is the same.",
        "- Not measured: endpoint weights under a policy that honours them (`ring_hash`, "
        "gRFC A42). lbserver's Cluster says ROUND_ROBIN, and one locality per backend already "
        "gives grpcio's clients the weights with it.",
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, section: str) -> None:
    replace_section(path, SECTION_TITLE, section)
