"""`Config`: every option of `lbserver serve`, its type, default, bounds and
help text, and the checks that involve several options. The help texts are
the configuration reference (docs/configuration.md) and the descriptions in
the chart's values schema; scripts/gen-config-docs writes both."""

from __future__ import annotations

from typing import Any, cast

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from lbserver.config._errors import config_error
from lbserver.config._values import (
    MAX_BACKENDS_PER_SERVICE,
    MAX_LIST_LENGTH,
    MAX_MESSAGE_BYTES,
    MAX_SERVICES,
    MAX_STREAMS,
    Address,
    AddressOrEmpty,
    AddressOrOff,
    Aliases,
    EmptyServicePolicy,
    Float,
    Int,
    LogLevel,
    NameRule,
    NameRules,
    PositiveSeconds,
    Seconds,
    Str,
    SubsetSizes,
    TlsClientAuth,
    WatchedServices,
    is_duration,
    problem,
)
from lbserver.domain.naming import RULES
from lbserver.logs import LogFormat
from lbserver.xds import Localities as XdsLocalities

ENV_PREFIX = "LBSERVER_"


class Config(BaseSettings):
    """The balancer's configuration, immutable. `Config(option=value, ...)`
    takes values as given (nothing from the environment); `load_config`
    layers the file, the environment and flags. A bad value is a
    ConfigError naming the option."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        validate_default=True,
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error(exc, type(self).model_fields) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the keyword arguments: load_config layers the file, the
        # environment and flags itself, so a message can say where a bad value
        # came from, and a test's Config() never depends on the environment.
        return (init_settings,)

    listen: Address = Field(
        "0.0.0.0:11810",
        description="HOST:PORT for gRPC: grpclb, Registry, Admin, health and reflection.",
    )
    metrics_listen: AddressOrOff = Field(
        "0.0.0.0:11811",
        description="HOST:PORT for Prometheus /metrics; empty or 'off' disables it.",
    )
    heartbeat_interval: PositiveSeconds = Field(
        3.0, description="Seconds between heartbeats that the balancer asks registrars to keep."
    )
    default_ttl: PositiveSeconds = Field(
        10.0,
        description=(
            "Seconds a backend stays listed after its last heartbeat, unless it asks otherwise."
        ),
    )
    min_ttl: PositiveSeconds = Field(
        1.0, description="Smallest TTL a heartbeat may ask for (seconds)."
    )
    max_ttl: PositiveSeconds = Field(
        60.0, description="Largest TTL a heartbeat may ask for (seconds)."
    )
    client_stats_interval: Seconds = Field(
        10.0,
        description=(
            "Seconds between the ClientStats reports clients are asked for; 0 disables them "
            "(gRPC C-core raises anything under 1 s to 1 s)."
        ),
    )
    startup_grace: Seconds = Field(
        5.0,
        description=(
            "Seconds after start during which an unknown service gets no fallback_response, so "
            "clients of a restarted balancer keep their lists until registrars are back."
        ),
    )
    empty_service: EmptyServicePolicy = Field(
        "fallback",
        description=(
            "What a client of an unknown or empty service gets: 'fallback' (fallback_response: "
            "use its resolver addresses) or 'hold' (nothing: keep its last list)."
        ),
    )
    max_list_length: Int = Field(
        100,
        ge=1,
        le=MAX_LIST_LENGTH,
        description=(
            "Most entries in a server list, 1-10000; weights are rounded to fit "
            "(largest remainder)."
        ),
    )
    error_penalty: Float = Field(
        1.0,
        ge=0,
        description=(
            "How much one error per request counts as utilization in the load-aware weight "
            "qps / (utilization + eps/qps * error_penalty) (gRFC A58)."
        ),
    )
    load_smoothing: Float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "Weight of the newest load report in a backend's moving average, in (0, 1]; "
            "1 disables smoothing."
        ),
    )
    blackout: Seconds = Field(
        10.0,
        description=(
            "Seconds after a backend's first load report during which it gets the median weight "
            "(early reports of a starting process are not representative)."
        ),
    )
    report_expiry: PositiveSeconds = Field(
        15.0,
        description=(
            "Seconds after which a backend's last load report no longer counts (median weight)."
        ),
    )
    slow_start: Seconds = Field(
        0.0,
        description=(
            "Seconds over which a newly registered backend ramps from 10% to its full weight "
            "(JVM warm-up); 0 disables the ramp."
        ),
    )
    max_weight_ratio: Float = Field(
        10.0,
        ge=1,
        description="Load-aware weights are clamped to [median / ratio, median * ratio].",
    )
    share_threshold: Float = Field(
        0.02,
        ge=0,
        lt=1,
        description=(
            "Hysteresis: with unchanged membership, a new list is pushed only when some "
            "backend's share moves by more than this fraction."
        ),
    )
    share_settle_time: Seconds = Field(
        10.0,
        description=(
            "A list that differs from the pushed one by less than share_threshold is pushed "
            "anyway once the difference has lasted this many seconds."
        ),
    )
    min_push_interval: Seconds = Field(
        1.0,
        description=(
            "Seconds between two weight-only list pushes per service; joins, leaves and drains "
            "are pushed at once."
        ),
    )
    shed_utilization: Float = Field(
        0.0,
        ge=0,
        description=(
            "Overload shedding: when every backend of a service reports CPU utilization above "
            "this, the list carries drop entries for the excess share; 0 disables it."
        ),
    )
    max_drop_share: Float = Field(
        0.5,
        ge=0,
        lt=1,
        description="The largest share of calls overload shedding may drop, in [0, 1).",
    )
    subset_sizes: SubsetSizes = Field(
        {},
        description=(
            "Deterministic subsetting: {service: N} gives each client of the service N of its "
            "backends, every backend serving the same number of clients within one; N from 1 "
            "to max_backends_per_service."
        ),
    )
    name_rules: NameRules = Field(
        cast(tuple[NameRule, ...], RULES),
        min_length=1,
        description=(
            "How a client's name maps to a service, tried in order: exact, host (without port), "
            "first_label (first DNS label of the host)."
        ),
    )
    name_aliases: Aliases = Field(
        {}, description="Extra names for services: {client-side name: service}."
    )
    auth_token_file: Str = Field(
        "",
        description=(
            "File of the tokens Registry and Admin calls must present as "
            "'authorization: Bearer <token>', one a line: the current token first, then previous "
            "ones still accepted during a rotation. Re-read when it changes (checked every "
            "second), no restart needed; empty: no token required."
        ),
    )
    auth_token: Str = Field(
        "",
        description=(
            "The token itself (several on separate lines), for setting it through "
            "LBSERVER_AUTH_TOKEN; read once at start; auth_token_file wins."
        ),
    )
    tls_cert_file: Str = Field(
        "", description="Server certificate chain (PEM); with tls_key_file turns on TLS."
    )
    tls_key_file: Str = Field("", description="Private key (PEM) of tls_cert_file.")
    tls_client_ca_file: Str = Field(
        "",
        description=(
            "CA bundle (PEM) for client certificates: with it, Registry and Admin calls need a "
            "certificate signed by this CA (mTLS)."
        ),
    )
    registry_listen: AddressOrEmpty = Field(
        "",
        description=(
            "HOST:PORT for Registry and Admin when tls_client_auth is 'registry': that port "
            "requires client certificates; the main port keeps BalanceLoad open."
        ),
    )
    tls_client_auth: TlsClientAuth = Field(
        "registry",
        description=(
            "Which calls need a client certificate when tls_client_ca_file is set: 'registry' "
            "(Registry and Admin, served on registry_listen; BalanceLoad stays open to clients "
            "on the main port) or 'all' (every call on the main port)."
        ),
    )
    max_services: Int = Field(
        1000,
        ge=1,
        le=MAX_SERVICES,
        description="Most services, 1-100000; heartbeats for more are refused.",
    )
    max_backends_per_service: Int = Field(
        1000,
        ge=1,
        le=MAX_BACKENDS_PER_SERVICE,
        description="Most backends in one service, 1-100000; heartbeats for more are refused.",
    )
    max_streams: Int = Field(
        20_000,
        ge=1,
        le=MAX_STREAMS,
        description=(
            "Most concurrent BalanceLoad and xDS (ADS) streams, counted together, that sent their "
            "initial request, 1-1000000; a stream's initial request beyond it is refused with "
            "RESOURCE_EXHAUSTED."
        ),
    )
    max_streams_per_peer: Int = Field(
        1000,
        ge=1,
        le=MAX_STREAMS,
        description=(
            "Most concurrent BalanceLoad and xDS streams from one IP address, waiting or not, "
            "1-1000000 "
            "(HeartbeatStreams are counted apart, against the same number); a new stream over "
            "it ends the address's oldest stream still waiting for its initial request, or is "
            "refused with RESOURCE_EXHAUSTED. Clients behind one NAT or proxy share one address."
        ),
    )
    max_pending_streams: Int = Field(
        1000,
        ge=1,
        le=MAX_STREAMS,
        description=(
            "Most BalanceLoad and xDS streams waiting for their initial request at once, "
            "1-1000000; one "
            "more ends the oldest waiting one (RESOURCE_EXHAUSTED). Waiting streams hold no "
            "max_streams slot."
        ),
    )
    client_stats_rate_per_stream: Float = Field(
        2.0,
        ge=0,
        description=(
            "Messages per second a BalanceLoad stream may send after its initial request "
            "(ClientStats reports), bursts of 10; a stream sending more is ended with "
            "RESOURCE_EXHAUSTED. At least 1/client_stats_interval; 0 disables the limit."
        ),
    )
    xds_max_resource_names: Int = Field(
        1000,
        ge=1,
        le=MAX_STREAMS,
        description=(
            "Most resource names one xDS (ADS) request may subscribe to, per resource type, "
            "1-1000000; a request naming more ends its stream with RESOURCE_EXHAUSTED."
        ),
    )
    xds_request_rate_per_stream: Float = Field(
        10.0,
        ge=0,
        description=(
            "Requests per second an xDS stream may send besides its ACK or NACK of each response "
            "(subscription changes, stale or repeated requests), bursts of 50; a stream sending "
            "more is ended with RESOURCE_EXHAUSTED. 0 disables the limit."
        ),
    )
    xds_localities: XdsLocalities = Field(
        "backend",
        description=(
            "How xDS endpoint lists are laid out: 'backend' (every backend its own locality "
            "weighted by its share, which gRPC's xDS clients honour; the endpoint carries the "
            "same weight, which Envoy honours) or 'zone' (one locality per registration zone "
            "weighted by its backends' sum; gRPC clients then split a zone evenly, Envoy by "
            "endpoint weight)."
        ),
    )
    max_message_bytes: Int = Field(
        1_048_576,
        ge=4096,
        le=MAX_MESSAGE_BYTES,
        description=(
            "Largest request message BalanceLoad, xDS, Registry and Admin accept, in bytes: "
            "4096 to 2147483647 (2 GiB - 1, gRPC's limit); a larger one is refused with "
            "RESOURCE_EXHAUSTED naming this option, or, beyond twice this size, by gRPC itself."
        ),
    )
    heartbeat_rate_per_peer: Float = Field(
        50.0,
        ge=0,
        description=(
            "Registry calls and streamed heartbeats per second one peer IP may make (bursts of "
            "the same size); 0 disables the limit. Registrars behind one NAT share it."
        ),
    )
    kubernetes_services: WatchedServices = Field(
        (),
        description=(
            "Services whose membership (also) comes from Kubernetes EndpointSlices: a list of "
            "{service, namespace, kubernetes_service, port_name, mode, scrape} with mode "
            "'kubernetes' (ready endpoints are the members) or 'both' (heartbeats accepted only "
            "from ready endpoints); scrape {port, path, interval, timeout, cpus, cpu_metric, "
            "requests_metric, errors_metric, inflight_metric}: the balancer reads each ready "
            "endpoint's load from its Prometheus endpoint (members without a registrar); in the "
            "environment, the same list as JSON."
        ),
    )
    kubeconfig: Str = Field(
        "",
        description=(
            "kubeconfig file for Kubernetes discovery; empty: the in-cluster service account "
            "(or $KUBECONFIG / ~/.kube/config outside a cluster)."
        ),
    )
    initial_request_timeout: PositiveSeconds = Field(
        2.0,
        description=(
            "Seconds a BalanceLoad stream may take to send its initial request (grpclb clients "
            "send it with the call); a stream that takes longer ends with DEADLINE_EXCEEDED."
        ),
    )
    shutdown_grace: Seconds = Field(
        5.0,
        description=(
            "Seconds open calls get to finish on SIGTERM/SIGINT before they are cancelled; "
            "BalanceLoad, HeartbeatStream and health Watch streams are ended at once (clients, "
            "registrars and health checkers reconnect), so the stop takes only as long as the "
            "open unary calls."
        ),
    )
    log_level: LogLevel = Field("info", description="One of debug, info, warning, error.")
    log_format: LogFormat = Field(
        "auto", description="auto (JSON unless stderr is a terminal), json or console."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        """The checks that involve more than one option."""
        _require(
            "default_ttl",
            self.min_ttl <= self.default_ttl <= self.max_ttl,
            f"must lie between min_ttl ({self.min_ttl}) and max_ttl ({self.max_ttl})",
        )
        _require(
            "heartbeat_interval",
            self.heartbeat_interval < self.default_ttl,
            f"must be shorter than default_ttl ({self.default_ttl}), or backends flap",
        )
        _require(
            "client_stats_rate_per_stream",
            self.client_stats_rate_per_stream == 0
            or self.client_stats_interval == 0
            or self.client_stats_rate_per_stream * self.client_stats_interval >= 1 - 1e-9,
            f"must be at least 1/client_stats_interval ({1 / (self.client_stats_interval or 1):g} "
            "per second), or clients reporting as asked are cut off; 0 disables the limit",
        )
        bad = {
            k: v
            for k, v in self.subset_sizes.items()
            if not 1 <= v <= self.max_backends_per_service
        }
        _require(
            "subset_sizes",
            not bad,
            f"sizes must be 1-{self.max_backends_per_service} (max_backends_per_service), "
            f"got {bad}",
        )
        self._consistent_tls()
        return self

    def _consistent_tls(self) -> None:
        # grpcio either requires client certificates for every call on a port
        # or does not ask for them: Registry and Admin get their own port when
        # only they need one.
        if not self.tls_cert_file and not self.tls_key_file and self.tls_client_ca_file:
            raise problem("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise problem("tls_cert_file and tls_key_file go together")
        if self.separate_registry and not self.registry_listen:
            raise problem(
                "tls_client_ca_file with tls_client_auth=registry needs registry_listen: "
                "Registry and Admin then get their own mTLS port"
            )
        if self.registry_listen and not self.separate_registry:
            raise problem(
                "registry_listen is only used with tls_client_ca_file and tls_client_auth=registry"
            )

    def replace(self, **changes: Any) -> Config:
        """A copy with some options changed, validated like any Config."""
        return Config(**{**dict(self), **changes})

    @property
    def separate_registry(self) -> bool:
        """Whether Registry and Admin listen on registry_listen, with mTLS."""
        return bool(self.tls_client_ca_file) and self.tls_client_auth == "registry"


def _require(option: str, ok: bool, text: str) -> None:
    if not ok:
        raise problem(f"{option}: {text}")


def option_names() -> list[str]:
    return list(Config.model_fields)


def option_help() -> dict[str, str]:
    return {name: field.description or "" for name, field in Config.model_fields.items()}


# The options that are durations in seconds (all bounded by MAX_DURATION).
DURATION_OPTIONS = tuple(
    name for name, field in Config.model_fields.items() if is_duration(field.metadata)
)
