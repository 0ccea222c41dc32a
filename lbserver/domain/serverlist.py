"""Turning weights into a grpclb server list.

grpclb clients round-robin over the list in order, so a backend listed twice
gets twice the calls. Weights become multiplicities (bounded list length,
largest-remainder rounding), and the entries are interleaved with smooth
weighted round robin so that any window of the list is balanced too.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, reduce
from typing import TypedDict, Unpack

from lbserver.domain.model import Backend, IPAddress
from lbserver.errors import InvalidValueError

DEFAULT_MAX_LIST_LENGTH = 100
DROP_TOKEN = "lbserver-drop"


@dataclass(frozen=True, slots=True)
class Entry:
    ip: bytes
    port: int
    token: str
    drop: bool = False
    # The backend's registration zone: grpclb does not carry it; xDS makes it
    # the locality's zone.
    zone: str = ""

    @classmethod
    def for_drop(cls, token: str = DROP_TOKEN) -> Entry:
        return cls(ip=b"", port=0, token=token, drop=True)


@dataclass(frozen=True, slots=True)
class ServerList:
    entries: tuple[Entry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def count(self, token: str) -> int:
        return sum(1 for entry in self.entries if entry.token == token and not entry.drop)

    def entries_per_token(self) -> Counter[str]:
        """Entries per backend token (drops left out), in one pass: counting
        each backend's with count() is quadratic in the list's length."""
        return Counter(entry.token for entry in self.entries if not entry.drop)


def packed(ip: IPAddress) -> bytes:
    return ip.packed


def multiplicities(weights: Mapping[str, float], max_length: int) -> dict[str, int]:
    """Entries per key, proportional to weights, at least one per key with a
    positive weight, total at most max(max_length, number of keys).

    Integer weights that fit are kept exact (reduced by their gcd); otherwise
    the list is scaled to max_length with largest-remainder rounding, ties
    broken by key so replicas agree."""
    if max_length < 1:
        raise InvalidValueError("max_length must be >= 1")
    positive = {key: w for key, w in weights.items() if w > 0 and math.isfinite(w)}
    if not positive:
        return {}
    if all(float(w).is_integer() for w in positive.values()):
        ints = {key: int(w) for key, w in positive.items()}
        divisor = reduce(math.gcd, ints.values())
        reduced = {key: w // divisor for key, w in ints.items()}
        if sum(reduced.values()) <= max_length:
            return reduced
    length = max(max_length, len(positive))
    # Exact rational arithmetic on integers: every weight is n/d exactly
    # (d a power of two for floats); over a common denominator D the weights
    # are the integers scaled[key] = w * D, and key's quota w * length / total
    # is scaled[key] * length / total_scaled. Same results as Fractions,
    # without their per-operation gcd.
    ratios = {key: w.as_integer_ratio() for key, w in positive.items()}
    common = math.lcm(*(d for _, d in ratios.values()))
    scaled = {key: n * (common // d) for key, (n, d) in ratios.items()}
    total = sum(scaled.values())
    counts: dict[str, int] = {}
    remainders: dict[str, int] = {}
    for key, value in scaled.items():
        whole, remainders[key] = divmod(value * length, total)
        counts[key] = max(1, whole)
    # Largest remainder: hand out what is left to the biggest fractional parts.
    by_remainder = sorted(positive, key=lambda key: (-remainders[key], key))
    spare = length - sum(counts.values())
    for key in by_remainder:
        if spare <= 0:
            break
        counts[key] += 1
        spare -= 1
    # The at-least-one floor can overshoot; take back from the most over quota
    # (counts - quota, in units of 1/total).
    while spare < 0:
        key = max(
            (k for k in counts if counts[k] > 1),
            key=lambda k: (counts[k] * total - scaled[k] * length, k),
        )
        counts[key] -= 1
        spare += 1
    return counts


def interleave(counts: Mapping[str, int]) -> list[str]:
    """Smooth weighted round robin (as in nginx): each step every key gains its
    count, the key with most credit is emitted and pays the total. Every
    window of the result holds each key within one entry of its share."""
    return list(_interleave(tuple(sorted(counts.items()))))


@lru_cache(maxsize=1024)
def _interleave(counts: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    # Memoized: a service's counts rarely change between heartbeats.
    keys = [key for key, _ in counts]
    gains = [count for _, count in counts]
    total = sum(gains)
    credit = [0] * len(keys)
    positions = range(len(keys))
    order: list[str] = []
    for _ in range(total):
        credit = [c + g for c, g in zip(credit, gains, strict=True)]
        chosen = max(positions, key=credit.__getitem__)  # max() keeps the first on ties
        credit[chosen] -= total
        order.append(keys[chosen])
    return tuple(order)


def list_counts(
    backends: Sequence[Backend],
    weights: Mapping[str, float],
    *,
    max_length: int = DEFAULT_MAX_LIST_LENGTH,
    drop_entries: int = 0,
    drop_share: float = 0.0,
) -> dict[str, int]:
    """Entries per token (drops under DROP_TOKEN) of build_server_list's
    list: the list is a function of these counts and the backends' addresses."""
    tokens = {b.token for b in backends}
    usable = {t: w for t, w in weights.items() if t in tokens and w > 0}
    if usable and 0 < drop_share < 1:
        usable[DROP_TOKEN] = drop_share / (1 - drop_share) * math.fsum(usable.values())
    counts = multiplicities(usable, max_length)
    if drop_entries > 0 and counts:
        counts[DROP_TOKEN] = drop_entries
    return counts


def list_from_counts(backends: Sequence[Backend], counts: Mapping[str, int]) -> ServerList:
    """The interleaved list with counts[token] entries per backend token."""
    by_token = {b.token: b for b in backends}
    made: dict[str, Entry] = {}
    entries = []
    for token in interleave(counts):
        entry = made.get(token)
        if entry is None:
            if token == DROP_TOKEN:
                entry = Entry.for_drop()
            else:
                registration = by_token[token].registration
                entry = Entry(
                    ip=packed(registration.ip),
                    port=registration.port,
                    token=token,
                    zone=registration.zone,
                )
            made[token] = entry
        entries.append(entry)
    return ServerList(entries=tuple(entries))


class ListOptions(TypedDict, total=False):
    """list_counts' keyword options, for build_server_list."""

    max_length: int
    drop_entries: int
    drop_share: float


def build_server_list(
    backends: Sequence[Backend], weights: Mapping[str, float], **options: Unpack[ListOptions]
) -> ServerList:
    """The list a client of these backends should get. Drops are spread
    through the list like a backend's entries: `drop_share` as a share of the
    list (rounded with the weights), or exactly `drop_entries` of them."""
    return list_from_counts(backends, list_counts(backends, weights, **options))


def shares_of(counts: Mapping[str, int]) -> dict[str, float]:
    """Share of the list per token, for the list with counts[token] entries
    per token (drops under DROP_TOKEN)."""
    total = sum(counts.values())
    return {token: count / total for token, count in counts.items()} if total else {}


def max_share_change_of(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    return max(
        (abs(after.get(t, 0.0) - before.get(t, 0.0)) for t in before.keys() | after.keys()),
        default=0.0,
    )
