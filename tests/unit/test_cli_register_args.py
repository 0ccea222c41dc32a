"""Argument parsing and validation of `lbserver register`."""

from __future__ import annotations

import argparse
import socket

import pytest

from lbserver.addresses import parse_host_port
from lbserver.cli import build_parser, main
from lbserver.cli.register import build_registrar, resolve_ip

REQUIRED = ["--balancer", "127.0.0.1:11810", "--service", "oap", "--backend", "10.0.0.7:11800"]


def parse(*extra: str, base: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(["register", *(REQUIRED if base is None else base), *extra])


def test_defaults() -> None:
    registrar = build_registrar(parse())
    assert registrar.balancers == ("127.0.0.1:11810",)
    assert registrar.service == "oap"
    assert (registrar.ip, registrar.port) == ("10.0.0.7", 11800)
    assert registrar.instance_id == "10.0.0.7:11800"
    assert (registrar.weight, registrar.zone, dict(registrar.labels)) == (1, "", {})
    assert registrar.interval == 3.0
    assert registrar.ttl is None


def test_every_option() -> None:
    registrar = build_registrar(
        parse(
            "--weight", "5",
            "--zone", "eu-1a",
            "--interval", "2",
            "--ttl", "7.5",
            "--instance-id", "oap-0",
            "--label", "pod=oap-0",
            "--label", "empty=",
            "--label", "expr=a=b",
        )
    )  # fmt: skip
    assert registrar.weight == 5
    assert registrar.zone == "eu-1a"
    assert registrar.interval == 2.0
    assert registrar.ttl == 7.5
    assert registrar.instance_id == "oap-0"
    assert dict(registrar.labels) == {"pod": "oap-0", "empty": "", "expr": "a=b"}


def test_balancers_repeated_and_comma_separated() -> None:
    args = parse(
        base=[
            "--balancer", "10.0.0.1:11810, 10.0.0.2:11810",
            "--balancer", "[fd00::3]:11810,10.0.0.1:11810",
            "--service", "oap",
            "--backend", "10.0.0.7:11800",
        ]
    )  # fmt: skip
    assert build_registrar(args).balancers == (
        "10.0.0.1:11810",
        "10.0.0.2:11810",
        "[fd00::3]:11810",
    )


def test_ipv6_backend() -> None:
    args = parse(base=["--balancer", "[::1]:11810", "--service", "oap", "--backend", "[::1]:8080"])
    registrar = build_registrar(args)
    assert (registrar.ip, registrar.port) == ("::1", 8080)
    assert registrar.instance_id == "[::1]:8080"


def test_backend_hostname_is_resolved() -> None:
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 80)}
    args = parse(
        base=["--balancer", "127.0.0.1:1", "--service", "oap", "--backend", "localhost:80"]
    )
    registrar = build_registrar(args)
    assert registrar.ip in addresses
    assert registrar.instance_id.endswith(":80")


def test_unresolvable_backend_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="--backend: cannot resolve"):
        resolve_ip("no-such-host.invalid", 80)


@pytest.mark.parametrize(
    "argv",
    [
        ["--balancer", "127.0.0.1:1", "--backend", "10.0.0.7:80"],  # no --service
        ["--service", "oap", "--backend", "10.0.0.7:80"],  # no --balancer
        ["--balancer", "127.0.0.1:1", "--service", "oap"],  # no --backend
        ["--balancer", "127.0.0.1:1", "--service", "oap", "--backend", "10.0.0.7:0"],
        ["--balancer", "127.0.0.1:1", "--service", "oap", "--backend", "10.0.0.7:99999"],
        ["--balancer", "127.0.0.1:1", "--service", "oap", "--backend", "10.0.0.7"],
        ["--balancer", "127.0.0.1:1", "--service", "oap", "--backend", "::1:80"],
        # A balancer without a port means 11810; an unbracketed IPv6 is still refused.
        ["--balancer", "::1", "--service", "oap", "--backend", "10.0.0.7:80"],
        ["--balancer", ",", "--service", "oap", "--backend", "10.0.0.7:80"],
        [*REQUIRED, "--weight", "0"],
        [*REQUIRED, "--weight", "heavy"],
        [*REQUIRED, "--interval", "0"],
        [*REQUIRED, "--interval", "inf"],
        [*REQUIRED, "--ttl", "-1"],
        [*REQUIRED, "--label", "novalue"],
        [*REQUIRED, "--label", "=x"],
        [*REQUIRED, "--log-format", "xml"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["register", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_ttl_not_above_interval_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["register", *REQUIRED, "--interval", "3", "--ttl", "3", "--log-level", "error"])
    assert code == 2
    assert "ttl" in capsys.readouterr().err


def test_unresolvable_backend_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["register", "--balancer", "127.0.0.1:1", "--service", "oap"]
    code = main([*argv, "--backend", "no-such-host.invalid:80", "--log-level", "error"])
    assert code == 2
    assert "cannot resolve" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("h:1", ("h", 1)),
        ("10.0.0.1:11810", ("10.0.0.1", 11810)),
        ("[::1]:8080", ("::1", 8080)),
        (" oap.ns.svc:11800 ", ("oap.ns.svc", 11800)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "h:", "h:x", "h:65536", "[::1]8080", "[oap]:80"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_host_port(text)
