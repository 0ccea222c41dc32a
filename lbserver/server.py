"""Assembles and runs `lbserver serve`: one grpc.aio server carrying grpclb,
Registry, Admin, health and reflection, plus the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import signal
import socket
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from envoy.service.discovery.v3 import ads_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY

from lbserver import metrics
from lbserver.balancer import Balancer, ListSettings
from lbserver.config import MAX_MESSAGE_BYTES, Config, parse_host_port
from lbserver.discovery import EndpointSource
from lbserver.domain.membership import TtlPolicy
from lbserver.domain.naming import NameRules
from lbserver.domain.weights import LoadWeightSettings, SheddingSettings
from lbserver.grpc_compat import HealthServicerBase
from lbserver.keepalive import SERVER_KEEPALIVE_OPTIONS
from lbserver.logs import LogLimiter
from lbserver.metrics_server import MetricsServer, start_metrics_server
from lbserver.proto.grpclb.v1 import load_balancer_pb2
from lbserver.proto.v1 import lbserver_pb2, lbserver_pb2_grpc
from lbserver.security import (
    Authorizer,
    PeerRateLimiter,
    RegistrationTokens,
    load_tokens,
    require,
    serve_decoded,
    server_credentials,
)
from lbserver.services.admin import AdminService
from lbserver.services.ads import AggregatedDiscoveryService
from lbserver.services.loadbalancer import LoadBalancerService
from lbserver.services.registry import RegistryService

log = structlog.get_logger("lbserver.server")

SERVICE_NAMES = (
    load_balancer_pb2.DESCRIPTOR.services_by_name["LoadBalancer"].full_name,
    lbserver_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
    lbserver_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name,
)

# The cyclic garbage collector's thresholds in `lbserver serve`. A balancer
# holds thousands of long-lived objects per thousand streams, and every list
# push allocates per stream; with CPython's defaults (700, 10, 10) the young
# generations were collected hundreds of times per fan-out and a full
# collection (0.3-0.7 s with 5,000 streams) ran every change or two. Memory
# is still freed by reference counting; only cycles wait longer.
GC_THRESHOLDS = (50_000, 20, 10)

# Keepalive as lbserver.keepalive agrees it with the clients.
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    *SERVER_KEEPALIVE_OPTIONS,
    # Two balancers on one port would silently split the clients between them.
    ("grpc.so_reuseport", 0),
    # No bandwidth-delay-product probing: it sizes flow-control windows for
    # bulk transfers, and costs a PING on every message received (an xDS ACK,
    # a streamed heartbeat) where every message here is small.
    ("grpc.http2.bdp_probe", 0),
)


_SHUTTING_DOWN = "the balancer is shutting down"


class HealthService(HealthServicerBase):  # type: ignore[misc]
    """grpc.health.v1.Health, as grpcio's asyncio HealthServicer (Check, Watch,
    `set`, `enter_graceful_shutdown`), except that entering the graceful
    shutdown also ends every open Watch stream: the watcher is told
    NOT_SERVING, then the call ends with UNAVAILABLE, and later Watch calls
    get the same at once. A Watch never ends by itself; left open, it held a
    stop for its whole shutdown_grace and was then cancelled. Envoy, Consul
    and gRPC clients with health checking watch; kubelet only calls Check."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        # Set (and replaced) at every change of a status.
        self._changed = asyncio.Event()
        self._shutting_down = False

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ],
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ],
    ) -> None:
        last: int | None = None
        while True:
            # Taken before the status is read: a change during the write
            # below sets this event, so it is not missed.
            changed = self._changed
            status = self._status.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._shutting_down:
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(_SHUTTING_DOWN)
                return
            await changed.wait()

    async def set(self, service: str, status: int) -> None:
        """Sets a service's status; ignored once shutting down."""
        if self._shutting_down:
            return
        self._status[service] = status
        self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Turns every status NOT_SERVING for good and ends the Watch streams."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in self._status:
            self._status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def build_balancer(config: Config) -> Balancer:
    return Balancer(
        ttl_policy=TtlPolicy(
            default=config.default_ttl, minimum=config.min_ttl, maximum=config.max_ttl
        ),
        heartbeat_interval=config.heartbeat_interval,
        name_rules=NameRules(rules=config.name_rules, aliases=config.name_aliases),
        load_settings=LoadWeightSettings(
            error_penalty=config.error_penalty,
            smoothing=config.load_smoothing,
            blackout=config.blackout,
            report_expiry=config.report_expiry,
            slow_start=config.slow_start,
            max_ratio=config.max_weight_ratio,
        ),
        list_settings=ListSettings(
            max_length=config.max_list_length,
            share_threshold=config.share_threshold,
            settle_time=config.share_settle_time,
            min_push_interval=config.min_push_interval,
            shedding=SheddingSettings(
                utilization=config.shed_utilization, max_drop_share=config.max_drop_share
            ),
            subset_sizes=config.subset_sizes,
        ),
        empty_service=config.empty_service,
        startup_grace=config.startup_grace,
        max_services=config.max_services,
        max_backends_per_service=config.max_backends_per_service,
        discovery={w.service: w.mode for w in config.kubernetes_services},
    )


@dataclass
class RunningServer:
    """A started balancer; `port` is the bound gRPC port (useful with :0)."""

    config: Config
    balancer: Balancer
    server: grpc.aio.Server
    health: HealthService
    port: int
    timers: asyncio.Task[None]
    # The server and port of Registry and Admin: the main ones unless mTLS
    # moved them to registry_listen.
    registry_server: grpc.aio.Server
    registry_port: int
    discovery: asyncio.Task[None] | None = None
    # The load scrapes of Kubernetes members with a scrape block.
    scraping: asyncio.Task[None] | None = None
    registry: RegistryService | None = None
    # The registration tokens (None: no token), and the task that re-reads
    # auth_token_file when there is one.
    tokens: RegistrationTokens | None = None
    token_watch: asyncio.Task[None] | None = None
    balance_load: LoadBalancerService | None = None
    # Rate-limits the log lines clients can cause; its task reports the
    # suppressed counts every window.
    log_limiter: LogLimiter | None = None
    log_flush: asyncio.Task[None] | None = None

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, ends every BalanceLoad stream (clients keep
        their lists and reconnect elsewhere), every Registry.HeartbeatStream
        (registrars open a new one at their next heartbeat, to a replica that
        is still up) and every grpc.health.v1 Watch stream (after telling it
        NOT_SERVING), and stops within the grace: open unary calls get it,
        and the stop is over as soon as they are done."""
        await self.health.enter_graceful_shutdown()
        self.balancer.close()
        if self.registry is not None:
            self.registry.close()
        for task in (self.timers, self.discovery, self.scraping, self.token_watch, self.log_flush):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        grace = self.config.shutdown_grace if grace is None else grace
        if self.registry_server is not self.server:
            await self.registry_server.stop(grace)
        await self.server.stop(grace)


def _endpoint_source(config: Config, balancer: Balancer) -> EndpointSource | None:
    if not config.kubernetes_services:
        return None
    # Imported only when configured: the kubernetes client is slow to import.
    from lbserver.discovery.kubernetes import KubernetesEndpointSource

    return KubernetesEndpointSource(
        config.kubernetes_services, balancer.set_endpoints, kubeconfig=config.kubeconfig or None
    )


def core_receive_limit(max_message_bytes: int) -> int:
    """gRPC's own receive limit: twice max_message_bytes (at most gRPC's
    maximum). Messages up to it reach the request deserializers, which refuse
    those over max_message_bytes naming the option; gRPC refuses larger ones
    before reading them (RESOURCE_EXHAUSTED, in its own words)."""
    return min(MAX_MESSAGE_BYTES, 2 * max_message_bytes)


def _grpc_server(config: Config) -> grpc.aio.Server:
    return grpc.aio.server(
        options=(
            *SERVER_OPTIONS,
            ("grpc.max_receive_message_length", core_receive_limit(config.max_message_bytes)),
        )
    )


def is_loopback_host(host: str) -> bool:
    """Whether every address `host` (of a listen address) stands for is a
    loopback one; "" and wildcards are not, nor is a name that does not
    resolve."""
    host = _unbracketed(host)
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(address).partition("%")[0]).is_loopback for address in addresses
    )


def warn_if_unauthenticated(config: Config, authorizer: Authorizer) -> bool:
    """Logs one loud warning and sets lbserver_registry_unauthenticated when
    Registry and Admin take calls without a token or client certificate on a
    non-loopback address: anyone who reaches the port could register
    backends (and get every client's traffic) or deregister real ones."""
    address = config.registry_listen or config.listen
    host, _ = parse_host_port("registry_listen" if config.registry_listen else "listen", address)
    exposed = not authorizer.enabled and not is_loopback_host(host)
    metrics.REGISTRY_UNAUTHENTICATED.set(1 if exposed else 0)
    if exposed:
        log.warning(
            "Registry and Admin accept calls WITHOUT AUTHENTICATION on a non-loopback address: "
            "anyone who can reach it can register backends or deregister real ones; set "
            "auth_token_file (or LBSERVER_AUTH_TOKEN) or tls_client_ca_file, or listen on "
            "127.0.0.1",
            listen=address,
        )
    return exposed


class ListenError(OSError):
    """An address of the configuration cannot be listened on; the message
    names the address and the option (`lbserver serve` exits 1)."""

    def __init__(self, option: str, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({option}): {reason}")


def _unbracketed(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _check_bindable(option: str, address: str, host: str, port: int) -> None:
    """ListenError when no address `host` resolves to can be bound on `port`
    (busy, not local, privileged). grpcio would only log the reason on stderr
    (in its own format) and raise "Failed to bind"; a trial bind, closed at
    once and never listening, gets the operating system's reason instead."""
    if port == 0:
        return
    try:
        candidates = socket.getaddrinfo(
            _unbracketed(host) or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(option, address, exc.strerror or str(exc)) from None
    first_error: OSError | None = None
    for family, kind, proto, _, sockaddr in candidates:
        try:
            with socket.socket(family, kind, proto) as trial:
                # As grpcio's own listening sockets do: a port whose last
                # connections are in TIME_WAIT is free.
                trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                trial.bind(sockaddr)
            return
        except OSError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise ListenError(option, address, first_error.strerror or str(first_error))


def _bind(server: grpc.aio.Server, option: str, address: str, credentials: Any) -> int:
    host, port = parse_host_port(option, address)
    _check_bindable(option, address, host, port)
    try:
        if credentials is not None:
            return server.add_secure_port(f"{host}:{port}", credentials)
        return server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise ListenError(option, address, str(exc)) from exc


async def start(config: Config, balancer: Balancer | None = None) -> RunningServer:
    """Starts the gRPC server(s). With a client CA and tls_client_auth
    'registry', Registry and Admin move to `registry_listen`, where every
    call needs a client certificate, while the main port keeps BalanceLoad
    open to clients without one (grpcio cannot ask for certificates per
    method on one port)."""
    balancer = balancer or build_balancer(config)
    source = _endpoint_source(config, balancer)
    separate_registry = config.separate_registry
    main_credentials = server_credentials(
        config.tls_cert_file,
        config.tls_key_file,
        "" if separate_registry else config.tls_client_ca_file,
        require_client_cert_everywhere=True,
    )
    tokens = load_tokens(config.auth_token, config.auth_token_file)
    limiter = LogLimiter(
        on_suppressed=lambda event: metrics.LOG_EVENTS_SUPPRESSED.labels(event).inc()
    )
    authorizer = Authorizer(
        tokens, require_client_cert=bool(config.tls_client_ca_file), log_limiter=limiter
    )
    server = _grpc_server(config)
    registry_server = _grpc_server(config) if separate_registry else server
    # Like load_balancer_pb2_grpc.add_LoadBalancerServicer_to_server, with a
    # serializer that lets every stream write a list serialized once, and
    # (as for Registry and Admin) a deserializer that refuses messages over
    # max_message_bytes or that do not decode, naming the limit or the type.
    balance_load = LoadBalancerService(
        balancer,
        client_stats_interval=config.client_stats_interval,
        initial_request_timeout=config.initial_request_timeout,
        max_streams=config.max_streams,
        max_streams_per_peer=config.max_streams_per_peer,
        max_pending_streams=config.max_pending_streams,
        client_stats_rate_per_stream=config.client_stats_rate_per_stream,
        log_limiter=limiter,
    )
    balance_load.add_to_server(server, config.max_message_bytes)
    # xDS beside grpclb, from the same watches; one admission count for both.
    AggregatedDiscoveryService(
        balancer,
        balance_load.admission,
        initial_request_timeout=config.initial_request_timeout,
        max_resource_names=config.xds_max_resource_names,
        request_rate_per_stream=config.xds_request_rate_per_stream,
        localities=config.xds_localities,
        log_limiter=limiter,
    ).add_to_server(server, config.max_message_bytes)
    registry = RegistryService(
        balancer,
        authorizer,
        PeerRateLimiter(config.heartbeat_rate_per_peer),
        max_streams_per_peer=config.max_streams_per_peer,
    )
    registry.add_to_server(registry_server, config.max_message_bytes)

    async def admin_gate(context: grpc.aio.ServicerContext, method: str) -> int:  # type: ignore[type-arg]
        return await require(authorizer, context, "admin")

    serve_decoded(
        registry_server,
        lbserver_pb2_grpc.add_AdminServicer_to_server,
        AdminService(balancer, authorizer),
        max_message_bytes=config.max_message_bytes,
        limiter=limiter,
        gate=admin_gate,
    )
    health_servicer = HealthService()
    servers = [server] if registry_server is server else [server, registry_server]
    for each in servers:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, each)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            each,
        )
    try:
        bound = _bind(server, "listen", config.listen, main_credentials)
        registry_port = bound
        if registry_server is not server:
            registry_port = _bind(
                registry_server,
                "registry_listen",
                config.registry_listen,
                server_credentials(
                    config.tls_cert_file,
                    config.tls_key_file,
                    config.tls_client_ca_file,
                    require_client_cert_everywhere=True,
                ),
            )
    except BaseException:
        # Stopped here, not by the garbage collector once the loop is gone.
        for each in servers:
            await each.stop(0)
        raise
    for each in servers:
        await each.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    timers = asyncio.create_task(balancer.run_timers(), name="balancer-timers")
    warn_if_unauthenticated(config, authorizer)
    running = RunningServer(
        config,
        balancer,
        server,
        health_servicer,
        bound,
        timers,
        registry_server,
        registry_port,
        registry=registry,
        tokens=tokens,
        balance_load=balance_load,
        log_limiter=limiter,
        log_flush=asyncio.create_task(limiter.run_flush(), name="log-flush"),
    )
    if tokens is not None and tokens.path is not None:
        running.token_watch = asyncio.create_task(tokens.watch(), name="token-file")
    if source is not None:
        running.discovery = asyncio.create_task(source.run(), name="kubernetes-discovery")
    if any(w.scrape is not None for w in config.kubernetes_services):
        from lbserver.discovery.scrape import Scraper

        scraper = Scraper(
            config.kubernetes_services, balancer, kubeconfig=config.kubeconfig or None
        )
        running.scraping = asyncio.create_task(scraper.run(), name="load-scrapes")
        log.info("scraping the load of kubernetes members", services=scraper.services)
    return running


async def start_metrics(config: Config, balancer: Balancer) -> MetricsServer | None:
    """Serves /metrics from the event loop (timeouts and a connection cap:
    lbserver/metrics_server.py); ListenError when its address cannot be
    listened on."""
    if config.metrics_listen in ("", "off"):
        return None
    host, port = parse_host_port("metrics_listen", config.metrics_listen)
    try:
        server = await start_metrics_server(_unbracketed(host) or "0.0.0.0", port, REGISTRY)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ListenError("metrics_listen", config.metrics_listen, reason) from None
    metrics.register_balancer(balancer, REGISTRY)
    return server


def tune_gc() -> None:
    """Freezes what startup allocated (modules, config: never garbage) out of
    every later collection, and collects less often (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(config: Config) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully."""
    running = await start(config)
    try:
        metrics_server = await start_metrics(config, running.balancer)
    except BaseException:
        await running.stop(grace=0)
        raise
    tune_gc()
    log.info(
        "lbserver serving",
        listen=config.listen,
        port=running.port,
        metrics_port=metrics_server.port if metrics_server is not None else None,
        heartbeat_interval=config.heartbeat_interval,
        default_ttl=config.default_ttl,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", grace=config.shutdown_grace)
    await running.stop()
    if metrics_server is not None:
        await metrics_server.close()
    log.info("stopped")
