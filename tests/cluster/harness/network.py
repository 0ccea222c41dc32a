"""Cluster DNS and kube-proxy, serving from the node's network namespace.

`ClusterDns` answers like CoreDNS's kubernetes plugin from what `records`
returns for a name (A and SRV; NXDOMAIN for unknown names, so search-path
expansion works as in a pod). `ServiceForwarder` stands for kube-proxy on one
Service IP and port: every new connection goes to one endpoint picked at
random among the ready ones (terminating-but-serving ones only when none is
ready), and lives on even after that endpoint leaves the Service, as
conntrack keeps it."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord

from tests.cluster.harness.netns import socket_in

DNS_TTL = 5


@dataclass(frozen=True)
class SrvRecord:
    target: str
    port: int
    priority: int = 0
    weight: int = 100


@dataclass(frozen=True)
class Records:
    """What DNS knows about one name: None for a name that does not exist."""

    a: tuple[str, ...] = ()
    srv: tuple[SrvRecord, ...] = ()


RecordLookup = Callable[[str], Records | None]


class ClusterDns:
    def __init__(self, netns: str, address: str, records: RecordLookup) -> None:
        self._netns = netns
        self._address = address
        self._records = records
        self._transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self.queries: list[tuple[str, str, str]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        udp = socket_in(self._netns, socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((self._address, 53))
        udp.setblocking(False)
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        tcp = socket_in(self._netns)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((self._address, 53))
        tcp.setblocking(False)
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    def answer(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = request.reply()
        reply.header.aa = 1
        question = request.q
        name = str(question.qname).rstrip(".").lower()
        qtype = QTYPE[question.qtype]
        self.queries.append((time.strftime("%H:%M:%S"), name, qtype))
        records = self._records(name)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return bytes(reply.pack())
        if qtype in ("A", "ANY"):
            for ip in records.a:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(ip), ttl=DNS_TTL))
        if qtype in ("SRV", "ANY"):
            for srv in records.srv:
                reply.add_answer(
                    RR(
                        question.qname,
                        QTYPE.SRV,
                        rdata=SRV(srv.priority, srv.weight, srv.port, srv.target + "."),
                        ttl=DNS_TTL,
                    )
                )
                target = self._records(srv.target)
                for ip in target.a if target else ():
                    reply.add_ar(RR(srv.target + ".", QTYPE.A, rdata=A(ip), ttl=DNS_TTL))
        if qtype == "AAAA":
            _ = AAAA  # no IPv6 in the cluster: NOERROR without answers
        return bytes(reply.pack())

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(2)
                data = await reader.readexactly(struct.unpack("!H", header)[0])
                answer = self.answer(data)
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, dns: ClusterDns) -> None:
        self._dns = dns
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            answer = self._dns.answer(data)
        except Exception:
            return
        if self._transport is not None:
            self._transport.sendto(answer, addr)


# ---------------------------------------------------------------------------
# kube-proxy

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
# Candidates for one new connection: (description, connector), ready ones first.
EndpointPicker = Callable[[], list[tuple[str, Connector]]]


def pod_connector(netns: str, ip: str, port: int) -> Connector:
    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket_in(netns)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (ip, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    return connect


def host_connector(host: str, port: int) -> Connector:
    """To a server in the machine's own namespace (the fake API server)."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port)

    return connect


class ServiceForwarder:
    """kube-proxy for one `ip:port` of a Service."""

    def __init__(self, netns: str, ip: str, port: int, pick: EndpointPicker) -> None:
        self._netns = netns
        self.ip = ip
        self.port = port
        self._pick = pick
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> None:
        sock = socket_in(self._netns)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.ip, self.port))
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._accept, sock=sock, backlog=512)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._relays):
            task.cancel()
        for task in list(self._relays):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._relays.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        candidates = self._pick()
        if not candidates:
            _reset(writer)  # iptables REJECT: no endpoints
            return
        _, connect = random.choice(candidates)
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(connect(), 5)
        except (OSError, TimeoutError):
            _reset(writer)
            return
        self.connections += 1
        try:
            await asyncio.gather(_pump(reader, upstream_writer), _pump(upstream_reader, writer))
        finally:
            for w in (writer, upstream_writer):
                w.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
