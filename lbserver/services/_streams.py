"""What a balancer stream may hold, shared by BalanceLoad and xDS (ADS).

One StreamAdmission counts the streams of both protocols: `max_streams`,
`max_streams_per_peer` and `max_pending_streams` bound them together, so a
client cannot double its share by speaking the other protocol.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from lbserver import metrics
from lbserver.logs import LogLimiter, clip
from lbserver.security import RefusedMessage, abort_refused, peer_ip

log = structlog.get_logger("lbserver.streams")

# Status details carrying a client's value are clipped to this many bytes.
DETAILS_BYTES = 512


@dataclass(frozen=True)
class StreamLimits:
    """What one stream (BalanceLoad or xDS), and one peer, may hold (config
    options of the same names)."""

    max_streams: int = 20_000
    max_streams_per_peer: int = 1_000
    max_pending_streams: int = 1_000
    initial_request_timeout: float = 2.0
    # Messages per second after the initial request; 0: no limit.
    client_stats_rate_per_stream: float = 2.0


class RefusedError(Exception):
    """Ends a stream with `code` and `details`; `limit` labels the metric."""

    def __init__(self, code: grpc.StatusCode, details: str, limit: str = "") -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.limit = limit


class Ticket:
    """One stream's hold on the admission counts."""

    __slots__ = ("established", "evicted", "ip", "released")

    def __init__(self, ip: str, evicted: asyncio.Future[RefusedError]) -> None:
        self.ip = ip
        self.evicted = evicted
        self.established = False
        self.released = False


class StreamAdmission:
    """Counts BalanceLoad and xDS streams together: pending ones (no initial
    request yet, in arrival order), established ones, and both per peer IP. Every table is
    bounded by the number of open streams (entries leave with them)."""

    def __init__(self, limits: StreamLimits) -> None:
        self._limits = limits
        self.established = 0
        self._pending: dict[Ticket, None] = {}
        self._pending_by_peer: dict[str, dict[Ticket, None]] = {}
        self._per_peer: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def streams_of(self, ip: str) -> int:
        return self._per_peer.get(ip, 0)

    def admit(self, ip: str) -> Ticket:
        """A pending ticket for a new stream from `ip`, making room by ending
        older pending streams; RefusedError when the peer's cap is taken by
        established streams."""
        limits = self._limits
        if self._per_peer.get(ip, 0) >= limits.max_streams_per_peer:
            own = self._pending_by_peer.get(ip)
            if not own:
                raise RefusedError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many streams (BalanceLoad and xDS) from this address: "
                    f"max_streams_per_peer={limits.max_streams_per_peer}",
                    "max_streams_per_peer",
                )
            self._evict(
                next(iter(own)),
                "max_streams_per_peer",
                f"ended while waiting for its initial_request: this address opened more "
                f"streams than max_streams_per_peer={limits.max_streams_per_peer}",
            )
        if len(self._pending) >= limits.max_pending_streams:
            self._evict(
                next(iter(self._pending)),
                "max_pending_streams",
                f"ended while waiting for its initial_request: more than "
                f"max_pending_streams={limits.max_pending_streams} streams were waiting "
                "for theirs",
            )
        ticket = Ticket(ip, asyncio.get_running_loop().create_future())
        self._pending[ticket] = None
        self._pending_by_peer.setdefault(ip, {})[ticket] = None
        self._per_peer[ip] = self._per_peer.get(ip, 0) + 1
        return ticket

    def establish(self, ticket: Ticket) -> None:
        """Moves a pending ticket to a `max_streams` slot; RefusedError when all
        are taken (the ticket is then released)."""
        self._unpend(ticket)
        if self.established >= self._limits.max_streams:
            self.release(ticket)
            raise RefusedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this balancer serves at most max_streams={self._limits.max_streams} "
                "streams (BalanceLoad and xDS); try another replica",
                "max_streams",
            )
        ticket.established = True
        self.established += 1

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self._unpend(ticket)
        if ticket.established:
            self.established -= 1
        left = self._per_peer[ticket.ip] - 1
        if left:
            self._per_peer[ticket.ip] = left
        else:
            del self._per_peer[ticket.ip]

    def _unpend(self, ticket: Ticket) -> None:
        if ticket in self._pending:
            del self._pending[ticket]
            own = self._pending_by_peer[ticket.ip]
            del own[ticket]
            if not own:
                del self._pending_by_peer[ticket.ip]

    def _evict(self, ticket: Ticket, limit: str, details: str) -> None:
        self.release(ticket)
        if not ticket.evicted.done():
            ticket.evicted.set_result(
                RefusedError(grpc.StatusCode.RESOURCE_EXHAUSTED, details, limit)
            )


class MessageRate:
    """A token bucket: `rate` messages per second, bursts of `burst`."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last = time.monotonic()

    def allow(self) -> bool:
        if self._rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


async def first_message(read: asyncio.Future[object], ticket: Ticket, wait: float) -> object:
    """A stream's first message (or EOF_MARKER), read by `read`; RefusedError
    when it takes longer than `wait` seconds (initial_request_timeout) or the
    stream is evicted meanwhile."""
    try:
        await asyncio.wait(
            (read, ticket.evicted), timeout=wait, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        if not read.done():
            read.cancel()
    if ticket.evicted.done():
        raise ticket.evicted.result()
    if not read.done() or read.cancelled():
        raise RefusedError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"no initial request within initial_request_timeout={wait:g}s",
            "initial_request_timeout",
        )
    return read.result()


def serialize_response(response: Any) -> bytes:
    """A response serializer for streams that write each answer serialized
    once for all their clients: bytes pass through as they are, a message
    is serialized."""
    if isinstance(response, bytes):
        return response
    serialized: bytes = response.SerializeToString()
    return serialized


@dataclass(frozen=True)
class StreamEnds:
    """How one service ends a stream it refuses: counted by status code in
    its `errors` counter (and by limit in lbserver_streams_refused_total),
    logged as `rejected <rpc> stream` within the log limiter's budget."""

    rpc: str
    errors: Any  # a prometheus Counter labelled by code
    limiter: LogLimiter

    async def refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        refusal: RefusedError | RefusedMessage,
        peer: str,
    ) -> None:
        self.errors.labels(refusal.code.name).inc()
        if isinstance(refusal, RefusedMessage):
            await abort_refused(context, refusal, self.limiter)
            return
        details = clip(refusal.details, DETAILS_BYTES)
        if refusal.limit:
            metrics.STREAMS_REFUSED.labels(self.rpc, refusal.limit).inc()
        self.limiter.warning(
            log,
            f"rejected {self.rpc} stream",
            peer=peer,
            code=refusal.code.name,
            limit=refusal.limit or None,
            details=clip(details),
        )
        await context.abort(refusal.code, details)


async def admitted(
    admission: StreamAdmission,
    context: grpc.aio.ServicerContext[Any, Any],
    ends: StreamEnds,
    serve: Callable[[str, Ticket], Awaitable[None]],
) -> None:
    """Runs `serve(peer, ticket)` for a stream `admission` lets in (ending it
    with the refusal otherwise), and gives the ticket back when it ends."""
    peer = context.peer()
    try:
        ticket = admission.admit(peer_ip(peer))
    except RefusedError as refusal:
        await ends.refuse(context, refusal, peer)
        return
    try:
        await serve(peer, ticket)
    finally:
        admission.release(ticket)
