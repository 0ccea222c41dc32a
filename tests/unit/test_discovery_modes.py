"""Kubernetes discovery modes in the Balancer: who may heartbeat and who is
listed, driven through the EndpointsCallback."""

from __future__ import annotations

import ipaddress

import pytest

from lbserver.balancer import Balancer
from lbserver.discovery import Endpoint
from lbserver.domain.model import Registration
from lbserver.errors import RegistrationRefusedError


def endpoint(n: int, *, ready: bool = True, terminating: bool = False) -> Endpoint:
    return Endpoint(
        ip=f"10.0.0.{n}",
        port=11800,
        ready=ready,
        serving=ready or terminating,
        terminating=terminating,
        zone="z1",
        pod=f"oap-{n}",
    )


def heartbeat(n: int) -> Registration:
    return Registration(
        service="oap", instance_id=f"oap-{n}", ip=ipaddress.ip_address(f"10.0.0.{n}"), port=11800
    )


def listed(balancer: Balancer) -> set[str]:
    servers = balancer.server_list("oap")
    tokens = {e.token for e in servers.entries} if servers else set()
    return {b.instance_id for b in balancer.membership.backends("oap") if b.token in tokens}


def test_both_mode_refuses_until_endpoints_are_known() -> None:
    balancer = Balancer(discovery={"oap": "both"})
    with pytest.raises(RegistrationRefusedError) as error:
        balancer.heartbeat(heartbeat(1))
    assert error.value.status == "unavailable"


def test_both_mode_accepts_only_ready_endpoints() -> None:
    balancer = Balancer(discovery={"oap": "both"})
    balancer.set_endpoints("oap", frozenset({endpoint(1), endpoint(2, ready=False)}))
    balancer.heartbeat(heartbeat(1))
    for outsider in (2, 3):  # not ready; not an endpoint at all
        with pytest.raises(RegistrationRefusedError) as error:
            balancer.heartbeat(heartbeat(outsider))
        assert error.value.status == "permission_denied"
        assert f"10.0.0.{outsider}:11800" in str(error.value)
    assert listed(balancer) == {"oap-1"}
    assert [b.instance_id for b in balancer.membership.backends("oap")] == ["oap-1"]


def test_both_mode_terminating_endpoint_leaves_the_list_at_once() -> None:
    balancer = Balancer(discovery={"oap": "both"})
    balancer.set_endpoints("oap", frozenset({endpoint(1), endpoint(2)}))
    balancer.heartbeat(heartbeat(1))
    balancer.heartbeat(heartbeat(2))
    assert listed(balancer) == {"oap-1", "oap-2"}
    balancer.set_endpoints("oap", frozenset({endpoint(1), endpoint(2, terminating=True)}))
    assert listed(balancer) == {"oap-1"}
    # An unreachable API server changes nothing.
    balancer.set_endpoints("oap", None)
    assert listed(balancer) == {"oap-1"}
    balancer.set_endpoints("oap", frozenset({endpoint(1), endpoint(2)}))
    assert listed(balancer) == {"oap-1", "oap-2"}


def test_kubernetes_mode_lists_ready_endpoints_and_refuses_heartbeats() -> None:
    balancer = Balancer(discovery={"oap": "kubernetes"})
    balancer.set_endpoints("oap", frozenset({endpoint(1), endpoint(2), endpoint(3, ready=False)}))
    assert listed(balancer) == {"oap-1", "oap-2"}
    backend = balancer.membership.get("oap", "oap-1")
    assert backend is not None and backend.registration.zone == "z1"
    with pytest.raises(RegistrationRefusedError) as error:
        balancer.heartbeat(heartbeat(1))
    assert error.value.status == "failed_precondition"
    balancer.set_endpoints("oap", frozenset({endpoint(2)}))
    assert listed(balancer) == {"oap-2"}
    balancer.tick()  # members from Kubernetes never expire by TTL
    assert listed(balancer) == {"oap-2"}


def test_heartbeat_mode_ignores_endpoints() -> None:
    balancer = Balancer()
    balancer.set_endpoints("oap", frozenset({endpoint(1)}))
    balancer.heartbeat(heartbeat(5))
    assert listed(balancer) == {"oap-5"}
