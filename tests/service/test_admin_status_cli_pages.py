"""`lbserver status` reading a paged Admin.GetState from a fake server on
127.0.0.1: pages put together again, the --json layout unchanged, a reply
over gRPC's default 4 MB limit still read, refused client stats shown."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from lbserver.cli import main
from lbserver.cli.status import render_tables
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.support.fake_admin import serve_admin


def backend(name: str, **fields: object) -> pb.BackendStatus:
    return pb.BackendStatus(instance_id=name, ip="10.0.0.1", port=80, **fields)  # type: ignore[arg-type]


STATS = pb.ClientCallStats(calls_started=5, calls_dropped_by_token={"lbserver-drop": 1})
PAGES = {
    "": pb.GetStateResponse(
        version="9.9.9",
        services=[
            pb.ServiceStatus(
                name="a", clients=2, client_stats=STATS, backends=[backend("a1"), backend("a2")]
            )
        ],
        next_page_token="p2",
    ),
    "p2": pb.GetStateResponse(
        version="9.9.9",
        services=[
            pb.ServiceStatus(name="a", continued=True, backends=[backend("a3")]),
            pb.ServiceStatus(name="b", list_length=1, backends=[backend("b1")]),
        ],
        next_page_token="p3",
    ),
    "p3": pb.GetStateResponse(
        version="9.9.9",
        services=[pb.ServiceStatus(name="b", continued=True, backends=[backend("b2")])],
    ),
}


class PagingAdmin(pb_grpc.AdminServicer):
    def __init__(self, pages: dict[str, pb.GetStateResponse]) -> None:
        self.pages = pages
        self.requests: list[pb.GetStateRequest] = []

    def GetState(
        self, request: pb.GetStateRequest, context: grpc.ServicerContext
    ) -> pb.GetStateResponse:
        self.requests.append(request)
        return self.pages[request.page_token]


def serve(pages: dict[str, pb.GetStateResponse]) -> Iterator[tuple[PagingAdmin, str]]:
    fake = PagingAdmin(pages)
    for address in serve_admin(fake):
        yield fake, address


@pytest.fixture
def paging() -> Iterator[tuple[PagingAdmin, str]]:
    yield from serve(PAGES)


def test_pages_are_put_together(
    paging: tuple[PagingAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, address = paging
    assert main(["status", "--balancer", address, "--json", "--service", ""]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [r.page_token for r in fake.requests] == ["", "p2", "p3"]
    services = document["services"]
    assert [(s["name"], [b["instance_id"] for b in s["backends"]]) for s in services] == [
        ("a", ["a1", "a2", "a3"]),
        ("b", ["b1", "b2"]),
    ]
    # The first entry of a service carries its numbers; continuations only backends.
    assert (services[0]["clients"], services[0]["client_stats"]["calls_started"]) == (2, 5)
    assert services[1]["list_length"] == 1
    assert set(services[0]) == {
        "name",
        "clients",
        "list_length",
        "drop_entries",
        "client_stats",
        "backends",
    }
    assert set(services[0]["client_stats"]) == {
        "calls_started",
        "calls_finished",
        "calls_finished_with_client_failed_to_send",
        "calls_finished_known_received",
        "calls_dropped_by_token",
    }


def test_the_service_filter_goes_with_every_page(
    paging: tuple[PagingAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, address = paging
    assert main(["status", "--balancer", address, "--service", "a"]) == 0
    assert [(r.service, r.page_token) for r in fake.requests] == [
        ("a", ""),
        ("a", "p2"),
        ("a", "p3"),
    ]
    assert "service a: 3 backends, 2 clients" in capsys.readouterr().out


def test_a_token_that_repeats_ends_the_paging(capsys: pytest.CaptureFixture[str]) -> None:
    looping = {
        "": pb.GetStateResponse(services=[pb.ServiceStatus(name="a")], next_page_token="again"),
        "again": pb.GetStateResponse(
            services=[pb.ServiceStatus(name="a", continued=True, backends=[backend("a1")])],
            next_page_token="again",
        ),
    }
    for fake, address in serve(looping):
        assert main(["status", "--balancer", address, "--json"]) == 0
        assert [r.page_token for r in fake.requests] == ["", "again"]
    (service,) = json.loads(capsys.readouterr().out)["services"]
    assert [b["instance_id"] for b in service["backends"]] == ["a1"]


def test_a_reply_over_4_mb_from_a_balancer_without_pages_is_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    labels = {f"k{i}": "v" * 200 for i in range(20)}
    whole = pb.GetStateResponse(
        services=[
            pb.ServiceStatus(
                name="a", backends=[backend(f"a{n}", labels=labels) for n in range(1200)]
            )
        ]
    )
    assert whole.ByteSize() > 4 * 1024 * 1024
    for _, address in serve({"": whole}):
        assert main(["status", "--balancer", address, "--json"]) == 0, capsys.readouterr().err
    (service,) = json.loads(capsys.readouterr().out)["services"]
    assert len(service["backends"]) == 1200


def test_tables_say_what_client_stats_were_refused() -> None:
    state = pb.GetStateResponse(
        services=[
            pb.ServiceStatus(
                name="a",
                client_stats=pb.ClientCallStats(
                    calls_dropped_other_tokens=7, drop_tokens_ignored=3, counters_clamped=1
                ),
            ),
            pb.ServiceStatus(name="b"),
        ]
    )
    lines = render_tables(state, "127.0.0.1:1").splitlines()
    refused = [line for line in lines if "refused" in line]
    assert refused == [
        "  client stats refused: 7 dropped under tokens not in the list (3 tokens ignored), "
        "1 counter clamped to the per-report bound"
    ]
