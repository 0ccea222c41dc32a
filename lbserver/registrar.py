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
from typing import Self

import grpc
import grpc.aio
import structlog

from lbserver._heartbeat_stream import HeartbeatStream, refusal
from lbserver.backendprobe import BackendProbe
from lbserver.domain.model import LoadReport
from lbserver.proto.v1 import lbserver_pb2, lbserver_pb2_grpc

__all__ = [
    "LoadCallback",
    "LoadReport",
    "Registrar",
    "join_host_port",
    "parse_host_port",
]

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger()

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
_MAX_UINT32 = 2**32 - 1
# Codes that mean "could not talk to the balancer" rather than "it said no".
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


LoadCallback = Callable[[], LoadReport | Awaitable[LoadReport]]


def parse_host_port(value: str) -> tuple[str, int]:
    """Splits ``HOST:PORT`` or ``[IPV6]:PORT``; raises ValueError on bad input."""
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{value!r} is not [IPV6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r} is not HOST:PORT")
        if ":" in host:
            raise ValueError(f"{value!r}: write IPv6 addresses in brackets, as [::1]:PORT")
    if not host:
        raise ValueError(f"{value!r} has no host")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number in 1-65535")
    return host, int(port_text)


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


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        token: str | None = None,
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
        if not service or service.strip() != service:
            raise ValueError(f"service: must be a non-empty name, not {service!r}")
        try:
            parsed_ip = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"ip: {ip!r} is not a literal IPv4 or IPv6 address") from None
        if parsed_ip.is_unspecified or parsed_ip.is_multicast:
            raise ValueError(f"ip: clients cannot connect to {ip}")
        if isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"port: {port} is outside 1-65535")
        if isinstance(weight, bool) or not 1 <= weight <= _MAX_UINT32:
            raise ValueError(f"weight: must be an integer >= 1, not {weight}")
        if not math.isfinite(interval) or interval <= 0:
            raise ValueError(f"interval: must be a number of seconds > 0, not {interval}")
        if ttl is not None and (not math.isfinite(ttl) or ttl <= interval):
            raise ValueError(f"ttl: must be longer than the interval ({interval} s), not {ttl}")
        if instance_id is not None and not instance_id:
            raise ValueError("instance_id: must not be empty (omit it to use IP:PORT)")
        for key in labels or {}:
            if not key:
                raise ValueError("labels: keys must not be empty")

        self._balancers = tuple(addresses)
        self._service = service
        self._ip = str(parsed_ip)
        self._port = port
        self._instance_id = instance_id or join_host_port(self._ip, port)
        self._weight = weight
        self._zone = zone
        self._labels = dict(labels or {})
        self._interval = float(interval)
        self._ttl = ttl
        self._load = load
        # Sent as `authorization: Bearer <token>` when the balancers require it.
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
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
        self._started = False
        self._stopping = False
        self._closed = asyncio.Event()
        self._load_failing = False
        self._background: asyncio.Task[None] | None = None

    @property
    def _address(self) -> str:
        return join_host_port(self._ip, self._port)

    @property
    def _log(self) -> structlog.typing.FilteringBoundLogger:
        # Bound on every use: a logger bound in __init__ would keep the logging
        # configuration of that moment (the CLI configures logging afterwards).
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
        options = [
            # gRPC's own reconnect backoff grows to 120 s; a restarted
            # balancer must get the registration back within one interval.
            ("grpc.initial_reconnect_backoff_ms", int(_INITIAL_BACKOFF * 1000)),
            ("grpc.max_reconnect_backoff_ms", max(int(self._interval * 1000), 200)),
        ]
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
        if request is None:
            request = await self._heartbeat_request()
        return await link.stub.Heartbeat(request, timeout=timeout, metadata=self._metadata)

    async def _stream_heartbeat(
        self,
        link: _Link,
        request: lbserver_pb2.HeartbeatRequest,
        reply_within: float,
        confirm: bool,
    ) -> lbserver_pb2.HeartbeatResponse | None:
        stream = link.stream
        if stream is None or stream.ended:
            _close_stream(link)
            stream = link.stream = HeartbeatStream(
                link.stub, self._metadata, lambda news: self._note_news(link, news)
            )
            link.sent_state = None
        ask = confirm or link.sent_state != request.state or link.unanswered + 1 >= _CONFIRM_EVERY
        try:
            reply = await stream.send(request, reply_within=reply_within if ask else None)
        except BaseException:
            _close_stream(link)
            raise
        link.sent_state = request.state
        if reply is None:
            link.unanswered += 1
            return None
        link.unanswered = 0
        refused = refusal(reply)
        if refused is not None:
            raise refused
        return reply.accepted

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
            reply = await link.stub.Deregister(request, timeout=deadline, metadata=self._metadata)
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
