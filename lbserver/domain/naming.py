"""Mapping the name a grpclb client sends to a registered service.

Clients send whatever their channel target was: `oap`, `oap:11800`,
`oap.skywalking.svc.cluster.local:11800`. Rules derive candidate service names
from it, most specific first; aliases rename a candidate. The first candidate
that is a known service wins.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lbserver.errors import InvalidValueError

RULES = ("exact", "host", "first_label")


@dataclass(frozen=True, slots=True)
class NameRules:
    rules: tuple[str, ...] = RULES
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        unknown = [rule for rule in self.rules if rule not in RULES]
        if unknown:
            raise InvalidValueError(
                f"unknown name rule(s) {unknown}; known rules: {', '.join(RULES)}"
            )
        if not self.rules:
            raise InvalidValueError("at least one name rule is needed")


def strip_port(name: str) -> str:
    """`host:port` → `host`; `[v6]:port` → `v6`; a bare IPv6 address stays."""
    if name.startswith("["):
        end = name.find("]")
        return name[1:end] if end > 0 else name
    if name.count(":") == 1:
        return name.split(":", 1)[0]
    return name


def _rule_candidate(rule: str, name: str) -> str:
    if rule == "exact":
        return name
    host = strip_port(name)
    if rule == "host":
        return host
    # first_label: "oap.skywalking.svc.cluster.local" → "oap"; an IP stays whole.
    if ":" in host or host.replace(".", "").isdigit():
        return host
    return host.split(".", 1)[0]


def candidates(name: str, rules: NameRules) -> Iterator[str]:
    seen: set[str] = set()
    for rule in rules.rules:
        candidate = _rule_candidate(rule, name)
        for option in (rules.aliases.get(candidate), candidate):
            if option and option not in seen:
                seen.add(option)
                yield option


def resolve(name: str, known_services: Collection[str], rules: NameRules) -> str | None:
    for candidate in candidates(name, rules):
        if candidate in known_services:
            return candidate
    return None
