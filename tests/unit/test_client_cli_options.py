"""Options of `lbserver status` and `lbserver register`: a balancer given
without a port means 11810, --json and --watch exclude each other, and the
help says what the commands do."""

from __future__ import annotations

import argparse

import pytest

from lbserver.addresses import parse_host_port
from lbserver.cli import build_parser, main
from lbserver.cli.register import build_registrar


def status_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["status", *argv])


def register_args(*balancers: str) -> argparse.Namespace:
    argv = ["register", "--service", "oap", "--backend", "10.0.0.7:11800"]
    for balancer in balancers:
        argv += ["--balancer", balancer]
    return build_parser().parse_args(argv)


def test_default_balancer_port_is_the_grpc_port() -> None:
    from lbserver.addresses import DEFAULT_BALANCER_PORT

    assert DEFAULT_BALANCER_PORT == 11810


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("localhost", "localhost:11810"),
        ("lbserver.skywalking.svc", "lbserver.skywalking.svc:11810"),
        ("10.0.0.1", "10.0.0.1:11810"),
        ("[::1]", "[::1]:11810"),
        (" [fd00::3] ", "[fd00::3]:11810"),
        ("localhost:1234", "localhost:1234"),
        ("[::1]:1234", "[::1]:1234"),
    ],
)
def test_status_balancer_without_port_means_11810(given: str, meant: str) -> None:
    assert status_args("--balancer", given).balancer == meant


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        (["localhost"], ("localhost:11810",)),
        (["[::1]"], ("[::1]:11810",)),
        (["10.0.0.1,10.0.0.2:1234"], ("10.0.0.1:11810", "10.0.0.2:1234")),
        # The same balancer written two ways is heartbeated once.
        (["lb", "lb:11810"], ("lb:11810",)),
    ],
)
def test_register_balancer_without_port_means_11810(
    given: list[str], meant: tuple[str, ...]
) -> None:
    assert build_registrar(register_args(*given)).balancers == meant


@pytest.mark.parametrize("given", ["::1", "fd00::3", "[::1]x", "[oap]", "h:x", "h:", ":80", "h:0"])
def test_bad_balancer_still_exits_2(given: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["status", "--balancer", given],
        ["register", "--service", "oap", "--backend", "10.0.0.7:1", "--balancer", given],
    ):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 2
        assert "--balancer" in capsys.readouterr().err


def test_parse_host_port_default_port_is_opt_in() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_host_port("localhost")
    assert parse_host_port("localhost", default_port=7) == ("localhost", 7)
    assert parse_host_port("[::1]", default_port=7) == ("::1", 7)
    assert parse_host_port("[::1]:8", default_port=7) == ("::1", 8)


@pytest.mark.parametrize(
    "argv",
    [["--json", "--watch"], ["--watch", "1", "--json"], ["--json", "--watch", "5"]],
)
def test_status_json_and_watch_exclude_each_other(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["status", "--balancer", "127.0.0.1:1", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_register_help_says_a_headless_service_name_is_enough(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_text("register", capsys)
    assert "Every replica must be listed" not in text
    assert "headless Service resolves to every replica" in text
    assert "list addresses only when there is no such name" in text.lower()
    assert "11810" in text


def test_status_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("status", capsys)
    assert (
        "Exit codes: 0 ok, 1 balancer unreachable or call failed, 2 bad options, 3 no such service"
        in text
    )
    assert "[--json | --watch [S]]" in text
