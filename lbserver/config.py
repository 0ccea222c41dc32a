"""Balancer configuration: embedded defaults, then an optional YAML file, then
`LBSERVER_*` environment variables, then command-line flags (last wins).

Every option is a field of `Config`; the field's metadata holds its help text,
which the configuration reference in docs/ is checked against.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from lbserver.discovery import WatchedService
from lbserver.domain.naming import RULES
from lbserver.errors import ConfigError
from lbserver.logs import LOG_LEVELS

ENV_PREFIX = "LBSERVER_"
EMPTY_SERVICE_POLICIES = ("fallback", "hold")
LOG_FORMATS = ("auto", "json", "console")

# `LBSERVER_*` variables that are not options: the config file's path, and the
# token `lbserver register` and `lbserver status` send.
NON_OPTION_VARIABLES = frozenset({f"{ENV_PREFIX}CONFIG", f"{ENV_PREFIX}TOKEN"})

# The service-link variables the kubelet injects for every Service in a pod's
# namespace (pkg/kubelet/envvars), NAME being the Service's name upper-cased
# with '-' as '_' (a Service `lbserver` or `lbserver-*` gives LBSERVER_...):
# NAME_SERVICE_HOST, NAME_SERVICE_PORT, NAME_SERVICE_PORT_<PORT NAME> (named
# ports; an IANA service name has a letter), NAME_PORT, and per port
# NAME_PORT_<n>_<TCP|UDP|SCTP>[_PROTO|_PORT|_ADDR]. No option name has this
# shape (a unit test checks every one).
_SERVICE_LINK = re.compile(
    r"[A-Z][A-Z0-9_]*_(?:"
    r"SERVICE_HOST"
    r"|SERVICE_PORT(?:_[A-Z0-9_]*[A-Z][A-Z0-9_]*)?"
    r"|PORT"
    r"|PORT_[1-9][0-9]{0,4}_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?"
    r")"
)

# Upper bounds the code can honour: gRPC channel arguments are C ints, and a
# google.protobuf.Duration (heartbeat intervals, TTLs, the stats interval) holds
# at most about 292 years of nanoseconds; a day is more than any of them needs.
MAX_DURATION = 86_400.0
MAX_MESSAGE_BYTES = 2**31 - 1
MAX_SERVICES = 100_000
MAX_BACKENDS_PER_SERVICE = 100_000
MAX_STREAMS = 1_000_000
MAX_LIST_LENGTH = 10_000


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, (dict, list, tuple)):
        frozen = MappingProxyType(dict(default)) if isinstance(default, dict) else tuple(default)
        return field(default_factory=lambda: frozen, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    listen: str = _opt(
        "0.0.0.0:11810",
        "HOST:PORT for gRPC: grpclb, Registry, Admin, health and reflection.",
    )
    metrics_listen: str = _opt(
        "0.0.0.0:11811", "HOST:PORT for Prometheus /metrics; empty or 'off' disables it."
    )
    heartbeat_interval: float = _opt(
        3.0, "Seconds between heartbeats that the balancer asks registrars to keep."
    )
    default_ttl: float = _opt(
        10.0, "Seconds a backend stays listed after its last heartbeat, unless it asks otherwise."
    )
    min_ttl: float = _opt(1.0, "Smallest TTL a heartbeat may ask for (seconds).")
    max_ttl: float = _opt(60.0, "Largest TTL a heartbeat may ask for (seconds).")
    client_stats_interval: float = _opt(
        10.0,
        "Seconds between the ClientStats reports clients are asked for; 0 disables them "
        "(gRPC C-core raises anything under 1 s to 1 s).",
    )
    startup_grace: float = _opt(
        5.0,
        "Seconds after start during which an unknown service gets no fallback_response, so "
        "clients of a restarted balancer keep their lists until registrars are back.",
    )
    empty_service: str = _opt(
        "fallback",
        "What a client of an unknown or empty service gets: 'fallback' (fallback_response: "
        "use its resolver addresses) or 'hold' (nothing: keep its last list).",
    )
    max_list_length: int = _opt(
        100,
        "Most entries in a server list, 1-10000; weights are rounded to fit (largest remainder).",
    )
    error_penalty: float = _opt(
        1.0,
        "How much one error per request counts as utilization in the load-aware weight "
        "qps / (utilization + eps/qps * error_penalty) (gRFC A58).",
    )
    load_smoothing: float = _opt(
        0.5,
        "Weight of the newest load report in a backend's moving average, in (0, 1]; "
        "1 disables smoothing.",
    )
    blackout: float = _opt(
        10.0,
        "Seconds after a backend's first load report during which it gets the median weight "
        "(early reports of a starting process are not representative).",
    )
    report_expiry: float = _opt(
        15.0, "Seconds after which a backend's last load report no longer counts (median weight)."
    )
    slow_start: float = _opt(
        0.0,
        "Seconds over which a newly registered backend ramps from 10% to its full weight "
        "(JVM warm-up); 0 disables the ramp.",
    )
    max_weight_ratio: float = _opt(
        10.0, "Load-aware weights are clamped to [median / ratio, median * ratio]."
    )
    share_threshold: float = _opt(
        0.02,
        "Hysteresis: with unchanged membership, a new list is pushed only when some "
        "backend's share moves by more than this fraction.",
    )
    share_settle_time: float = _opt(
        10.0,
        "A list that differs from the pushed one by less than share_threshold is pushed "
        "anyway once the difference has lasted this many seconds.",
    )
    min_push_interval: float = _opt(
        1.0,
        "Seconds between two weight-only list pushes per service; joins, leaves and drains "
        "are pushed at once.",
    )
    shed_utilization: float = _opt(
        0.0,
        "Overload shedding: when every backend of a service reports CPU utilization above "
        "this, the list carries drop entries for the excess share; 0 disables it.",
    )
    max_drop_share: float = _opt(
        0.5, "The largest share of calls overload shedding may drop, in [0, 1)."
    )
    subset_sizes: Mapping[str, int] = _opt(
        {},
        "Deterministic subsetting: {service: N} gives each client of the service N of its "
        "backends, every backend serving the same number of clients within one; N from 1 "
        "to max_backends_per_service.",
    )
    name_rules: tuple[str, ...] = _opt(
        RULES,
        "How a client's name maps to a service, tried in order: exact, host (without port), "
        "first_label (first DNS label of the host).",
    )
    name_aliases: Mapping[str, str] = _opt(
        {}, "Extra names for services: {client-side name: service}."
    )
    auth_token_file: str = _opt(
        "",
        "File of the tokens Registry and Admin calls must present as "
        "'authorization: Bearer <token>', one a line: the current token first, then previous "
        "ones still accepted during a rotation. Re-read when it changes (checked every "
        "second), no restart needed; empty: no token required.",
    )
    auth_token: str = _opt(
        "",
        "The token itself (several on separate lines), for setting it through "
        "LBSERVER_AUTH_TOKEN; read once at start; auth_token_file wins.",
    )
    tls_cert_file: str = _opt("", "Server certificate chain (PEM); with tls_key_file turns on TLS.")
    tls_key_file: str = _opt("", "Private key (PEM) of tls_cert_file.")
    tls_client_ca_file: str = _opt(
        "",
        "CA bundle (PEM) for client certificates: with it, Registry and Admin calls need a "
        "certificate signed by this CA (mTLS).",
    )
    registry_listen: str = _opt(
        "",
        "HOST:PORT for Registry and Admin when tls_client_auth is 'registry': that port "
        "requires client certificates; the main port keeps BalanceLoad open.",
    )
    tls_client_auth: str = _opt(
        "registry",
        "Which calls need a client certificate when tls_client_ca_file is set: 'registry' "
        "(Registry and Admin, served on registry_listen; BalanceLoad stays open to clients "
        "on the main port) or 'all' (every call on the main port).",
    )
    max_services: int = _opt(1000, "Most services, 1-100000; heartbeats for more are refused.")
    max_backends_per_service: int = _opt(
        1000, "Most backends in one service, 1-100000; heartbeats for more are refused."
    )
    max_streams: int = _opt(
        20_000,
        "Most concurrent BalanceLoad streams that sent their initial request, 1-1000000; a "
        "stream's initial request beyond it is refused with RESOURCE_EXHAUSTED.",
    )
    max_streams_per_peer: int = _opt(
        1000,
        "Most concurrent BalanceLoad streams from one IP address, waiting or not, 1-1000000 "
        "(HeartbeatStreams are counted apart, against the same number); a new stream over "
        "it ends the address's oldest stream still waiting for its initial request, or is "
        "refused with RESOURCE_EXHAUSTED. Clients behind one NAT or proxy share one address.",
    )
    max_pending_streams: int = _opt(
        1000,
        "Most BalanceLoad streams waiting for their initial request at once, 1-1000000; one "
        "more ends the oldest waiting one (RESOURCE_EXHAUSTED). Waiting streams hold no "
        "max_streams slot.",
    )
    client_stats_rate_per_stream: float = _opt(
        2.0,
        "Messages per second a BalanceLoad stream may send after its initial request "
        "(ClientStats reports), bursts of 10; a stream sending more is ended with "
        "RESOURCE_EXHAUSTED. At least 1/client_stats_interval; 0 disables the limit.",
    )
    max_message_bytes: int = _opt(
        1_048_576,
        "Largest request message BalanceLoad, Registry and Admin accept, in bytes: 4096 to "
        "2147483647 (2 GiB - 1, gRPC's limit); a larger one is refused with "
        "RESOURCE_EXHAUSTED naming this option, or, beyond twice this size, by gRPC itself.",
    )
    heartbeat_rate_per_peer: float = _opt(
        50.0,
        "Registry calls and streamed heartbeats per second one peer IP may make (bursts of "
        "the same size); 0 disables the limit. Registrars behind one NAT share it.",
    )
    kubernetes_services: tuple[WatchedService, ...] = _opt(
        (),
        "Services whose membership (also) comes from Kubernetes EndpointSlices: a list of "
        "{service, namespace, kubernetes_service, port_name, mode} with mode 'kubernetes' "
        "(ready endpoints are the members) or 'both' (heartbeats accepted only from ready "
        "endpoints); in the environment, the same list as JSON.",
    )
    kubeconfig: str = _opt(
        "",
        "kubeconfig file for Kubernetes discovery; empty: the in-cluster service account "
        "(or $KUBECONFIG / ~/.kube/config outside a cluster).",
    )
    initial_request_timeout: float = _opt(
        2.0,
        "Seconds a BalanceLoad stream may take to send its initial request (grpclb clients "
        "send it with the call); a stream that takes longer ends with DEADLINE_EXCEEDED.",
    )
    shutdown_grace: float = _opt(
        5.0,
        "Seconds open calls get to finish on SIGTERM/SIGINT before they are cancelled; "
        "BalanceLoad, HeartbeatStream and health Watch streams are ended at once (clients, "
        "registrars and health checkers reconnect), so the stop takes only as long as the "
        "open unary calls.",
    )
    log_level: str = _opt("info", "One of debug, info, warning, error.")
    log_format: str = _opt("auto", "auto (JSON unless stderr is a terminal), json or console.")

    def __post_init__(self) -> None:
        for name in ("listen",):
            parse_host_port(name, getattr(self, name))
        if self.registry_listen:
            parse_host_port("registry_listen", self.registry_listen)
        if self.metrics_listen not in ("", "off"):
            parse_host_port("metrics_listen", self.metrics_listen)
        for name in (
            "heartbeat_interval",
            "default_ttl",
            "min_ttl",
            "max_ttl",
            "initial_request_timeout",
            "report_expiry",
        ):
            _require(name, getattr(self, name) > 0, "must be > 0")
        for name in (
            "client_stats_interval",
            "startup_grace",
            "shutdown_grace",
            "error_penalty",
            "blackout",
            "slow_start",
            "shed_utilization",
            "share_settle_time",
            "min_push_interval",
        ):
            _require(name, getattr(self, name) >= 0, "must be >= 0")
        for name in DURATION_OPTIONS:
            _require(
                name,
                getattr(self, name) <= MAX_DURATION,
                f"must be at most {MAX_DURATION:g} seconds (1 day)",
            )
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
        for name, low, high in (
            ("max_list_length", 1, MAX_LIST_LENGTH),
            ("max_services", 1, MAX_SERVICES),
            ("max_backends_per_service", 1, MAX_BACKENDS_PER_SERVICE),
            ("max_streams", 1, MAX_STREAMS),
            ("max_streams_per_peer", 1, MAX_STREAMS),
            ("max_pending_streams", 1, MAX_STREAMS),
            ("max_message_bytes", 4096, MAX_MESSAGE_BYTES),
        ):
            _require(name, low <= getattr(self, name) <= high, f"must be {low}-{high}")
        _require("heartbeat_rate_per_peer", self.heartbeat_rate_per_peer >= 0, "must be >= 0")
        _require(
            "client_stats_rate_per_stream",
            math.isfinite(self.client_stats_rate_per_stream)
            and self.client_stats_rate_per_stream >= 0,
            "must be a finite number >= 0",
        )
        _require(
            "client_stats_rate_per_stream",
            self.client_stats_rate_per_stream == 0
            or self.client_stats_interval == 0
            or self.client_stats_rate_per_stream * self.client_stats_interval >= 1 - 1e-9,
            f"must be at least 1/client_stats_interval ({1 / (self.client_stats_interval or 1):g} "
            "per second), or clients reporting as asked are cut off; 0 disables the limit",
        )
        _require(
            "tls_client_auth",
            self.tls_client_auth in ("registry", "all"),
            "must be one of registry, all",
        )
        _require("load_smoothing", 0 < self.load_smoothing <= 1, "must be in (0, 1]")
        _require("max_weight_ratio", self.max_weight_ratio >= 1, "must be >= 1")
        _require("share_threshold", 0 <= self.share_threshold < 1, "must be in [0, 1)")
        _require("max_drop_share", 0 <= self.max_drop_share < 1, "must be in [0, 1)")
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
        _require(
            "empty_service",
            self.empty_service in EMPTY_SERVICE_POLICIES,
            f"must be one of {', '.join(EMPTY_SERVICE_POLICIES)}",
        )
        unknown = [r for r in self.name_rules if r not in RULES]
        _require(
            "name_rules",
            not unknown and bool(self.name_rules),
            f"must be a non-empty list of {', '.join(RULES)}; got {list(self.name_rules)}",
        )
        _require(
            "log_level", self.log_level in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}"
        )
        _require(
            "log_format", self.log_format in LOG_FORMATS, f"must be one of {', '.join(LOG_FORMATS)}"
        )


# The options that are durations in seconds (all bounded by MAX_DURATION).
DURATION_OPTIONS = (
    "heartbeat_interval",
    "default_ttl",
    "min_ttl",
    "max_ttl",
    "client_stats_interval",
    "startup_grace",
    "blackout",
    "report_expiry",
    "slow_start",
    "share_settle_time",
    "min_push_interval",
    "initial_request_timeout",
    "shutdown_grace",
)


def _require(option: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{option}: {problem}")


def parse_host_port(option: str, value: str) -> tuple[str, int]:
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(\d+)", value)
    if not match:
        raise ConfigError(f"{option}: expected HOST:PORT, got {value!r}")
    port = int(match.group(2))
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option}: port {port} is outside 0-65535")
    return match.group(1), port


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def option_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in dataclasses.fields(Config)}


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _coerce(option: str, value: Any, target: Any) -> Any:
    """Converts a YAML or environment value to the option's type."""
    if target is float:
        if isinstance(value, bool):
            raise ConfigError(f"{option}: expected seconds, got {value!r}")
        if isinstance(value, (int, float)):
            number = float(value)
        else:
            match = _DURATION.match(str(value))
            if not match:
                raise ConfigError(
                    f"{option}: expected seconds like 3, 2.5s or 500ms, got {value!r}"
                )
            number = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if not math.isfinite(number):
            raise ConfigError(f"{option}: must be finite")
        return number
    if target is int:
        if isinstance(value, bool) or not re.fullmatch(r"-?\d+", str(value).strip()):
            raise ConfigError(f"{option}: expected a whole number, got {value!r}")
        return int(str(value).strip())
    if target is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{option}: expected a string, got {value!r}")
        return str(value)
    if target == "tuple":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{option}: expected a list, got {value!r}")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if target == "watched_services":
        return _watched_services(option, value)
    if target == "int_mapping":
        raw = _coerce(option, value, "mapping")
        sizes: dict[str, int] = {}
        for key, item in raw.items():
            sizes[key] = _coerce(f"{option}[{key}]", item, int)
        return MappingProxyType(sizes)
    if target == "mapping":
        if isinstance(value, str):
            pairs: dict[str, str] = {}
            for item in filter(None, (part.strip() for part in value.split(","))):
                key, sep, mapped = item.partition("=")
                if not sep or not key.strip() or not mapped.strip():
                    raise ConfigError(
                        f"{option}: expected NAME=SERVICE[,NAME=SERVICE], got {item!r}"
                    )
                pairs[key.strip()] = mapped.strip()
            return MappingProxyType(pairs)
        if not isinstance(value, dict):
            raise ConfigError(f"{option}: expected a mapping, got {value!r}")
        return MappingProxyType({str(k): str(v) for k, v in value.items()})
    raise AssertionError(f"no coercion for {option}")


_WATCH_KEYS = ("service", "namespace", "kubernetes_service", "port_name", "mode")


def _watched_services(option: str, value: Any) -> tuple[WatchedService, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{option}: expected a JSON list of services: {exc}") from None
    if not isinstance(value, list):
        raise ConfigError(f"{option}: expected a list of services, got {value!r}")
    watched = []
    for index, item in enumerate(value):
        where = f"{option}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping, got {item!r}")
        unknown = sorted(set(item) - set(_WATCH_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known: {', '.join(_WATCH_KEYS)}")
        service = str(item.get("service", "")).strip()
        if not service:
            raise ConfigError(f"{where}: 'service' is required")
        mode = str(item.get("mode", "both"))
        if mode not in ("kubernetes", "both"):
            raise ConfigError(f"{where}: mode must be 'kubernetes' or 'both', not {mode!r}")
        watched.append(
            WatchedService(
                service=service,
                namespace=str(item.get("namespace", "default")),
                kubernetes_service=str(item.get("kubernetes_service", service)),
                port_name=str(item.get("port_name", "")),
                mode=mode,  # type: ignore[arg-type]
            )
        )
    names = [w.service for w in watched]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{option}: services listed twice: {duplicates}")
    return tuple(watched)


def _target(f: dataclasses.Field[Any]) -> Any:
    annotation = str(f.type)
    if annotation == "tuple[WatchedService, ...]":
        return "watched_services"
    if annotation.startswith("tuple"):
        return "tuple"
    if annotation == "Mapping[str, int]":
        return "int_mapping"
    if annotation.startswith("Mapping"):
        return "mapping"
    return {"float": float, "int": int, "str": str}[annotation]


def _similar_options(option: str) -> list[str]:
    """Option names close to a misspelt one, best first."""
    names = option_names()
    close = difflib.get_close_matches(option, names, n=3, cutoff=0.6)
    close += [name for name in names if name.split("_")[0] == option.split("_")[0]]
    return list(dict.fromkeys(close))[:3]


def _apply(values: dict[str, Any], source: Mapping[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in source.items():
        option = key.replace("-", "_")
        if option not in fields:
            close = _similar_options(option)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown option {key!r}{hint}")
        values[option] = _coerce(f"{where}: {option}", value, _target(fields[option]))


def is_kubernetes_service_link(name: str) -> bool:
    """Whether an environment variable's name has the shape of a service-link
    variable the kubelet injects (`LBSERVER_SERVICE_HOST`,
    `LBSERVER_PORT_11810_TCP_ADDR`, `LBSERVER_PROD_SERVICE_PORT_GRPCLB`, ...)."""
    return _SERVICE_LINK.fullmatch(name) is not None


def environment_options(environ: Mapping[str, str]) -> dict[str, str]:
    """The option values set by `LBSERVER_<OPTION>` variables, by option name.

    Kubernetes service links and the non-option variables (LBSERVER_CONFIG,
    LBSERVER_TOKEN) are skipped; any other `LBSERVER_*` variable is a typo
    that must not pass silently: ConfigError naming it as set, with a hint."""
    names = set(option_names())
    values: dict[str, str] = {}
    unknown: list[str] = []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NON_OPTION_VARIABLES:
            continue
        option = name[len(ENV_PREFIX) :].lower()
        if option in names:
            values[option] = value
        elif not is_kubernetes_service_link(name):
            close = [f"{ENV_PREFIX}{match.upper()}" for match in _similar_options(option)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            unknown.append(f"{name}: unknown option {option!r}{hint}")
    if unknown:
        raise ConfigError(f"environment variable {'; '.join(sorted(unknown))}")
    return values


def _read_yaml(path: str | os.PathLike[str]) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start} of the file)"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = _yaml_problem(exc, text)
        raise ConfigError(f"config file {path} is not valid YAML: {problem}") from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """A YAML error on one line, with 1-based line and column, without PyYAML's
    `in "<unicode string>"` (the caller names the file)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context:
            text += f" ({exc.context}"
            if exc.context_mark is not None:
                context = exc.context_mark
                text += f" at line {context.line + 1}, column {context.column + 1}"
            text += ")"
        return text
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line, column = before.count("\n") + 1, exc.position - before.rfind("\n")
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        return f"line {line}, column {column}: character {char!r}: {exc.reason}"
    return " ".join(str(exc).replace('in "<unicode string>", ', "").split())


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < file < LBSERVER_* environment < overrides (flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = path or environ.get(f"{ENV_PREFIX}CONFIG") or None
    if path is not None:
        document = _read_yaml(path)
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError(f"config file {path}: expected a mapping of options at the top")
        _apply(values, document, str(path))
    _apply(values, environment_options(environ), "environment LBSERVER_*")
    _apply(values, {k: v for k, v in (overrides or {}).items() if v is not None}, "flag")
    return Config(**values)
