"""Waiting in tests for something other tasks, threads or processes do: the
one polling helper, always bounded in time.

    await eventually(lambda: backend.calls, "a call at the backend")
    await eventually(balancer.has_list, "the list", within=15, detail=describe)
    eventually_blocking(lambda: proc.poll() is not None, "the exit")  # from threads

The check may be a plain or an async callable; its first truthy result is
returned. After `within` seconds an AssertionError names `what` and shows
`detail()` (or the last result), so a failure says what was seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

DEFAULT_WITHIN = 15.0


def _failure(what: str, within: float, last: object, detail: Callable[[], object] | None) -> str:
    seen = detail() if detail is not None else repr(last)
    return f"timed out after {within:g}s waiting for {what}; seen: {seen}"


@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]],
    what: str = ...,
    *,
    within: float = ...,
    interval: float = ...,
    detail: Callable[[], object] | None = ...,
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T | None],
    what: str = ...,
    *,
    within: float = ...,
    interval: float = ...,
    detail: Callable[[], object] | None = ...,
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    what: str = "the condition",
    *,
    within: float = DEFAULT_WITHIN,
    interval: float = 0.02,
    detail: Callable[[], object] | None = None,
) -> Any:
    """Polls `check` on the running loop until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_failure(what, within, value, detail))
        await asyncio.sleep(interval)


def eventually_blocking(
    check: Callable[[], T | None],
    what: str = "the condition",
    *,
    within: float = DEFAULT_WITHIN,
    interval: float = 0.05,
    detail: Callable[[], object] | None = None,
) -> T:
    """`eventually` for code outside an event loop (it sleeps the thread)."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_failure(what, within, value, detail))
        time.sleep(interval)
