"""lbserver.loadprobe: rate math on canned exposition text with a fake clock,
cgroup CPU limits, the static load spec, and the `lbserver register` load options."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lbserver.cli import build_parser, main
from lbserver.cli.register import build_load
from lbserver.domain.model import LoadReport
from lbserver.registrar import (
    DEFAULT_CPU_METRIC,
    MetricSelector,
    PrometheusLoadProbe,
    available_cpus,
    container_cpu_limit,
    default_cpus,
    parse_cpus,
    parse_selector,
    static_load,
)

URL = "http://127.0.0.1:1234/metrics"
REQUIRED = ["--balancer", "127.0.0.1:11810", "--service", "oap", "--backend", "10.0.0.7:11800"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def exposition(
    cpu: float | None = 10.0,
    requests: Mapping[str, float] | None = None,
    errors: float | None = None,
    inflight: Mapping[str, float] | None = None,
    start_time: float | None = None,
) -> str:
    """A page like prometheus_client and the Java simpleclient write."""
    lines = []
    if cpu is not None:
        lines += [
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.",
            "# TYPE process_cpu_seconds_total counter",
            f"process_cpu_seconds_total {cpu}",
        ]
    if start_time is not None:
        lines += [
            "# TYPE process_start_time_seconds gauge",
            f"process_start_time_seconds {start_time}",
        ]
    if requests is not None:
        lines.append("# TYPE requests counter")
        for code, value in requests.items():
            lines.append(f'requests_total{{code="{code}"}} {value}')
            lines.append(f'requests_created{{code="{code}"}} 1.7e9')
    if errors is not None:
        lines += ["# TYPE errors counter", f"errors_total {errors}"]
    if inflight is not None:
        lines.append("# TYPE inflight gauge")
        for pool, value in inflight.items():
            lines.append(f'inflight{{pool="{pool}"}} {value}')
    return "\n".join(lines) + "\n"


def probe(clock: FakeClock, **options: object) -> PrometheusLoadProbe:
    settings: dict[str, object] = {
        "requests_metric": "requests_total",
        "errors_metric": "errors_total",
        "inflight_metric": "inflight",
        "cpus": 2.0,
        "clock": clock,
    }
    settings.update(options)
    return PrometheusLoadProbe(URL, **settings)  # type: ignore[arg-type]


# --- rate math -------------------------------------------------------------


def test_first_scrape_gives_no_rates_but_gauges() -> None:
    clock = FakeClock()
    report = probe(clock).observe(
        exposition(cpu=5, requests={"200": 10}, errors=1, inflight={"a": 2, "b": 3})
    )
    assert report == LoadReport(in_flight=5)


def test_rates_between_two_scrapes() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(cpu=5, requests={"200": 100, "500": 10}, errors=10, inflight={"a": 1}))
    clock.now += 10
    report = p.observe(
        exposition(cpu=10, requests={"200": 580, "500": 30}, errors=30, inflight={"a": 7})
    )
    # 5 CPU seconds in 10 s on 2 CPUs; (480 + 20) requests and 20 errors in 10 s.
    assert report == LoadReport(
        cpu_utilization=0.25, requests_per_second=50.0, errors_per_second=2.0, in_flight=7
    )
    clock.now += 5
    report = p.observe(
        exposition(cpu=12.5, requests={"200": 580, "500": 30}, errors=30, inflight={"a": 0})
    )
    assert report == LoadReport(
        cpu_utilization=0.25, requests_per_second=0.0, errors_per_second=0.0, in_flight=0
    )


def test_counter_reset_makes_only_that_rate_unknown_for_one_interval() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(cpu=50, requests={"200": 1000}, errors=5))
    clock.now += 10
    report = p.observe(exposition(cpu=60, requests={"200": 40}, errors=5))
    assert report.requests_per_second is None
    assert report.cpu_utilization == 0.5
    assert report.errors_per_second == 0.0
    clock.now += 10
    report = p.observe(exposition(cpu=70, requests={"200": 140}, errors=5))
    assert report.requests_per_second == 10.0


def test_one_series_going_down_voids_the_sum() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(requests={"200": 100, "500": 50}))
    clock.now += 10
    # The sum grew, but one series was reset: the rate cannot be known.
    assert p.observe(exposition(requests={"200": 300, "500": 0})).requests_per_second is None


def test_restart_seen_in_start_time_voids_every_rate() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(cpu=1, requests={"200": 10}, errors=0, start_time=1000))
    clock.now += 10
    # Counters grew past their old values after a restart: only the start time tells.
    report = p.observe(
        exposition(cpu=30, requests={"200": 500}, errors=2, inflight={"a": 1}, start_time=1005)
    )
    assert report == LoadReport(in_flight=1)
    clock.now += 10
    report = p.observe(exposition(cpu=32, requests={"200": 600}, errors=2, start_time=1005))
    assert (report.cpu_utilization, report.requests_per_second) == (0.1, 10.0)


def test_missing_metrics_are_unknown_not_zero() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(cpu=None, requests={"200": 1}))
    clock.now += 10
    report = p.observe(exposition(cpu=None, requests={"200": 11}))
    assert report == LoadReport(requests_per_second=1.0)


def test_unconfigured_metrics_are_unknown() -> None:
    clock = FakeClock()
    p = PrometheusLoadProbe(URL, cpus=1, clock=clock)
    assert p.metrics == {"cpu": DEFAULT_CPU_METRIC}
    p.observe(exposition(cpu=1, requests={"200": 1}, errors=1, inflight={"a": 1}))
    clock.now += 2
    report = p.observe(exposition(cpu=2, requests={"200": 5}, errors=3, inflight={"a": 1}))
    assert report == LoadReport(cpu_utilization=0.5)


def test_metric_appearing_later_starts_with_no_rate() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(requests=None))
    clock.now += 10
    assert p.observe(exposition(requests={"200": 100})).requests_per_second is None
    clock.now += 10
    assert p.observe(exposition(requests={"200": 150})).requests_per_second == 5.0


def test_new_series_counts_from_the_next_interval() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(requests={"200": 100}))
    clock.now += 10
    # The new series' 1000 requests happened at some unknown time: not in this rate.
    assert p.observe(exposition(requests={"200": 200, "503": 1000})).requests_per_second == 10.0
    clock.now += 10
    report = p.observe(exposition(requests={"200": 300, "503": 1100}))
    assert report.requests_per_second == 20.0


def test_no_time_passed_gives_no_rates() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(cpu=1, requests={"200": 1}))
    assert p.observe(exposition(cpu=2, requests={"200": 2})) == LoadReport()


def test_label_filter_and_sample_name_matching() -> None:
    clock = FakeClock()
    p = probe(clock, requests_metric='requests_total{code="500"}', errors_metric="errors")
    p.observe(exposition(requests={"200": 100, "500": 10}, errors=10))
    clock.now += 10
    report = p.observe(exposition(requests={"200": 900, "500": 30}, errors=40))
    # Only code="500"; "errors" also finds the counter's errors_total samples.
    assert (report.requests_per_second, report.errors_per_second) == (2.0, 3.0)


def test_histogram_count_as_requests() -> None:
    clock = FakeClock()
    p = probe(clock, requests_metric="trace_in_latency_count")

    def page(count: float) -> str:
        return (
            "# TYPE trace_in_latency histogram\n"
            f'trace_in_latency_bucket{{protocol="grpc",le="+Inf"}} {count}\n'
            f'trace_in_latency_count{{protocol="grpc"}} {count}\n'
            f'trace_in_latency_sum{{protocol="grpc"}} {count / 10}\n'
        )

    p.observe(page(100))
    clock.now += 4
    assert p.observe(page(300)).requests_per_second == 50.0


@pytest.mark.parametrize("value", ["NaN", "-3", "+Inf"])
def test_unusable_gauge_is_unknown(value: str) -> None:
    report = probe(FakeClock()).observe(f"inflight {value}\n")
    assert report.in_flight is None


def test_fractional_gauge_rounds() -> None:
    assert probe(FakeClock()).observe("inflight 2.6\n").in_flight == 3


def test_nan_counter_gives_unknown_rate() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe("errors_total NaN\n")
    clock.now += 1
    assert p.observe("errors_total 4\n").errors_per_second is None


def test_unparsable_text_raises_and_keeps_the_baseline() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(requests={"200": 0}))
    clock.now += 10
    with pytest.raises(ValueError, match="Prometheus text format"):
        p.observe("<html><body>login</body></html>\n")
    clock.now += 10
    assert p.observe(exposition(requests={"200": 200})).requests_per_second == 10.0


def test_failed_scrape_is_all_unknown_and_restarts_the_baseline() -> None:
    clock = FakeClock()
    p = probe(clock)
    p.observe(exposition(cpu=1, requests={"200": 0}, inflight={"a": 4}))
    clock.now += 10
    assert p.scrape_failed(ConnectionRefusedError("refused")) == LoadReport()
    clock.now += 10
    # The first scrape after a failure has no baseline: the backend may have restarted.
    assert p.observe(exposition(cpu=2, requests={"200": 100})).requests_per_second is None
    clock.now += 10
    assert p.observe(exposition(cpu=4, requests={"200": 200})).requests_per_second == 10.0


def test_failures_and_recovery_are_logged_once_each() -> None:
    clock = FakeClock()
    p = probe(clock)
    with capture_logs() as logs:
        p.observe(exposition(requests={"200": 0}, errors=0, inflight={"a": 0}))
        p.scrape_failed(ConnectionRefusedError("refused"))
        p.scrape_failed(TimeoutError())
        p.scrape_failed(ValueError("bad"))
        p.observe(exposition(requests={"200": 0}, errors=0, inflight={"a": 0}))
        p.observe(exposition(requests={"200": 0}, errors=0, inflight={"a": 0}))
        p.scrape_failed(TimeoutError())
    assert [(log["log_level"], log["event"]) for log in logs] == [
        ("warning", "load scrape failed; reporting unknown load until it works again"),
        ("info", "load scrape works again"),
        ("warning", "load scrape failed; reporting unknown load until it works again"),
    ]
    assert logs[0]["error"] == "refused"
    assert logs[2]["error"] == "TimeoutError"


def test_missing_metric_is_logged_once_and_when_found() -> None:
    clock = FakeClock()
    p = probe(clock)
    with capture_logs() as logs:
        for _ in range(3):
            p.observe(exposition(errors=1, inflight={"a": 1}))
        p.observe(exposition(requests={"200": 1}, errors=1, inflight={"a": 1}))
    assert [(log["event"], log["metric"]) for log in logs] == [
        ("load metric not found; reporting it as unknown", "requests_total"),
        ("load metric found", "requests_total"),
    ]


# --- selectors, constructor ------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("up", MetricSelector("up")),
        (" requests_total ", MetricSelector("requests_total")),
        ("a:b_c{}", MetricSelector("a:b_c")),
        ('r{code="500"}', MetricSelector("r", {"code": "500"})),
        ('r{code="5\\"0",x=""}', MetricSelector("r", {"code": '5"0', "x": ""})),
    ],
)
def test_parse_selector(spec: str, expected: MetricSelector) -> None:
    selector = parse_selector(spec)
    assert (selector.name, dict(selector.labels)) == (expected.name, dict(expected.labels))
    assert parse_selector(str(selector)) == selector


@pytest.mark.parametrize("spec", ["", "9lives", "a b", "{code='x'}", "r{code=500}", 'r{a="b"'])
def test_parse_selector_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_selector(spec)


def test_empty_matcher_means_label_absent() -> None:
    selector = parse_selector('r{code=""}')
    assert selector.matches({"pool": "a"})
    assert not selector.matches({"code": "200"})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cpus": 0.0}, "cpus"),
        ({"cpus": math.inf}, "cpus"),
        ({"timeout": 0.0}, "timeout"),
        ({"min_interval": -1.0}, "min_interval"),
        ({"requests_metric": "a b"}, "requests_metric"),
    ],
)
def test_probe_rejects_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrometheusLoadProbe(URL, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url", ["ftp://h/metrics", "127.0.0.1:1234", "http:///metrics", "http://h:99999/", "file:/x"]
)
def test_probe_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        PrometheusLoadProbe(url)


# --- CPU count -------------------------------------------------------------


def write(directory: Path, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text + "\n")
    return directory


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    write(tmp_path, cpu__max="150000 100000")
    assert container_cpu_limit(tmp_path) == 1.5


def test_cgroup_v2_no_limit(tmp_path: Path) -> None:
    write(tmp_path, cpu__max="max 100000")
    assert container_cpu_limit(tmp_path) is None


@pytest.mark.parametrize("subdir", ["cpu", "cpu,cpuacct", "."])
def test_cgroup_v1_quota(tmp_path: Path, subdir: str) -> None:
    write(tmp_path / subdir, cpu__cfs_quota_us="50000", cpu__cfs_period_us="100000")
    assert container_cpu_limit(tmp_path) == 0.5


def test_cgroup_v1_no_limit(tmp_path: Path) -> None:
    write(tmp_path / "cpu", cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    assert container_cpu_limit(tmp_path) is None


@pytest.mark.parametrize("text", ["", "garbage", "100000", "x 100000", "100000 0"])
def test_cgroup_unreadable_is_no_limit(tmp_path: Path, text: str) -> None:
    write(tmp_path, cpu__max=text)
    assert container_cpu_limit(tmp_path) is None


def test_no_cgroup_is_no_limit(tmp_path: Path) -> None:
    assert container_cpu_limit(tmp_path / "missing") is None


def test_default_cpus_is_the_limit_capped_at_the_usable_cores(tmp_path: Path) -> None:
    assert default_cpus(write(tmp_path / "small", cpu__max="50000 100000")) == 0.5
    cores = available_cpus()
    assert default_cpus(write(tmp_path / "huge", cpu__max="100000000 100000")) == cores
    assert default_cpus(tmp_path / "none") == cores


@pytest.mark.parametrize(
    ("text", "cpus"), [("2", 2.0), ("0.5", 0.5), ("500m", 0.5), ("1500m", 1.5)]
)
def test_parse_cpus(text: str, cpus: float) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["", "0", "-1", "0m", "inf", "nan", "two", "m"])
def test_parse_cpus_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_cpus(text)


# --- static load -----------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "report"),
    [
        ("cpu=0.9,rps=100", LoadReport(cpu_utilization=0.9, requests_per_second=100.0)),
        (
            " cpu = 0 , rps=0,eps=1.5,inflight=3 ",
            LoadReport(
                cpu_utilization=0.0, requests_per_second=0.0, errors_per_second=1.5, in_flight=3
            ),
        ),
        ("rps=7,", LoadReport(requests_per_second=7.0)),
        ("cpu=1.5", LoadReport(cpu_utilization=1.5)),
    ],
)
def test_static_load(spec: str, report: LoadReport) -> None:
    assert static_load(spec) == report


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("cpu=-0.1", "cpu"),
        ("cpu=nan", "cpu"),
        ("cpu=0.5,rps=inf", "rps"),
        ("eps=x", "eps"),
        ("inflight=1.5", "inflight"),
        ("inflight=-1", "inflight"),
        ("cpu=1,cpu=2", "cpu"),
        ("qps=10", "qps"),
        ("cpu", "cpu"),
        ("", "gives no load"),
    ],
)
def test_static_load_names_the_bad_key(spec: str, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        static_load(spec)


# --- lbserver register options ---------------------------------------------


def parse(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["register", *REQUIRED, *extra])


def test_no_load_options_send_no_load() -> None:
    assert build_load(parse()) is None


def test_load_static_option() -> None:
    load = build_load(parse("--load-static", "cpu=0.5,rps=10"))
    assert load is not None
    assert load() == LoadReport(cpu_utilization=0.5, requests_per_second=10.0)


def test_load_url_options() -> None:
    load = build_load(
        parse(
            "--load-url", "http://127.0.0.1:1234/metrics",
            "--interval", "5",
            "--requests-metric", 'trace_in_latency_count{protocol="grpc"}',
            "--errors-metric", "trace_analysis_error_count",
            "--inflight-metric", "inflight",
            "--cpus", "1500m",
        )
    )  # fmt: skip
    assert isinstance(load, PrometheusLoadProbe)
    assert load.url == "http://127.0.0.1:1234/metrics"
    assert load.metrics == {
        "cpu": DEFAULT_CPU_METRIC,
        "requests": 'trace_in_latency_count{protocol="grpc"}',
        "errors": "trace_analysis_error_count",
        "inflight": "inflight",
    }
    assert (load.cpus, load.timeout, load.min_interval) == (1.5, 2.0, 2.5)


def test_load_url_defaults() -> None:
    load = build_load(parse("--load-url", "https://oap:1234/metrics", "--interval", "0.5"))
    assert isinstance(load, PrometheusLoadProbe)
    assert load.metrics == {"cpu": DEFAULT_CPU_METRIC}
    assert load.cpus == default_cpus()
    assert (load.timeout, load.min_interval) == (0.5, 0.25)


def test_empty_cpu_metric_turns_cpu_off() -> None:
    load = build_load(parse("--load-url", URL, "--cpu-metric", "", "--requests-metric", "r"))
    assert isinstance(load, PrometheusLoadProbe)
    assert load.metrics == {"requests": "r"}


def run_main(argv: list[str]) -> int:
    """Exit code of `lbserver register`, whether argparse or run() rejects."""
    try:
        return main(["register", *REQUIRED, "--log-level", "error", *argv])
    except SystemExit as exit_info:
        return exit_info.code if isinstance(exit_info.code, int) else -1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--load-static", "cpu=-1"], "cpu"),
        (["--load-static", "cpu=0.5,rps=fast"], "rps"),
        (["--load-static", "load=1"], "load"),
        (["--load-static", "cpu=1", "--load-url", URL], "not allowed with"),
        (["--load-url", "ftp://127.0.0.1/metrics"], "http"),
        (["--load-url", "127.0.0.1:1234"], "http"),
        (["--load-url", "http://:1234/metrics"], "http"),
        (["--load-url", "http://h:70000/"], "--load-url"),
        (["--load-url", URL, "--requests-metric", "bad name"], "--requests-metric"),
        (["--load-url", URL, "--inflight-metric", "x{a=1}"], "--inflight-metric"),
        (["--load-url", URL, "--cpus", "0"], "--cpus"),
        (["--requests-metric", "r"], "--requests-metric needs --load-url"),
        (["--load-static", "cpu=1", "--cpus", "2"], "--cpus needs --load-url"),
    ],
)
def test_bad_load_options_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(argv) == 2
    assert message in capsys.readouterr().err
