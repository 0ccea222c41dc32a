"""The cases of bench/balance and how one is run.

A case is a set of backends (2 or 5 equal ones, or 5 with one at half
capacity). All six modes run against the same backends one after the
other, each phase with fresh client channels: a warm-up (longer than the
call deadline, so the previous phase's last calls are over) and a
measurement window. The convergence scenario runs one longer phase under a
lbserver mode: a backend joins, one drains, one is killed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .client import ChannelSpec, PhaseSpec, Plan
from .infra import REGISTRAR_TTL, BackendProcess, Infra
from .modes import (
    GRPCLB,
    KUBE,
    LEAST_CONN,
    MODES,
    NGINX,
    PROXY,
    RANDOM,
    Mode,
    Targets,
    channels_for,
    client_rates,
)
from .report import (
    BackendFigures,
    Convergence,
    ModeResult,
    arrival_times,
    first_time_at_share,
    window_calls,
    window_lag,
    window_utilization,
)

# Client processes need a moment to import grpc before their first phase.
CLIENT_LEAD = 2.5
# The modes run in this order in every round: lbserver's first, so that they
# meet the weights of their own traffic rather than of the modes that
# overload a backend ((a)-(c) in the hetero cases).
RUN_ORDER: tuple[Mode, ...] = (GRPCLB, PROXY, KUBE, RANDOM, LEAST_CONN, NGINX)


def kube_service(case: str) -> str:
    """The service of mode (f) in a case: the same backends, learned from
    Kubernetes instead of their registrars."""
    return f"oap-{case}-k8s"


@dataclass(frozen=True)
class Settings:
    warmup: float  # unmeasured start of every slice
    measure: float  # seconds measured per mode, split over the rounds
    rounds: int = 1
    # Unmeasured start of a (d) slice, which follows (c): long enough for
    # lbserver's weights to recover from whatever (c) did to the backends.
    lbserver_warmup: float = 5.0
    clients: int = 20
    client_processes: int = 4
    exponent: float = 1.0  # Zipf-like skew of client call rates
    load: float = 0.5  # offered calls / total capacity
    slots: int = 4  # capacity slots of a full backend
    service_time: float = 0.05  # seconds a call holds its slot (mean)
    service_dist: str = "fixed"  # or "exp": exponential hold times
    deadline: float = 2.0  # per-call deadline, seconds
    seed: int = 42
    convergence_observe: float = 3.0  # seconds watched after each drain/kill step
    modes: tuple[Mode, ...] = MODES

    @property
    def capacity_per_slot(self) -> float:
        return 1.0 / self.service_time

    @property
    def gap(self) -> float:
        """Idle seconds between two slices: every call of the previous slice
        has ended (deadline) and no backend has a queue left."""
        return self.deadline + 0.3


@dataclass(frozen=True)
class Case:
    name: str
    slots: tuple[int, ...]
    load: float  # offered calls / total capacity
    note: str


def cases(settings: Settings) -> list[Case]:
    full, half = settings.slots, max(1, settings.slots // 2)
    load = settings.load
    hetero = (
        f"5 backends, the last (b4) with {half} slots instead of {full}: half the capacity;"
        " max/mean and CV are of calls per capacity slot."
    )
    # Round robin gives b4 a fifth of the calls, but it has a ninth of the
    # capacity: past 5/9 = 56% of the total, round robin overloads it.
    high = 0.65
    return [
        Case("equal-2", (full, full), load, f"2 equal backends, {load:.0%} load."),
        Case("equal-5", (full,) * 5, load, f"5 equal backends, {load:.0%} load."),
        Case(
            f"hetero-{load * 100:.0f}",
            (full, full, full, full, half),
            load,
            f"{hetero} {load:.0%} load: round robin runs b4 at {load * 9 / 5:.0%}.",
        ),
        Case(
            f"hetero-{high * 100:.0f}",
            (full, full, full, full, half),
            high,
            f"{hetero} {high:.0%} load: round robin offers b4 {high * 9 / 5:.0%} of its capacity"
            " (overload: its queue grows until calls hit their deadline).",
        ),
    ]


def _split(channels: Sequence[ChannelSpec], processes: int) -> list[list[ChannelSpec]]:
    groups: list[list[ChannelSpec]] = [[] for _ in range(processes)]
    for channel in channels:
        groups[channel.id % processes].append(channel)
    return groups


def _run_clients(
    infra: Infra, tag: str, settings: Settings, phases: Sequence[PhaseSpec]
) -> list[tuple[Any, Any]]:
    """Starts the client processes, each with its share of every phase's
    channels; returns (process, result path) pairs."""
    started = []
    for index in range(settings.client_processes):
        mine = [
            PhaseSpec(
                name=p.name,
                start=p.start,
                measure_from=p.measure_from,
                end=p.end,
                channels=tuple(_split(p.channels, settings.client_processes)[index]),
            )
            for p in phases
        ]
        plan = Plan(seed=settings.seed, deadline=settings.deadline, phases=tuple(mine))
        started.append(infra.start_client(f"{tag}-{index}", plan.to_json()))
    return started


def _collect(started: Sequence[tuple[Any, Any]], timeout: float) -> list[dict[str, Any]]:
    results = []
    for process, out in started:
        code = process.wait(timeout=timeout)
        if code != 0 or not out.exists():
            raise RuntimeError(f"{process.name} failed ({code}); log:\n{process.logs(4000)}")
        results.append(json.loads(out.read_text()))
    return results


class ListWatcher:
    """Polls lbserver's server list of a service in a thread: (monotonic time,
    {backend port: (list entries, effective weight)}) every `period` seconds."""

    def __init__(self, infra: Infra, service: str, period: float = 0.2) -> None:
        self.samples: list[tuple[float, dict[int, tuple[int, float]]]] = []
        self._infra, self._service, self._period = infra, service, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="list-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), self._infra.list_state(self._service)))
            self._stop.wait(self._period)

    def stop(self) -> list[tuple[float, dict[int, tuple[int, float]]]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples

    @staticmethod
    def by_name(
        samples: list[tuple[float, dict[int, tuple[int, float]]]], names: dict[int, str]
    ) -> list[tuple[float, dict[str, tuple[int, float]]]]:
        return [(t, {names.get(p, str(p)): v for p, v in e.items()}) for t, e in samples]


def _save(infra: Infra, name: str, data: object) -> None:
    """Raw data next to the logs, for a closer look after the run."""
    (infra.log_dir / name).write_text(json.dumps(data))


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_case(infra: Infra, case: Case, settings: Settings) -> list[ModeResult]:
    service, kube = f"oap-{case.name}", kube_service(case.name)
    pods = KUBE in settings.modes
    names = [f"b{i}" for i in range(len(case.slots))]
    backends = infra.start_backends(
        names, case.slots, settings.service_time, service, settings.service_dist, pods=pods
    )
    infra.wait_listed(service, backends)
    if pods:
        infra.publish_pods(kube, backends)
        infra.wait_listed(kube, backends)
    nginx, nginx_address = infra.start_nginx(backends, case.name)
    proxy, proxy_address = infra.start_proxy(service, case.name)
    targets = Targets(
        backends=tuple(b.address for b in backends),
        nginx=nginx_address,
        proxy=proxy_address,
        grpclb=infra.grpclb_target(service),
        kube=infra.grpclb_target(kube) if pods else "",
    )
    capacity = sum(case.slots) * settings.capacity_per_slot
    offered = case.load * capacity
    rates = client_rates(settings.clients, offered, settings.exponent, settings.seed)

    # Rounds: every mode gets one slice per round, so each samples the same
    # spells of machine contention (other work on 2 cores stalls processes).
    phases: list[PhaseSpec] = []
    t = time.monotonic() + CLIENT_LEAD
    for round_ in range(settings.rounds):
        for mode in (m for m in RUN_ORDER if m in settings.modes):
            warmup = settings.lbserver_warmup if mode is GRPCLB else settings.warmup
            start, measure_from = t, t + warmup
            end = measure_from + settings.measure / settings.rounds
            channels = tuple(channels_for(mode, rates, targets, settings.seed))
            phases.append(PhaseSpec(f"{mode.key}@{round_}", start, measure_from, end, channels))
            t = end + settings.gap

    started = _run_clients(infra, case.name, settings, phases)
    watcher = ListWatcher(infra, service)
    kube_watcher = ListWatcher(infra, kube) if pods else None
    results = _collect(started, timeout=t - time.monotonic() + settings.deadline + 30)
    lists = watcher.stop()
    kube_lists = kube_watcher.stop() if kube_watcher is not None else []
    stats = [b.stats() for b in backends]
    _save(infra, f"stats-{case.name}.json", dict(zip(names, stats, strict=True)))
    ports = {b.port: b.name for b in backends}
    _save(infra, f"lists-{case.name}.json", ListWatcher.by_name(lists, ports))
    if pods:
        _save(infra, f"lists-{case.name}-k8s.json", ListWatcher.by_name(kube_lists, ports))
        infra.unpublish_pods(kube, backends)
    for process in (nginx, proxy, *(b.process for b in backends)):
        process.terminate(timeout=5)
    by_mode = {GRPCLB: lists, PROXY: lists, KUBE: kube_lists}
    return [
        _mode_figures(
            case,
            mode,
            [p for p in phases if p.name.split("@")[0] == mode.key],
            backends,
            stats,
            results,
            by_mode.get(mode, []),
            settings,
        )
        for mode in settings.modes
    ]


def _mode_figures(
    case: Case,
    mode: Mode,
    phases: Sequence[PhaseSpec],
    backends: Sequence[BackendProcess],
    stats: Sequence[dict[str, Any]],
    results: Sequence[dict[str, Any]],
    lists: Sequence[tuple[float, dict[int, tuple[int, float]]]],
    settings: Settings,
) -> ModeResult:
    """One mode's figures over all its measurement windows."""
    windows = [(p.measure_from, p.end) for p in phases]
    mine = [r[p.name] for r in results for p in phases]
    failures: dict[str, int] = {}
    for r in mine:
        for code, n in r["window_failures"].items():
            failures[code] = failures.get(code, 0) + n
    # lbserver's lists during the windows, for the modes that use them.
    listed = [
        {port: n for port, (n, _) in e.items()}
        for at, e in lists
        if e and any(t0 <= at < t1 for t0, t1 in windows)
    ]
    capacity = sum(case.slots) * settings.capacity_per_slot
    return ModeResult(
        case=case.name,
        mode=mode.key,
        letter=mode.letter,
        label=mode.label,
        seconds=sum(t1 - t0 for t0, t1 in windows),
        offered_rps=case.load * capacity,
        backends=tuple(
            BackendFigures(
                name=b.name,
                slots=b.slots,
                calls=window_calls(s, windows),
                utilization=window_utilization(s, windows),
                list_entries=(
                    (min(e.get(b.port, 0) for e in listed), max(e.get(b.port, 0) for e in listed))
                    if listed
                    else None
                ),
            )
            for b, s in zip(backends, stats, strict=True)
        ),
        latencies_ms=tuple(sorted(x for r in mine for _, x, _ in r["samples"])),
        backend_latencies_ms={
            b.name: tuple(sorted(x for r in mine for _, x, name in r["samples"] if name == b.name))
            for b in backends
        },
        failures=failures,
        deadline_ms=settings.deadline * 1000,
        list_changes=(sum(1 for x, y in itertools.pairwise(listed) if x != y) if listed else None),
        client_lag_ms=1000 * max(r["max_lag"] for r in mine),
        backend_lag_ms=1000 * max(window_lag(s, windows) for s in stats),
    )


def _wait_unlisted(
    infra: Infra, service: str, port: int, since: float, until: float
) -> float | None:
    while time.monotonic() < until:
        if infra.list_entries(service).get(port, 0) == 0:
            return time.monotonic() - since
        time.sleep(0.05)
    return None


def run_convergence(infra: Infra, mode: Mode, settings: Settings) -> Convergence:
    """Four equal backends under `mode` (grpclb or proxy); a fifth joins, then
    one drains (Registrar.stop()) and one is killed (SIGKILL)."""
    service = f"oap-conv-{mode.key}"
    slots = settings.slots
    backends = infra.start_backends([f"b{i}" for i in range(4)], [slots] * 4,
                                    settings.service_time, service,
                                    settings.service_dist)  # fmt: skip
    infra.wait_listed(service, backends)
    proxy = None
    if mode is PROXY:
        proxy, address = infra.start_proxy(service, "conv")
        targets = Targets(backends=(), proxy=address)
    else:
        targets = Targets(backends=(), grpclb=infra.grpclb_target(service))
    capacity = 4 * slots * settings.capacity_per_slot
    rates = client_rates(settings.clients, settings.load * capacity, settings.exponent,
                         settings.seed)  # fmt: skip
    slow_start = infra.setting("slow_start")
    heartbeat = infra.setting("heartbeat_interval")
    join_observe = slow_start + 2 * heartbeat + 2.0
    observe = settings.convergence_observe
    start = time.monotonic() + CLIENT_LEAD
    join_at = start + settings.lbserver_warmup
    # Budget: process start of the new backend (~2 s), the join, drain and kill
    # observations, and lbserver's TTL for the killed backend.
    end = join_at + 2.0 + join_observe + observe + REGISTRAR_TTL + observe
    phase = PhaseSpec(mode.key, start, start, end,
                      tuple(channels_for(mode, rates, targets, settings.seed)))  # fmt: skip
    started = _run_clients(infra, f"conv-{mode.key}", settings, [phase])

    watcher = ListWatcher(infra, service)
    _sleep_until(join_at)
    [new] = infra.start_backends(
        ["b4"], [slots], settings.service_time, service, settings.service_dist
    )
    registered_at = float(new.stats()["registered_at"])
    everyone = [*backends, new]

    _sleep_until(registered_at + join_observe)
    drained, killed = backends[1], backends[2]
    drained_at = drained.deregister()

    _sleep_until(drained_at + observe)
    killed_stats = killed.stats()
    killed_at = time.monotonic()
    killed.process.send_signal(signal.SIGKILL)
    unlisted = _wait_unlisted(infra, service, killed.port, killed_at, end)

    results = _collect(started, timeout=end - time.monotonic() + settings.deadline + 30)
    stats = {b.name: (killed_stats if b is killed else b.stats()) for b in everyone}
    lists = ListWatcher.by_name(watcher.stop(), {b.port: b.name for b in everyone})
    _save(
        infra,
        f"stats-conv-{mode.key}.json",
        {
            "backends": stats,
            "lists": lists,
            "registered_at": registered_at,
            "drained_at": drained_at,
            "killed_at": killed_at,
        },
    )
    if proxy is not None:
        proxy.terminate(timeout=5)
    for b in everyone:
        if b is not killed:
            b.process.terminate(timeout=5)

    return _convergence_figures(
        mode, stats, results, registered_at, drained.name, drained_at, killed_at, unlisted
    )


def _convergence_figures(
    mode: Mode,
    stats: dict[str, dict[str, Any]],
    results: Sequence[dict[str, Any]],
    registered_at: float,
    drained: str,
    drained_at: float,
    killed_at: float,
    unlisted: float | None,
) -> Convergence:
    new_times = arrival_times(stats["b4"])
    all_times = sorted(x for s in stats.values() for x in arrival_times(s))
    reached, timeline = first_time_at_share(
        new_times, all_times, registered_at, fair=1 / 5, until=drained_at
    )
    first_call = next((t - registered_at for t, n in new_times if n > 0), None)
    after_drain = int(stats[drained]["calls_after_deregister"])
    last = stats[drained]["last_arrival"]
    failures = [(t, code) for r in results for t, code in r[mode.key]["failures"]]
    after_kill = [(t, code) for t, code in failures if t >= killed_at]
    codes: dict[str, int] = {}
    for _, code in after_kill:
        codes[code] = codes.get(code, 0) + 1
    return Convergence(
        mode=mode.label,
        letter=mode.letter,
        backends_before=4,
        registered_at=registered_at,
        first_call_after=max(0.0, first_call) if first_call is not None else None,
        share_90_after=reached,
        share_timeline=tuple(timeline),
        drained_calls_after=after_drain,
        drained_last_call_after=max(0.0, float(last) - drained_at) if after_drain else None,
        killed_failures=len(after_kill),
        killed_failures_codes=codes,
        killed_last_failure_after=(
            max(t for t, _ in after_kill) - killed_at if after_kill else None
        ),
        killed_unlisted_after=unlisted,
        total_failures=len(failures),
    )


def describe_rates(settings: Settings) -> str:
    rates = sorted(client_rates(settings.clients, 1.0, settings.exponent, settings.seed))
    return (
        f"client call rates ~ 1/(k+1)^{settings.exponent:g}: the busiest client makes "
        f"{rates[-1] * 100:.0f}% of the calls, the quietest {rates[0] * 100:.1f}%"
        f" (max/min {rates[-1] / rates[0]:.0f}x)"
    )
