"""The registrar refuses at construction whatever the balancer would refuse,
with the balancer's own message, and `lbserver register` exits 2 on it
instead of heartbeating into INVALID_ARGUMENT forever."""

from __future__ import annotations

from typing import Any

import pytest

from lbserver.cli import main
from lbserver.domain.validation import parse_registration
from lbserver.errors import InvalidArgumentError, LbserverError
from lbserver.registrar import Registrar

BASE: dict[str, Any] = {"service": "oap", "ip": "10.0.0.1", "port": 11800}

# What the balancer refuses in a heartbeat, as Registrar keyword arguments.
REFUSED = [
    pytest.param({"service": "bad name"}, id="service with a space"),
    pytest.param({"service": "s" * 254}, id="service too long"),
    pytest.param({"service": "tab\there"}, id="service with a tab"),
    pytest.param({"instance_id": "oap 0"}, id="instance_id with a space"),
    pytest.param({"instance_id": "i" * 129}, id="instance_id too long"),
    pytest.param({"zone": "eu 1a"}, id="zone with a space"),
    pytest.param({"zone": "z" * 65}, id="zone too long"),
    pytest.param({"labels": {"bad key": "v"}}, id="label key with a space"),
    pytest.param({"labels": {"k": "v" * 257}}, id="label value too long"),
    pytest.param({"labels": {f"k{i}": "v" for i in range(33)}}, id="too many labels"),
    pytest.param({"weight": 10_001}, id="weight 10001"),
    pytest.param({"weight": 20_000}, id="weight 20000"),
    pytest.param({"ip": "::"}, id="unspecified ip"),
    pytest.param({"ip": "224.0.0.1"}, id="multicast ip"),
    pytest.param({"port": 65_536}, id="port 65536"),
]


@pytest.mark.parametrize("kwargs", REFUSED)
def test_registrar_refuses_what_the_balancer_refuses(kwargs: dict[str, Any]) -> None:
    fields = {**BASE, **kwargs}
    with pytest.raises(InvalidArgumentError) as balancer:
        parse_registration(
            service=fields["service"],
            instance_id=fields.get("instance_id", ""),
            ip=fields["ip"],
            port=fields["port"],
            weight=fields.get("weight", 0),
            zone=fields.get("zone", ""),
            labels=fields.get("labels"),
        )
    with pytest.raises(InvalidArgumentError) as registrar:
        Registrar(["127.0.0.1:11810"], **fields)
    assert str(registrar.value) == str(balancer.value)
    assert registrar.value.field == balancer.value.field


def test_invalid_argument_is_a_value_error_and_an_lbserver_error() -> None:
    # Registrar documents ValueError; callers catching it keep working.
    assert issubclass(InvalidArgumentError, ValueError)
    assert issubclass(InvalidArgumentError, LbserverError)
    with pytest.raises(ValueError, match=r"^service: "):
        Registrar(["127.0.0.1:11810"], "bad name", "10.0.0.1", 11800)


def test_registrar_accepts_the_limits() -> None:
    registrar = Registrar(
        ["127.0.0.1:11810"],
        "s" * 253,
        "10.0.0.1",
        65_535,
        instance_id="i" * 128,
        weight=10_000,
        zone="z" * 64,
        labels={f"k{i}": "v" * 256 for i in range(32)},
    )
    assert registrar.weight == 10_000


REQUIRED = ["--balancer", "127.0.0.1:11810", "--backend", "10.0.0.7:11800"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--service", "bad name"], "service: must not contain whitespace or control characters"),
        (["--service", "oap", "--weight", "20000"], "weight: 20000 is outside 1-10000"),
        (["--service", "oap", "--zone", "eu 1a"], "zone: must not contain whitespace"),
        (["--service", "oap", "--instance-id", "oap 0"], "instance_id: must not contain"),
        (["--service", "oap", "--label", "bad key=v"], "labels: must not contain whitespace"),
    ],
)
def test_register_exits_2_with_the_balancers_message(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["register", *REQUIRED, *extra, "--probe", "none", "--log-level", "error"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("lbserver register: error: ")
    assert message in err
