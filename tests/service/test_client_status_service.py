"""`lbserver status --service NAME` for a service the balancer does not know:
a message naming the known services on stderr and exit code 3, against a
fake Admin server on 127.0.0.1 that filters like the balancer's."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from lbserver.cli import main
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.support.fake_admin import serve_admin


class FilteringAdmin(pb_grpc.AdminServicer):
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.requests: list[pb.GetStateRequest] = []

    def GetState(
        self, request: pb.GetStateRequest, context: grpc.ServicerContext
    ) -> pb.GetStateResponse:
        self.requests.append(request)
        return pb.GetStateResponse(
            version="9.9.9",
            services=[
                pb.ServiceStatus(name=name) for name in self.names if request.service in ("", name)
            ],
        )


def serve(names: list[str]) -> Iterator[tuple[FilteringAdmin, str]]:
    fake = FilteringAdmin(names)
    for address in serve_admin(fake):
        yield fake, address


@pytest.fixture
def admin() -> Iterator[tuple[FilteringAdmin, str]]:
    yield from serve(["oap", "satellite"])


@pytest.fixture
def empty_admin() -> Iterator[tuple[FilteringAdmin, str]]:
    yield from serve([])


@pytest.mark.parametrize("output", [[], ["--json"]])
def test_unknown_service_exits_3_naming_the_known_ones(
    admin: tuple[FilteringAdmin, str], output: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = admin
    code = main(["status", "--balancer", address, "--service", "nope", *output])
    captured = capsys.readouterr()
    assert code == 3
    assert captured.out == ""
    first, *rest = captured.err.splitlines()
    assert first == f"lbserver status: no service 'nope' on {address}"
    assert rest == ["known services: oap, satellite"]


def test_unknown_service_on_a_balancer_without_services(
    empty_admin: tuple[FilteringAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = empty_admin
    assert main(["status", "--balancer", address, "--service", "nope"]) == 3
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"lbserver status: no service 'nope' on {address}",
        "known services: none",
    ]


def test_known_service_still_exits_0(
    admin: tuple[FilteringAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, address = admin
    assert main(["status", "--balancer", address, "--service", "oap", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in document["services"]] == ["oap"]
    # One call when the service exists.
    assert fake.requests == [pb.GetStateRequest(service="oap")]


def test_no_filter_on_an_empty_balancer_is_not_an_error(
    empty_admin: tuple[FilteringAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = empty_admin
    assert main(["status", "--balancer", address]) == 0
    assert "no services" in capsys.readouterr().out
