"""`agent-shim proxy` between real clients and backends of three gRPC implementations.

Clients: grpcio (C-core, `grpc.aio`), grpc-go, @grpc/grpc-js; backends:
`grpc.aio`, the sync `grpc.server`, grpc-go — every one a separate process,
speaking the raw-bytes protocol of `tests.interop.protocol` (docs/interop.md).
The proxy is the real CLI (`python -m agent_shim.cli proxy`), fed the backend
list by a scripted grpclb balancer; the clients dial only the proxy, and the
tests ask the backends directly (Control/Report) what reached them.

Matrix: every client with every backend (and each pair once without the
proxy, the baseline) for the four call types with metadata, status, details,
trailers and trailers-only answers, 4 MiB messages and cancellation;
deadlines, 200 streams and keepalive on a subset where each client and each
backend appears once; a backend's graceful stop and its SIGKILL with each
client once and each backend implementation once in the role that goes away.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import pytest

from tests.interop.harness import (
    BACKENDS,
    CLIENTS,
    PeerBackend,
    RigFactory,
    RigPool,
    RunningClient,
    run_client,
)
from tests.interop.protocol import (
    BIDI,
    CLIENT_STREAM,
    DETAILS_SUFFIX,
    FAIL_BLOB,
    MIB,
    SERVER_STREAM,
    UNARY,
    Json,
    call,
    calls_plan,
    loop_plan,
    pause,
    payload,
    streams_plan,
    text,
)
from tests.interop.tap import FrameTap, StreamLog, TapStats
from tests.support.eventually import eventually_blocking
from tests.support.processes import LOOPBACK

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(120)]

ALL_PAIRS = [pytest.param(c, b, id=f"{c}-to-{b}") for c in CLIENTS for b in BACKENDS]
# Each client and each backend once, for the scenarios that cost more.
DEEP_PAIRS = [
    pytest.param(c, b, id=f"{c}-to-{b}")
    for c, b in (("python", "go"), ("go", "aio"), ("node", "sync"))
]

BLOB = bytes([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFE, 0xFF]) + b"interop"
ECHOED: list[tuple[str, str | bytes]] = [
    ("x-md-text", "interop text"),
    ("x-md-blob-bin", BLOB),
    ("x-md-multi", "one"),
    ("x-md-multi", "two"),
]


def _prefix(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def _by_name(result: Json) -> dict[str, Json]:
    return {c["name"]: c for c in result["calls"]}


def _joined(values: Sequence[str] | None) -> str | None:
    # grpc-js (Node's HTTP/2) joins a repeated header into one "a, b" value,
    # which HTTP says is the same thing.
    return None if values is None else ", ".join(values)


def _assert_code(c: Json, code: grpc.StatusCode) -> None:
    assert c["code"] == code.value[0], (
        f"{c['name']}: {c['code']} {c['details']!r} (wanted {code.name}); error {c.get('error')}"
    )


def _assert_echoed_metadata(c: Json, backend: str) -> None:
    """Request metadata (text, -bin, repeated) came back in the response headers
    and trailers, and each names the backend that served the call."""
    headers, trailers = c["headers"], c["trailers"]
    name = c["name"]
    assert headers.get("x-backend") == [backend], (name, headers)
    assert headers.get("x-md-text") == ["interop text"], (name, headers)
    assert headers.get("x-md-blob-bin") == [BLOB.hex()], (name, headers)
    assert _joined(headers.get("x-md-multi")) == "one, two", (name, headers)
    assert trailers.get("x-served-by") == [backend], (name, trailers)
    assert trailers.get("x-trailer-text") == ["interop text"], (name, trailers)
    assert trailers.get("x-trailer-blob-bin") == [BLOB.hex()], (name, trailers)
    assert _joined(trailers.get("x-trailer-multi")) == "one, two", (name, trailers)


def _summary(c: Json) -> Any:
    [reply] = c["received"]
    return json.loads(reply["text"])


def _shas(messages: Sequence[Json]) -> list[tuple[int, str]]:
    return [(m["len"], m["sha256"]) for m in messages]


# ---- the plans and checks of the full matrix -----------------------------------------------------


def _types_calls(prefix: str, client: str) -> list[Json]:
    def md(kind: str) -> list[tuple[str, str | bytes]]:
        return [("x-call-id", f"{prefix}-{kind}"), *ECHOED]

    return [
        call("unary", UNARY, [text(f"hello from {client}")], metadata=md("unary")),
        call(
            "server_stream",
            SERVER_STREAM,
            [text("stream me")],
            metadata=[*md("server_stream"), ("x-count", "3")],
        ),
        call(
            "client_stream",
            CLIENT_STREAM,
            [text(f"part-{i}") for i in range(5)],
            metadata=md("client_stream"),
        ),
        call(
            "bidi",
            BIDI,
            [text(f"ping-{i}") for i in range(3)],
            metadata=md("bidi"),
            pingpong=True,
        ),
    ]


TYPES = ("unary", "server_stream", "client_stream", "bidi")


def _check_types(result: dict[str, Json], backend: str) -> None:
    for name in TYPES:
        c = result[name]
        _assert_code(c, grpc.StatusCode.OK)
        _assert_echoed_metadata(c, backend)
    assert _shas(result["unary"]["received"]) == _shas(result["unary"]["sent"])
    assert _shas(result["server_stream"]["received"]) == _shas(result["server_stream"]["sent"]) * 3
    assert _shas(result["bidi"]["received"]) == _shas(result["bidi"]["sent"])
    summary = _summary(result["client_stream"])
    assert summary["count"] == 5
    assert summary["sha256"] == [m["sha256"] for m in result["client_stream"]["sent"]]


FAILURES = [
    # name, method, code, trailers-only, messages, pingpong, replies expected
    ("unary_fails", UNARY, grpc.StatusCode.FAILED_PRECONDITION, False, 1, False, 0),
    ("server_stream_fails", SERVER_STREAM, grpc.StatusCode.ABORTED, False, 1, False, 2),
    ("client_stream_fails", CLIENT_STREAM, grpc.StatusCode.INVALID_ARGUMENT, False, 3, False, 0),
    ("bidi_fails", BIDI, grpc.StatusCode.PERMISSION_DENIED, False, 2, True, 2),
    ("unary_trailers_only", UNARY, grpc.StatusCode.RESOURCE_EXHAUSTED, True, 1, False, 0),
    ("server_stream_trailers_only", SERVER_STREAM, grpc.StatusCode.NOT_FOUND, True, 1, False, 0),
    (
        "client_stream_trailers_only",
        CLIENT_STREAM,
        grpc.StatusCode.UNAUTHENTICATED,
        True,
        3,
        False,
        0,
    ),
    ("bidi_trailers_only", BIDI, grpc.StatusCode.UNIMPLEMENTED, True, 1, False, 0),
]


# Every failing call is made ROUNDS times: a proxy that sometimes loses the
# response headers of a failing call (seen with the grpc.aio proxy) shows.
ROUNDS = 10


def _failure_names() -> list[str]:
    return [f"{name}-{r}" for r in range(ROUNDS) for name, *_ in FAILURES]


def _failure_calls(prefix: str) -> list[Json]:
    specs = []
    for r in range(ROUNDS):
        for name, method, code, trailers_only, count, pingpong, _ in FAILURES:
            metadata: list[tuple[str, str | bytes]] = [
                ("x-call-id", f"{prefix}-{name}-{r}"),
                ("x-fail", str(code.value[0])),
                ("x-fail-details", f"{name} failed"),
                ("x-count", "2"),
                *ECHOED,
            ]
            if trailers_only:
                metadata.append(("x-trailers-only", "1"))
                if method in (CLIENT_STREAM, BIDI):
                    metadata.append(("x-read-first", "1"))
            messages = [text(f"{name}-{i}") for i in range(count)]
            specs.append(
                call(f"{name}-{r}", method, messages, metadata=metadata, pingpong=pingpong)
            )
    return specs


def _failure_problems(
    c: Json, stream: StreamLog | None, backend: str, spec: tuple[Any, ...]
) -> str:
    """What is wrong with one failing call, as the client and the wire saw it ('' if nothing)."""
    name, _, code, trailers_only, _, _, replies = spec
    trailers = c["trailers"]
    checks = [
        (c["code"] == code.value[0], f"code {c['code']} {c['details']!r}, not {code.name}"),
        (c["details"] == f"{name} failed{DETAILS_SUFFIX}", f"details {c['details']!r}"),
        (trailers.get("x-fail-why") == [f"{name} failed"], f"trailers {trailers}"),
        (trailers.get("x-fail-blob-bin") == [FAIL_BLOB.hex()], "x-fail-blob-bin trailer"),
        (trailers.get("x-served-by") == [backend], f"x-served-by {trailers.get('x-served-by')}"),
        (trailers.get("x-trailer-blob-bin") == [BLOB.hex()], "x-trailer-blob-bin trailer"),
        (len(c["received"]) == replies, f"{len(c['received'])} replies, not {replies}"),
        (stream is not None and bool(stream.response_headers), "no response on the wire"),
    ]
    if stream is not None and stream.response_headers:
        status = dict(stream.response_headers[-1]).get("grpc-status")
        checks.append((status == str(code.value[0]), f"grpc-status {status} on the wire"))
        if trailers_only:
            checks.append(
                (stream.shape == ["HEADERS+END"], f"not trailers-only: {stream.response}")
            )
        else:
            checks.append(
                (
                    stream.shape[0] == "HEADERS" and stream.shape[-1] == "HEADERS+END",
                    f"response frames {stream.response}",
                )
            )
    headers = c["headers"]
    if trailers_only:
        custom = sorted(k for k in headers if k.startswith("x-"))
        checks.append((custom == [], f"a trailers-only answer came with headers {custom}"))
    else:
        checks += [
            (headers.get("x-backend") == [backend], f"response headers {headers}"),
            (headers.get("x-md-blob-bin") == [BLOB.hex()], "x-md-blob-bin header"),
            (_joined(headers.get("x-md-multi")) == "one, two", "x-md-multi header"),
        ]
    return "; ".join(problem for ok, problem in checks if not ok)


def _check_failures(result: dict[str, Json], frames: TapStats, prefix: str, backend: str) -> None:
    assert frames.errors == []
    specs = {spec[0]: spec for spec in FAILURES}
    problems = {}
    for call_name in _failure_names():
        spec = specs[call_name.rsplit("-", 1)[0]]
        stream = frames.stream_of_call(f"{prefix}-{call_name}")
        problem = _failure_problems(result[call_name], stream, backend, spec)
        if problem:
            problems[call_name] = problem
    assert problems == {}


def _states(server: PeerBackend, prefix: str) -> dict[str, str]:
    return {k.removeprefix(f"{prefix}-"): v["state"] for k, v in server.calls(prefix).items()}


# ---- every client with every backend -------------------------------------------------------------


@pytest.mark.parametrize(("client", "backend"), ALL_PAIRS)
def test_peers_agree_without_the_proxy(rigs: RigPool, client: str, backend: str) -> None:
    """The baseline: the same calls as the two tests below, straight from the
    client to the backend. A failure here is in the peers or this harness, so
    a failure only in the tests through the proxy is the proxy's."""
    server = rigs.get(backend).backends[0]
    prefix = _prefix("direct")
    plan = calls_plan([*_types_calls(prefix, client), *_failure_calls(prefix)])
    with FrameTap(LOOPBACK, server.port) as tap:
        result = _by_name(run_client(client, tap.address, plan))
        frames = tap.snapshot()
    _check_types(result, server.backend_name)
    _check_failures(result, frames, prefix, server.backend_name)
    assert _states(server, prefix) == {
        **dict.fromkeys(TYPES, "ok"),
        **dict.fromkeys(_failure_names(), "failed"),
    }


@pytest.mark.parametrize(("client", "backend"), ALL_PAIRS)
def test_four_call_types_with_metadata_both_ways(rigs: RigPool, client: str, backend: str) -> None:
    """Unary, server-streaming, client-streaming and ping-pong bidi calls;
    request metadata (text, -bin, a repeated key) reaches the backend and comes
    back in the response headers and trailers."""
    rig = rigs.get(backend)
    server = rig.backends[0]
    prefix = _prefix("types")
    result = _by_name(run_client(client, rig.target, calls_plan(_types_calls(prefix, client))))
    _check_types(result, server.backend_name)
    assert _states(server, prefix) == dict.fromkeys(TYPES, "ok")
    # The proxy sends the balancer's token for the chosen backend.
    tokens = {v.get("lb_token") for v in server.calls(prefix).values()}
    assert tokens == {f"token-{server.backend_name}"}


@pytest.mark.parametrize(("client", "backend"), ALL_PAIRS)
def test_error_status_details_and_trailers_and_trailers_only(
    rigs: RigPool, client: str, backend: str
) -> None:
    """A backend's status code, percent-encoded details and trailing metadata
    (text and -bin) reach the client — after response headers and messages, or
    as a trailers-only answer (no headers, no messages): on the client's
    connection that is still one HEADERS frame that ends the stream."""
    rig = rigs.get(backend)
    server = rig.backends[0]
    assert rig.proxy is not None
    prefix = _prefix("errors")
    with FrameTap(rig.proxy.host, rig.proxy.port) as tap:
        result = _by_name(run_client(client, tap.address, calls_plan(_failure_calls(prefix))))
        frames = tap.snapshot()
    _check_failures(result, frames, prefix, server.backend_name)
    # Each reached the backend once: a status from a backend is never replayed.
    assert _states(server, prefix) == dict.fromkeys(_failure_names(), "failed")


# ---- deeper scenarios ----------------------------------------------------------------------------


@pytest.mark.parametrize(("client", "backend"), ALL_PAIRS)
def test_4mib_messages_both_ways(rigs: RigPool, client: str, backend: str) -> None:
    """4 MiB messages in every call type, both ways, byte-exact: every pair,
    as each implementation sizes its flow-control windows its own way."""
    rig = rigs.get(backend)
    big = 4 * MIB
    plan = calls_plan(
        [
            call("unary", UNARY, [payload(big, 1)], timeout_ms=60_000),
            call(
                "server_stream",
                SERVER_STREAM,
                [payload(big, 2)],
                metadata=[("x-count", "2")],
                timeout_ms=60_000,
            ),
            call(
                "client_stream",
                CLIENT_STREAM,
                [payload(big, 3), payload(big, 4), payload(big, 5)],
                timeout_ms=60_000,
            ),
            call(
                "bidi",
                BIDI,
                # The second one above gRPC's default 4 MiB receive limit.
                [payload(big, 6), payload(big + 64 * 1024, 7)],
                pingpong=True,
                timeout_ms=60_000,
            ),
        ]
    )
    result = _by_name(run_client(client, rig.target, plan, timeout=120))
    for c in result.values():
        _assert_code(c, grpc.StatusCode.OK)
        assert all(m["len"] >= big for m in c["sent"])
    assert _shas(result["unary"]["received"]) == _shas(result["unary"]["sent"])
    assert _shas(result["server_stream"]["received"]) == _shas(result["server_stream"]["sent"]) * 2
    assert _shas(result["bidi"]["received"]) == _shas(result["bidi"]["sent"])
    summary = _summary(result["client_stream"])
    assert (summary["count"], summary["bytes"]) == (3, 3 * big)
    assert summary["sha256"] == [m["sha256"] for m in result["client_stream"]["sent"]]


@pytest.mark.parametrize(("client", "backend"), DEEP_PAIRS)
def test_deadline_exceeded_and_the_backend_call_ends(
    rigs: RigPool, client: str, backend: str
) -> None:
    """A client deadline shorter than the backend's work: DEADLINE_EXCEEDED at
    the client (after the messages that did come), and the backend's call ends
    too instead of running on."""
    rig = rigs.get(backend)
    server = rig.backends[0]
    prefix = _prefix("deadline")
    plan = calls_plan(
        [
            call(
                "unary",
                UNARY,
                [text("slow")],
                metadata=[("x-call-id", f"{prefix}-unary"), ("x-sleep-ms", "30000")],
                timeout_ms=1000,
            ),
            call(
                "server_stream",
                SERVER_STREAM,
                [text("slow stream")],
                metadata=[
                    ("x-call-id", f"{prefix}-server_stream"),
                    ("x-count", "5"),
                    ("x-interval-ms", "30000"),
                ],
                timeout_ms=1000,
            ),
            call(
                "bidi",
                BIDI,
                [text("and then nothing")],
                metadata=[("x-call-id", f"{prefix}-bidi")],
                pingpong=True,
                half_close=False,
                timeout_ms=1000,
            ),
        ]
    )
    result = _by_name(run_client(client, rig.target, plan))
    for c in result.values():
        _assert_code(c, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert len(result["unary"]["received"]) == 0
    assert _shas(result["server_stream"]["received"]) == _shas(result["server_stream"]["sent"])
    assert _shas(result["bidi"]["received"]) == _shas(result["bidi"]["sent"])

    def all_ended() -> dict[str, str] | None:
        states = {k: v["state"] for k, v in server.calls(prefix).items()}
        return states if len(states) == 3 and set(states.values()) == {"cancelled"} else None

    eventually_blocking(
        all_ended,
        what=f"{backend} backend's calls ended by the deadline",
        detail=lambda: _states(server, prefix),
    )


@pytest.mark.parametrize(("client", "backend"), ALL_PAIRS)
def test_client_cancel_mid_stream_reaches_the_backend(
    rigs: RigPool, client: str, backend: str
) -> None:
    """A bidi stream cancelled after one echo, a server stream after two
    replies: CANCELLED at the client, and the backend sees its call cancelled
    (grpc-js half-closes before it resets: the cancel must still arrive)."""
    rig = rigs.get(backend)
    server = rig.backends[0]
    prefix = _prefix("cancel")
    plan = calls_plan(
        [
            call(
                "bidi",
                BIDI,
                [text("one")],
                metadata=[("x-call-id", f"{prefix}-bidi")],
                pingpong=True,
                cancel_after=1,
                timeout_ms=30_000,
            ),
            call(
                "server_stream",
                SERVER_STREAM,
                [text("tick")],
                metadata=[
                    ("x-call-id", f"{prefix}-server_stream"),
                    ("x-count", "100"),
                    ("x-interval-ms", "100"),
                ],
                cancel_after=2,
                timeout_ms=30_000,
            ),
        ]
    )
    result = _by_name(run_client(client, rig.target, plan))
    for c in result.values():
        _assert_code(c, grpc.StatusCode.CANCELLED)
    assert len(result["bidi"]["received"]) == 1
    assert len(result["server_stream"]["received"]) == 2

    def cancelled() -> dict[str, str] | None:
        states = {k: v["state"] for k, v in server.calls(prefix).items()}
        return states if len(states) == 2 and set(states.values()) == {"cancelled"} else None

    eventually_blocking(
        cancelled,
        what=f"the client's cancellations reaching the {backend} backend",
        detail=lambda: _states(server, prefix),
    )


@pytest.mark.parametrize(("client", "backend"), DEEP_PAIRS)
def test_200_concurrent_streams_on_one_connection(rigs: RigPool, client: str, backend: str) -> None:
    """200 bidi streams on one client connection, all open at once (each has
    its first echo before any sends its second message)."""
    rig = rigs.get(backend)
    server = rig.backends[0]
    assert rig.proxy is not None
    prefix = _prefix("streams")
    with FrameTap(rig.proxy.host, rig.proxy.port) as tap:
        result = run_client(client, tap.address, streams_plan(200, prefix))
        stats = tap.snapshot()
    assert result["failures"] == []
    assert (result["first_echoes"], result["ok"]) == (200, 200)
    assert result["backends"] == {server.backend_name: 200}
    assert stats.connections == 1
    assert len(stats.client_streams) >= 200
    states = [v["state"] for v in server.calls(prefix).values()]
    assert states == ["ok"] * 200


@pytest.mark.parametrize(("client", "backend"), DEEP_PAIRS)
def test_client_keepalive_pings_are_accepted(rigs: RigPool, client: str, backend: str) -> None:
    """A client pinging every second (idle and during calls) is answered and
    never sent GOAWAY (too_many_pings): its one connection stays READY. The
    first pause is long enough for four pings without data in between, which
    grpc-go and C-core servers with their default policy answer with GOAWAY
    ENHANCE_YOUR_CALM "too_many_pings" (the calls still succeed, on a new
    connection: only the tap and the channel's states show it)."""
    rig = rigs.get(backend)
    assert rig.proxy is not None
    prefix = _prefix("keepalive")

    def unary(name: str) -> Json:
        return call(name, UNARY, [text(name)], metadata=[("x-call-id", f"{prefix}-{name}")])

    plan = calls_plan(
        [
            unary("warm-up"),
            pause(4500),
            *(unary(f"after-idle-{i}") for i in range(5)),
            call(
                "bidi-with-gap",
                BIDI,
                [text("before"), text("after")],
                pingpong=True,
                interval_ms=2000,
                timeout_ms=30_000,
            ),
            pause(1500),
            *(unary(f"last-{i}") for i in range(5)),
        ],
        watch_state=True,
        keepalive_ms=1000,
        keepalive_timeout_ms=5000,
    )
    with FrameTap(rig.proxy.host, rig.proxy.port) as tap:
        result = run_client(client, tap.address, plan)
        stats = tap.snapshot()
    for c in result["calls"]:
        _assert_code(c, grpc.StatusCode.OK)
    assert result["states"] == [], "the connection left READY"
    assert result["final_state"] == "READY"
    assert stats.connections == 1
    assert stats.client_pings >= 2, "the client sent no keepalive pings"
    assert stats.server_ping_acks >= stats.client_pings - 1
    errors = [(g.error_code, g.debug) for g in stats.server_goaways if g.error_code != 0]
    assert errors == [], f"the proxy sent GOAWAY {errors}"


GRACEFUL = [
    pytest.param(c, stopping, staying, id=f"{c}-{stopping}-stops")
    for c, stopping, staying in (
        ("python", "aio", "go"),
        ("go", "go", "sync"),
        ("node", "sync", "aio"),
    )
]


@pytest.mark.parametrize(("client", "stopping_impl", "staying_impl"), GRACEFUL)
def test_backend_graceful_shutdown_mid_run_fails_no_call(
    rig_factory: RigFactory, client: str, stopping_impl: str, staying_impl: str
) -> None:
    """One of two listed backends stops gracefully (SIGTERM: GOAWAY, running
    calls finish) while the client makes calls; it stays in the list, as when
    the balancer has not heard yet. No call fails."""
    rig = rig_factory(
        [(stopping_impl, f"{stopping_impl}-stopping"), (staying_impl, f"{staying_impl}-staying")]
    )
    stopping, staying = rig.backends
    prefix = _prefix("graceful")
    running = RunningClient(client, rig.target, loop_plan(prefix, concurrency=4, sleep_ms=50))
    try:
        eventually_blocking(
            lambda: len(stopping.calls(prefix)) >= 10 and stopping.report()["active"] >= 1,
            what="calls running on the backend about to stop",
            detail=lambda: (stopping.report(), f"client running: {running.alive()}"),
        )
        stopping.send_signal(signal.SIGTERM)
        assert stopping.wait(20) == 0
        stopped = [e for e in stopping.events() if e["event"] == "stopped"]
        assert stopped and stopped[0]["graceful"], stopping.logs()
        after_stop = len(staying.calls(prefix))
        eventually_blocking(
            lambda: len(staying.calls(prefix)) >= after_stop + 20,
            what="calls after the stop served by the other backend",
            detail=lambda: (len(staying.calls(prefix)), f"client running: {running.alive()}"),
        )
        assert running.alive(), "the client ended before it was told to"
        result = running.finish()
    finally:
        running.kill()
    assert result["failures"] == [], result
    assert result["failed"] == 0 and result["ok"] == result["total"]
    assert result["stop_reason"] == "stdin closed"
    assert result["backends"].get(stopping.backend_name, 0) >= 10
    assert result["backends"].get(staying.backend_name, 0) >= 20


SIGKILL = [
    pytest.param(c, killed, surviving, id=f"{c}-{killed}-killed")
    for c, killed, surviving in (
        ("python", "go", "aio"),
        ("go", "sync", "go"),
        ("node", "aio", "sync"),
    )
]
STREAMS = 10
SEGMENTS = 30


@pytest.mark.parametrize(("client", "killed_impl", "surviving_impl"), SIGKILL)
def test_backend_sigkill_mid_stream_replays_unanswered_client_streams(
    rig_factory: RigFactory, client: str, killed_impl: str, surviving_impl: str
) -> None:
    """Client streams trickle segments through the proxy when one of the two
    backends is SIGKILLed: the streams it had not answered are replayed on the
    other backend from the proxy's buffer, every one completes with all its
    segments in order, and none fails."""
    rig = rig_factory(
        [(killed_impl, f"{killed_impl}-doomed"), (surviving_impl, f"{surviving_impl}-survivor")]
    )
    doomed, survivor = rig.backends
    prefix = _prefix("sigkill")
    specs = [
        call(
            f"stream-{i}",
            CLIENT_STREAM,
            [text(f"{prefix}-{i}-segment-{j:03d}".ljust(100, ".")) for j in range(SEGMENTS)],
            metadata=[("x-call-id", f"{prefix}-{i}")],
            interval_ms=40,
            timeout_ms=60_000,
        )
        for i in range(STREAMS)
    ]
    running = RunningClient(client, rig.target, calls_plan(specs, parallel=True))
    try:

        def half_sent() -> dict[str, Json] | None:
            streams = {
                k: v
                for k, v in doomed.calls(prefix).items()
                if v["state"] == "active" and 1 <= v["received"] <= SEGMENTS // 2
            }
            return streams if len(streams) >= 2 else None

        in_flight = eventually_blocking(
            half_sent,
            what="streams half sent to the backend to be killed",
            detail=lambda: (doomed.calls(prefix), f"client running: {running.alive()}"),
        )
        doomed.kill()
        result = running.finish(timeout=90)
    finally:
        running.kill()
    calls = _by_name(result)
    for c in calls.values():
        _assert_code(c, grpc.StatusCode.OK)
        summary = _summary(c)
        assert (summary["count"], summary["bytes"]) == (SEGMENTS, SEGMENTS * 100), c["name"]
        assert summary["sha256"] == [m["sha256"] for m in c["sent"]], c["name"]
    # The streams cut by the kill were answered by the survivor, whole.
    replayed = {k.removeprefix(f"{prefix}-") for k in in_flight}
    for i in replayed:
        c = calls[f"stream-{i}"]
        assert c["headers"].get("x-backend") == [survivor.backend_name], c
    survived = survivor.calls(prefix)
    for call_id in in_flight:
        assert survived[call_id]["state"] == "ok", survived.get(call_id)
        assert survived[call_id]["received"] == SEGMENTS
