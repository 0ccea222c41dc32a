"""Logging for every part of lbserver and agent_shim.

Commands call `configure_logging`: structlog, JSON when stderr is not a
terminal (containers, CI), a readable console renderer otherwise.

Library code (the registrar, agent_shim's channels and proxy) logs through
`get_logger(name)`. While the application has not configured structlog
(`structlog.is_configured()` is False) those lines go to the standard
`logging` module under `name`, the event followed by key=value pairs, so the
application's logging configuration decides what is shown: by default
nothing below WARNING, warnings and errors on stderr, never stdout (which is
where structlog's unconfigured default would print everything). Once
structlog is configured (the commands do it) they go through structlog with
their key-value pairs. The choice is made at every call, so a logger created
before the configuration follows it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

__all__ = ["LOG_LEVELS", "LogFormat", "Logger", "configure_logging", "get_logger"]

LogFormat = Literal["auto", "json", "console"]
LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _text(value: Any) -> str:
    """A value as key=value shows it: plain words bare, anything else repr()."""
    bare = isinstance(value, str) and value.isprintable() and not any(c in value for c in " \"'=")
    return value if bare and value else repr(value)


class Logger:
    """structlog's calling convention (`log.info("event", key=value)`,
    `log.bind(key=value)`), routed at every call: through structlog once it is
    configured, to `logging.getLogger(name)` before."""

    __slots__ = ("_context", "_name", "_stdlib")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}
        self._stdlib = logging.getLogger(name)

    @property
    def name(self) -> str:
        return self._name

    def bind(self, **values: Any) -> Logger:
        return Logger(self._name, {**self._context, **values})

    def debug(self, event: str, **values: Any) -> None:
        self._log(logging.DEBUG, "debug", event, values)

    def info(self, event: str, **values: Any) -> None:
        self._log(logging.INFO, "info", event, values)

    def warning(self, event: str, **values: Any) -> None:
        self._log(logging.WARNING, "warning", event, values)

    def error(self, event: str, **values: Any) -> None:
        self._log(logging.ERROR, "error", event, values)

    def critical(self, event: str, **values: Any) -> None:
        self._log(logging.CRITICAL, "critical", event, values)

    def exception(self, event: str, **values: Any) -> None:
        """An error with the exception being handled."""
        values.setdefault("exc_info", True)
        self._log(logging.ERROR, "exception", event, values)

    def _log(self, level: int, method: str, event: str, values: dict[str, Any]) -> None:
        if structlog.is_configured():
            bound = structlog.get_logger(self._name)
            if self._context:
                bound = bound.bind(**self._context)
            getattr(bound, method)(event, **values)
            return
        if not self._stdlib.isEnabledFor(level):
            return
        exc_info = values.pop("exc_info", None)
        stack_info = bool(values.pop("stack_info", False))
        pairs = {**self._context, **values}
        message = " ".join([event, *(f"{key}={_text(value)}" for key, value in pairs.items())])
        # stacklevel 3: the record names the code that called info() etc.
        self._stdlib.log(
            level, "%s", message, exc_info=exc_info, stack_info=stack_info, stacklevel=3
        )


def get_logger(name: str) -> Logger:
    """The logger library code uses; `name` is its `logging` logger name
    (`lbserver.registrar`, `agent_shim.selector`, ...)."""
    return Logger(name)
