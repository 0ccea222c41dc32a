"""The balancer's backend address policy (check_backend_address): clients are
never sent to link-local addresses (the cloud metadata service), broadcast,
"this network", unspecified or multicast addresses, in any IPv6 spelling of
them, nor to loopback unless the balancer allows it; every ordinary private or
public address passes."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbserver.domain.model import IPAddress
from lbserver.domain.validation import (
    METADATA_ADDRESSES,
    check_backend_address,
    parse_ip,
    parse_registration,
)
from lbserver.errors import InvalidArgumentError

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def v4_in(network: str) -> st.SearchStrategy[ipaddress.IPv4Address]:
    net = ipaddress.IPv4Network(network)
    first = int(net.network_address)
    return st.integers(first, first + net.num_addresses - 1).map(V4)


def v6_in(network: str) -> st.SearchStrategy[ipaddress.IPv6Address]:
    net = ipaddress.IPv6Network(network)
    first = int(net.network_address)
    return st.integers(first, first + net.num_addresses - 1).map(V6)


def mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """::ffff:a.b.c.d, which a dual-stack socket connects to as a.b.c.d."""
    return V6(f"::ffff:{ip}")


def nat64(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """64:ff9b::a.b.c.d, which a NAT64 gateway forwards to a.b.c.d."""
    return V6(int(V6("64:ff9b::")) | int(ip))


def refused(ip: IPAddress, *, allow_loopback: bool = False) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as error:
        check_backend_address(ip, allow_loopback=allow_loopback)
    assert error.value.field == "ip"
    assert str(ip) in str(error.value)
    return error.value


# IPv4 addresses no client may be sent to, whatever the balancer allows.
NEVER_V4 = st.one_of(
    v4_in("169.254.0.0/16"),  # link-local: the metadata service
    v4_in("0.0.0.0/8"),  # "this network", with the unspecified address
    v4_in("224.0.0.0/4"),  # multicast
    st.just(V4("255.255.255.255")),  # broadcast
    st.sampled_from(sorted(a for a in METADATA_ADDRESSES if isinstance(a, V4))),
)
NEVER_V6 = st.one_of(
    v6_in("fe80::/10"),  # link-local
    v6_in("ff00::/8"),  # multicast
    st.just(V6("::")),
    v6_in("::/96").filter(lambda ip: ip != V6("::1")),  # IPv4-compatible, deprecated
    st.sampled_from(sorted(a for a in METADATA_ADDRESSES if isinstance(a, V6))),
)
LOOPBACK_V4 = v4_in("127.0.0.0/8")

# Ordinary backend addresses: RFC 1918, shared (CGNAT, pod ranges), ULA, and
# public ranges; metadata services are the only exceptions inside them.
PRIVATE_V4 = st.one_of(
    v4_in("10.0.0.0/8"),
    v4_in("172.16.0.0/12"),
    v4_in("192.168.0.0/16"),
    v4_in("100.64.0.0/10"),
).filter(lambda ip: ip not in METADATA_ADDRESSES)
PUBLIC_V4 = st.one_of(
    v4_in("1.0.0.0/8"),
    v4_in("8.0.0.0/5"),
    v4_in("128.0.0.0/2").filter(lambda ip: ip not in ipaddress.IPv4Network("169.254.0.0/16")),
    v4_in("192.0.0.0/3").filter(lambda ip: ip < V4("224.0.0.0")),
    # Class E: not broadcast, and GKE can give pods these.
    v4_in("240.0.0.0/4").filter(lambda ip: ip != V4("255.255.255.255")),
)
ORDINARY_V6 = st.one_of(
    v6_in("fc00::/7").filter(lambda ip: ip not in METADATA_ADDRESSES),
    v6_in("2000::/3"),
)


@given(NEVER_V4, st.booleans())
def test_never_allowed_ipv4_is_refused_in_every_form(ip: V4, allow_loopback: bool) -> None:
    for form in (ip, mapped(ip), nat64(ip)):
        refused(form, allow_loopback=allow_loopback)


@given(NEVER_V6, st.booleans())
def test_never_allowed_ipv6_is_refused(ip: V6, allow_loopback: bool) -> None:
    refused(ip, allow_loopback=allow_loopback)


@given(v4_in("169.254.0.0/16"))
def test_link_local_is_refused_as_link_local(ip: V4) -> None:
    assert "link-local" in str(refused(ip))
    assert "link-local" in str(refused(mapped(ip)))


@given(v6_in("fe80::/10"))
def test_ipv6_link_local_is_refused_as_link_local(ip: V6) -> None:
    assert "link-local" in str(refused(ip))


@given(st.one_of(LOOPBACK_V4, LOOPBACK_V4.map(mapped), st.just(V6("::1"))))
def test_loopback_only_when_allowed(ip: IPAddress) -> None:
    assert "loopback" in str(refused(ip, allow_loopback=False))
    check_backend_address(ip, allow_loopback=True)


@given(st.one_of(PRIVATE_V4, PUBLIC_V4), st.booleans())
def test_ordinary_ipv4_is_accepted_in_every_form(ip: V4, allow_loopback: bool) -> None:
    for form in (ip, mapped(ip), nat64(ip)):
        check_backend_address(form, allow_loopback=allow_loopback)


@given(ORDINARY_V6, st.booleans())
def test_ordinary_ipv6_is_accepted(ip: V6, allow_loopback: bool) -> None:
    check_backend_address(ip, allow_loopback=allow_loopback)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",  # AWS, GCP, Azure, OCI metadata
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "::ffff:169.254.169.254",
        "::ffff:a9fe:a9fe",
        "64:ff9b::169.254.169.254",
        "::169.254.169.254",
        "255.255.255.255",
        "::ffff:255.255.255.255",
        "0.1.2.3",
        "fe80::1%eth0",
        "fd00::1%eth0",  # a zone index names an interface of one host
    ],
)
def test_known_bad_addresses(address: str) -> None:
    refused(ipaddress.ip_address(address), allow_loopback=True)


def test_message_says_which_address_and_why() -> None:
    with pytest.raises(InvalidArgumentError) as error:
        check_backend_address(V4("169.254.169.254"), allow_loopback=True, field="backend.ip")
    assert error.value.field == "backend.ip"
    assert str(error.value).startswith("backend.ip: 169.254.169.254 is link-local")
    with pytest.raises(InvalidArgumentError, match=r"reaches 127\.0\.0\.1, which is a loopback"):
        check_backend_address(V6("::ffff:127.0.0.1"), allow_loopback=False)


@given(st.one_of(v4_in("0.0.0.0/32"), v4_in("224.0.0.0/4")))
def test_unconnectable_has_one_implementation(ip: V4) -> None:
    """Unspecified and multicast: the policy refuses exactly as parse_ip
    does (same message), in the IPv4-mapped form too."""
    for form in (ip, mapped(ip)):
        with pytest.raises(InvalidArgumentError) as parsed:
            parse_ip("ip", str(form))
        assert str(refused(form, allow_loopback=True)) == str(parsed.value)


@pytest.mark.parametrize("address", ["169.254.169.254", "127.0.0.1", "::1", "fe80::1"])
def test_registration_itself_does_not_apply_the_policy(address: str) -> None:
    """The registrar cannot know the balancer's policy (loopback allowed or
    not): parse_registration, shared by both, leaves it to the balancer."""
    reg = parse_registration(service="oap", instance_id="", ip=address, port=80)
    assert reg.ip == ipaddress.ip_address(address)
