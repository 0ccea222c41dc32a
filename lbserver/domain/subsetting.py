"""Deterministic subsetting: with many clients, each gets a subset of the
backends so that connections per backend stay bounded at fleet scale.

Client c gets the `size` backends starting at position c * size on the ring
of backends (in the service's stable order). The windows of clients 0..m-1
tile the ring one after another, so every backend is in floor(m*size/n) or
ceil(m*size/n) subsets: balanced within one client.
"""

from __future__ import annotations

import heapq


def subset_positions(backend_count: int, size: int, client_index: int) -> list[int]:
    if backend_count <= 0:
        return []
    if size <= 0 or size >= backend_count:
        return list(range(backend_count))
    start = (client_index * size) % backend_count
    return sorted((start + offset) % backend_count for offset in range(size))


class IndexPool:
    """Hands out the smallest free client index, so the indices in use stay
    as close to 0..m-1 as clients come and go."""

    def __init__(self) -> None:
        self._next = 0
        self._freed: list[int] = []  # a heap of released indices below _next
        self._in_use = 0

    def acquire(self) -> int:
        self._in_use += 1
        if self._freed:
            return heapq.heappop(self._freed)
        self._next += 1
        return self._next - 1

    def release(self, index: int) -> None:
        self._in_use -= 1
        heapq.heappush(self._freed, index)

    def __len__(self) -> int:
        return self._in_use
