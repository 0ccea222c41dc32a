"""Follow-ups shipped with token rotation: `agent-shim proxy --balancer`
takes HOST without a port (meaning 11810) through the same parser as the
lbserver commands, and the load probe logs like a library (the `logging`
module until the application configures structlog, never stdout)."""

from __future__ import annotations

import logging

import pytest
import structlog

from agent_shim.cli import build_parser
from lbserver.registrar import PrometheusLoadProbe


def proxy_args(*balancers: str) -> list[list[str]]:
    argv = ["proxy", "--listen", "127.0.0.1:11800", "--service", "oap"]
    for balancer in balancers:
        argv += ["--balancer", balancer]
    balancer_groups: list[list[str]] = build_parser().parse_args(argv).balancer
    return balancer_groups


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("lbserver.skywalking.svc", ["lbserver.skywalking.svc:11810"]),
        ("10.0.0.1", ["10.0.0.1:11810"]),
        ("[::1]", ["[::1]:11810"]),
        ("lb-0, lb-1:1234", ["lb-0:11810", "lb-1:1234"]),
        ("[fd00::3]:1234", ["[fd00::3]:1234"]),
    ],
)
def test_proxy_balancer_without_port_means_11810(given: str, meant: list[str]) -> None:
    assert proxy_args(given) == [meant]


@pytest.mark.parametrize("given", ["::1", "[oap]", "h:", ":80", "h:0", ","])
def test_proxy_bad_balancer_exits_2(given: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        proxy_args(given)
    assert exit_info.value.code == 2
    assert "--balancer" in capsys.readouterr().err


def test_proxy_fallback_still_needs_a_port(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["proxy", "--listen", "127.0.0.1:1", "--service", "oap", "--balancer", "lb"]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--fallback", "oap"])
    assert "--fallback" in capsys.readouterr().err


def test_proxy_help_says_the_port_may_be_omitted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["proxy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--balancer HOST[:PORT][,HOST[:PORT]...]" in text
    assert "port 11810 if omitted" in text


def test_load_probe_logs_to_the_logging_module_not_stdout(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An application that never configured structlog.
    monkeypatch.setattr(structlog, "is_configured", lambda: False)
    probe = PrometheusLoadProbe("http://127.0.0.1:1/metrics")
    with caplog.at_level(logging.INFO, logger="lbserver.loadprobe"):
        probe.scrape_failed(ConnectionRefusedError("connection refused"))
        probe.observe("# nothing here\n")
    records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert [(name, level) for name, level, _ in records] == [
        ("lbserver.loadprobe", "WARNING"),
        ("lbserver.loadprobe", "INFO"),
        ("lbserver.loadprobe", "WARNING"),
    ]
    assert records[0][2].startswith("load scrape failed")
    assert "load_url=http://127.0.0.1:1/metrics" in records[0][2]
    assert capsys.readouterr().out == ""
