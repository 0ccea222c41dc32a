"""An in-process, loopback-only DNS server for grpclb discovery tests.

gRPC C-core's grpclb discovery (channel option `grpc.dns_enable_srv_queries=1`)
resolves a target `dns://127.0.0.1:PORT/<name>:<port>` like this:

- A/AAAA of `<name>`: the *fallback* addresses (used with the target's port when
  the balancer sends `fallback_response`, or when no list arrives in time);
- SRV `_grpclb._tcp.<name>`: the balancers, as target host names and ports;
- A/AAAA of every SRV target host.

`DnsServer` answers exactly these from a record table a test may change at any
time (thread-safe): `set_balancers(name, [(ip, port), ...])` publishes the SRV
record with one target host per balancer (`lb<i>.<name>.`, each with its own A or
AAAA record), `set_addresses(name, [ip, ...])` publishes the fallback records.
Unknown names get NXDOMAIN; known names get NOERROR with no answers for types
they have no records of (e.g. AAAA when only IPv4 addresses are set).

    with DnsServer() as dns:
        dns.set_balancers("svc.test", [("127.0.0.1", balancer_port)])
        dns.set_addresses("svc.test", ["127.0.0.1"])
        channel = grpc.insecure_channel(dns.target("svc.test", 1234), options=...)
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord
from dnslib.server import DNSLogger, DNSServer

from tests.support.started import Started

GRPCLB_SRV_PREFIX = "_grpclb._tcp."


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def _is_ipv6(ip: str) -> bool:
    return ipaddress.ip_address(ip).version == 6


@dataclass(frozen=True)
class SrvTarget:
    """One SRV answer: a target host name (with a trailing dot) and a port."""

    host: str
    port: int
    priority: int = 0
    weight: int = 0


@dataclass
class _Records:
    addresses: dict[str, list[str]] = field(default_factory=dict)  # name -> A/AAAA
    srv: dict[str, list[SrvTarget]] = field(default_factory=dict)  # SRV name -> targets


@dataclass(frozen=True)
class Query:
    """A question the server received (name normalized, without trailing dot)."""

    name: str
    qtype: str


class _Resolver:
    """dnslib resolver over a `_Records` table (duck-typed, dnslib wants `resolve`)."""

    def __init__(self, owner: DnsServer) -> None:
        self._owner = owner

    def resolve(self, request: Any, handler: Any) -> Any:
        return self._owner._answer(request)


class DnsServer(Started):
    """A dnslib UDP server on 127.0.0.1 (or ::1) with run-time editable records."""

    def __init__(self, host: str = "127.0.0.1", ttl: int = 0) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"DnsServer listens on loopback only, not {host!r}")
        self.host = host
        self.ttl = ttl
        self._lock = threading.Lock()
        self._records = _Records()
        self._queries: list[Query] = []
        self._server: Any = None

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            return self
        logger = DNSLogger(log="-request,-reply,-truncated,-error", prefix=False, logf=_drop)
        server = DNSServer(_Resolver(self), port=0, address=self.host, tcp=False, logger=logger)
        server.start_thread()
        self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.server.shutdown()
        server.server.server_close()
        server.thread.join(timeout=5)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("DnsServer is not running")
        port: int = self._server.server.server_address[1]
        return port

    @property
    def authority(self) -> str:
        """`host:port` of this server, as used in `dns://AUTHORITY/name`."""
        host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
        return f"{host}:{self.port}"

    def target(self, name: str, port: int) -> str:
        """A gRPC channel target resolving `name:port` through this server."""
        return f"dns://{self.authority}/{_norm(name)}:{port}"

    # ---- records -----------------------------------------------------------------

    def set_balancers(self, name: str, balancers: Iterable[tuple[str, int]]) -> None:
        """Publish SRV `_grpclb._tcp.<name>` with one target host per (ip, port).

        Target `i` is named `lb<i>.<name>.` and gets an A (or AAAA) record for
        its ip. An empty iterable removes the SRV record (and its target hosts).
        """
        name = _norm(name)
        srv_name = GRPCLB_SRV_PREFIX + name
        with self._lock:
            for old in self._records.srv.pop(srv_name, []):
                self._records.addresses.pop(_norm(old.host), None)
            targets: list[SrvTarget] = []
            for i, (ip, port) in enumerate(balancers):
                ipaddress.ip_address(ip)  # validate
                host = f"lb{i}.{name}"
                self._records.addresses[host] = [ip]
                targets.append(SrvTarget(host=host + ".", port=port))
            if targets:
                self._records.srv[srv_name] = targets

    def set_srv(self, name: str, targets: Sequence[SrvTarget]) -> None:
        """Publish SRV `_grpclb._tcp.<name>` verbatim (the targets' A records are
        up to the caller, through `set_addresses`)."""
        srv_name = GRPCLB_SRV_PREFIX + _norm(name)
        with self._lock:
            if targets:
                self._records.srv[srv_name] = list(targets)
            else:
                self._records.srv.pop(srv_name, None)

    def set_addresses(self, name: str, ips: Iterable[str]) -> None:
        """Publish A/AAAA records of `name` (grpclb fallback addresses); empty removes."""
        name = _norm(name)
        ips = list(ips)
        for ip in ips:
            ipaddress.ip_address(ip)  # validate
        with self._lock:
            if ips:
                self._records.addresses[name] = ips
            else:
                self._records.addresses.pop(name, None)

    def remove(self, name: str) -> None:
        """Forget every record of `name` (addresses, SRV and the SRV's target hosts)."""
        self.set_balancers(name, [])
        self.set_addresses(name, [])

    def clear(self) -> None:
        with self._lock:
            self._records = _Records()

    # ---- observation ---------------------------------------------------------------

    def queries(self) -> list[Query]:
        with self._lock:
            return list(self._queries)

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    # ---- answering -------------------------------------------------------------------

    def _answer(self, request: Any) -> Any:
        reply = request.reply()
        qname = str(request.q.qname)
        name = _norm(qname)
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self._queries.append(Query(name=name, qtype=str(qtype)))
            addresses = list(self._records.addresses.get(name, []))
            srv = list(self._records.srv.get(name, []))
        if not addresses and not srv:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if qtype == "A":
            for ip in addresses:
                if not _is_ipv6(ip):
                    reply.add_answer(RR(qname, QTYPE.A, rdata=A(ip), ttl=self.ttl))
        elif qtype == "AAAA":
            for ip in addresses:
                if _is_ipv6(ip):
                    reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(ip), ttl=self.ttl))
        elif qtype == "SRV":
            for t in srv:
                rdata = SRV(priority=t.priority, weight=t.weight, port=t.port, target=t.host)
                reply.add_answer(RR(qname, QTYPE.SRV, rdata=rdata, ttl=self.ttl))
        return reply


def _drop(_: str) -> None:
    """dnslib log sink: tests do not want one line per query on stdout."""


def query(server: DnsServer, name: str, qtype: str = "A", timeout: float = 2.0) -> Any:
    """Ask `server` one question over UDP; returns the parsed dnslib `DNSRecord`."""
    packet = DNSRecord.question(name, qtype).send(server.host, server.port, timeout=timeout)
    return DNSRecord.parse(packet)
