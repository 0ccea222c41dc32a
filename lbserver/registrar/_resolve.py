"""Balancer targets to addresses: a headless Service name resolves to every
replica, and each must get its own heartbeats (replicas share no store)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

from lbserver.addresses import join_host_port, parse_host_port
from lbserver.logs import Logger

Resolver = Callable[[str], Awaitable[list[str]]]


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


async def resolve_balancer(host: str) -> list[str]:
    """All IP addresses of `host` (one for an IP literal), sorted."""
    literal = _ip_literal(host)
    if literal is not None:
        return [literal]
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({str(info[4][0]) for info in infos})


class BalancerAddresses:
    """The addresses of the balancer targets, resolved again on every call;
    a target that fails to resolve keeps the addresses it had."""

    def __init__(self, targets: Sequence[str], resolve: Resolver, log: Logger) -> None:
        self._targets = tuple(targets)
        self._resolve = resolve
        self._log = log
        self._failing = False
        self._resolved: dict[str, list[str]] = {}
        # The DNS name each resolved address came from: with TLS, the name the
        # balancer's certificate carries (a headless Service's pod IPs are in
        # no certificate).
        self._names: dict[str, str] = {}

    def name_of(self, address: str) -> str | None:
        """The DNS name `address` was resolved from; None for an IP target."""
        return self._names.get(address)

    async def resolve(self) -> list[str]:
        """Every address of every target, in the targets' order."""
        addresses: list[str] = []
        failed: list[str] = []
        for target in self._targets:
            host, port = parse_host_port(target)
            try:
                resolved = [join_host_port(ip, port) for ip in await self._resolve(host)]
            except OSError as err:
                failed.append(f"{target}: {err}")
                resolved = self._resolved.get(target, [])
            else:
                self._resolved[target] = resolved
            if _ip_literal(host) is None:
                for address in resolved:
                    self._names.setdefault(address, host)
            addresses.extend(address for address in resolved if address not in addresses)
        if failed and not self._failing:
            self._log.warning("cannot resolve balancers; keeping known addresses", errors=failed)
        elif not failed and self._failing:
            self._log.info("balancers resolve again")
        self._failing = bool(failed)
        return addresses
