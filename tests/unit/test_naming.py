from __future__ import annotations

import pytest

from lbserver.domain.naming import NameRules, candidates, resolve, strip_port

KNOWN = {"oap", "oap.skywalking", "collector"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("oap", "oap"),
        ("oap:11800", "oap"),
        ("oap.skywalking.svc.cluster.local:11800", "oap"),
        ("oap.skywalking", "oap.skywalking"),  # exact beats first label
        ("unknown.example:443", None),
        ("[fd00::1]:11800", None),
    ],
)
def test_default_rules(name: str, expected: str | None) -> None:
    assert resolve(name, KNOWN, NameRules()) == expected


def test_aliases_rename_a_candidate() -> None:
    rules = NameRules(aliases={"skywalking-oap": "oap"})
    assert resolve("skywalking-oap.default.svc:11800", KNOWN, rules) == "oap"
    assert resolve("skywalking-oap", KNOWN, rules) == "oap"


def test_rules_can_be_restricted() -> None:
    exact_only = NameRules(rules=("exact",))
    assert resolve("oap:11800", KNOWN, exact_only) is None
    assert resolve("oap", KNOWN, exact_only) == "oap"
    host_only = NameRules(rules=("host",))
    assert resolve("oap.skywalking:1", KNOWN, host_only) == "oap.skywalking"


def test_candidates_are_unique_and_ordered() -> None:
    assert list(candidates("oap.ns:1", NameRules())) == ["oap.ns:1", "oap.ns", "oap"]


def test_strip_port_handles_ipv6() -> None:
    assert strip_port("[fd00::1]:80") == "fd00::1"
    assert strip_port("fd00::1") == "fd00::1"
    assert strip_port("host:80") == "host"


def test_unknown_rule_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown name rule"):
        NameRules(rules=("exact", "suffix"))
