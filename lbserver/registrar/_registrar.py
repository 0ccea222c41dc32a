"""The Registrar: keeps one backend registered with every balancer replica
(the package docstring has the whole story). Each balancer address gets its
own heartbeat loop on its own channel (a `Link`), so one balancer being down
never delays the others."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final, Self

import grpc
import grpc.aio

from lbserver.addresses import join_host_port, parse_host_port
from lbserver.backoff import Backoff
from lbserver.domain.model import LoadReport
from lbserver.domain.validation import check_weight, parse_load, parse_registration
from lbserver.errors import InvalidArgumentError, UsageError
from lbserver.logs import get_logger
from lbserver.proto.v1 import lbserver_pb2
from lbserver.registrar._backendprobe import BackendProbe
from lbserver.registrar._channel import INITIAL_RETRY
from lbserver.registrar._link import Link
from lbserver.registrar._resolve import BalancerAddresses, Resolver, resolve_balancer
from lbserver.registrar._tokens import Tokens, TokenSource

# The logger users configure (documented): the same name as before the
# registrar became a package.
_log = get_logger("lbserver.registrar")

_DEFAULT_DEREGISTER_TIMEOUT = 2.0

LoadCallback = Callable[[], LoadReport | Awaitable[LoadReport]]


def _balancer_addresses(balancers: Sequence[str]) -> tuple[str, ...]:
    """The balancer targets as HOST:PORT, each once; InvalidArgumentError
    naming `balancers` otherwise."""
    if isinstance(balancers, str):
        raise InvalidArgumentError(
            "balancers", "must be a sequence of HOST:PORT strings, not one string"
        )
    if not balancers:
        raise InvalidArgumentError("balancers", "at least one balancer address is required")
    addresses: list[str] = []
    for entry in balancers:
        try:
            address = join_host_port(*parse_host_port(entry))
        except ValueError as err:
            raise InvalidArgumentError("balancers", str(err)) from None
        if address not in addresses:
            addresses.append(address)
    return tuple(addresses)


def _load_message(report: LoadReport) -> lbserver_pb2.LoadReport | None:
    # The balancer's own checks: a load it would refuse is not sent.
    checked = parse_load(**dataclasses.asdict(report))
    fields = {
        name: value for name, value in dataclasses.asdict(checked).items() if value is not None
    }
    return lbserver_pb2.LoadReport(**fields) if fields else None


def _retry_backoff(interval: float) -> Backoff:
    """Between failed heartbeats: 0.2 s, doubling, never longer than the
    heartbeat interval (a restarted balancer gets the registration back
    within one interval)."""
    return Backoff(initial=min(INITIAL_RETRY, interval), multiplier=2.0, maximum=interval)


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


class Registrar:
    """Keeps one backend registered with every given balancer until stop().

    The arguments, as validated, are its read-only attributes: `balancers`,
    `service`, `ip`, `port`, `instance_id` (IP:PORT when not given),
    `weight`, `zone`, `labels`, `interval` and `ttl`."""

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
        addresses = _balancer_addresses(balancers)
        if instance_id is not None and not instance_id:
            raise InvalidArgumentError("instance_id", "must not be empty (omit it to use IP:PORT)")
        if not math.isfinite(interval) or interval <= 0:
            raise InvalidArgumentError(
                "interval", f"must be a number of seconds > 0, not {interval}"
            )
        if ttl is not None and (not math.isfinite(ttl) or ttl <= interval):
            raise InvalidArgumentError(
                "ttl", f"must be longer than the interval ({interval} s), not {ttl}"
            )
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
        if probe_failures < 1:
            raise InvalidArgumentError("probe_failures", f"must be >= 1, not {probe_failures}")

        # What is registered, as the balancer will see it (read-only).
        self.balancers: Final = addresses
        self.service: Final = registration.service
        self.ip: Final = str(registration.ip)
        self.port: Final = registration.port
        self.instance_id: Final = registration.instance_id
        self.weight: Final = registration.weight
        self.zone: Final = registration.zone
        self.labels: Final = registration.labels
        self.interval: Final = float(interval)
        self.ttl: Final = ttl
        self._load = load
        self._log = _log.bind(service=self.service, instance_id=self.instance_id)
        # Sent as `authorization: Bearer <token>` when the balancers require it.
        self._tokens = Tokens(token, self._log)
        self._credentials = credentials
        self._targets = BalancerAddresses(addresses, resolve or resolve_balancer, self._log)
        # DRAINING when asked to drain, or while the probe says the backend is down.
        self._drained = False
        self._probe = probe
        self._probe_failures = probe_failures
        self._probe_down = False
        self._probe_task: asyncio.Task[None] | None = None
        self._links: list[Link] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._resolver_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._closed = asyncio.Event()
        self._load_failing = False
        self._background: asyncio.Task[None] | None = None

    @property
    def _address(self) -> str:
        return join_host_port(self.ip, self.port)

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
            raise UsageError("Registrar.run() may be called only once")
        self._started = True
        if self._stopping:
            return
        await self._update_links(await self._targets.resolve())
        self._resolver_task = asyncio.create_task(self._resolver_loop(), name="resolve balancers")
        if self._probe is not None:
            self._probe_task = asyncio.create_task(
                self._probe_loop(self._probe), name="probe backend"
            )
        self._log.info(
            "registrar started",
            balancers=list(self.balancers),
            addresses=[link.address for link in self._links],
            ip=self.ip,
            port=self.port,
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
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> Self:
        self._background = asyncio.create_task(self.run(), name="registrar")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Stopped (and deregistered) whatever the block raised.
        await self.stop()
        if self._background is not None:
            await self._background

    async def _resolver_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._update_links(await self._targets.resolve())

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
                await link.close()
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

    def _connect(self, address: str) -> Link:
        return Link(
            address,
            interval=self.interval,
            tokens=self._tokens,
            log=self._log,
            credentials=self._credentials,
            tls_name=self._targets.name_of(address),
        )

    async def _heartbeat_loop(self, link: Link) -> None:
        failures = 0
        while True:
            _stop_if_cancelled()
            try:
                reply = await self._send_heartbeat(link)
            except grpc.aio.AioRpcError as err:
                link.note_failure(err)
                failures += 1
            except Exception:
                # Never let a bug end the heartbeats: the backend would silently
                # vanish from every list when its TTL runs out.
                link.note_error()
                failures += 1
            else:
                if reply is not None:
                    link.note_success(reply)
                failures = 0
            # The interval as the balancer last set it, also for the backoff's cap.
            delay = _retry_backoff(link.interval).delay(failures) if failures else link.interval
            await asyncio.sleep(delay)

    async def _send_heartbeat(
        self, link: Link, *, confirm: bool = False
    ) -> lbserver_pb2.HeartbeatResponse | None:
        return await link.heartbeat(self._heartbeat_request, confirm=confirm)

    async def _heartbeat_request(self) -> lbserver_pb2.HeartbeatRequest:
        request = lbserver_pb2.HeartbeatRequest(
            service=self.service,
            instance_id=self.instance_id,
            ip=self.ip,
            port=self.port,
            zone=self.zone,
            labels=self.labels,
            weight=self.weight,
            load=await self._current_load(),
            state=self._state,
        )
        if self.ttl is not None:
            request.requested_ttl.FromNanoseconds(round(self.ttl * 1e9))
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

    async def _drain_one(self, link: Link) -> bool:
        try:
            await self._send_heartbeat(link, confirm=True)
        except grpc.aio.AioRpcError as err:
            link.log_error("drain heartbeat failed", err)
            return False
        return True

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
                request = lbserver_pb2.DeregisterRequest(
                    service=self.service, instance_id=self.instance_id
                )
                await asyncio.gather(*(link.deregister(request, deadline) for link in self._links))
            await asyncio.gather(*(link.close() for link in self._links))
        finally:
            self._closed.set()
            self._log.info("registrar stopped")
