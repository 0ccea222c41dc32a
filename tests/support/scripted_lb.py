"""A scripted grpclb balancer for the tests of grpclb clients.

It serves exactly the server list the test sets (an order with repeats, drop
entries with tokens of the test's choosing, an unreachable backend first),
lists lbserver would never build; pushes a new one to every open stream when
the test changes it; and sums the ClientStats the clients report. gRPC's own
grpclb tests drive their clients against such a fake remote balancer. Tests
of lbserver's lists use the real balancer instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, Self

import grpc
from google.protobuf.duration_pb2 import Duration

from lbserver.addresses import parse_host_port
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb_pb2
from lbserver.proto.grpclb.v1 import load_balancer_pb2_grpc as lb_grpc
from lbserver.proto.v1 import lbserver_pb2 as pb

# In an order: a drop entry (its token is the next of the test's drop tokens).
DROP = "drop"


class Named(Protocol):
    """A test backend: CountingBackend, EchoBackend, or just a name and an address."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...


def token_of(name: str) -> str:
    return f"token-{name}"


class ScriptedBalancer(lb_grpc.LoadBalancerServicer):
    """Serves the list set by `serve` to every client, whatever name it asks
    for; `service_state` reads back what lbserver's Admin.GetState would show
    of it (backends and tokens, list length, client stats)."""

    def __init__(self, service: str = "svc", *, client_stats_interval: float = 0.0) -> None:
        self.service = service
        self.client_stats_interval = client_stats_interval
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._servers: lb_pb2.ServerList | None = None
        self._backends: dict[str, tuple[str, int]] = {}
        # One queue per open stream: the lists to send it, None when it ends.
        self._streams: set[asyncio.Queue[lb_pb2.ServerList | None]] = set()
        self._stats = pb.ClientCallStats()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Self:
        self._server = grpc.aio.server()
        lb_grpc.add_LoadBalancerServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(grace=0)

    def serve(
        self, order: Sequence[str], backends: Sequence[Named], drops: Sequence[str] = ()
    ) -> Self:
        """Lists `backends` by name in exactly `order` (a name may repeat;
        DROP places a drop entry with the next token of `drops`) and pushes
        the list to every open stream (set before the start, it is the
        first list every client gets)."""
        by_name = {b.name: parse_host_port(b.address) for b in backends}
        self._backends = by_name
        drop_tokens = iter(drops)
        servers = []
        for name in order:
            if name == DROP:
                servers.append(lb_pb2.Server(load_balance_token=next(drop_tokens), drop=True))
            else:
                host, port = by_name[name]
                servers.append(
                    lb_pb2.Server(
                        ip_address=ipaddress.ip_address(host).packed,
                        port=port,
                        load_balance_token=token_of(name),
                    )
                )
        self._servers = lb_pb2.ServerList(servers=servers)
        for stream in self._streams:
            stream.put_nowait(self._servers)
        return self

    def tokens(self) -> dict[str, str]:
        """The token of each backend, by name."""
        return {name: token_of(name) for name in self._backends}

    def service_state(self) -> pb.ServiceStatus:
        servers = self._servers.servers if self._servers is not None else []
        entries = Counter(s.load_balance_token for s in servers if not s.drop)
        return pb.ServiceStatus(
            name=self.service,
            backends=[
                pb.BackendStatus(
                    instance_id=name,
                    ip=host,
                    port=port,
                    load_balance_token=token_of(name),
                    list_entries=entries[token_of(name)],
                )
                for name, (host, port) in self._backends.items()
            ],
            clients=len(self._streams),
            client_stats=self._stats,
            list_length=len(servers),
            drop_entries=sum(1 for s in servers if s.drop),
        )

    async def BalanceLoad(
        self,
        request_iterator: AsyncIterator[lb_pb2.LoadBalanceRequest],
        context: grpc.aio.ServicerContext[lb_pb2.LoadBalanceRequest, lb_pb2.LoadBalanceResponse],
    ) -> AsyncIterator[lb_pb2.LoadBalanceResponse]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("initial_request"):
            return
        updates: asyncio.Queue[lb_pb2.ServerList | None] = asyncio.Queue()
        if self._servers is not None:
            updates.put_nowait(self._servers)
        self._streams.add(updates)
        reader = asyncio.ensure_future(self._record_stats(request_iterator, updates))
        try:
            initial = lb_pb2.InitialLoadBalanceResponse()
            if self.client_stats_interval > 0:
                initial.client_stats_report_interval.CopyFrom(_duration(self.client_stats_interval))
            yield lb_pb2.LoadBalanceResponse(initial_response=initial)
            while (servers := await updates.get()) is not None:
                yield lb_pb2.LoadBalanceResponse(server_list=servers)
        finally:
            self._streams.discard(updates)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _record_stats(
        self,
        requests: AsyncIterator[lb_pb2.LoadBalanceRequest],
        updates: asyncio.Queue[lb_pb2.ServerList | None],
    ) -> None:
        """Sums the reports (deltas) until the client ends its side, then
        ends the stream."""
        try:
            async for request in requests:
                if request.HasField("client_stats"):
                    self._add(request.client_stats)
        finally:
            updates.put_nowait(None)

    def _add(self, report: lb_pb2.ClientStats) -> None:
        stats = self._stats
        stats.reports += 1
        stats.calls_started += report.num_calls_started
        stats.calls_finished += report.num_calls_finished
        stats.calls_finished_with_client_failed_to_send += (
            report.num_calls_finished_with_client_failed_to_send
        )
        stats.calls_finished_known_received += report.num_calls_finished_known_received
        for drop in report.calls_finished_with_drop:
            stats.calls_dropped_by_token[drop.load_balance_token] += drop.num_calls


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration
