"""The shim's pure grpclb client bookkeeping: weighted round robin in list
order, drops, failing backends, and the ClientStats counters."""

from __future__ import annotations

import random

import pytest

from agent_shim._errors import DroppedCallError, NoBackendError
from agent_shim._picker import CallStats, Picker, ServerEntry, StatsDelta
from lbserver.backoff import Backoff

A, B, C = "10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"


def entry(address: str) -> ServerEntry:
    return ServerEntry(address, f"t-{address}")


DROP = ServerEntry("", "drop-token", drop=True)


def picks(picker: Picker, n: int, now: float = 0.0) -> list[str]:
    result = []
    for _ in range(n):
        try:
            result.append(picker.pick(now).address)
        except DroppedCallError as error:
            result.append(f"drop:{error.token}")
    return result


def listed(*entries: ServerEntry, count_stats: bool = True) -> Picker:
    picker = Picker()
    picker.update(entries, count_stats=count_stats)
    return picker


def test_round_robin_follows_the_list_in_order() -> None:
    assert picks(listed(entry(A), entry(B), entry(C)), 6) == [A, B, C, A, B, C]


def test_a_backend_listed_twice_gets_twice_the_calls() -> None:
    order = picks(listed(entry(A), entry(B), entry(A)), 9)
    assert order == [A, B, A] * 3
    assert order.count(A) == 2 * order.count(B)


def test_start_offsets_the_cursor() -> None:
    picker = Picker()
    picker.update([entry(A), entry(B), entry(C)], count_stats=True, start=4)
    assert picks(picker, 3) == [B, C, A]


def test_drop_entries_fail_their_exact_share_and_are_counted() -> None:
    picker = listed(entry(A), DROP, entry(B))
    assert picks(picker, 6) == [A, "drop:drop-token", B] * 2
    delta = picker.take_stats()
    assert delta.calls_dropped_by_token == {"drop-token": 2}
    # C-core counts a drop as started and finished, too.
    assert (delta.calls_started, delta.calls_finished) == (6, 2)


def test_a_list_of_only_drops_drops_every_call() -> None:
    picker = listed(DROP, DROP)
    with pytest.raises(DroppedCallError):
        picker.pick(0.0)
    with pytest.raises(DroppedCallError):
        picker.pick(0.0)


def test_a_retry_is_never_dropped() -> None:
    picker = listed(DROP, entry(A), entry(B))
    assert picker.pick(0.0, exclude={B}).address == A
    assert picker.take_stats().calls_dropped_by_token == {}


def test_empty_list_fails_every_call() -> None:
    with pytest.raises(NoBackendError):
        listed().pick(0.0)


def test_failing_backend_is_skipped_until_its_backoff_ends() -> None:
    picker = listed(entry(A), entry(B), entry(C))
    first = picker.pick(0.0)
    assert first.address == A
    picker.finished(A, 0.0, counted=True, reached_backend=False, failed=True)
    assert picks(picker, 4, now=0.5) == [B, C, B, C]
    # The first mark lasts 1 s.
    assert picks(picker, 3, now=1.5) == [A, B, C]


def test_repeated_failures_back_off_longer_and_success_clears() -> None:
    picker = listed(entry(A), entry(B))
    picker.finished(A, 0.0, counted=False, reached_backend=False, failed=True)
    picker.finished(A, 1.0, counted=False, reached_backend=False, failed=True)
    assert picker.is_failing(A, 2.5)  # 1.6 s after the second failure
    assert not picker.is_failing(A, 2.7)
    picker.finished(A, 3.0, counted=False, reached_backend=True, failed=False)
    picker.finished(A, 3.0, counted=False, reached_backend=False, failed=True)
    assert not picker.is_failing(A, 4.1)  # back to 1 s after a success


def test_a_call_that_reached_but_failed_keeps_the_mark() -> None:
    picker = listed(entry(A), entry(B))
    picker.finished(A, 0.0, counted=False, reached_backend=False, failed=True)
    picker.finished(A, 0.1, counted=False, reached_backend=True, failed=True)
    assert picker.is_failing(A, 0.5)


def test_when_every_backend_fails_they_are_tried_anyway() -> None:
    picker = listed(entry(A), entry(B))
    for address in (A, B):
        picker.finished(address, 0.0, counted=False, reached_backend=False, failed=True)
    assert picks(picker, 2, now=0.1) == [A, B]


def test_exclude_skips_the_failed_backend_and_fails_when_nothing_is_left() -> None:
    picker = listed(entry(A), entry(B))
    assert picker.pick(0.0, exclude={A}).address == B
    with pytest.raises(NoBackendError):
        listed(entry(A), entry(A)).pick(0.0, exclude={A})


def test_connection_state_hook_marks_backends_failing() -> None:
    down = {B}
    picker = Picker(connection_failing=lambda address: address in down)
    picker.update([entry(A), entry(B), entry(C)], count_stats=True)
    assert picks(picker, 4) == [A, C, A, C]
    down.clear()
    assert picks(picker, 3) == [A, B, C]


def test_marks_of_backends_that_left_the_list_are_forgotten() -> None:
    picker = listed(entry(A), entry(B))
    picker.finished(A, 0.0, counted=False, reached_backend=False, failed=True)
    picker.update([entry(B)], count_stats=True)
    picker.update([entry(A), entry(B)], count_stats=True)
    assert not picker.is_failing(A, 0.1)


def test_a_new_list_restarts_the_order() -> None:
    picker = listed(entry(A), entry(B))
    picker.pick(0.0)
    picker.update([entry(C), entry(A)], count_stats=True)
    assert picks(picker, 2) == [C, A]


def test_stats_count_started_finished_and_how_calls_ended() -> None:
    picker = listed(entry(A), entry(B))
    for reached in (True, True, False):
        chosen = picker.pick(0.0)
        picker.finished(
            chosen.address, 0.0, counted=True, reached_backend=reached, failed=not reached
        )
    picker.pick(0.0)  # still running
    delta = picker.take_stats()
    assert delta == StatsDelta(
        calls_started=4,
        calls_finished=3,
        calls_finished_with_client_failed_to_send=1,
        calls_finished_known_received=2,
    )
    assert picker.take_stats().is_empty()


def test_fallback_lists_are_not_counted() -> None:
    picker = listed(entry(A), count_stats=False)
    picker.pick(0.0)
    picker.finished(A, 0.0, counted=False, reached_backend=True, failed=False)
    assert picker.take_stats().is_empty()


def test_call_stats_are_deltas() -> None:
    stats = CallStats()
    stats.dropped("x")
    stats.dropped("x")
    stats.dropped("y")
    first = stats.take()
    assert dict(first.calls_dropped_by_token) == {"x": 2, "y": 1}
    stats.started()
    second = stats.take()
    assert (second.calls_started, dict(second.calls_dropped_by_token)) == (1, {})
    assert not second.is_empty()
    assert StatsDelta().is_empty()


def test_backoff_grows_by_the_multiplier_up_to_the_cap() -> None:
    backoff = Backoff(initial=1.0, multiplier=1.6, maximum=120.0)
    delays = [backoff.delay(n) for n in range(1, 14)]
    assert delays[:3] == pytest.approx([1.0, 1.6, 2.56])
    assert delays[-1] == 120.0
    assert delays == sorted(delays)


def test_backoff_jitter_stays_within_bounds() -> None:
    backoff = Backoff(initial=10.0, multiplier=1.0, maximum=10.0, jitter=0.2)
    rng = random.Random(7)
    delays = {backoff.delay(1, rng) for _ in range(200)}
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert len(delays) > 1
