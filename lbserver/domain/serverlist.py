"""Turning weights into a grpclb server list.

grpclb clients round-robin over the list in order, so a backend listed twice
gets twice the calls. Weights become multiplicities (bounded list length,
largest-remainder rounding), and the entries are interleaved with smooth
weighted round robin so that any window of the list is balanced too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce

from lbserver.domain.model import Backend, IPAddress

DEFAULT_MAX_LIST_LENGTH = 100
DROP_TOKEN = "lbserver-drop"


@dataclass(frozen=True, slots=True)
class Entry:
    ip: bytes
    port: int
    token: str
    drop: bool = False

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


def packed(ip: IPAddress) -> bytes:
    return ip.packed


def multiplicities(weights: Mapping[str, float], max_length: int) -> dict[str, int]:
    """Entries per key, proportional to weights, at least one per key with a
    positive weight, total at most max(max_length, number of keys).

    Integer weights that fit are kept exact (reduced by their gcd); otherwise
    the list is scaled to max_length with largest-remainder rounding, ties
    broken by key so replicas agree."""
    if max_length < 1:
        raise ValueError("max_length must be >= 1")
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
    total = sum(Fraction(w) for w in positive.values())
    quotas = {key: Fraction(w) * length / total for key, w in positive.items()}
    counts = {key: max(1, math.floor(q)) for key, q in quotas.items()}
    # Largest remainder: hand out what is left to the biggest fractional parts.
    by_remainder = sorted(positive, key=lambda key: (-(quotas[key] - math.floor(quotas[key])), key))
    spare = length - sum(counts.values())
    for key in by_remainder:
        if spare <= 0:
            break
        counts[key] += 1
        spare -= 1
    # The at-least-one floor can overshoot; take back from the most over quota.
    while spare < 0:
        key = max(
            (k for k in counts if counts[k] > 1),
            key=lambda k: (counts[k] - quotas[k], k),
        )
        counts[key] -= 1
        spare += 1
    return counts


def interleave(counts: Mapping[str, int]) -> list[str]:
    """Smooth weighted round robin (as in nginx): each step every key gains its
    count, the key with most credit is emitted and pays the total. Every
    window of the result holds each key within one entry of its share."""
    keys = sorted(counts)
    total = sum(counts.values())
    credit = dict.fromkeys(keys, 0)
    order: list[str] = []
    for _ in range(total):
        for key in keys:
            credit[key] += counts[key]
        chosen = max(keys, key=lambda k: credit[k])  # max() keeps the first on ties
        credit[chosen] -= total
        order.append(chosen)
    return order


def build_server_list(
    backends: Sequence[Backend],
    weights: Mapping[str, float],
    *,
    max_length: int = DEFAULT_MAX_LIST_LENGTH,
    drop_entries: int = 0,
    drop_share: float = 0.0,
) -> ServerList:
    """The list a client of these backends should get. Drops are spread
    through the list like a backend's entries: `drop_share` as a share of the
    list (rounded with the weights), or exactly `drop_entries` of them."""
    by_token = {b.token: b for b in backends}
    usable = {t: w for t, w in weights.items() if t in by_token and w > 0}
    if usable and 0 < drop_share < 1:
        usable[DROP_TOKEN] = drop_share / (1 - drop_share) * math.fsum(usable.values())
    counts = multiplicities(usable, max_length)
    if drop_entries > 0 and counts:
        counts[DROP_TOKEN] = drop_entries
    entries = []
    for token in interleave(counts):
        if token == DROP_TOKEN:
            entries.append(Entry.for_drop())
            continue
        registration = by_token[token].registration
        entries.append(Entry(ip=packed(registration.ip), port=registration.port, token=token))
    return ServerList(entries=tuple(entries))


def shares(servers: ServerList) -> dict[str, float]:
    """Share of the list per token (drop entries under their token)."""
    total = len(servers)
    counts: dict[str, int] = {}
    for entry in servers.entries:
        counts[entry.token] = counts.get(entry.token, 0) + 1
    return {token: count / total for token, count in counts.items()} if total else {}


def max_share_change(old: ServerList, new: ServerList) -> float:
    before, after = shares(old), shares(new)
    return max(
        (abs(after.get(t, 0.0) - before.get(t, 0.0)) for t in before.keys() | after.keys()),
        default=0.0,
    )
