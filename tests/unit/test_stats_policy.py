"""Client stats policy (lbserver.domain.clientstats) and the Balancer behind
record_client_stats: clamped reports, saturated totals, tokens bounded by
the list, stats forgotten with their service. Fake clock, no I/O."""

from __future__ import annotations

import ipaddress
import random
import string

from lbserver.balancer import Balancer, ClientCallStats
from lbserver.domain.clientstats import (
    INT64_MAX,
    MAX_CALLS_PER_REPORT,
    ClientStatsBook,
    gone_services,
    list_tokens,
)
from lbserver.domain.membership import TtlPolicy
from lbserver.domain.model import Registration
from lbserver.domain.serverlist import DROP_TOKEN, Entry, ServerList
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.services.admin import client_stats_message


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(
    started: int = 0, dropped: dict[str, int] | None = None, *, all_counters: int | None = None
) -> ClientCallStats:
    other = 0 if all_counters is None else all_counters
    return ClientCallStats(
        started if all_counters is None else all_counters,
        other,
        other,
        other,
        calls_dropped_by_token=dict(dropped or {}),
        reports=1,
    )


def servers(*tokens: str) -> ServerList:
    return ServerList(tuple(Entry(b"\x0a\x00\x00\x01", 80, token) for token in tokens))


def random_tokens(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits
    return ["".join(rng.choices(alphabet, k=24)) for _ in range(n)]


def registration(n: int, service: str = "oap") -> Registration:
    return Registration(
        service=service,
        instance_id=f"pod-{n}",
        ip=ipaddress.ip_address(f"10.0.0.{n}"),
        port=11800,
    )


def make(clock: Clock) -> Balancer:
    return Balancer(clock=clock, wall_clock=clock, ttl_policy=TtlPolicy(default=10))


def test_each_counter_of_a_report_is_clamped_and_counted() -> None:
    book = ClientStatsBook()
    book.follow(servers("a"))
    book.record(report(all_counters=INT64_MAX, dropped={"a": INT64_MAX, DROP_TOKEN: 5}))
    totals = book.totals
    assert totals.calls_started == MAX_CALLS_PER_REPORT
    assert totals.calls_finished == MAX_CALLS_PER_REPORT
    assert totals.calls_finished_with_client_failed_to_send == MAX_CALLS_PER_REPORT
    assert totals.calls_finished_known_received == MAX_CALLS_PER_REPORT
    assert totals.calls_dropped_by_token == {"a": MAX_CALLS_PER_REPORT, DROP_TOKEN: 5}
    assert totals.counters_clamped == 5
    assert totals.reports == 1


def test_negative_counters_count_as_nothing() -> None:
    book = ClientStatsBook()
    book.record(report(started=-5, dropped={DROP_TOKEN: -1}))
    assert (book.totals.calls_started, book.totals.calls_dropped_by_token) == (0, {DROP_TOKEN: 0})
    assert book.totals.counters_clamped == 2


def test_totals_saturate_at_the_int64_maximum() -> None:
    book = ClientStatsBook()
    book.follow(servers("a"))
    book.totals.calls_started = INT64_MAX - 10
    book.totals.calls_dropped_by_token["a"] = INT64_MAX - 1
    book.totals.calls_dropped_other_tokens = INT64_MAX
    book.record(report(started=MAX_CALLS_PER_REPORT, dropped={"a": 7, "zzz": 9}))
    totals = book.totals
    assert totals.calls_started == INT64_MAX
    assert totals.calls_dropped_by_token["a"] == INT64_MAX
    assert totals.calls_dropped_other_tokens == INT64_MAX
    # Whatever the totals are, the Admin API's message can carry them.
    assert client_stats_message_of(totals).SerializeToString()


def client_stats_message_of(stats: ClientCallStats) -> pb.ClientCallStats:
    from lbserver.balancer import ServiceView

    return client_stats_message(ServiceView("s", (), ServerList(()), {}, 0, stats))


def test_add_saturates_too() -> None:
    total = ClientCallStats(INT64_MAX, 0, 0, 0, {"t": INT64_MAX}, INT64_MAX)
    total.add(ClientCallStats(INT64_MAX, 1, 0, 0, {"t": INT64_MAX, "u": 1}, 1))
    assert (total.calls_started, total.calls_finished, total.reports) == (INT64_MAX, 1, INT64_MAX)
    assert total.calls_dropped_by_token == {"t": INT64_MAX, "u": 1}


def test_only_list_tokens_and_the_drop_token_are_kept_per_token() -> None:
    book = ClientStatsBook()
    book.follow(servers("a", "b", "a"))
    assert book.accepted_tokens == {"a", "b", DROP_TOKEN}
    noise = random_tokens(1000)
    book.record(report(dropped={"a": 1, DROP_TOKEN: 2, **dict.fromkeys(noise, 3)}))
    totals = book.totals
    assert totals.calls_dropped_by_token == {"a": 1, DROP_TOKEN: 2}
    assert totals.calls_dropped_other_tokens == 3000
    assert totals.drop_tokens_ignored == 1000


def test_without_a_list_only_the_drop_token_is_kept() -> None:
    assert list_tokens(None) == {DROP_TOKEN}
    book = ClientStatsBook()
    book.record(report(dropped={DROP_TOKEN: 1, "old-backend": 4}))
    assert book.totals.calls_dropped_by_token == {DROP_TOKEN: 1}
    assert book.totals.calls_dropped_other_tokens == 4


def test_a_token_that_leaves_the_list_moves_to_the_other_bucket() -> None:
    book = ClientStatsBook()
    book.follow(servers("a", "b"))
    book.record(report(dropped={"a": 1, "b": 2}))
    book.follow(servers("b", "c"))
    assert book.totals.calls_dropped_by_token == {"b": 2}
    assert book.totals.calls_dropped_other_tokens == 1
    # Nothing is lost: per-token and other drops add up to what was reported.
    book.record(report(dropped={"a": 10, "c": 20}))
    totals = book.totals
    assert sum(totals.calls_dropped_by_token.values()) + totals.calls_dropped_other_tokens == 33


def test_tokens_kept_are_bounded_by_the_list_plus_one_over_churn() -> None:
    book = ClientStatsBook()
    for generation in range(50):
        tokens = [f"g{generation}-{i}" for i in range(10)]
        book.follow(servers(*tokens))
        book.record(report(dropped=dict.fromkeys([*tokens, DROP_TOKEN, "x"], 1)))
        assert len(book.totals.calls_dropped_by_token) <= len(set(tokens)) + 1


def test_gone_services() -> None:
    assert gone_services(["a", "b", "c"], {"a"}, {"b": 1}) == ["c"]


def test_balancer_keeps_tokens_of_the_current_list_only() -> None:
    balancer = make(Clock())
    balancer.heartbeat(registration(1))
    balancer.heartbeat(registration(2))
    listed = balancer.server_list("oap")
    assert listed is not None
    token = listed.entries[0].token
    watch = balancer.watch("oap")  # an open stream for the service
    noise = random_tokens(200_000)
    for _ in range(2):
        balancer.record_client_stats(
            "oap", report(all_counters=INT64_MAX, dropped={token: INT64_MAX, DROP_TOKEN: 1})
        )
    for start in range(0, len(noise), 20_000):
        chunk = noise[start : start + 20_000]
        balancer.record_client_stats("oap", report(dropped=dict.fromkeys(chunk, INT64_MAX)))
    (view,) = balancer.view("oap")
    stats = view.client_stats
    assert stats.calls_started == 2 * MAX_CALLS_PER_REPORT
    assert stats.calls_dropped_by_token == {token: 2 * MAX_CALLS_PER_REPORT, DROP_TOKEN: 2}
    assert stats.drop_tokens_ignored == 200_000
    assert stats.reports == 12
    assert set(stats.calls_dropped_by_token) <= {e.token for e in listed.entries} | {DROP_TOKEN}
    assert client_stats_message_of(stats).ByteSize() < 1000
    watch.close()


def test_stats_of_a_service_are_forgotten_when_its_backends_expire() -> None:
    clock = Clock()
    balancer = make(clock)
    balancer.heartbeat(registration(1))
    balancer.heartbeat(registration(1, service="other"))
    watch = balancer.watch("oap")
    balancer.record_client_stats("oap", report(all_counters=INT64_MAX))
    balancer.record_client_stats("oap", report(all_counters=INT64_MAX))
    assert balancer.view("oap")[0].client_stats.calls_started == 2 * MAX_CALLS_PER_REPORT
    watch.close()
    # The service still has its backend: the stats stay.
    assert balancer.view("oap")[0].client_stats.reports == 2
    clock.now += 5
    balancer.heartbeat(registration(1, service="other"))
    clock.now += 6
    balancer.tick()  # oap's backend expired; nobody asks for oap
    assert [view.name for view in balancer.view()] == ["other"]
    assert balancer.view("oap") == []
    # The service coming back starts from zero.
    balancer.heartbeat(registration(1))
    assert balancer.view("oap")[0].client_stats == ClientCallStats()


def test_stats_stay_while_clients_remain_and_go_with_the_last_one() -> None:
    clock = Clock()
    balancer = make(clock)
    balancer.heartbeat(registration(1))
    watch = balancer.watch("oap")
    balancer.record_client_stats("oap", report(started=3))
    balancer.deregister("oap", "pod-1")
    # No backends: the stream now gets fallback and no longer maps to oap.
    assert watch.service is None
    assert balancer.view("oap") == []
    watch.close()
    assert balancer.view() == []


def test_a_new_service_clears_stats_of_gone_ones_even_unviewed() -> None:
    clock = Clock()
    balancer = make(clock)
    for n in range(1, 4):
        balancer.heartbeat(registration(n, service=f"s{n}"))
        balancer.record_client_stats(f"s{n}", report(started=1))
        balancer.deregister(f"s{n}", f"pod-{n}")
    # Each new service's first report forgot the previous (gone) one.
    assert len(balancer._client_stats) == 1
