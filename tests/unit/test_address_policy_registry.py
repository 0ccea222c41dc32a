"""The balancer applies the backend address policy to every heartbeat: no
link-local (cloud metadata), broadcast or "this network" backends ever, and
loopback backends only from a registrar on the balancer's own host."""

from __future__ import annotations

import pytest

from lbserver.errors import InvalidArgumentError
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.services.registry import _loopback, _Registrations


def heartbeat(ip: str) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(service="oap", ip=ip, port=11800)


@pytest.mark.parametrize("ip", ["169.254.169.254", "255.255.255.255", "0.0.0.1", "fe80::1"])
@pytest.mark.parametrize("loopback_peer", [True, False])
def test_never_acceptable_backends_are_refused_from_anywhere(ip: str, loopback_peer: bool) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        _Registrations().parse(heartbeat(ip), loopback_peer=loopback_peer)
    assert refused.value.field == "ip"


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"])
def test_every_form_of_loopback_only_from_this_host(ip: str) -> None:
    registrations = _Registrations()
    registrations.parse(heartbeat(ip), loopback_peer=True)
    with pytest.raises(InvalidArgumentError):
        registrations.parse(heartbeat(ip), loopback_peer=False)


def test_loopback_backends_only_from_this_host() -> None:
    registrations = _Registrations()
    assert str(registrations.parse(heartbeat("127.0.0.1"), loopback_peer=True).ip) == "127.0.0.1"
    # The same identity, cached: the policy still applies per call.
    with pytest.raises(InvalidArgumentError, match="loopback"):
        registrations.parse(heartbeat("127.0.0.1"), loopback_peer=False)
    assert str(registrations.parse(heartbeat("10.0.0.7"), loopback_peer=False).ip) == "10.0.0.7"


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5555", True),
        ("ipv4:127.0.3.4:5555", True),
        ("ipv6:[::1]:5555", True),
        ("ipv6:[::ffff:127.0.0.1]:5555", True),
        ("unix:/tmp/sock", True),
        ("ipv4:10.0.0.7:5555", False),
        ("ipv6:[fd00::1]:5555", False),
        ("garbage", False),
    ],
)
def test_loopback_peers(peer: str, local: bool) -> None:
    assert _loopback(peer) is local
