"""Metric selectors: ``name`` or ``name{label="value",...}``, which samples of
a Prometheus page the load probe reads."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from prometheus_client.parser import text_string_to_metric_families

from lbserver.errors import InvalidValueError

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@dataclass(frozen=True, slots=True)
class MetricSelector:
    """A sample name and optional label matchers, as in ``name{label="x"}``.

    Matches samples by *sample* name (``process_cpu_seconds_total``, not the
    family name ``process_cpu_seconds`` the parser gives counters). A name
    without ``_total`` also matches ``NAME_total`` samples when the page has no
    ``NAME`` samples. A matcher ``label=""`` matches samples without that label,
    as in PromQL."""

    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key, "") == value for key, value in self.labels.items())

    def __str__(self) -> str:
        if not self.labels:
            return self.name
        # Label values in the exposition format escape backslash, quote, newline.
        body = ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(self.labels.items()))
        return f"{self.name}{{{body}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_selector(spec: str) -> MetricSelector:
    """Parses ``NAME`` or ``NAME{label="value",...}``; raises ValueError."""
    text = spec.strip()
    brace = text.find("{")
    name = text if brace < 0 else text[:brace]
    if not _METRIC_NAME.fullmatch(name):
        raise InvalidValueError(
            f'{spec!r} is not a metric name (optionally with {{label="value"}})'
        )
    if brace < 0:
        return MetricSelector(name)
    if not text.endswith("}"):
        raise InvalidValueError(f"{spec!r}: label matchers must end with '}}'")
    if not text[brace + 1 : -1].strip():
        return MetricSelector(name)
    # The exposition parser already knows label syntax and escapes: feed it the
    # selector as one sample line.
    try:
        families = list(text_string_to_metric_families(f"{text} 0\n"))
        samples = [sample for family in families for sample in family.samples]
    except Exception:  # the parser raises ValueError mostly, IndexError on some garbage
        samples = []
    if len(samples) != 1 or samples[0].name != name:
        raise InvalidValueError(f'{spec!r}: label matchers must look like {{label="value",...}}')
    return MetricSelector(name, MappingProxyType(dict(samples[0].labels)))
