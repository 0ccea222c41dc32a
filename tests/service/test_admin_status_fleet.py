"""`lbserver status` (the CLI, through its run function) against a real
grpc.aio server on 127.0.0.1 with 10,000 backends: about 6 MB of state, more
than gRPC's default 4 MB receive limit if the balancer sent it in one reply."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Sequence

import pytest

from lbserver.balancer import Balancer, ListSettings
from lbserver.cli import main
from lbserver.domain.model import Registration
from lbserver.domain.weights import LoadWeightSettings, SheddingSettings
from tests.service.conftest import Harness

BIG = 10_000
# ~450 bytes of labels a backend: 10,000 backends are a ~6 MB state, over
# gRPC's default 4 MB receive limit if sent whole.
LABELS = {"pod": "p" * 150, "team": "t" * 150, "rack": "r" * 150}


def plain_balancer(max_backends_per_service: int = 1000) -> Balancer:
    """A balancer whose lists hold one entry per backend: the registrations
    below have equal weights and report no load, and neither slow start nor
    shedding is on."""
    return Balancer(
        load_settings=LoadWeightSettings(slow_start=0.0),
        list_settings=ListSettings(shedding=SheddingSettings(utilization=0.0)),
        max_backends_per_service=max_backends_per_service,
    )


def registration(service: str, n: int, labels: dict[str, str] | None = None) -> Registration:
    return Registration(
        service=service,
        instance_id=f"{service}-{n}",
        ip=ipaddress.ip_address(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"),
        port=11800,
        labels=labels or {},
    )


def register(balancer: Balancer, registrations: Sequence[Registration]) -> None:
    """Many backends at once: membership directly, then one heartbeat
    through the balancer so that the list is built once, not per backend."""
    *first, last = registrations
    for r in first:
        balancer.membership.heartbeat(r, time.monotonic(), time.time())
    balancer.heartbeat(last)


def fleet_balancer() -> Balancer:
    balancer = plain_balancer(max_backends_per_service=BIG)
    register(balancer, [registration("big", n, LABELS) for n in range(BIG)])
    register(balancer, [registration("small", n) for n in range(3)])
    return balancer


@pytest.fixture
def fleet() -> Balancer:
    return fleet_balancer()


def expected_ids(balancer: Balancer, service: str) -> list[str]:
    return [b.instance_id for b in balancer.membership.backends(service)]


async def test_status_cli_shows_10000_backends(
    harness: Harness, fleet: Balancer, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await harness.start(balancer=fleet)
    address = f"127.0.0.1:{running.port}"
    # The CLI blocks its thread while the server runs on this loop.
    code = await asyncio.to_thread(main, ["status", "--balancer", address, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    services = document["services"]
    assert [s["name"] for s in services] == ["big", "small"]
    big = services[0]
    assert [b["instance_id"] for b in big["backends"]] == expected_ids(fleet, "big")
    assert big["list_length"] == BIG
    assert big["backends"][-1]["labels"] == LABELS
    assert set(big) == {
        "name",
        "clients",
        "list_length",
        "drop_entries",
        "client_stats",
        "backends",
    }

    code = await asyncio.to_thread(
        main, ["status", "--balancer", address, "--json", "--service", "big"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    only = json.loads(captured.out)["services"]
    assert [s["name"] for s in only] == ["big"]
    assert len(only[0]["backends"]) == BIG

    code = await asyncio.to_thread(main, ["status", "--balancer", address])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "service big: 10000 backends" in captured.out
    assert "service small: 3 backends" in captured.out
