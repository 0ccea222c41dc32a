from __future__ import annotations

import math

import pytest

from lbserver.domain.model import BackendState
from lbserver.domain.validation import check_balance_name, parse_load, parse_registration
from lbserver.errors import InvalidArgumentError


def test_defaults_for_unset_proto_fields() -> None:
    reg = parse_registration(service="oap", instance_id="", ip="fd00::1", port=80)
    assert reg.weight == 1
    assert reg.state is BackendState.SERVING
    assert reg.instance_id == "[fd00::1]:80"
    assert reg.requested_ttl is None


def test_draining_state() -> None:
    reg = parse_registration(service="oap", instance_id="x", ip="10.0.0.1", port=80, state=2)
    assert reg.state is BackendState.DRAINING


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ip": "256.0.0.1"}, "ip"),
        ({"port": 0}, "port"),
        ({"service": ""}, "service"),
        ({"zone": "z" * 65}, "zone"),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, "labels"),
        ({"labels": {"k": "v" * 300}}, "labels[k]"),
        ({"weight": -1}, "weight"),
        ({"state": 3}, "state"),
        ({"requested_ttl": math.inf}, "requested_ttl"),
    ],
)
def test_invalid_fields_are_named(kwargs: dict[str, object], field: str) -> None:
    base: dict[str, object] = {"service": "oap", "instance_id": "", "ip": "10.0.0.1", "port": 80}
    base.update(kwargs)
    with pytest.raises(InvalidArgumentError) as error:
        parse_registration(**base)  # type: ignore[arg-type]
    assert error.value.field == field


def test_unknown_load_stays_unknown() -> None:
    load = parse_load(
        cpu_utilization=None, requests_per_second=0.0, errors_per_second=None, in_flight=None
    )
    assert load.cpu_utilization is None and load.requests_per_second == 0.0


def test_balance_name_limit() -> None:
    assert check_balance_name("a" * 256) == "a" * 256
    with pytest.raises(InvalidArgumentError, match="257 bytes"):
        check_balance_name("a" * 257)


@pytest.mark.parametrize("address", ["::ffff:0.0.0.0", "::ffff:224.0.0.1", "[::ffff:239.1.2.3]"])
def test_ipv4_mapped_unspecified_and_multicast_cannot_be_connected_to(address: str) -> None:
    # A dual-stack socket connects to ::ffff:a.b.c.d as a.b.c.d.
    with pytest.raises(InvalidArgumentError, match="cannot be connected to") as error:
        parse_registration(service="oap", instance_id="", ip=address, port=80)
    assert error.value.field == "ip"


def test_ipv4_mapped_ordinary_address_is_accepted() -> None:
    reg = parse_registration(service="oap", instance_id="", ip="::ffff:10.0.0.1", port=80)
    assert str(reg.ip) == "::ffff:a00:1"
