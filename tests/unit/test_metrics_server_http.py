"""The metrics server's HTTP/1.1 parsing, without sockets: request heads,
and reading them however the bytes arrive."""

from __future__ import annotations

import asyncio
import contextlib
from http import HTTPStatus

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from lbserver.metrics_server import HttpError, parse_head, read_head, start_metrics_server

GET = b"GET /metrics HTTP/1.1\r\nHost: lb:11811\r\nAccept-Encoding: gzip"


def test_request_fields() -> None:
    request = parse_head(GET + b"\r\nX-A: 1\r\nx-a:  2 \r\nConnection: close")
    assert request.method == "GET"
    assert request.path == "/metrics"
    assert request.version == (1, 1)
    assert request.headers["host"] == "lb:11811"
    assert request.headers["x-a"] == "1, 2"
    assert not request.keep_alive


def test_query_and_absolute_form() -> None:
    request = parse_head(b"GET /metrics?name[]=a HTTP/1.1\r\nHost: h")
    assert (request.path, request.query) == ("/metrics", "name[]=a")
    request = parse_head(b"GET http://h:1/metrics?x=1 HTTP/1.1\r\nHost: h")
    assert (request.path, request.query) == ("/metrics", "x=1")


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.1\nHost: h", True),  # bare LF line ends are accepted
        (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive, Close", False),
        (b"GET / HTTP/1.0", False),  # HTTP/1.0 needs no Host
        (b"GET / HTTP/1.0\r\nConnection: keep-alive", True),
    ],
)
def test_keep_alive(head: bytes, keep_alive: bool) -> None:
    assert parse_head(head).keep_alive is keep_alive


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GARBAGE", HTTPStatus.BAD_REQUEST),
        (b"GET /metrics", HTTPStatus.BAD_REQUEST),
        (b"GET  /metrics HTTP/1.1\r\nHost: h", HTTPStatus.BAD_REQUEST),
        (b"GET /metrics HTTP/1.1 extra\r\nHost: h", HTTPStatus.BAD_REQUEST),
        (b"G(T /metrics HTTP/1.1\r\nHost: h", HTTPStatus.BAD_REQUEST),
        (b"GET /metrics HTTQ/1.1\r\nHost: h", HTTPStatus.BAD_REQUEST),
        (b"GET /met\x00rics HTTP/1.1\r\nHost: h", HTTPStatus.BAD_REQUEST),
        (b"GET ftp://h/metrics HTTP/1.1\r\nHost: h", HTTPStatus.BAD_REQUEST),
        (b"GET * HTTP/1.1\r\nHost: h", HTTPStatus.BAD_REQUEST),
        (b"GET /metrics HTTP/1.1", HTTPStatus.BAD_REQUEST),  # no Host
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b", HTTPStatus.BAD_REQUEST),
        (b"GET /metrics HTTP/1.1\r\nHost : h", HTTPStatus.BAD_REQUEST),
        (b"GET /metrics HTTP/1.1\r\nHost: h\r\n folded", HTTPStatus.BAD_REQUEST),
        (b"GET /metrics HTTP/1.1\r\nHost: h\r\nX: a\rb", HTTPStatus.BAD_REQUEST),
        (b"GET /metrics HTTP/1.1\r\nHost: h\r\nX: a\x01", HTTPStatus.BAD_REQUEST),
        (b"GET /metrics HTTP/1.1\r\nHost: h\r\nContent-Length: -1", HTTPStatus.BAD_REQUEST),
        (
            b"GET /metrics HTTP/1.1\r\nHost: h\r\nContent-Length: 5",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        ),
        (b"PRI * HTTP/2.0", HTTPStatus.HTTP_VERSION_NOT_SUPPORTED),
    ],
)
def test_malformed_heads(head: bytes, status: HTTPStatus) -> None:
    with pytest.raises(HttpError) as error:
        parse_head(head)
    assert error.value.status == status
    assert error.value.close


@given(st.binary(min_size=1, max_size=200))
def test_any_bytes_give_a_request_or_an_http_error(head: bytes) -> None:
    with contextlib.suppress(HttpError):
        parse_head(head)


def read_all(chunks: list[bytes], buffer: bytearray, max_bytes: int = 8192) -> bytes | None:
    async def run() -> bytes | None:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        return await read_head(reader, buffer, max_bytes)

    return asyncio.run(run())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.lists(st.integers(min_value=0), max_size=30), st.sampled_from([b"\r\n", b"\n", b""]))
def test_head_read_in_any_pieces(cuts: list[int], leading: bytes) -> None:
    """However the bytes arrive (one at a time, a slowloris), the head is the
    same and what follows it (a pipelined request) is kept."""
    wire = leading + GET + b"\r\n\r\nGET /healthz"
    buffer = bytearray()
    assert read_all(split(wire, cuts), buffer) == GET
    assert bytes(buffer).startswith(b"GET /healthz") or b"GET /healthz".startswith(bytes(buffer))


def test_head_over_the_cap_is_431() -> None:
    with pytest.raises(HttpError) as error:
        read_all([GET + b"\r\nX: " + b"a" * 200], bytearray(), max_bytes=128)
    assert error.value.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    with pytest.raises(HttpError):  # whole, but still too long
        read_all([GET + b"\r\nX: " + b"a" * 200 + b"\r\n\r\n"], bytearray(), max_bytes=128)
    with pytest.raises(HttpError):  # blank lines count too
        read_all([b"\r\n" * 200], bytearray(), max_bytes=128)


def test_client_closing_mid_head_is_no_request() -> None:
    assert read_all([b"GET /metr"], bytearray()) is None
    assert read_all([], bytearray()) is None


@pytest.mark.parametrize(
    "settings",
    [
        {"header_timeout": 0.0},
        {"idle_timeout": -1.0},
        {"write_timeout": float("nan")},
        {"max_connections": 0},
        {"max_request_bytes": 10},
    ],
)
def test_settings_are_checked_before_listening(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        asyncio.run(start_metrics_server("127.0.0.1", 0, CollectorRegistry(), **settings))  # type: ignore[arg-type]
