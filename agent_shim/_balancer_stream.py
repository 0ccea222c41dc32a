"""The Selector's BalanceLoad stream: one open stream at a time, to one
balancer after the other with backoff, turning what the balancer sends into
calls on a `ListSink` and reporting client stats at the interval it asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from agent_shim._balancer_call import (
    BalancerCall,
    BalancerCallError,
    BalancerConnector,
    GrpcBalancerConnector,
)
from agent_shim._picker import ServerEntry, StatsDelta
from lbserver.backoff import Backoff
from lbserver.logs import Logger
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb_pb2

if TYPE_CHECKING:
    import grpc.aio

# gRPC C-core's reconnect backoff for the balancer call.
BALANCER_BACKOFF = Backoff(initial=1.0, multiplier=1.6, maximum=120.0, jitter=0.2)
MIN_RECONNECT_INTERVAL = 1.0
# C-core raises shorter report intervals to 1 s.
MIN_STATS_INTERVAL = 1.0


def server_address(server: lb_pb2.Server) -> str | None:
    """`ip:port` / `[v6]:port` of a list entry, None when it is malformed."""
    if not 0 < server.port < 65536:
        return None
    try:
        ip = ipaddress.ip_address(server.ip_address)
    except ValueError:
        return None
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{host}:{server.port}"


def client_stats_message(delta: StatsDelta, now: float) -> lb_pb2.LoadBalanceRequest:
    stats = lb_pb2.ClientStats(
        num_calls_started=delta.calls_started,
        num_calls_finished=delta.calls_finished,
        num_calls_finished_with_client_failed_to_send=(
            delta.calls_finished_with_client_failed_to_send
        ),
        num_calls_finished_known_received=delta.calls_finished_known_received,
        calls_finished_with_drop=[
            lb_pb2.ClientStatsPerToken(load_balance_token=token, num_calls=n)
            for token, n in sorted(delta.calls_dropped_by_token.items())
        ],
    )
    stats.timestamp.FromNanoseconds(int(now * 1e9))
    return lb_pb2.LoadBalanceRequest(client_stats=stats)


class ListSink(Protocol):
    """What the stream tells (the Selector); called on the stream's loop."""

    def on_server_list(self, entries: tuple[ServerEntry, ...]) -> None: ...

    def on_fallback_response(self) -> None: ...

    def take_stats(self) -> StatsDelta: ...

    def reset_stats(self) -> None: ...


class BalancerStream:
    """See the module docstring. `connector` opens the BalanceLoad calls (by
    default over grpc.aio channels made by `channel_factory`)."""

    def __init__(
        self,
        addresses: Sequence[str],
        service: str,
        sink: ListSink,
        log: Logger,
        *,
        rng: random.Random,
        connector: BalancerConnector | None = None,
        channel_factory: Callable[[str], grpc.aio.Channel] | None = None,
    ) -> None:
        self._addresses = tuple(addresses)
        self._service = service
        self._sink = sink
        self._log = log
        self._rng = rng
        self._connector_arg = connector
        self._channel_factory = channel_factory
        self._connector: BalancerConnector | None = None
        self._balancer_down_logged = False

    async def close(self) -> None:
        """Closes the connector's channels; after run() was cancelled."""
        if self._connector is not None:
            await self._connector.close()

    def _entries(self, message: lb_pb2.ServerList) -> tuple[ServerEntry, ...]:
        entries: list[ServerEntry] = []
        invalid = 0
        for server in message.servers:
            if server.drop:
                entries.append(ServerEntry("", server.load_balance_token, drop=True))
                continue
            address = server_address(server)
            if address is None:
                invalid += 1
                continue
            entries.append(ServerEntry(address, server.load_balance_token))
        if invalid:
            self._log.warning("ignoring malformed server list entries", count=invalid)
        return tuple(entries)

    async def run(self) -> None:
        """Keeps a stream open, to one balancer after the other, until cancelled."""
        attempt = 0  # failed rounds through all balancers since the last good stream
        failures_in_round = 0
        index = 0
        last_reconnect = -MIN_RECONNECT_INTERVAL
        while True:
            address = self._addresses[index]
            try:
                started = await self._stream(address)
            except Exception:
                # A bug or an unexpected grpc error must not end balancing for
                # good: log it and carry on as if the balancer had failed.
                self._log.exception("the balancer stream failed unexpectedly", balancer=address)
                started = False
            if started:
                # The stream had started: reconnect at once, to the same
                # balancer; but not in a tight loop to one that keeps
                # hanging up right after answering.
                attempt = failures_in_round = 0
                since = time.monotonic() - last_reconnect
                if since < MIN_RECONNECT_INTERVAL:
                    await asyncio.sleep(MIN_RECONNECT_INTERVAL - since)
                last_reconnect = time.monotonic()
                continue
            index = (index + 1) % len(self._addresses)
            failures_in_round += 1
            if failures_in_round >= len(self._addresses):
                failures_in_round = 0
                attempt += 1
                delay = BALANCER_BACKOFF.delay(attempt, self._rng)
                self._log.debug("retrying the balancers later", delay=round(delay, 2))
                await asyncio.sleep(delay)

    def _balancer_call(self, address: str) -> BalancerCall:
        if self._connector is None:
            self._connector = self._connector_arg or GrpcBalancerConnector(self._channel_factory)
        return self._connector.call(address)

    async def _stream(self, address: str) -> bool:
        """One BalanceLoad stream; True if it had started (got initial_response)."""
        call = self._balancer_call(address)
        started = False
        reporter: asyncio.Task[None] | None = None
        logger = self._log.bind(balancer=address)
        try:
            await call.write(
                lb_pb2.LoadBalanceRequest(
                    initial_request=lb_pb2.InitialLoadBalanceRequest(name=self._service)
                )
            )
            first = await call.read()
            if first is None:
                self._balancer_failed(logger, "the balancer closed the stream before answering")
                return False
            if first.WhichOneof("load_balance_response_type") != "initial_response":
                # grpc-go drops such a stream too.
                self._balancer_failed(logger, "the first response was not initial_response")
                return False
            started = True
            interval = first.initial_response.client_stats_report_interval.ToTimedelta()
            seconds = interval.total_seconds()
            self._sink.reset_stats()
            if seconds > 0:
                reporter = asyncio.create_task(
                    self._report_stats(call, max(MIN_STATS_INTERVAL, seconds), logger)
                )
            if self._balancer_down_logged:
                logger.info("balancer reachable again", stats_interval=seconds)
            else:
                logger.debug("balancer stream started", stats_interval=seconds)
            self._balancer_down_logged = False
            while True:
                message = await call.read()
                if message is None:
                    logger.info("the balancer ended the stream")
                    return True
                kind = message.WhichOneof("load_balance_response_type")
                if kind == "server_list":
                    self._sink.on_server_list(self._entries(message.server_list))
                elif kind == "fallback_response":
                    self._sink.on_fallback_response()
                else:
                    logger.debug("ignoring an unexpected response", kind=kind)
        except BalancerCallError as exc:
            if started:
                logger.warning("the balancer stream broke", code=exc.code, details=exc.details)
            else:
                self._balancer_failed(logger, str(exc))
            return started
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
            call.cancel()

    def _balancer_failed(self, logger: Logger, reason: str) -> None:
        # One warning per outage; the retries in between are debug noise.
        if self._balancer_down_logged:
            logger.debug("balancer unreachable", reason=reason)
        else:
            self._balancer_down_logged = True
            logger.warning("balancer unreachable; retrying with backoff", reason=reason)

    async def _report_stats(self, call: BalancerCall, interval: float, logger: Logger) -> None:
        last_empty = False
        while True:
            await asyncio.sleep(interval)
            delta = self._sink.take_stats()
            empty = delta.is_empty()
            # C-core skips a report when this one and the last were both empty.
            if empty and last_empty:
                continue
            last_empty = empty
            try:
                await call.write(client_stats_message(delta, time.time()))
            except BalancerCallError as exc:
                logger.debug("could not send client stats", error=str(exc))
                return
