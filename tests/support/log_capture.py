"""structlog events captured in-process, for tests that read what was logged
or wait for a log line as the sign that something has happened.

    with captured_logs() as capture:
        ...
        await eventually(lambda: logged(capture, "client connected"), "the connection")
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog
from structlog.testing import LogCapture


@contextmanager
def captured_logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    previous = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture
    finally:
        # Other tests capture info-level events: leave the configuration as found.
        structlog.configure(**previous)


def logged(capture: LogCapture, event: str) -> list[MutableMapping[str, Any]]:
    """The captured entries of `event`, oldest first."""
    return [entry for entry in capture.entries if entry["event"] == event]
