"""The exceptions lbserver raises. Everything derives from LbserverError so a
caller can catch the whole family:

    LbserverError
    ├── ConfigError            bad configuration (file, environment, flags)
    │   ├── KubernetesConfigError    no usable Kubernetes API configuration or
    │   │                            no `kubernetes` package (lbserver[kubernetes])
    │   └── KubernetesSettingsError  a bad KubernetesEndpointSource argument
    ├── InvalidArgumentError   bad input from a client; names the field
    │                          (also a ValueError: the registrar raises it for a
    │                          registration the balancer would refuse)
    ├── InvalidValueError      a bad value given to a library function or
    │                          constructor (an address, a setting); a ValueError
    ├── UsageError             a call the object's state does not allow (run()
    │                          twice); a RuntimeError
    ├── LimitExceededError     a configured limit would be exceeded
    └── RegistrationRefusedError  a heartbeat the discovery mode does not allow

The Kubernetes errors live in lbserver.discovery.kubernetes (importing this
module must not need the `kubernetes` package).
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


class InvalidValueError(LbserverError, ValueError):
    """A value given to a library function or constructor is invalid (an
    address that is not HOST:PORT, a setting out of range); the message says
    which and why. Also a ValueError, which callers have always caught."""


class UsageError(LbserverError, RuntimeError):
    """A call the object's state does not allow (run() called twice, a
    selector started twice). Also a RuntimeError."""


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
