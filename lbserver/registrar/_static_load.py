"""A fixed load, given as text (``lbserver register --load-static``)."""

from __future__ import annotations

from lbserver.domain.model import LoadReport
from lbserver.domain.validation import parse_load
from lbserver.errors import InvalidArgumentError, InvalidValueError

_STATIC_KEYS = {
    "cpu": "cpu_utilization",
    "rps": "requests_per_second",
    "eps": "errors_per_second",
    "inflight": "in_flight",
}
# parse_load's field names, back to the keys the spec uses.
_KEY_OF_FIELD = {f"load.{name}": key for key, name in _STATIC_KEYS.items()}


def static_load(spec: str) -> LoadReport:
    """Parses ``cpu=0.9,rps=100[,eps=1,inflight=3]`` (any non-empty subset of
    the keys; an absent key is unknown). Raises ValueError naming the bad key;
    a value the balancer would refuse raises InvalidArgumentError (its rule)."""
    rates: dict[str, float] = {}
    in_flight: int | None = None
    seen: set[str] = set()
    for item in spec.split(","):
        if not item.strip():
            continue
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep:
            raise InvalidValueError(f"{item.strip()!r} is not KEY=VALUE")
        if key not in _STATIC_KEYS:
            raise InvalidValueError(f"{key!r}: unknown key; use {', '.join(_STATIC_KEYS)}")
        if key in seen:
            raise InvalidValueError(f"{key}: given twice")
        seen.add(key)
        if key == "inflight":
            try:
                in_flight = int(text)
            except ValueError:
                raise InvalidValueError(f"{key}: {text!r} is not an integer") from None
            if in_flight < 0:
                raise InvalidValueError(f"{key}: must be an integer >= 0, not {text!r}")
            continue
        try:
            number = float(text)
        except ValueError:
            raise InvalidValueError(f"{key}: {text!r} is not a number") from None
        rates[_STATIC_KEYS[key]] = number
    if not seen:
        raise InvalidValueError(
            f"{spec!r} gives no load; use KEY=VALUE with {', '.join(_STATIC_KEYS)}"
        )
    try:
        return parse_load(
            cpu_utilization=rates.get("cpu_utilization"),
            requests_per_second=rates.get("requests_per_second"),
            errors_per_second=rates.get("errors_per_second"),
            in_flight=in_flight,
        )
    except InvalidArgumentError as err:
        raise InvalidArgumentError(_KEY_OF_FIELD[err.field], err.problem) from None
