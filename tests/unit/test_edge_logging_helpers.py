"""The guards between clients and the logs (clip, LogLimiter), the stream
admission counts, and the new limits' configuration."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from lbserver.config import Config, load_config
from lbserver.errors import ConfigError
from lbserver.logs import CLIP_BYTES, LogLimiter, clip
from lbserver.services._streams import RefusedError, StreamAdmission, StreamLimits


def test_short_values_are_logged_as_they_are() -> None:
    assert clip("oap.skywalking.svc:11800") == "oap.skywalking.svc:11800"
    exact = "é" * (CLIP_BYTES // 2)  # CLIP_BYTES bytes of UTF-8
    assert clip(exact) == exact


def test_long_values_keep_a_prefix_their_length_and_a_hash() -> None:
    value = "oap" + "x" * 1_048_573
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    clipped = clip(value)
    assert clipped == f"{value[:32]}...(1048576 bytes, sha256:{digest})"
    assert clip(value.encode()) == clipped
    assert clip("a" + value) != clipped


def test_clipping_never_splits_a_character() -> None:
    clipped = clip("€" * 1000)  # 3 bytes each: 32 bytes is 10 2/3 characters
    assert clipped.startswith("€" * 10 + "...(3000 bytes, sha256:")


def test_anything_that_embeds_a_value_is_clipped_as_text() -> None:
    error = ValueError("ip: '" + "1" * 5000 + "' is not an IPv4 or IPv6 address")
    assert clip(error).startswith("ip: '1111")
    assert len(clip(error)) < 100


class Events:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **values: Any) -> None:
        self.lines.append(("info", event, values))

    def warning(self, event: str, **values: Any) -> None:
        self.lines.append(("warning", event, values))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [values for _, name, values in self.lines if name == event]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_event_is_logged_at_most_n_times_per_window() -> None:
    clock, logger, counted = Clock(), Events(), list[str]()
    limiter = LogLimiter(3, 60.0, clock=clock, on_suppressed=counted.append)
    for n in range(100):
        limiter.warning(logger, "auth failure", n=n)
        limiter.info(logger, "client connected", n=n)
    assert [v["n"] for v in logger.named("auth failure")] == [0, 1, 2]
    assert [v["n"] for v in logger.named("client connected")] == [0, 1, 2]
    # One line when suppression starts, per event.
    assert [v["kind"] for v in logger.named(LogLimiter.SUPPRESSING)] == [
        "auth failure",
        "client connected",
    ]
    # ... at the event's own level: a crowd of clients connecting is no warning.
    assert [level for level, event, _ in logger.lines if event == LogLimiter.SUPPRESSING] == [
        "warning",
        "info",
    ]
    assert counted.count("auth failure") == 97
    # The next window: its count first, then the event again.
    clock.now += 60.0
    assert limiter.warning(logger, "auth failure", n=100)
    summary = logger.named(LogLimiter.SUPPRESSED)
    assert summary == [
        {"kind": "auth failure", "suppressed": 97, "logged": 3, "window_seconds": 60.0}
    ]
    # flush() reports what no later event did, once.
    clock.now += 60.0
    assert limiter.flush() == 97  # "client connected"'s
    assert limiter.flush() == 0
    assert len(logger.named(LogLimiter.SUPPRESSED)) == 2


def test_a_quiet_event_is_never_summarised() -> None:
    clock, logger = Clock(), Events()
    limiter = LogLimiter(3, 60.0, clock=clock)
    limiter.warning(logger, "auth failure")
    clock.now += 120.0
    assert limiter.flush() == 0
    assert logger.named(LogLimiter.SUPPRESSED) == []


async def test_admission_makes_room_by_ending_the_oldest_waiting_stream() -> None:
    admission = StreamAdmission(
        StreamLimits(max_streams=2, max_streams_per_peer=3, max_pending_streams=2)
    )
    a, b = admission.admit("10.0.0.1"), admission.admit("10.0.0.2")
    c = admission.admit("10.0.0.3")  # the budget of 2 is full: a is ended
    assert a.evicted.done() and "max_pending_streams=2" in a.evicted.result().details
    assert admission.pending == 2 and admission.streams_of("10.0.0.1") == 0
    admission.establish(b)
    admission.establish(c)
    d = admission.admit("10.0.0.4")
    with pytest.raises(RefusedError, match="max_streams=2"):
        admission.establish(d)
    assert admission.streams_of("10.0.0.4") == 0
    for ticket in (b, c):
        admission.release(ticket)
    assert admission.pending == 0 and admission.established == 0
    assert admission.streams_of("10.0.0.2") == 0


async def test_a_peer_at_its_cap_ends_its_own_waiting_stream_or_is_refused() -> None:
    admission = StreamAdmission(
        StreamLimits(max_streams=10, max_streams_per_peer=2, max_pending_streams=10)
    )
    other = admission.admit("10.0.0.8")
    first = admission.admit("10.0.0.9")
    admission.establish(first)
    waiting = admission.admit("10.0.0.9")
    second = admission.admit("10.0.0.9")  # at the cap: ends `waiting`, not `other`
    assert waiting.evicted.done() and not other.evicted.done()
    assert "max_streams_per_peer=2" in waiting.evicted.result().details
    admission.establish(second)
    with pytest.raises(RefusedError, match="max_streams_per_peer=2"):
        admission.admit("10.0.0.9")
    for ticket in (other, first, waiting, second):
        admission.release(ticket)
    assert admission.pending == 0 and admission.established == 0
    assert admission.streams_of("10.0.0.9") == 0


def test_new_limits_have_defaults_and_bounds() -> None:
    config = Config()
    assert config.initial_request_timeout == 2.0
    assert config.max_streams_per_peer == 1000
    assert config.max_pending_streams == 1000
    assert config.client_stats_rate_per_stream == 2.0
    for option in ("max_streams_per_peer", "max_pending_streams"):
        with pytest.raises(ConfigError, match=f"^{option}: must be 1-"):
            load_config(environ={f"LBSERVER_{option.upper()}": "0"})


def test_the_stats_rate_must_let_clients_report_as_asked() -> None:
    with pytest.raises(ConfigError, match="client_stats_rate_per_stream: must be at least"):
        load_config(
            environ={
                "LBSERVER_CLIENT_STATS_INTERVAL": "0.25",
                "LBSERVER_CLIENT_STATS_RATE_PER_STREAM": "2",
            }
        )
    assert load_config(environ={"LBSERVER_CLIENT_STATS_RATE_PER_STREAM": "0"})
    with pytest.raises(ConfigError, match="client_stats_rate_per_stream"):
        load_config(environ={"LBSERVER_CLIENT_STATS_RATE_PER_STREAM": "-1"})
