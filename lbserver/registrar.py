"""Backend-side registration: heartbeats one backend to every balancer replica.

Used by `lbserver register` (the sidecar) and directly by backends written in
Python::

    registrar = Registrar(["lbserver-0:11810", "lbserver-1:11810"], "oap", "10.0.0.7", 11800)
    task = asyncio.create_task(registrar.run())
    ...
    await registrar.drain()   # optional: leave the server lists, keep running
    await registrar.stop()    # deregisters from every balancer
    await task

or ``async with Registrar(...) as registrar: ...`` which runs it in the
background and stops (deregistering) on exit.

Replicas share no store, so every balancer gets its own heartbeat loop on its
own channel; one balancer being down never delays the others.

The constructor runs the balancer's own validation (lbserver.domain.validation)
on the registration: whatever a balancer would refuse raises ValueError
(InvalidArgumentError, naming the field) here instead of being retried forever.

Registry calls carry ``authorization: Bearer <token>`` when `token` is given:
one token (str), a sequence of tokens, or a callable returning the current
sequence (called before every heartbeat, so keep it cheap; `lbserver
register --token-file` passes a reader that re-reads the file when it
changes, so a rotated Kubernetes Secret needs no restart). The first token is
sent first. A balancer that answers UNAUTHENTICATED or PERMISSION_DENIED is
asked again at once with the next token (each token at most once per
heartbeat), so a rotation where balancers and registrars learn the new token
at different moments loses no heartbeat. Per balancer the registrar then
keeps the token that balancer accepted, for as long as the sequence still
holds it, and logs when it switches. A HeartbeatStream is authorized once,
when it opens: a stream refused at its opening is reopened with the next
token, and an open stream whose token has left the sequence is reopened with
a current one.

Logs go to the standard `logging` module (logger `lbserver.registrar`) unless
the application configured structlog, which then gets them; nothing is
printed to stdout.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import math
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio

from lbserver._heartbeat_stream import HeartbeatStream, refusal
from lbserver.addresses import DEFAULT_BALANCER_PORT, join_host_port, parse_host_port
from lbserver.backendprobe import BackendProbe
from lbserver.domain.model import LoadReport
from lbserver.domain.validation import check_weight, parse_registration
from lbserver.logs import Logger, get_logger
from lbserver.proto.v1 import lbserver_pb2, lbserver_pb2_grpc

__all__ = [
    "DEFAULT_BALANCER_PORT",
    "LoadCallback",
    "LoadReport",
    "Registrar",
    "TokenSource",
    "join_host_port",
    "parse_host_port",
]

_log = get_logger("lbserver.registrar")

# lbserver's gRPC port: what a balancer address without a port means where
# one may be omitted (the commands' --balancer).

_INITIAL_BACKOFF = 0.2
# A balancer answering with a tiny interval must not turn the loop into a busy loop.
_MIN_INTERVAL = 0.05
# The RPC deadline follows the interval, but one shorter than a slow network's
# round trip would fail every heartbeat.
_MIN_RPC_TIMEOUT = 0.5
_DEFAULT_DEREGISTER_TIMEOUT = 2.0
# On a HeartbeatStream every this many heartbeats wait for an answer: proof,
# end to end, that the balancer still takes them (a hung balancer is noticed
# within this many intervals); the others are only written.
_CONFIRM_EVERY = 5
# Codes that mean "could not talk to the balancer" rather than "it said no".
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Codes that mean "not with this token": the next token is tried.
_DENIED_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


LoadCallback = Callable[[], LoadReport | Awaitable[LoadReport]]
# The registration token(s): one, several in order of preference, or a
# callable giving the current ones (see the module docstring).
TokenSource = str | Sequence[str] | Callable[[], Sequence[str]]
_Metadata = tuple[tuple[str, str], ...]
_T = TypeVar("_T")


def _bearer(token: str | None) -> _Metadata:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _token_callable(token: TokenSource | None) -> Callable[[], Sequence[str]]:
    """`token` as a callable giving the current tokens; ValueError if unusable."""
    if token is None or isinstance(token, str):
        fixed: tuple[str, ...] = (token,) if token else ()
        return lambda: fixed
    if callable(token):
        return token
    fixed = tuple(token)
    if not all(isinstance(entry, str) and entry for entry in fixed):
        raise ValueError("token: every token of the sequence must be a non-empty string")
    return lambda: fixed


Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve_balancer(host: str) -> list[str]:
    """All IP addresses of `host` (one for an IP literal), sorted."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({str(info[4][0]) for info in infos})


def _load_message(report: LoadReport) -> lbserver_pb2.LoadReport | None:
    fields = {
        name: getattr(report, name)
        for name in ("cpu_utilization", "requests_per_second", "errors_per_second", "in_flight")
        if getattr(report, name) is not None
    }
    for name, number in fields.items():
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"load.{name} must be a finite number >= 0, not {number}")
    return lbserver_pb2.LoadReport(**fields) if fields else None


def _nanos(seconds: float) -> int:
    return round(seconds * 1e9)


def _offered(token: str | None, tokens: tuple[str, ...]) -> bool:
    """A balancer's accepted token (None: none sent) is still one to send."""
    return token in tokens if tokens else token is None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _stop_if_cancelled() -> None:
    """Ends a loop whose task was cancelled. A cancellation that lands while a
    gRPC call is failing can surface as that call's AioRpcError (asyncio's
    wait_for returns the finished future's outcome instead of raising
    CancelledError), which the loops catch to keep heartbeating; without this
    check a balancer that left the headless Service kept its loop alive, and
    the resolver, waiting for it, stopped adding new replicas."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _close_stream(link: _Link) -> None:
    if link.stream is not None:
        link.stream.close()
        link.stream = None


@dataclass(slots=True)
class _Link:
    """One balancer: its channel and what the registrar last heard from it."""

    address: str
    channel: grpc.aio.Channel
    stub: lbserver_pb2_grpc.RegistryAsyncStub
    interval: float
    # "" before the first attempt, then "ok", "unreachable", "rejected:CODE" or
    # "error"; logs are written only when it changes.
    status: str = ""
    # The open Registry.HeartbeatStream, if any; unary Heartbeat calls once
    # the balancer said it has no such method (an older lbserver).
    stream: HeartbeatStream | None = None
    unary_only: bool = False
    # The state last written on the stream, and heartbeats since the last
    # answer: a state change, a new stream and every _CONFIRM_EVERY-th
    # heartbeat ask for an answer, the others are only written.
    sent_state: int | None = None
    unanswered: int = 0
    # One heartbeat at a time per link, so states are written in order.
    exchange: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The token this balancer last accepted (the open stream's, if any);
    # tried first while the registrar's tokens still include it.
    token: str | None = None


class Registrar:
    """Keeps one backend registered with every given balancer until stop()."""

    def __init__(
        self,
        balancers: Sequence[str],
        service: str,
        ip: str,
        port: int,
        *,
        instance_id: str | None = None,
        weight: int = 1,
        zone: str = "",
        labels: Mapping[str, str] | None = None,
        interval: float = 3.0,
        ttl: float | None = None,
        load: LoadCallback | None = None,
        token: TokenSource | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        resolve: Resolver | None = None,
        probe: BackendProbe | None = None,
        probe_failures: int = 2,
    ) -> None:
        if isinstance(balancers, str):
            raise ValueError("balancers must be a sequence of HOST:PORT strings, not one string")
        if not balancers:
            raise ValueError("balancers: at least one balancer address is required")
        addresses: list[str] = []
        for entry in balancers:
            try:
                address = join_host_port(*parse_host_port(entry))
            except ValueError as err:
                raise ValueError(f"balancers: {err}") from None
            if address not in addresses:
                addresses.append(address)
        if instance_id is not None and not instance_id:
            raise ValueError("instance_id: must not be empty (omit it to use IP:PORT)")
        if not math.isfinite(interval) or interval <= 0:
            raise ValueError(f"interval: must be a number of seconds > 0, not {interval}")
        if ttl is not None and (not math.isfinite(ttl) or ttl <= interval):
            raise ValueError(f"ttl: must be longer than the interval ({interval} s), not {ttl}")
        # The balancer's own checks: what it would refuse (INVALID_ARGUMENT,
        # forever) fails here, with its message. Weight 0 would mean "unset"
        # on the wire; here it is a mistake.
        check_weight("weight", weight)
        registration = parse_registration(
            service=service,
            instance_id=instance_id or "",
            ip=ip,
            port=port,
            weight=weight,
            zone=zone,
            labels=labels,
            requested_ttl=ttl,
        )

        self._balancers = tuple(addresses)
        self._service = registration.service
        self._ip = str(registration.ip)
        self._port = registration.port
        self._instance_id = registration.instance_id
        self._weight = registration.weight
        self._zone = registration.zone
        self._labels = dict(registration.labels)
        self._interval = float(interval)
        self._ttl = ttl
        self._load = load
        # Sent as `authorization: Bearer <token>` when the balancers require it.
        self._token_source = _token_callable(token)
        self._tokens: tuple[str, ...] = ()
        self._tokens_failing = False
        self._credentials = credentials
        self._resolve = resolve or resolve_balancer
        if probe_failures < 1:
            raise ValueError(f"probe_failures: must be >= 1, not {probe_failures}")
        # DRAINING when asked to drain, or while the probe says the backend is down.
        self._drained = False
        self._probe = probe
        self._probe_failures = probe_failures
        self._probe_down = False
        self._probe_task: asyncio.Task[None] | None = None
        self._links: list[_Link] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._resolver_task: asyncio.Task[None] | None = None
        self._resolve_failing = False
        self._resolved: dict[str, list[str]] = {}
        # The DNS name each resolved address came from: with TLS, the name the
        # balancer's certificate carries (a headless Service's pod IPs are in
        # no certificate).
        self._names: dict[str, str] = {}
        self._started = False
        self._stopping = False
        self._closed = asyncio.Event()
        self._load_failing = False
        self._background: asyncio.Task[None] | None = None

    @property
    def _address(self) -> str:
        return join_host_port(self._ip, self._port)

    @property
    def _log(self) -> Logger:
        return _log.bind(service=self._service, instance_id=self._instance_id)

    @property
    def balancers(self) -> tuple[str, ...]:
        return self._balancers

    @property
    def service(self) -> str:
        return self._service

    @property
    def ip(self) -> str:
        return self._ip

    @property
    def port(self) -> int:
        return self._port

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def weight(self) -> int:
        return self._weight

    @property
    def zone(self) -> str:
        return self._zone

    @property
    def labels(self) -> Mapping[str, str]:
        return dict(self._labels)

    @property
    def interval(self) -> float:
        return self._interval

    @property
    def ttl(self) -> float | None:
        return self._ttl

    @property
    def draining(self) -> bool:
        return self._state == lbserver_pb2.BACKEND_STATE_DRAINING

    @property
    def backend_down(self) -> bool:
        """The probe found the backend not answering (it is reported DRAINING)."""
        return self._probe_down

    @property
    def _state(self) -> lbserver_pb2.BackendState.ValueType:
        if self._drained or self._probe_down:
            return lbserver_pb2.BACKEND_STATE_DRAINING
        return lbserver_pb2.BACKEND_STATE_SERVING

    async def run(self) -> None:
        """Heartbeats to every balancer until stop() has finished.

        Cancelling run() instead of calling stop() ends the heartbeats without
        deregistering: the balancers drop the backend when its TTL runs out.
        """
        if self._started:
            raise RuntimeError("Registrar.run() may be called only once")
        self._started = True
        if self._stopping:
            return
        await self._update_links(await self._resolve_targets())
        self._resolver_task = asyncio.create_task(self._resolver_loop(), name="resolve balancers")
        if self._probe is not None:
            self._probe_task = asyncio.create_task(
                self._probe_loop(self._probe), name="probe backend"
            )
        self._log.info(
            "registrar started",
            balancers=list(self._balancers),
            addresses=[link.address for link in self._links],
            ip=self._ip,
            port=self._port,
        )
        try:
            await self._closed.wait()
        finally:
            if not self._stopping:
                self._stopping = True
                await self._shutdown(deregister=False, deadline=0)

    async def stop(
        self, deregister: bool = True, *, deregister_timeout: float = _DEFAULT_DEREGISTER_TIMEOUT
    ) -> None:
        """Ends the heartbeat loops, deregisters from every balancer at once
        (failures are logged, not raised) and closes the channels."""
        if self._stopping:
            await self._closed.wait()
            return
        self._stopping = True
        await self._shutdown(deregister=deregister, deadline=deregister_timeout)

    async def drain(self) -> int:
        """Marks the backend DRAINING and tells every balancer right away, so it
        leaves the server lists while still alive. Later heartbeats keep saying
        DRAINING. Returns how many balancers acknowledged."""
        self._drained = True
        count = await self._announce()
        self._log.info("draining", acknowledged=count, balancers=len(self._links))
        return count

    async def _announce(self) -> int:
        """Sends the current state to every balancer now, not at the next beat."""
        if self._stopping or not self._links:
            return 0
        acknowledged = await asyncio.gather(*(self._drain_one(link) for link in self._links))
        return sum(acknowledged)

    async def _probe_loop(self, probe: BackendProbe) -> None:
        failures = 0
        while True:
            _stop_if_cancelled()
            try:
                alive = await probe()
            except Exception:
                self._log.exception("backend probe failed")
                alive = False
            failures = 0 if alive else failures + 1
            if alive and self._probe_down:
                self._probe_down = False
                self._log.info("backend answers again: serving", backend=self._address)
                await self._announce()
            elif failures >= self._probe_failures and not self._probe_down:
                self._probe_down = True
                self._log.warning(
                    "backend not answering: reported draining until it does",
                    backend=self._address,
                    failures=failures,
                )
                await self._announce()
            await asyncio.sleep(self._interval)

    async def __aenter__(self) -> Self:
        self._background = asyncio.create_task(self.run(), name="registrar")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        if self._background is not None:
            await self._background

    async def _resolve_targets(self) -> list[str]:
        """Every address of every balancer target: a headless Service name
        resolves to all replicas, and each must get its own heartbeats."""
        addresses: list[str] = []
        failed: list[str] = []
        for target in self._balancers:
            host, port = parse_host_port(target)
            try:
                resolved = [join_host_port(ip, port) for ip in await self._resolve(host)]
            except OSError as err:
                failed.append(f"{target}: {err}")
                resolved = self._resolved.get(target, [])
            else:
                self._resolved[target] = resolved
            if not _is_ip(host):
                for address in resolved:
                    self._names.setdefault(address, host)
            addresses.extend(address for address in resolved if address not in addresses)
        if failed and not self._resolve_failing:
            self._log.warning("cannot resolve balancers; keeping known addresses", errors=failed)
        elif not failed and self._resolve_failing:
            self._log.info("balancers resolve again")
        self._resolve_failing = bool(failed)
        return addresses

    async def _resolver_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._update_links(await self._resolve_targets())

    async def _update_links(self, addresses: list[str]) -> None:
        current = {
            link.address: (link, task) for link, task in zip(self._links, self._tasks, strict=True)
        }
        for address, (link, task) in current.items():
            if address not in addresses:
                # A replica that left the headless Service: nothing to
                # deregister from, it is gone.
                self._log.info("balancer address gone", balancer=address)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                _close_stream(link)
                await link.channel.close(None)
        links, tasks = [], []
        for address in addresses:
            if address in current:
                link, task = current[address]
            else:
                link = self._connect(address)
                task = asyncio.create_task(self._heartbeat_loop(link), name=f"heartbeat {address}")
            links.append(link)
            tasks.append(task)
        self._links, self._tasks = links, tasks

    def _connect(self, address: str) -> _Link:
        options: list[tuple[str, Any]] = [
            # gRPC's own reconnect backoff grows to 120 s; a restarted
            # balancer must get the registration back within one interval.
            ("grpc.initial_reconnect_backoff_ms", int(_INITIAL_BACKOFF * 1000)),
            ("grpc.max_reconnect_backoff_ms", max(int(self._interval * 1000), 200)),
        ]
        name = self._names.get(address)
        if self._credentials is not None and name is not None:
            # Connected by IP, verified by the name that resolved to it.
            options += [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]
        channel = (
            grpc.aio.secure_channel(address, self._credentials, options=options)
            if self._credentials is not None
            else grpc.aio.insecure_channel(address, options=options)
        )
        return _Link(
            address=address,
            channel=channel,
            stub=lbserver_pb2_grpc.RegistryStub(channel),
            interval=self._interval,
        )

    async def _heartbeat_loop(self, link: _Link) -> None:
        backoff = _INITIAL_BACKOFF
        while True:
            _stop_if_cancelled()
            try:
                reply = await self._send_heartbeat(link)
            except grpc.aio.AioRpcError as err:
                self._note_failure(link, err)
                delay = min(backoff, link.interval)
                backoff = min(backoff * 2, link.interval)
            except Exception:
                # Never let a bug end the heartbeats: the backend would silently
                # vanish from every list when its TTL runs out.
                if link.status != "error":
                    self._log.exception("heartbeat failed", balancer=link.address)
                    link.status = "error"
                delay = min(backoff, link.interval)
                backoff = min(backoff * 2, link.interval)
            else:
                if reply is not None:
                    self._note_success(link, reply)
                backoff = _INITIAL_BACKOFF
                delay = link.interval
            await asyncio.sleep(delay)

    async def _send_heartbeat(
        self, link: _Link, *, confirm: bool = False
    ) -> lbserver_pb2.HeartbeatResponse | None:
        """Sends the current state; returns the balancer's answer, or None
        when the heartbeat went out on the stream without asking for one
        (`confirm` asks)."""
        timeout = max(link.interval, _MIN_RPC_TIMEOUT)
        request = None
        if not link.unary_only:
            async with link.exchange:
                # Built under the lock: a drain's DRAINING must not be
                # overtaken by a SERVING heartbeat built before it.
                request = await self._heartbeat_request()
                try:
                    return await self._stream_heartbeat(link, request, timeout, confirm)
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    link.unary_only = True
                    self._log.info(
                        "balancer has no HeartbeatStream; using unary heartbeats",
                        balancer=link.address,
                    )
                    # Sent again unary, without building it (and reading the
                    # load) twice.
                    request.ClearField("reply_token")
        unary = request if request is not None else await self._heartbeat_request()
        return await self._with_tokens(
            link,
            lambda metadata, remaining: link.stub.Heartbeat(
                unary, timeout=remaining, metadata=metadata
            ),
            timeout,
        )

    async def _stream_heartbeat(
        self,
        link: _Link,
        request: lbserver_pb2.HeartbeatRequest,
        reply_within: float,
        confirm: bool,
    ) -> lbserver_pb2.HeartbeatResponse | None:
        tokens = self._current_tokens()
        stream = link.stream
        if stream is not None and not stream.ended and _offered(link.token, tokens):
            ask = (
                confirm or link.sent_state != request.state or link.unanswered + 1 >= _CONFIRM_EVERY
            )
            try:
                reply = await stream.send(request, reply_within=reply_within if ask else None)
            except BaseException:
                _close_stream(link)
                raise
        else:
            # A new stream (the token travels when it opens), also when the
            # open one's token is no longer offered (rotated out).
            _close_stream(link)
            reply = await self._open_stream(link, request, reply_within, tokens)
        link.sent_state = request.state
        if reply is None:
            link.unanswered += 1
            return None
        link.unanswered = 0
        refused = refusal(reply)
        if refused is not None:
            raise refused
        return reply.accepted

    async def _open_stream(
        self,
        link: _Link,
        request: lbserver_pb2.HeartbeatRequest,
        reply_within: float,
        tokens: tuple[str, ...],
    ) -> lbserver_pb2.HeartbeatStreamResponse:
        """Opens a HeartbeatStream with the first token the balancer takes
        and sends `request` on it, asking for the answer: a stream refused
        at its opening (UNAUTHENTICATED, PERMISSION_DENIED) is reopened with
        the next token. An answer, even a refusal of the heartbeat, means
        the stream's token was accepted."""
        candidates = self._candidates(link, tokens)
        for attempt, token in enumerate(candidates):
            stream = link.stream = HeartbeatStream(
                link.stub, _bearer(token), lambda news: self._note_news(link, news)
            )
            try:
                reply = await stream.send(request, reply_within=reply_within)
            except grpc.aio.AioRpcError as err:
                _close_stream(link)
                if err.code() in _DENIED_CODES and attempt + 1 < len(candidates):
                    continue
                raise
            except BaseException:
                _close_stream(link)
                raise
            assert reply is not None  # asked for
            self._accepted_token(link, token, tokens)
            return reply
        raise AssertionError("no token candidates")  # pragma: no cover - never empty

    async def _with_tokens(
        self,
        link: _Link,
        call: Callable[[_Metadata, float], Awaitable[_T]],
        within: float,
    ) -> _T:
        """A unary call (given its metadata and timeout), made again with the
        next token while the balancer answers UNAUTHENTICATED or
        PERMISSION_DENIED; all attempts within `within` seconds."""
        tokens = self._current_tokens()
        candidates = self._candidates(link, tokens)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        for attempt, token in enumerate(candidates):
            try:
                result = await call(_bearer(token), max(deadline - loop.time(), 0.0))
            except grpc.aio.AioRpcError as err:
                if err.code() in _DENIED_CODES and attempt + 1 < len(candidates):
                    continue
                raise
            self._accepted_token(link, token, tokens)
            return result
        raise AssertionError("no token candidates")  # pragma: no cover - never empty

    def _current_tokens(self) -> tuple[str, ...]:
        """The tokens to offer now; the last good ones if the source fails."""
        try:
            tokens = tuple(dict.fromkeys(t for t in self._token_source() if t))
        except Exception:
            if not self._tokens_failing:
                self._tokens_failing = True
                self._log.warning("token source failed; keeping the last tokens", exc_info=True)
            return self._tokens
        if self._tokens_failing:
            self._tokens_failing = False
            self._log.info("token source works again")
        self._tokens = tokens
        return tokens

    @staticmethod
    def _candidates(link: _Link, tokens: tuple[str, ...]) -> list[str | None]:
        """Tokens in the order to try them: the one this balancer accepted
        last while it is still offered, else the first; then the others in
        their order. [None] (no token) when there are none."""
        if not tokens:
            return [None]
        first = link.token if link.token in tokens else tokens[0]
        return [first, *(token for token in tokens if token != first)]

    def _accepted_token(self, link: _Link, token: str | None, tokens: tuple[str, ...]) -> None:
        previous, link.token = link.token, token
        if token == previous or token is None:
            return
        if previous is None and token == tokens[0]:
            return  # the first token, from the start: nothing to say
        # The token's place in the sequence, never the token.
        self._log.info(
            "switched registration token",
            balancer=link.address,
            token_number=tokens.index(token) + 1,
            tokens=len(tokens),
        )

    def _note_news(self, link: _Link, news: lbserver_pb2.HeartbeatStreamResponse) -> None:
        """An answer the balancer volunteered: the outcome of this backend's
        heartbeats changed (refused now, or accepted again, or a new TTL)."""
        refused = refusal(news)
        if refused is not None:
            self._note_failure(link, refused)
        else:
            self._note_success(link, news.accepted)

    async def _heartbeat_request(self) -> lbserver_pb2.HeartbeatRequest:
        request = lbserver_pb2.HeartbeatRequest(
            service=self._service,
            instance_id=self._instance_id,
            ip=self._ip,
            port=self._port,
            zone=self._zone,
            labels=self._labels,
            weight=self._weight,
            load=await self._current_load(),
            state=self._state,
        )
        if self._ttl is not None:
            request.requested_ttl.FromNanoseconds(_nanos(self._ttl))
        return request

    async def _current_load(self) -> lbserver_pb2.LoadReport | None:
        if self._load is None:
            return None
        try:
            result = self._load()
            report = await result if inspect.isawaitable(result) else result
            if not isinstance(report, LoadReport):
                raise TypeError(f"load callback returned {type(report).__name__}, not LoadReport")
            message = _load_message(report)
        except Exception:
            # Heartbeats without load still keep the backend registered.
            if not self._load_failing:
                self._log.warning(
                    "load callback failed; sending heartbeats without load", exc_info=True
                )
                self._load_failing = True
            return None
        if self._load_failing:
            self._log.info("load callback works again")
            self._load_failing = False
        return message

    def _note_success(self, link: _Link, reply: lbserver_pb2.HeartbeatResponse) -> None:
        interval = reply.heartbeat_interval.ToNanoseconds() / 1e9
        if interval > 0:
            link.interval = max(interval, _MIN_INTERVAL)
        if link.status != "ok":
            self._log.info(
                "registered with balancer" if not link.status else "balancer reachable again",
                balancer=link.address,
                granted_ttl=reply.granted_ttl.ToNanoseconds() / 1e9,
                interval=link.interval,
            )
            link.status = "ok"

    def _note_failure(self, link: _Link, err: grpc.aio.AioRpcError) -> None:
        code = err.code()
        status = "unreachable" if code in _UNREACHABLE_CODES else f"rejected:{code.name}"
        if status == link.status:
            return
        link.status = status
        self._log.warning(
            "balancer unreachable" if status == "unreachable" else "balancer rejected heartbeat",
            balancer=link.address,
            code=code.name,
            error=err.details(),
        )

    async def _drain_one(self, link: _Link) -> bool:
        try:
            await self._send_heartbeat(link, confirm=True)
        except grpc.aio.AioRpcError as err:
            self._log.warning(
                "drain heartbeat failed",
                balancer=link.address,
                code=err.code().name,
                error=err.details(),
            )
            return False
        return True

    async def _deregister_one(self, link: _Link, deadline: float) -> None:
        request = lbserver_pb2.DeregisterRequest(
            service=self._service, instance_id=self._instance_id
        )
        try:
            reply = await self._with_tokens(
                link,
                lambda metadata, remaining: link.stub.Deregister(
                    request, timeout=remaining, metadata=metadata
                ),
                deadline,
            )
        except grpc.aio.AioRpcError as err:
            self._log.warning(
                "deregister failed",
                balancer=link.address,
                code=err.code().name,
                error=err.details(),
            )
        else:
            self._log.info("deregistered", balancer=link.address, removed=reply.removed)

    async def _shutdown(self, *, deregister: bool, deadline: float) -> None:
        try:
            for background in (self._resolver_task, self._probe_task):
                if background is not None:
                    background.cancel()
                    await asyncio.gather(background, return_exceptions=True)
            close_probe = getattr(self._probe, "close", None)
            if close_probe is not None:
                await close_probe()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if deregister and self._links:
                await asyncio.gather(
                    *(self._deregister_one(link, deadline) for link in self._links)
                )
            for link in self._links:
                _close_stream(link)
            await asyncio.gather(*(link.channel.close(None) for link in self._links))
        finally:
            self._closed.set()
            self._log.info("registrar stopped")
