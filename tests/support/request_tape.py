"""A replayable request iterator for sync code: what the sync balanced_channel
used before it ran over the asyncio channel (whose own tape, agent_shim's
_aio_call._Tape, keeps a call's requests now). Kept with its tests as the
reference for the replay rule both follow."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


# Unused since balanced_channel runs on the asyncio channel (whose _Tape
# replays requests); kept while tests/unit/test_shim_helpers.py pins it.
class RequestTape(Generic[T]):
    """Replays a request iterator: every attempt of a call reads its own view,
    which first yields what earlier views consumed (kept up to `limit`
    messages), then continues with the source. Starting a new view retires the
    old one, so the source is never read by two attempts at once."""

    def __init__(self, source: Iterable[T], limit: int) -> None:
        self._source = iter(source)
        self._limit = limit
        self._lock = threading.Lock()
        self._kept: list[T] = []
        self._overflowed = False
        self._exhausted = False
        self._generation = 0

    def replayable(self) -> bool:
        return not self._overflowed

    def view(self) -> Iterator[T]:
        with self._lock:
            self._generation += 1
            return self._replay(self._generation)

    def _replay(self, generation: int) -> Iterator[T]:
        position = 0
        while True:
            with self._lock:
                if generation != self._generation:
                    return
                if position < len(self._kept):
                    item = self._kept[position]
                elif self._exhausted:
                    return
                else:
                    try:
                        item = next(self._source)
                    except StopIteration:
                        self._exhausted = True
                        return
                    if not self._overflowed:
                        if len(self._kept) < self._limit:
                            self._kept.append(item)
                        else:
                            self._overflowed = True
                            self._kept.clear()
                position += 1
            yield item
