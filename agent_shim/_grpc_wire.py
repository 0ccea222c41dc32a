"""gRPC over HTTP/2 as the relay reads and writes it: which headers pass,
`grpc-timeout` values, statuses the relay makes, and the trailers-only form."""

from __future__ import annotations

from typing import Final

from agent_shim._hpack import Header
from agent_shim._selector import LB_TOKEN_METADATA_KEY

# HTTP/1.1 hop-by-hop headers (RFC 9110 7.6.1) and HTTP/2's connection-specific
# ones (RFC 9113 8.2.2); `te` passes only as "trailers" (gRPC requires it).
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        LB_TOKEN_METADATA_KEY.encode(),
    }
)
_LB_TOKEN: Final = LB_TOKEN_METADATA_KEY.encode()
_TE: Final = b"te"
_TIMEOUT: Final = b"grpc-timeout"
_STATUS: Final = b"grpc-status"
_PATH: Final = b":path"
_TIMEOUT_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
# gRPC status codes the proxy sends or reads.
CANCELLED: Final = 1
UNAVAILABLE: Final = 14
RESOURCE_EXHAUSTED: Final = 8
# Trailers-only answers meaning the backend did not take the stream.
_NOT_TAKEN: Final = frozenset({UNAVAILABLE, CANCELLED})


def forwardable(headers: list[Header]) -> list[Header]:
    """`headers` without hop-by-hop headers and `lb-token`."""
    return [h for h in headers if h[0] not in _HOP_BY_HOP and (h[0] != _TE or h[1] == b"trailers")]


def parse_timeout(value: bytes) -> float | None:
    """Seconds of a `grpc-timeout` value ("100m", "5S"), None if malformed."""
    if len(value) < 2 or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


def format_timeout(seconds: float) -> bytes:
    """A `grpc-timeout` value (at most 8 digits) for `seconds`."""
    millis = max(0, int(seconds * 1000))
    if millis < 10**8:
        return b"%dm" % millis
    return b"%dS" % min(int(seconds), 10**8 - 1)


def _percent_encode(text: str) -> bytes:
    out = bytearray()
    for byte in text.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers_only(code: int, message: str) -> list[Header]:
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (_STATUS, b"%d" % code),
        (b"grpc-message", _percent_encode(message)),
    ]


def _status_of(headers: list[Header]) -> int | None:
    for name, value in headers:
        if name == _STATUS:
            return int(value) if value.isdigit() else None
    return None
