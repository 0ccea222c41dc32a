"""Balancer configuration: embedded defaults, then an optional YAML file, then
`LBSERVER_*` environment variables, then command-line flags (last wins).

Every option is a field of the pydantic-settings model `Config`, with its
type (durations, Literal choices, bounds), default and help text; the model
also holds every check that involves several options. scripts/gen-config-docs
writes the configuration reference in docs/ and the chart's values schema for
`config` from it.
"""

from lbserver.config._loading import (
    NON_OPTION_VARIABLES,
    environment_options,
    is_kubernetes_service_link,
    load_config,
)
from lbserver.config._model import (
    DURATION_OPTIONS,
    ENV_PREFIX,
    Config,
    option_help,
    option_names,
)
from lbserver.config._values import (
    EMPTY_SERVICE_POLICIES,
    LOG_FORMATS,
    MAX_BACKENDS_PER_SERVICE,
    MAX_DURATION,
    MAX_LIST_LENGTH,
    MAX_MESSAGE_BYTES,
    MAX_SERVICES,
    MAX_STREAMS,
    Duration,
    EmptyServicePolicy,
    LogLevel,
    TlsClientAuth,
    parse_host_port,
    seconds,
)

__all__ = [
    "DURATION_OPTIONS",
    "EMPTY_SERVICE_POLICIES",
    "ENV_PREFIX",
    "LOG_FORMATS",
    "MAX_BACKENDS_PER_SERVICE",
    "MAX_DURATION",
    "MAX_LIST_LENGTH",
    "MAX_MESSAGE_BYTES",
    "MAX_SERVICES",
    "MAX_STREAMS",
    "NON_OPTION_VARIABLES",
    "Config",
    "Duration",
    "EmptyServicePolicy",
    "LogLevel",
    "TlsClientAuth",
    "environment_options",
    "is_kubernetes_service_link",
    "load_config",
    "option_help",
    "option_names",
    "parse_host_port",
    "seconds",
]
