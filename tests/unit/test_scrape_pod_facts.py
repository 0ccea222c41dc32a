"""Which container of a pod the load scraper reads, and its CPU limit."""

from __future__ import annotations

from lbserver.discovery._pods import PodScrapeFacts, scrape_facts
from tests.support.fake_kube import container, pod

OAP = pod(
    "oap-0",
    uid="u-1",
    containers=[
        container("proxy", ports=[(None, 15000)], cpu_limit="1"),
        container("oap", ports=[("grpc", 11800), ("monitoring", 1234)], cpu_limit="1500m"),
    ],
)


def test_a_named_port_picks_its_container() -> None:
    assert scrape_facts(OAP, "monitoring") == PodScrapeFacts("u-1", 1234, 1.5, "oap")


def test_a_numbered_port_picks_its_container() -> None:
    assert scrape_facts(OAP, 1234) == PodScrapeFacts("u-1", 1234, 1.5, "oap")


def test_a_port_no_container_declares_uses_the_first_container() -> None:
    # A number is scraped even when undeclared (containers need not list ports).
    assert scrape_facts(OAP, 9999) == PodScrapeFacts("u-1", 9999, 1.0, "proxy")
    assert scrape_facts(OAP, "metrics") == PodScrapeFacts("u-1", None, 1.0, "proxy")


def test_no_limit_or_an_unreadable_one_is_none() -> None:
    plain = pod("p", containers=[container("c", ports=[("m", 1)])])
    assert scrape_facts(plain, "m").cpu_limit is None
    odd = pod("p", containers=[container("c", cpu_limit="2000000n")])
    assert scrape_facts(odd, 1).cpu_limit is None


def test_a_pod_without_containers() -> None:
    assert scrape_facts({"metadata": {}}, "m") == PodScrapeFacts("", None, None, "")
