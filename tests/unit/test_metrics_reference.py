from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from lbserver import metrics
from lbserver.balancer import Balancer
from lbserver.domain.model import Registration


def test_every_metric_is_in_the_reference() -> None:
    import ipaddress

    balancer = Balancer()
    balancer.heartbeat(
        Registration(service="s", instance_id="i", ip=ipaddress.ip_address("10.0.0.1"), port=1)
    )
    registry = CollectorRegistry()
    metrics.register_balancer(balancer, registry)
    names = {family.name for family in registry.collect()}
    names |= {
        collector._name
        for collector in vars(metrics).values()
        if hasattr(collector, "_name") and hasattr(collector, "_documentation")
    }
    reference = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    missing = sorted(
        name
        for name in names
        if f"`{name}`" not in reference and f"`{name}_total`" not in reference
    )
    assert missing == []
    assert len(names) >= 15
