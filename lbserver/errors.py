"""The exceptions lbserver raises. Everything derives from LbserverError so a
caller can catch the whole family:

    LbserverError
    ├── ConfigError            bad configuration (file, environment, flags)
    ├── InvalidArgumentError   bad input from a client; names the field
    │                          (also a ValueError: the registrar raises it for a
    │                          registration the balancer would refuse)
    ├── LimitExceededError     a configured limit would be exceeded
    └── RegistrationRefusedError  a heartbeat the discovery mode does not allow
"""

from __future__ import annotations


class LbserverError(Exception):
    """Base of every lbserver error."""


class ConfigError(LbserverError):
    """The configuration is invalid; the message says which option and why."""


class InvalidArgumentError(LbserverError, ValueError):
    """A request field is invalid. Mapped to gRPC INVALID_ARGUMENT by the
    balancer; raised by the registrar's constructor for a registration the
    balancer would refuse. Also a ValueError, so `except ValueError` catches it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class LimitExceededError(LbserverError):
    """A configured limit (services, backends, streams) would be exceeded.
    Mapped to gRPC RESOURCE_EXHAUSTED."""

    def __init__(self, limit: str, value: int) -> None:
        super().__init__(f"limit {limit}={value} reached")
        self.limit = limit
        self.value = value


class RegistrationRefusedError(LbserverError):
    """Kubernetes discovery does not allow this heartbeat: its address is not a
    ready endpoint of the service (`permission_denied`), the service takes
    membership from Kubernetes only (`failed_precondition`), or its endpoints
    are not known yet (`unavailable`, retry later)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
