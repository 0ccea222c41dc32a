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

What clients send reaches the logs only through two guards, so that no client
can flood them (DESIGN: "nothing a client sends may ... flood the logs"):

- `clip(value)`: a client-supplied string (a name, a service, an instance id,
  an error message that embeds one) as it may be logged: short values as they
  are, longer ones as a prefix, their length and a short hash
  (`oap...(1048576 bytes, sha256:ab12cd34)`), enough to tell two apart.
- `LogLimiter`: events a client can cause at will (refused calls, rejected
  streams, invalid messages) are logged at most `per_window` times per
  `window` seconds per event name; the first suppressed one logs
  `suppressing repeated log events` once, and when the window ends (at the
  next such event, or at `flush()`) `suppressed repeated log events` says how
  many were left out. The metrics count every event, logged or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import structlog

from lbserver.errors import InvalidValueError

__all__ = [
    "CLIP_BYTES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LogFormat",
    "LogLevel",
    "LogLimiter",
    "Logger",
    "clip",
    "configure_logging",
    "get_logger",
]

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    if level not in LOG_LEVELS:
        raise InvalidValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
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


# ---------------------------------------------------------------------------
# Client-supplied values and client-triggered events

# Values up to this many bytes are logged as they are: every name, service and
# instance id the balancer accepts (validation bounds them at 256, 253 and 128
# bytes) is logged whole.
CLIP_BYTES = 256
# What a clipped value keeps of its beginning.
CLIP_PREFIX_BYTES = 32


def clip(value: str | bytes | object, limit: int = CLIP_BYTES) -> str:
    """`value` (a string a client supplied, or anything that embeds one) fit
    for a log line or a status message: as it is when it has at most `limit`
    bytes (UTF-8), else its first CLIP_PREFIX_BYTES bytes, its length and the
    first 8 hex digits of its SHA-256: `oap...(1048576 bytes, sha256:ab12cd34)`."""
    if isinstance(value, bytes):
        data = value
    else:
        text = value if isinstance(value, str) else str(value)
        # A character is at most 4 bytes: short strings need no encoding.
        if len(text) * 4 <= limit:
            return text
        data = text.encode("utf-8", errors="surrogatepass")
        if len(data) <= limit:
            return text
    if len(data) <= limit:
        return data.decode("utf-8", errors="backslashreplace")
    prefix = data[: min(CLIP_PREFIX_BYTES, limit)].decode("utf-8", errors="ignore")
    digest = hashlib.sha256(data).hexdigest()[:8]
    return f"{prefix}...({len(data)} bytes, sha256:{digest})"


class _EventLogger(Protocol):
    """What LogLimiter needs of a logger (structlog's or `Logger`)."""

    def info(self, event: str, **values: Any) -> Any: ...

    def warning(self, event: str, **values: Any) -> Any: ...


@dataclass
class _Kind:
    start: float
    logger: _EventLogger
    # "info" or "warning": the event's level, which its suppression notices keep.
    method: str
    logged: int = 0
    suppressed: int = 0


# LogLimiter's defaults: at most this many lines per event name and window.
EVENTS_PER_WINDOW = 10
EVENT_WINDOW_SECONDS = 60.0


class LogLimiter:
    """Logs an event at most `per_window` times per `window` seconds per
    event name; the rest are counted (`on_suppressed(event)`, for a metric)
    and summed up in one line when the window ends. Keyed by event name
    only, which the code chooses: the table stays as small as the code's
    vocabulary, whatever clients send. Not thread-safe: the balancer logs
    from its event loop."""

    SUPPRESSING = "suppressing repeated log events"
    SUPPRESSED = "suppressed repeated log events"

    def __init__(
        self,
        per_window: int = EVENTS_PER_WINDOW,
        window: float = EVENT_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_suppressed: Callable[[str], None] | None = None,
    ) -> None:
        if per_window < 1 or window <= 0:
            raise InvalidValueError("LogLimiter needs per_window >= 1 and window > 0")
        self.per_window = per_window
        self.window = window
        self._clock = clock
        self._on_suppressed = on_suppressed
        self._kinds: dict[str, _Kind] = {}

    def warning(self, logger: _EventLogger, event: str, **values: Any) -> bool:
        """Logs a warning unless this event's budget is spent; True if logged."""
        return self._log(logger, "warning", event, values)

    def info(self, logger: _EventLogger, event: str, **values: Any) -> bool:
        """Logs an info line unless this event's budget is spent; True if logged."""
        return self._log(logger, "info", event, values)

    def _log(self, logger: _EventLogger, method: str, event: str, values: dict[str, Any]) -> bool:
        now = self._clock()
        kind = self._kinds.get(event)
        if kind is None or now - kind.start >= self.window:
            if kind is not None:
                self._report(event, kind)
            kind = self._kinds[event] = _Kind(start=now, logger=logger, method=method)
        if kind.logged < self.per_window:
            kind.logged += 1
            getattr(logger, method)(event, **values)
            return True
        kind.suppressed += 1
        kind.logger = logger
        if self._on_suppressed is not None:
            self._on_suppressed(event)
        if kind.suppressed == 1:
            getattr(logger, kind.method)(
                self.SUPPRESSING,
                kind=event,
                limit=f"{self.per_window} per {self.window:g} s",
                until="the window ends; the count follows then",
            )
        return False

    def flush(self) -> int:
        """Reports (and forgets) every event whose window has ended; the
        number of events reported as suppressed. Call it now and then (the
        server does, every window), or a burst's count waits for the next
        event of its kind."""
        now = self._clock()
        total = 0
        for event, kind in list(self._kinds.items()):
            if now - kind.start >= self.window:
                total += self._report(event, kind)
                del self._kinds[event]
        return total

    def _report(self, event: str, kind: _Kind) -> int:
        if kind.suppressed:
            getattr(kind.logger, kind.method)(
                self.SUPPRESSED,
                kind=event,
                suppressed=kind.suppressed,
                logged=kind.logged,
                window_seconds=self.window,
            )
        return kind.suppressed

    async def run_flush(self) -> None:
        """Flushes every window until cancelled."""
        while True:
            await asyncio.sleep(self.window)
            self.flush()
