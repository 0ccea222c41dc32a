"""kubernetes_services[].scrape: the balancer's own load scrapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lbserver.config import Config, load_config
from lbserver.discovery import CPU_LIMIT, ScrapeSettings
from lbserver.errors import ConfigError


def watched(scrape: Any, mode: str = "kubernetes") -> list[dict[str, Any]]:
    return [{"service": "oap", "namespace": "skywalking", "mode": mode, "scrape": scrape}]


def test_a_scrape_block_with_defaults() -> None:
    config = Config(kubernetes_services=watched({"port": 1234}))
    assert config.kubernetes_services[0].scrape == ScrapeSettings(port=1234)


def test_a_full_scrape_block_from_the_environment() -> None:
    scrape = {
        "port": 1234,
        "path": "/metrics",
        "interval": "15s",
        "timeout": "500ms",
        "cpus": 2,
        "cpu_metric": "process_cpu_seconds_total",
        "requests_metric": "trace_in_latency_count",
        "errors_metric": "trace_analysis_error_count",
        "inflight_metric": None,
    }
    config = load_config(environ={"LBSERVER_KUBERNETES_SERVICES": json.dumps(watched(scrape))})
    assert config.kubernetes_services[0].scrape == ScrapeSettings(
        port=1234,
        interval=15.0,
        timeout=0.5,
        cpus=2.0,
        requests_metric="trace_in_latency_count",
        errors_metric="trace_analysis_error_count",
    )


def test_no_scrape_block_means_no_scrapes() -> None:
    config = Config(kubernetes_services=[{"service": "oap", "mode": "kubernetes"}])
    assert config.kubernetes_services[0].scrape is None


@pytest.mark.parametrize(
    ("scrape", "mode", "message"),
    [
        ({"port": 1234}, "both", "scrape needs mode 'kubernetes'"),
        ({"port": 0}, "kubernetes", "port must be in 1-65535"),
        ({}, "kubernetes", "'port' is required"),
        ({"port": "x"}, "kubernetes", "expected a whole number"),
        ({"port": 1234, "path": "metrics"}, "kubernetes", "path must start with '/'"),
        ({"port": 1234, "timeout": 20}, "kubernetes", "timeout <= interval"),
        ({"port": 1234, "cpus": 0}, "kubernetes", "cpus must be a number > 0"),
        ({"port": 1234, "cpu_metric": "not a metric"}, "kubernetes", "cpu_metric"),
        ({"port": 1234, "scheme": "https"}, "kubernetes", "unknown keys \\['scheme'\\]"),
        ("1234", "kubernetes", "scrape: expected a mapping"),
    ],
)
def test_bad_scrape_blocks_name_the_problem(scrape: Any, mode: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"kubernetes_services\[0\]: .*{message}"):
        Config(kubernetes_services=watched(scrape, mode))


@pytest.mark.parametrize("port", ["monitoring", "http-metrics", "m1"])
def test_a_port_by_name(port: str) -> None:
    config = Config(kubernetes_services=watched({"port": port}))
    assert config.kubernetes_services[0].scrape == ScrapeSettings(port=port)


def test_a_port_of_digits_in_a_string_is_a_number() -> None:
    config = load_config(
        environ={"LBSERVER_KUBERNETES_SERVICES": json.dumps(watched({"port": "1234"}))}
    )
    assert config.kubernetes_services[0].scrape == ScrapeSettings(port=1234)


def test_cpus_from_the_containers_limit() -> None:
    config = Config(kubernetes_services=watched({"port": "monitoring", "cpus": "limit"}))
    assert config.kubernetes_services[0].scrape == ScrapeSettings(port="monitoring", cpus=CPU_LIMIT)


@pytest.mark.parametrize(
    ("scrape", "message"),
    [
        ({"port": "Monitoring"}, "expected a whole number or a port name"),
        ({"port": "-metrics"}, "expected a whole number or a port name"),
        ({"port": "a--b"}, "expected a whole number or a port name"),
        ({"port": "a-very-long-port-name"}, "expected a whole number or a port name"),
        ({"port": ""}, "expected a whole number"),
        ({"port": 1234, "cpus": "limits"}, "expected a number"),
        ({"port": 1234, "cpus": "-1"}, "cpus must be a number > 0 or 'limit'"),
    ],
)
def test_bad_port_names_and_cpus(scrape: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"kubernetes_services\[0\]: .*{message}"):
        Config(kubernetes_services=watched(scrape))
