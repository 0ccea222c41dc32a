"""HTTP/2 keepalive: the one set of numbers both ends of a BalanceLoad stream
(and agent_shim's backend connections) agree on.

A client pings every KEEPALIVE_TIME s, even with no call active, and gives a
connection up when the answer takes longer than KEEPALIVE_TIMEOUT s: that is
how a balancer or backend that vanished without closing its connections (a
lost node) is noticed. 20 s is what grpc-go uses; the server permits pings
every 10 s (SERVER_KEEPALIVE_OPTIONS), so a client never earns a GOAWAY
too_many_pings.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "CLIENT_CHANNEL_OPTIONS",
    "KEEPALIVE_TIME",
    "KEEPALIVE_TIMEOUT",
    "SERVER_KEEPALIVE_OPTIONS",
]

KEEPALIVE_TIME: Final = 20.0
KEEPALIVE_TIMEOUT: Final = 10.0

# grpcio channel options for a client of the balancer.
CLIENT_CHANNEL_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME * 1000)),
    ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
    ("grpc.keepalive_permit_without_calls", 1),
)

# grpcio server options: accept the clients' pings (grpc-go pings its balancer
# every 20 s even with no call active; without these the server answers with
# GOAWAY too_many_pings), and ping clients every 60 s to find those that
# vanished without closing their stream.
SERVER_KEEPALIVE_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", int(KEEPALIVE_TIME * 1000) // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)
