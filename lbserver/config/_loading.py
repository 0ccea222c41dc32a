"""Where the options come from: the embedded defaults, then an optional YAML
file (`--config FILE` or LBSERVER_CONFIG), then `LBSERVER_*` environment
variables, then command-line flags (last wins). Each layer is a
pydantic-settings source; `Config` validates the result."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import EnvSettingsSource, InitSettingsSource, PydanticBaseSettingsSource

from lbserver.config._errors import ORIGINS
from lbserver.config._model import ENV_PREFIX, Config, option_names
from lbserver.errors import ConfigError

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

ENVIRONMENT = f"environment {ENV_PREFIX}*"


def is_kubernetes_service_link(name: str) -> bool:
    """Whether an environment variable's name has the shape of a service-link
    variable the kubelet injects (`LBSERVER_SERVICE_HOST`,
    `LBSERVER_PORT_11810_TCP_ADDR`, `LBSERVER_PROD_SERVICE_PORT_GRPCLB`, ...)."""
    return _SERVICE_LINK.fullmatch(name) is not None


def _similar_options(option: str) -> list[str]:
    """Option names close to a misspelt one, best first."""
    names = option_names()
    close = difflib.get_close_matches(option, names, n=3, cutoff=0.6)
    close += [name for name in names if name.split("_")[0] == option.split("_")[0]]
    return list(dict.fromkeys(close))[:3]


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


class _Environment(EnvSettingsSource):
    """`LBSERVER_<OPTION>` variables of the given environment (the process's
    by default), once environment_options has refused unknown ones."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        environment_options(environ)
        self._environ = environ
        super().__init__(Config)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # The prefix is case-sensitive, as environment_options reads it.
        return {
            name.lower(): value
            for name, value in self._environ.items()
            if name.startswith(ENV_PREFIX)
        }


def _options(where: str, values: Mapping[Any, Any]) -> InitSettingsSource:
    """A file's or the flags' options ('-' may stand for '_'), refusing
    unknown names with a hint."""
    names = set(option_names())
    options: dict[str, Any] = {}
    for key, value in values.items():
        option = str(key).replace("-", "_")
        if option not in names:
            close = _similar_options(option)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown option {key!r}{hint}")
        options[option] = value
    return InitSettingsSource(Config, init_kwargs=options)


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


def _config_file(path: str | os.PathLike[str]) -> InitSettingsSource:
    document = _read_yaml(path)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path}: expected a mapping of options at the top")
    return _options(str(path), document)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < file < LBSERVER_* environment < overrides (flags; None
    means not given)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(f"{ENV_PREFIX}CONFIG") or None
    layers: list[tuple[str, PydanticBaseSettingsSource]] = []
    if path is not None:
        layers.append((f"config file {path}", _config_file(path)))
    layers.append((ENVIRONMENT, _Environment(environ)))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    layers.append(("flag", _options("flag", flags)))
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for where, source in layers:
        for option, value in source().items():
            values[option], origins[option] = value, where
    token = ORIGINS.set(origins)
    try:
        return Config(**values)
    finally:
        ORIGINS.reset(token)
