"""What the sync and asyncio balanced channels share: argument handling,
metadata, deadlines and the rule for retrying a call on another backend."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from agent_shim._selector import LB_TOKEN_METADATA_KEY, Choice

# Requests of a client-streaming call kept to replay it on another backend
# when its first backend could not be reached; beyond this it is not retried.
DEFAULT_RETRY_BUFFER_MESSAGES = 1000

MetadataPairs = tuple[tuple[str, str | bytes], ...]
ChannelOptions = Sequence[tuple[str, Any]]


def balancer_addresses(balancer: str | Sequence[str]) -> tuple[str, ...]:
    """`"a:1,b:2"`, `"a:1"` or `["a:1", "b:2"]` as a tuple of addresses."""
    parts = [balancer] if isinstance(balancer, str) else list(balancer)
    addresses = tuple(a.strip() for part in parts for a in part.split(",") if a.strip())
    if not addresses:
        raise ValueError("at least one balancer address is needed")
    return addresses


def with_token(
    metadata: Iterable[tuple[str, str | bytes]] | None, choice: Choice[Any]
) -> MetadataPairs:
    """The caller's metadata plus the chosen entry's lb-token (which replaces
    any the caller set: the token belongs to the backend actually called)."""
    kept = tuple(
        (key, value) for key, value in (metadata or ()) if key.lower() != LB_TOKEN_METADATA_KEY
    )
    return kept + choice.metadata


def failed_before_backend(code: grpc.StatusCode | None, initial_metadata: object) -> bool:
    """UNAVAILABLE before any response (no initial metadata): the call did
    not reach a backend (connection refused, reset, no connection), so it is
    safe to send it to another one."""
    return code is grpc.StatusCode.UNAVAILABLE and not initial_metadata


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
