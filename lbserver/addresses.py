"""HOST:PORT parsing and formatting, shared by lbserver and agent-shim.

Standard library only: agent-shim's proxy imports it without loading the
balancer, the registrar or grpcio.
"""

from __future__ import annotations

import ipaddress
import re

from lbserver.errors import InvalidValueError

__all__ = [
    "DEFAULT_BALANCER_PORT",
    "join_host_port",
    "parse_host_port",
    "parse_listen_address",
]

# The balancer's gRPC port (BalanceLoad, Registry, Admin).
DEFAULT_BALANCER_PORT = 11810


def parse_host_port(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Splits ``HOST:PORT`` or ``[IPV6]:PORT``; with `default_port` also takes
    ``HOST`` or ``[IPV6]`` alone, meaning that port. Raises ValueError on bad input."""
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end >= 0 else ""
        if end < 0 or not (rest.startswith(":") or (rest == "" and default_port is not None)):
            form = "[IPV6] or [IPV6]:PORT" if default_port is not None else "[IPV6]:PORT"
            raise InvalidValueError(f"{value!r} is not {form}")
        host, port_text = text[1:end], rest[1:] if rest else str(default_port)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidValueError(f"{host!r} in {value!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            if default_port is None:
                raise InvalidValueError(f"{value!r} is not HOST:PORT")
            host, port_text = text, str(default_port)
        elif ":" in host:
            raise InvalidValueError(f"{value!r}: write IPv6 addresses in brackets, as [::1]:PORT")
    if not host:
        raise InvalidValueError(f"{value!r} has no host")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidValueError(f"{value!r}: port must be a number in 1-65535")
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_LISTEN = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(\d+)")


def parse_listen_address(value: str) -> tuple[str, int]:
    """Splits an address to listen on, ``HOST:PORT`` or ``[IPV6]:PORT``: the
    host as written (brackets kept, for the bind string; empty: every
    interface) and the port (0: any free port). InvalidValueError otherwise."""
    match = _LISTEN.fullmatch(value)
    if not match:
        raise InvalidValueError(f"expected HOST:PORT, got {value!r}")
    port = int(match.group(2))
    if not 0 <= port <= 65535:
        raise InvalidValueError(f"port {port} is outside 0-65535")
    return match.group(1), port
