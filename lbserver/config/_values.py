"""The value types of the options: how a YAML or environment value becomes
the option's type, and what each type looks like in JSON Schema.

Every conversion error is a `PydanticCustomError` of type `lbserver`, whose
message is final: the model turns it into a ConfigError naming the option
(`_errors.py`). Bounds and enum-like choices are declared on the fields and
checked by pydantic."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeGuard, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema
from pydantic_settings import NoDecode

from lbserver.addresses import parse_listen_address
from lbserver.discovery import CPU_LIMIT, ScrapeSettings, WatchedService
from lbserver.domain.publish import EmptyServicePolicy as EmptyServicePolicy
from lbserver.errors import ConfigError, InvalidValueError
from lbserver.logs import LogFormat
from lbserver.logs import LogLevel as LogLevel

# Upper bounds the code can honour: gRPC channel arguments are C ints, and a
# google.protobuf.Duration (heartbeat intervals, TTLs, the stats interval) holds
# at most about 292 years of nanoseconds; a day is more than any of them needs.
MAX_DURATION = 86_400.0
MAX_MESSAGE_BYTES = 2**31 - 1
MAX_SERVICES = 100_000
MAX_BACKENDS_PER_SERVICE = 100_000
MAX_STREAMS = 1_000_000
MAX_LIST_LENGTH = 10_000

# The error type of every message written here (the model keeps it as is).
ERROR_TYPE = "lbserver"


def problem(text: str) -> PydanticCustomError:
    # The text goes through the context: it may hold braces (a mapping).
    return PydanticCustomError(ERROR_TYPE, "{problem}", {"problem": text})


# --- durations --------------------------------------------------------------

DURATION_PATTERN = r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$"
_DURATION = re.compile(DURATION_PATTERN)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def seconds(value: Any) -> float:
    """3, 2.5, "2.5", "500ms", "3s", "2m", "1h" → seconds."""
    if isinstance(value, bool):
        raise problem(f"expected seconds, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise problem(f"expected seconds like 3, 2.5s or 500ms, got {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class _Seconds:
    """A float that may be written with a unit; in JSON Schema a number or a
    string of that pattern (the field's bounds apply to the number)."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(seconds, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        number = handler(schema)
        return {**number, "type": ["number", "string"], "pattern": DURATION_PATTERN}


Duration = Annotated[float, _Seconds()]
# The two kinds of duration options: those where 0 disables something, and
# the others.
# (The bounds go before the unit parser, or JSON Schema misses them.)
Seconds = Annotated[float, Field(ge=0, le=MAX_DURATION), _Seconds()]
PositiveSeconds = Annotated[float, Field(gt=0, le=MAX_DURATION), _Seconds()]


def is_duration(metadata: list[Any]) -> bool:
    """Whether a field with this pydantic metadata is a Duration."""
    return any(isinstance(item, _Seconds) for item in metadata)


# --- scalars ----------------------------------------------------------------


def _whole_number(value: Any) -> int:
    if isinstance(value, bool) or not re.fullmatch(r"-?\d+", str(value).strip()):
        raise problem(f"expected a whole number, got {value!r}")
    return int(str(value).strip())


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise problem(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise problem(f"expected a number, got {value!r}") from None


def _string(value: Any) -> str:
    # YAML reads `listen: 8080` as a number; the option is still the text.
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise problem(f"expected a string, got {value!r}")
    return str(value)


Int = Annotated[int, BeforeValidator(_whole_number)]
Float = Annotated[float, BeforeValidator(_number)]
Str = Annotated[str, BeforeValidator(_string)]


TlsClientAuth = Literal["registry", "all"]
NameRule = Literal["exact", "host", "first_label"]
EMPTY_SERVICE_POLICIES: tuple[str, ...] = get_args(EmptyServicePolicy)
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)


# --- addresses --------------------------------------------------------------


def parse_host_port(option: str, value: str) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT of an address to listen on (port 0: any free
    port), the host as written (with brackets); ConfigError otherwise."""
    try:
        return parse_listen_address(value)
    except InvalidValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def _host_port(value: str) -> tuple[str, int]:
    try:
        return parse_listen_address(value)
    except InvalidValueError as exc:
        raise problem(str(exc)) from None


def _address(value: str) -> str:
    _host_port(value)
    return value


def _address_or_off(value: str) -> str:
    return value if value in ("", "off") else _address(value)


def _address_or_empty(value: str) -> str:
    return value if value == "" else _address(value)


Address = Annotated[Str, AfterValidator(_address)]
AddressOrOff = Annotated[Str, AfterValidator(_address_or_off)]
AddressOrEmpty = Annotated[Str, AfterValidator(_address_or_empty)]


# --- lists and mappings -----------------------------------------------------


def _names(value: Any) -> Any:
    """`exact, host` (the environment) or a list → a tuple of stripped names."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise problem(f"expected a list, got {value!r}")
    return tuple(str(item).strip() for item in items if str(item).strip())


def _pairs(value: Any) -> dict[str, Any]:
    """`NAME=SERVICE[,NAME=SERVICE]` (the environment) or a mapping."""
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, mapped = item.partition("=")
            if not sep or not key.strip() or not mapped.strip():
                raise problem(f"expected NAME=SERVICE[,NAME=SERVICE], got {item!r}")
            pairs[key.strip()] = mapped.strip()
        return pairs
    if not isinstance(value, Mapping):
        raise problem(f"expected a mapping, got {value!r}")
    return {str(key): item for key, item in value.items()}


def _frozen(value: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(value)


NameRules = Annotated[tuple[NameRule, ...], NoDecode, BeforeValidator(_names)]
Aliases = Annotated[Mapping[str, Str], NoDecode, BeforeValidator(_pairs), AfterValidator(_frozen)]
SubsetSizes = Annotated[
    Mapping[str, Annotated[int, Field(ge=1), BeforeValidator(_whole_number)]],
    NoDecode,
    BeforeValidator(_pairs),
    AfterValidator(_frozen),
]


# --- Kubernetes discovery ---------------------------------------------------

WatchMode = Literal["kubernetes", "both"]
_WATCH_KEYS = ("service", "namespace", "kubernetes_service", "port_name", "mode", "scrape")
_SCRAPE_KEYS = (
    "port",
    "path",
    "interval",
    "timeout",
    "cpus",
    "cpu_metric",
    "requests_metric",
    "errors_metric",
    "inflight_metric",
)
# A Kubernetes port name (IANA_SVC_NAME): at most 15 characters, lowercase
# letters, digits and inner dashes, at least one letter. One character is not
# taken: a stray letter in a port setting has always been refused as a typo.
_PORT_NAME_SHAPE = "^[a-z0-9][-a-z0-9]{0,13}[a-z0-9]$"  # RE2 (helm's schema check): no lookarounds
_PORT_NAME = re.compile(rf"(?!.*--)(?=.*[a-z]){_PORT_NAME_SHAPE}")
WATCH_ENTRY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "service": {
            "type": "string",
            "description": "the name clients ask the balancer for",
            "minLength": 1,
        },
        "namespace": {
            "type": "string",
            "description": "namespace of the Service (default: default)",
            "minLength": 1,
        },
        "kubernetes_service": {
            "type": "string",
            "description": "the Kubernetes Service (default: service)",
            "minLength": 1,
        },
        "port_name": {"type": "string", "description": "the Service port, by name"},
        "mode": {"enum": list(get_args(WatchMode))},
        "scrape": {
            "type": "object",
            "description": (
                "the balancer scrapes every ready endpoint's Prometheus endpoint for its "
                "load (pods without a registrar sidecar)"
            ),
            "additionalProperties": False,
            "properties": {
                "port": {
                    "type": ["integer", "string"],
                    "minimum": 1,
                    "maximum": 65535,
                    "pattern": _PORT_NAME_SHAPE,
                    "description": (
                        "the targets' Prometheus port: a number, or the name of a "
                        "container port of each pod (needs RBAC get on pods)"
                    ),
                },
                "path": {"type": "string", "pattern": "^/", "description": "default /metrics"},
                "interval": {
                    "type": ["number", "string"],
                    "description": "seconds between scrapes of a target (default 10)",
                },
                "timeout": {
                    "type": ["number", "string"],
                    "description": "seconds one scrape may take (default 2)",
                },
                "cpus": {
                    "type": ["number", "string"],
                    "exclusiveMinimum": 0,
                    "pattern": "^limit$",
                    "description": (
                        "CPUs each pod may use (default 1), or 'limit': the CPU limit of "
                        "the container serving the port (needs RBAC get on pods; 1 when "
                        "it has none)"
                    ),
                },
                "cpu_metric": {
                    "type": ["string", "null"],
                    "description": "counter of CPU seconds (default process_cpu_seconds_total)",
                },
                "requests_metric": {"type": ["string", "null"], "description": "request counter"},
                "errors_metric": {"type": ["string", "null"], "description": "error counter"},
                "inflight_metric": {
                    "type": ["string", "null"],
                    "description": "gauge of requests in progress",
                },
            },
            "required": ["port"],
        },
    },
    "required": ["service"],
}
assert tuple(WATCH_ENTRY_SCHEMA["properties"]) == _WATCH_KEYS


def _watched_services(value: Any) -> tuple[WatchedService, ...]:
    """A list of {service, namespace, kubernetes_service, port_name, mode};
    in the environment, the same list as JSON."""
    if isinstance(value, tuple) and all(isinstance(item, WatchedService) for item in value):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise problem(f"expected a JSON list of services: {exc}") from None
    if not isinstance(value, list):
        raise problem(f"expected a list of services, got {value!r}")
    watched = [_watched_service(index, item) for index, item in enumerate(value)]
    names = [w.service for w in watched]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise problem(f"services listed twice: {duplicates}")
    return tuple(watched)


def _watched_service(index: int, item: Any) -> WatchedService:
    def fail(text: str) -> PydanticCustomError:
        # "[index]: ..." follows the option's name without a colon (_errors.py).
        return problem(f"[{index}]: {text}")

    if not isinstance(item, dict):
        raise fail(f"expected a mapping, got {item!r}")
    unknown = sorted(set(item) - set(_WATCH_KEYS))
    if unknown:
        raise fail(f"unknown keys {unknown}; known: {', '.join(_WATCH_KEYS)}")
    service = str(item.get("service", "")).strip()
    if not service:
        raise fail("'service' is required")
    mode = str(item.get("mode", "both"))
    if mode not in get_args(WatchMode):
        raise fail(f"mode must be 'kubernetes' or 'both', not {mode!r}")
    scrape = item.get("scrape")
    if scrape is not None and mode != "kubernetes":
        # In 'both' the registrars' heartbeats carry the load.
        raise fail("scrape needs mode 'kubernetes' (in 'both' the heartbeats carry the load)")
    return WatchedService(
        service=service,
        namespace=str(item.get("namespace", "default")),
        kubernetes_service=str(item.get("kubernetes_service", service)),
        port_name=str(item.get("port_name", "")),
        mode=mode,  # type: ignore[arg-type]
        scrape=None if scrape is None else _scrape_settings(fail, scrape),
    )


def _scrape_settings(fail: Callable[[str], PydanticCustomError], item: Any) -> ScrapeSettings:
    """A `scrape` block: {port, path, interval, timeout, cpus, *_metric}."""
    if not isinstance(item, dict):
        raise fail(f"scrape: expected a mapping, got {item!r}")
    unknown = sorted(set(item) - set(_SCRAPE_KEYS))
    if unknown:
        raise fail(f"scrape: unknown keys {unknown}; known: {', '.join(_SCRAPE_KEYS)}")
    if "port" not in item:
        raise fail("scrape: 'port' is required (the targets' Prometheus port)")
    defaults = ScrapeSettings(port=1)
    raw_port, raw_cpus = item.get("port"), item.get("cpus", defaults.cpus)
    try:
        port: int | str = raw_port if _is_port_name(raw_port) else _whole_number(raw_port)
        interval = seconds(item.get("interval", defaults.interval))
        timeout = seconds(item.get("timeout", defaults.timeout))
        cpus: float | Literal["limit"] = CPU_LIMIT if raw_cpus == CPU_LIMIT else _number(raw_cpus)
    except PydanticCustomError as exc:
        raise fail(f"scrape: {exc.message()}") from None
    path = str(item.get("path", defaults.path))
    if isinstance(port, int) and not 1 <= port <= 65535:
        raise fail(f"scrape: port must be in 1-65535 or a port name, not {port}")
    if not path.startswith("/"):
        raise fail(f"scrape: path must start with '/', not {path!r}")
    if not (0 < timeout <= interval <= MAX_DURATION):
        raise fail("scrape: needs 0 < timeout <= interval")
    if cpus != CPU_LIMIT and not (math.isfinite(cpus) and cpus > 0):
        raise fail(f"scrape: cpus must be a number > 0 or 'limit', not {cpus}")
    # The registrar's selector syntax, parsed by the registrar's parser
    # (imported here: the registrar package loads grpcio).
    from lbserver.registrar import parse_selector

    metrics: dict[str, str | None] = {}
    for key in ("cpu_metric", "requests_metric", "errors_metric", "inflight_metric"):
        value = item.get(key, getattr(defaults, key))
        metrics[key] = None if value is None else str(value)
    for key, spec in metrics.items():
        if spec is not None:
            try:
                parse_selector(spec)
            except ValueError as err:
                raise fail(f"scrape: {key}: {err}") from None
    return ScrapeSettings(
        port=port, path=path, interval=interval, timeout=timeout, cpus=cpus, **metrics
    )


def _is_port_name(value: Any) -> TypeGuard[str]:
    """A port given by name; a string of digits is still a number."""
    if not isinstance(value, str) or re.fullmatch(r"\s*-?\d+\s*", value):
        return False
    if not _PORT_NAME.match(value):
        raise problem(
            "expected a whole number or a port name (2-15 of a-z, 0-9 and inner '-', "
            f"with a letter), got {value!r}"
        )
    return True


WatchedServices = Annotated[
    tuple[WatchedService, ...],
    NoDecode,
    BeforeValidator(_watched_services),
    WithJsonSchema({"type": "array", "items": WATCH_ENTRY_SCHEMA}),
]
