"""The backend side's public face (lbserver.registrar), what importing
lbserver costs, and the registrar's use of the shared rules: the domain's
validation, lbserver.errors and lbserver.backoff."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import lbserver
import lbserver.registrar
from lbserver.domain.model import LoadReport
from lbserver.errors import InvalidArgumentError, LbserverError
from lbserver.registrar import PrometheusLoadProbe, Registrar, make_probe, static_load
from lbserver.registrar._registrar import _load_message, _retry_backoff

URL = "http://127.0.0.1:1234/metrics"


def test_importing_lbserver_loads_no_grpc() -> None:
    code = "import sys, lbserver; print('grpc' in sys.modules, lbserver.__version__)"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == ["False", lbserver.__version__]


def test_every_public_name_is_there() -> None:
    for name in lbserver.registrar.__all__:
        assert getattr(lbserver.registrar, name) is not None, name
    assert {"Registrar", "PrometheusLoadProbe"} <= set(lbserver.registrar.__all__)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"balancers": []}, "balancers"),
        ({"balancers": "h:1"}, "balancers"),
        ({"balancers": ["nohost"]}, "balancers"),
        ({"interval": 0}, "interval"),
        ({"ttl": 1.0}, "ttl"),
        ({"instance_id": ""}, "instance_id"),
        ({"token": ["a", ""]}, "token"),
        ({"probe_failures": 0}, "probe_failures"),
        ({"weight": 0}, "weight"),
    ],
)
def test_registrar_arguments_fail_with_the_documented_error(
    kwargs: dict[str, Any], field: str
) -> None:
    arguments: dict[str, Any] = {
        "balancers": ["127.0.0.1:11810"],
        "service": "oap",
        "ip": "10.0.0.1",
        "port": 11800,
        **kwargs,
    }
    with pytest.raises(InvalidArgumentError) as error:
        Registrar(**arguments)
    assert error.value.field == field
    assert isinstance(error.value, LbserverError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"url": "ftp://h/metrics"}, "url"),
        ({"cpus": 0.0}, "cpus"),
        ({"timeout": 0.0}, "timeout"),
        ({"min_interval": -1.0}, "min_interval"),
        ({"errors_metric": "a b"}, "errors_metric"),
    ],
)
def test_load_probe_arguments_fail_with_the_documented_error(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        PrometheusLoadProbe(**{"url": URL, **kwargs})
    assert error.value.field == field


def test_an_unknown_probe_kind_fails_with_the_documented_error() -> None:
    with pytest.raises(InvalidArgumentError) as error:
        make_probe("http", "10.0.0.1", 11800, 1.0)
    assert error.value.field == "probe"


def test_settings_are_attributes() -> None:
    registrar = Registrar(
        ["b:11810", "b:11810"], "oap", "10.0.0.1", 11800, labels={"k": "v"}, interval=2.0
    )
    assert registrar.balancers == ("b:11810",)
    assert registrar.instance_id == "10.0.0.1:11800"
    assert registrar.labels == {"k": "v"}
    assert (registrar.interval, registrar.ttl, registrar.weight) == (2.0, None, 1)
    probe = PrometheusLoadProbe(URL, cpus=2, min_interval=1)
    assert (probe.url, probe.cpus, probe.timeout, probe.min_interval) == (URL, 2.0, 2.0, 1.0)


@pytest.mark.parametrize(
    ("report", "field"),
    [
        (LoadReport(cpu_utilization=-0.5), "load.cpu_utilization"),
        (LoadReport(requests_per_second=float("nan")), "load.requests_per_second"),
        (LoadReport(errors_per_second=float("inf")), "load.errors_per_second"),
    ],
)
def test_a_load_the_balancer_refuses_is_not_sent(report: LoadReport, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        _load_message(report)
    assert error.value.field == field


def test_a_load_message_carries_only_known_values() -> None:
    message = _load_message(LoadReport(cpu_utilization=0.5, in_flight=3))
    assert message is not None
    assert message.HasField("cpu_utilization") and message.HasField("in_flight")
    assert not message.HasField("requests_per_second")
    assert _load_message(LoadReport()) is None


def test_failed_heartbeats_back_off_from_200ms_doubling_to_the_interval() -> None:
    backoff = _retry_backoff(3.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.2, 0.4, 0.8, 1.6, 3.0, 3.0]
    # An interval shorter than the first retry: every retry waits one interval.
    tiny = _retry_backoff(0.05)
    assert [tiny.delay(n) for n in range(1, 4)] == [0.05, 0.05, 0.05]


@pytest.mark.parametrize(("spec", "key"), [("cpu=-1", "cpu"), ("eps=nan", "eps")])
def test_a_static_load_the_balancer_refuses_names_its_key(spec: str, key: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        static_load(spec)
    assert error.value.field == key
