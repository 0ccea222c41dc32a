"""Pure helpers of the balanced channels and the Selector: request replay,
metadata, the retry rule, server list entries and the ClientStats message."""

from __future__ import annotations

import grpc
import pytest

from agent_shim._balancer_stream import client_stats_message, server_address
from agent_shim._common import balancer_addresses, failed_before_backend, with_token
from agent_shim._picker import StatsDelta
from agent_shim._selector import Choice
from agent_shim._sync_call import EndedCall as LocalRpcError
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb_pb2
from tests.support.request_tape import RequestTape


def test_a_new_view_replays_what_earlier_views_consumed_then_continues() -> None:
    tape = RequestTape(iter(range(5)), limit=10)
    first = tape.view()
    assert [next(first), next(first)] == [0, 1]
    second = tape.view()
    assert list(second) == [0, 1, 2, 3, 4]
    assert list(first) == []  # retired: it never reads the source again
    assert tape.replayable()


def test_past_the_limit_the_tape_is_no_longer_replayable() -> None:
    tape = RequestTape(iter(range(5)), limit=2)
    assert list(tape.view()) == [0, 1, 2, 3, 4]
    assert not tape.replayable()


def test_an_exhausted_source_replays_in_full() -> None:
    tape = RequestTape(["a", "b"], limit=2)
    assert list(tape.view()) == ["a", "b"]
    assert list(tape.view()) == ["a", "b"]


def test_balancer_addresses_accept_strings_lists_and_commas() -> None:
    assert balancer_addresses("a:1") == ("a:1",)
    assert balancer_addresses("a:1, b:2") == ("a:1", "b:2")
    assert balancer_addresses(["a:1", "b:2,c:3"]) == ("a:1", "b:2", "c:3")
    with pytest.raises(ValueError, match="balancer"):
        balancer_addresses(" , ")


def test_the_token_is_added_and_replaces_the_callers() -> None:
    choice = Choice("10.0.0.1:1", "tok", object())
    metadata = (("x-a", "1"), ("LB-Token", "forged"), ("x-b-bin", b"\x00"))
    assert with_token(metadata, choice) == (("x-a", "1"), ("x-b-bin", b"\x00"), ("lb-token", "tok"))
    assert with_token(None, Choice("f:1", "", object())) == ()


def test_only_unavailable_without_a_response_counts_as_not_reaching_the_backend() -> None:
    assert failed_before_backend(grpc.StatusCode.UNAVAILABLE, ())
    assert not failed_before_backend(grpc.StatusCode.UNAVAILABLE, (("k", "v"),))
    assert not failed_before_backend(grpc.StatusCode.DEADLINE_EXCEEDED, ())
    assert not failed_before_backend(grpc.StatusCode.OK, ())


def test_local_errors_are_calls_futures_and_failing_iterators() -> None:
    error = LocalRpcError(grpc.StatusCode.UNAVAILABLE, "no list")
    assert isinstance(error, grpc.RpcError)
    assert isinstance(error, grpc.Call)
    assert isinstance(error, grpc.Future)
    assert (error.code(), error.details(), error.done()) == (
        grpc.StatusCode.UNAVAILABLE,
        "no list",
        True,
    )
    assert error.exception() is error
    with pytest.raises(LocalRpcError):
        error.result()
    with pytest.raises(LocalRpcError):
        next(iter(error))
    seen: list[object] = []
    error.add_done_callback(seen.append)
    assert seen == [error]


@pytest.mark.parametrize(
    ("ip", "port", "expected"),
    [
        (bytes([10, 0, 0, 7]), 11800, "10.0.0.7:11800"),
        (bytes(15) + b"\x01", 443, "[::1]:443"),
        (b"\x01\x02", 80, None),
        (bytes([10, 0, 0, 7]), 0, None),
        (bytes([10, 0, 0, 7]), 70000, None),
    ],
)
def test_server_list_entries_become_addresses(ip: bytes, port: int, expected: str | None) -> None:
    assert server_address(lb_pb2.Server(ip_address=ip, port=port)) == expected


def test_client_stats_message_carries_the_delta_and_a_timestamp() -> None:
    delta = StatsDelta(
        calls_started=5,
        calls_finished=4,
        calls_finished_with_client_failed_to_send=1,
        calls_finished_known_received=2,
        calls_dropped_by_token={"b": 1, "a": 2},
    )
    stats = client_stats_message(delta, 1700000000.5).client_stats
    assert (stats.num_calls_started, stats.num_calls_finished) == (5, 4)
    assert stats.num_calls_finished_with_client_failed_to_send == 1
    assert stats.num_calls_finished_known_received == 2
    assert [(d.load_balance_token, d.num_calls) for d in stats.calls_finished_with_drop] == [
        ("a", 2),
        ("b", 1),
    ]
    assert (stats.timestamp.seconds, stats.timestamp.nanos) == (1700000000, 500_000_000)
