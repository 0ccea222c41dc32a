"""pydantic's validation errors as one ConfigError line that names the
option (and, for a value that cannot be read, where it was set), in the
words of the configuration reference: `max_streams: must be 1-1000000`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import annotated_types
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from lbserver.config._values import ERROR_TYPE, is_duration
from lbserver.errors import ConfigError

_LOWER = {"greater_than", "greater_than_equal"}
_UPPER = {"less_than", "less_than_equal"}
_OPERATORS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


# Where each option was set ("flag", "environment LBSERVER_*", ...) while
# load_config builds a Config, for the message about a value that cannot be read.
ORIGINS: ContextVar[Mapping[str, str]] = ContextVar(
    "lbserver_config_origins", default=MappingProxyType({})
)


def config_error(exc: ValidationError, fields: Mapping[str, FieldInfo]) -> ConfigError:
    """One message per bad option (its first problem), in the order pydantic
    found them."""
    messages: dict[str, str] = {}
    for error in exc.errors(include_url=False):
        option = str(error["loc"][0]) if error["loc"] else ""
        messages.setdefault(option, _message(error, fields, ORIGINS.get()))
    return ConfigError("; ".join(messages.values()))


def _message(
    error: ErrorDetails, fields: Mapping[str, FieldInfo], origins: Mapping[str, str]
) -> str:
    loc = error["loc"]
    if not loc:
        # A check of several options (the model's validator) names them itself.
        return error["msg"]
    option = str(loc[0])
    where = option + "".join(f"[{part}]" for part in loc[1:])
    if error["type"] == ERROR_TYPE:
        origin = origins.get(option)
        text = error["msg"]
        # "[index]: ..." is about an item of a list option: kubernetes_services[0]: ...
        return (
            f"{f'{origin}: ' if origin else ''}{where}{'' if text.startswith('[') else ': '}{text}"
        )
    return f"{where}: {_problem(error, fields.get(option))}"


def _problem(error: ErrorDetails, field: FieldInfo | None) -> str:
    kind = error["type"]
    context: dict[str, Any] = dict(error.get("ctx") or {})
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(context["expected"]))
        return f"must be one of {', '.join(choices)}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "too_short":
        return "must not be empty"
    if kind == "extra_forbidden":
        return "unknown option"
    if kind in _LOWER | _UPPER:
        if field is not None and len(error["loc"]) == 1:
            return _bounds(field, upper_violated=kind in _UPPER)
        # An item's bound (subset_sizes[oap]).
        (bound,) = context.values()
        return f"must be {_OPERATORS[kind]} {bound}"
    return error["msg"]


def _bounds(field: FieldInfo, *, upper_violated: bool) -> str:
    """The field's range as the reference words it."""
    low: tuple[str, float] | None = None
    high: tuple[str, float] | None = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Gt):
            low = ("(", float(item.gt))  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Ge):
            low = ("[", float(item.ge))  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Lt):
            high = (")", float(item.lt))  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            high = ("]", float(item.le))  # type: ignore[arg-type]
    if is_duration(field.metadata) and upper_violated and high is not None:
        return f"must be at most {high[1]:g} seconds (1 day)"
    if low is not None and high is not None and not is_duration(field.metadata):
        if field.annotation is int:
            return f"must be {low[1]:.0f}-{high[1]:.0f}"
        return f"must be in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low is not None:
        return f"must be {'>' if low[0] == '(' else '>='} {low[1]:g}"
    assert high is not None
    return f"must be {'<' if high[0] == ')' else '<='} {high[1]:g}"
