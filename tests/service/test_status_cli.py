"""`lbserver status` against a fake Admin server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from lbserver.cli import main
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc

NOW = timestamp_pb2.Timestamp(seconds=1_700_000_000)


def known_state() -> pb.GetStateResponse:
    return pb.GetStateResponse(
        version="9.9.9",
        now=NOW,
        services=[
            pb.ServiceStatus(
                name="oap",
                clients=3,
                list_length=4,
                client_stats=pb.ClientCallStats(
                    calls_started=100,
                    calls_finished=98,
                    calls_finished_with_client_failed_to_send=1,
                    calls_finished_known_received=96,
                    calls_dropped_by_token={"tok-drop": 2},
                ),
                backends=[
                    pb.BackendStatus(
                        instance_id="oap-0",
                        ip="10.0.0.1",
                        port=11800,
                        zone="eu-1a",
                        labels={"pod": "oap-0"},
                        state=pb.BACKEND_STATE_SERVING,
                        weight=1,
                        load=pb.LoadReport(cpu_utilization=0.5, requests_per_second=120.0),
                        load_balance_token="tok0",
                        last_heartbeat=timestamp_pb2.Timestamp(seconds=NOW.seconds - 2),
                        ttl=duration_pb2.Duration(seconds=9),
                        list_entries=3,
                        share=0.75,
                        effective_weight=240.0,
                    ),
                    pb.BackendStatus(
                        instance_id="[fd00::2]:11800",
                        ip="fd00::2",
                        port=11800,
                        state=pb.BACKEND_STATE_DRAINING,
                        weight=2,
                        load_balance_token="tok1",
                        list_entries=1,
                        share=0.25,
                    ),
                ],
            ),
            pb.ServiceStatus(name="empty"),
        ],
    )


class FakeAdmin(pb_grpc.AdminServicer):
    def __init__(self) -> None:
        self.requests: list[pb.GetStateRequest] = []

    def GetState(
        self, request: pb.GetStateRequest, context: grpc.ServicerContext
    ) -> pb.GetStateResponse:
        self.requests.append(request)
        return known_state()


@pytest.fixture
def admin() -> Iterator[tuple[FakeAdmin, str]]:
    # A thread-pool server: the CLI blocks the calling thread while it waits.
    fake = FakeAdmin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AdminServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


def test_json(admin: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str]) -> None:
    fake, address = admin
    assert main(["status", "--balancer", address, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert fake.requests == [pb.GetStateRequest()]
    assert document["balancer"] == address
    assert document["version"] == "9.9.9"
    assert document["now"] == "2023-11-14T22:13:20Z"
    assert [s["name"] for s in document["services"]] == ["oap", "empty"]
    oap = document["services"][0]
    assert oap["clients"] == 3
    assert oap["list_length"] == 4
    assert oap["drop_entries"] == 0
    assert oap["client_stats"] == {
        "calls_started": 100,
        "calls_finished": 98,
        "calls_finished_with_client_failed_to_send": 1,
        "calls_finished_known_received": 96,
        "calls_dropped_by_token": {"tok-drop": 2},
    }
    first, second = oap["backends"]
    assert first == {
        "instance_id": "oap-0",
        "address": "10.0.0.1:11800",
        "ip": "10.0.0.1",
        "port": 11800,
        "zone": "eu-1a",
        "labels": {"pod": "oap-0"},
        "state": "serving",
        "weight": 1,
        "effective_weight": 240.0,
        "list_entries": 3,
        "share": 0.75,
        "load": {
            "cpu_utilization": 0.5,
            "requests_per_second": 120.0,
            "errors_per_second": None,
            "in_flight": None,
        },
        "load_balance_token": "tok0",
        "last_heartbeat": "2023-11-14T22:13:18Z",
        "last_heartbeat_age_seconds": 2.0,
        "ttl_seconds": 9.0,
    }
    assert second["address"] == "[fd00::2]:11800"
    assert second["state"] == "draining"
    assert second["load"] == dict.fromkeys(first["load"])
    assert second["last_heartbeat"] is None
    assert second["last_heartbeat_age_seconds"] is None
    assert second["ttl_seconds"] is None
    empty = document["services"][1]
    assert empty["backends"] == []
    assert empty["client_stats"]["calls_dropped_by_token"] == {}


def test_service_filter_is_sent(
    admin: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, address = admin
    assert main(["status", "--balancer", address, "--service", "oap", "--json"]) == 0
    assert fake.requests == [pb.GetStateRequest(service="oap")]


def test_table(admin: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, address = admin
    assert main(["status", "--balancer", address]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "9.9.9" in lines[0]
    assert "service oap: 2 backends, 3 clients, list length 4" in out
    header = next(line for line in lines if "BACKEND" in line).split()
    assert header[:3] == ["BACKEND", "ZONE", "STATE"]
    row = next(line for line in lines if line.strip().startswith("10.0.0.1:11800")).split()
    assert row[:8] == ["10.0.0.1:11800", "eu-1a", "serving", "1", "240", "3", "75.0%", "50%"]
    assert "2.0s" in row
    assert "tok0" in row
    assert "oap-0" in row
    row = next(line for line in lines if line.strip().startswith("[fd00::2]:11800")).split()
    assert row[:8] == ["[fd00::2]:11800", "-", "draining", "2", "0", "1", "25.0%", "-"]
    assert "client stats: 100 started, 98 finished" in out
    assert "2 dropped (tok-drop: 2)" in out
    assert "service empty: 0 backends" in out


def test_unreachable_balancer_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    # A port nobody listens on: bound then closed.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(["status", "--balancer", f"127.0.0.1:{port}", "--timeout", "5"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert f"cannot reach balancer at 127.0.0.1:{port}" in captured.err


def test_bad_balancer_address_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    # "nope" alone is a host on port 11810; a bad port is not.
    with pytest.raises(SystemExit) as exit_info:
        main(["status", "--balancer", "nope:x"])
    assert exit_info.value.code == 2
    assert "--balancer" in capsys.readouterr().err


SNAPSHOT = Path(__file__).parent / "snapshots" / "status_table.txt"


def test_table_snapshot() -> None:
    """The whole table for a known state; regenerate on purpose with
    UPDATE_SNAPSHOTS=1 and review the diff."""
    from lbserver.cli.status import render_tables

    rendered = render_tables(known_state(), "127.0.0.1:11810")
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(rendered)
    assert rendered == SNAPSHOT.read_text()
