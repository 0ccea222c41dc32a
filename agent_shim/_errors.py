"""The errors agent_shim raises (argument errors are lbserver.errors'
InvalidArgumentError, a ValueError):

    ShimError
    ├── NoBackendError       no backend can take a call (UNAVAILABLE)
    ├── DroppedCallError     the balancer's list dropped the call (UNAVAILABLE)
    └── AlreadyStartedError  Selector.start() called twice (also a RuntimeError)
"""

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


class AlreadyStartedError(ShimError, RuntimeError):
    """Selector.start() was called on a started selector."""
