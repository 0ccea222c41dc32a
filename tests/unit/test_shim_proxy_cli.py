"""The `agent-shim proxy` option parsers and the proxy's metadata filter."""

from __future__ import annotations

import argparse

import pytest

from agent_shim.cli import address_list, build_parser, byte_count, listen_address
from agent_shim.proxy import DEFAULT_MAX_BUFFER_BYTES, forwardable
from lbserver.cli.options import non_negative_seconds as seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("1000", 1000), ("4Mi", 4 * 1024**2), ("64KiB", 64 * 1024), ("2k", 2000)],
)
def test_byte_count(text: str, expected: int) -> None:
    assert byte_count(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.5Mi", "Mi"])
def test_byte_count_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        byte_count(text)


def test_addresses() -> None:
    assert address_list("10.0.0.1:11810, lb:11810") == ["10.0.0.1:11810", "lb:11810"]
    assert address_list("[::1]:11810") == ["[::1]:11810"]
    assert listen_address("127.0.0.1:0") == "127.0.0.1:0"
    assert listen_address("[::]:11800") == "[::]:11800"
    for bad in ("nope", "host:", ":80", "h:70000", "::1:80"):
        with pytest.raises(argparse.ArgumentTypeError):
            address_list(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        listen_address("0.0.0.0")


def test_seconds() -> None:
    assert seconds("0") == 0.0
    assert seconds("2.5") == 2.5
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            seconds(bad)


def test_defaults_and_repeated_options() -> None:
    args = build_parser().parse_args(
        [
            *("proxy", "--listen", "127.0.0.1:11800", "--service", "oap"),
            *("--balancer", "a:1,b:2", "--balancer", "c:3"),
            *("--fallback", "oap:11800", "--fallback", "oap2:11800"),
        ]
    )
    assert args.balancer == [["a:1", "b:2"], ["c:3"]]
    assert args.fallback == [["oap:11800"], ["oap2:11800"]]
    assert args.max_buffer_bytes == DEFAULT_MAX_BUFFER_BYTES
    assert args.fallback_timeout == 10.0


def test_forwardable_keeps_order_and_duplicates() -> None:
    headers = [
        (b"x-a", b"1"),
        (b"lb-token", b"t"),
        (b"x-a", b"2"),
        (b"grpc-accept-encoding", b"gzip"),
    ]
    assert forwardable(headers) == [
        (b"x-a", b"1"),
        (b"x-a", b"2"),
        (b"grpc-accept-encoding", b"gzip"),
    ]
