"""What the registrar's channels (to the balancers, and the backend probe's
to the backend) share: they must reach a restarted peer again quickly."""

from __future__ import annotations

from typing import Any, Final

# How soon a failed heartbeat is tried again, and gRPC first reconnects.
INITIAL_RETRY: Final = 0.2


def reconnect_options(maximum: float) -> list[tuple[str, Any]]:
    """Channel options for a peer that must be reached again within
    `maximum` seconds (gRPC's own reconnect backoff grows to 120 s)."""
    initial_ms = int(INITIAL_RETRY * 1000)
    return [
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", max(int(maximum * 1000), initial_ms)),
    ]
