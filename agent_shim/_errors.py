"""The errors agent_shim raises; all of them mean UNAVAILABLE to a caller."""

from __future__ import annotations


class ShimError(Exception):
    """Base of the errors agent_shim raises."""


class NoBackendError(ShimError):
    """No backend can take a call now (empty list, all failing, no fallback).
    Maps to UNAVAILABLE."""


class DroppedCallError(ShimError):
    """The balancer's list said to drop this call (load shedding). Maps to
    UNAVAILABLE; counted per token in client stats."""

    def __init__(self, token: str) -> None:
        super().__init__(f"call dropped by the load balancer (token {token!r})")
        self.token = token
