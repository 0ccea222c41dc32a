"""The `agent-shim proxy`'s forwarding behaviour.

Most tests run the proxy in-process (`Proxy` + `ProxyServer` with the real
`Selector`) in front of probe backends (`tests.support.probe`), fed server
lists by a scripted grpclb balancer, and call it with raw-bytes stubs of all
four call types. The last ones run `agent-shim proxy` as a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from functools import partial
from typing import Any

import grpc
import pytest

from agent_shim._selector import Selector
from agent_shim.proxy import (
    MAX_ATTEMPTS,
    BackendPool,
    forwardable,
)
from tests.support.backends import CountingBackend, call_stub
from tests.support.eventually import eventually
from tests.support.probe import (
    BIDI,
    CLIENT_STREAM,
    DROP,
    FAIL,
    SERVER_FIRST,
    SERVER_STREAM,
    SLOW,
    UNARY,
    ProbeBackend,
)
from tests.support.processes import REPO_ROOT, ProcessManager, free_port
from tests.support.proxy_process import start_proxy
from tests.support.proxy_rig import ProxyRig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

CALL_TIMEOUT = 10.0


class Rig(ProxyRig):
    """A fake balancer, probe backends and an in-process proxy in front of them."""

    def __init__(self) -> None:
        super().__init__()
        self.backends: list[ProbeBackend] = []
        self.channel: grpc.aio.Channel | None = None

    async def backend(self, name: str, **kwargs: bool | int) -> ProbeBackend:
        backend = await ProbeBackend(name, **kwargs).start()  # type: ignore[arg-type]
        self.backends.append(backend)
        return backend

    async def start(
        self,
        servers: Sequence[tuple[str, int, str]],
        *,
        max_buffer_bytes: int = 4 * 1024 * 1024,
        no_backend_wait: float = 2.0,
    ) -> grpc.aio.Channel:
        port = await self.start_proxy(
            servers, "probe", max_buffer_bytes=max_buffer_bytes, no_backend_wait=no_backend_wait
        )
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
        )
        return self.channel

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        await super().close()
        for backend in self.backends:
            await backend.stop()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        await r.close()


def _md(metadata: Any) -> dict[str, str | bytes]:
    return {key: value for key, value in metadata}


def _picks(selector: Selector[BackendPool], token: str) -> bool:
    """Whether the selector's next pick is the backend listed with `token`
    (the pick is given back at once, as a call that reached its backend)."""
    choice = selector.choose()
    selector.finished(choice, reached_backend=True)
    return choice.token == token


# ---- metadata, messages and status ------------------------------------------------------


async def test_unary_metadata_and_messages_pass_both_ways(rig: Rig) -> None:
    a = await rig.backend("a")
    channel = await rig.start([a.entry("tok-a")])
    call = channel.unary_unary(UNARY, None, None)(
        b"hello",
        timeout=CALL_TIMEOUT,
        metadata=(
            ("x-tenant", "blue"),
            ("x-blob-bin", b"\x01\x02\x00"),
            ("authentication", "secret"),  # SkyWalking's agent token header
            ("lb-token", "forged"),  # replaced by the chosen backend's token
            ("connection", "close"),  # hop-by-hop: dropped
            ("keep-alive", "1"),
        ),
    )
    assert await call == b"a:hello"
    assert _md(await call.initial_metadata())["x-init"] == "a"
    trailing = _md(await call.trailing_metadata())
    assert trailing["x-trail"] == "a"
    assert trailing["x-trail-bin"] == b"\x00\xff"
    assert await call.code() is grpc.StatusCode.OK

    [received] = a.calls
    assert received.value("x-tenant") == "blue"
    assert received.value("x-blob-bin") == b"\x01\x02\x00"
    assert received.value("authentication") == "secret"
    assert [v for k, v in received.metadata if k == "lb-token"] == ["tok-a"]
    assert received.value("connection") is None
    assert received.value("keep-alive") is None


def test_forwardable_drops_hop_by_hop_headers_and_the_clients_lb_token() -> None:
    headers = [
        (b":authority", b"h"),
        (b":path", b"/s/m"),
        (b"x-a", b"1"),
        (b"grpc-timeout", b"1S"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        (b"user-agent", b"grpc-java"),
        (b"lb-token", b"t"),
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"close"),
        (b"te", b"gzip"),
        (b"x-b-bin", b"AA"),
    ]
    assert forwardable(headers) == [
        (b":authority", b"h"),
        (b":path", b"/s/m"),
        (b"x-a", b"1"),
        (b"grpc-timeout", b"1S"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        (b"user-agent", b"grpc-java"),
        (b"x-b-bin", b"AA"),
    ]


async def test_all_four_call_types(rig: Rig) -> None:
    a = await rig.backend("a")
    channel = await rig.start([a.entry()])

    assert await channel.unary_unary(UNARY, None, None)(b"x", timeout=CALL_TIMEOUT) == b"a:x"

    stream = channel.unary_stream(SERVER_STREAM, None, None)(b"4", timeout=CALL_TIMEOUT)
    assert [m async for m in stream] == [b"0", b"1", b"2", b"3"]

    async def requests() -> AsyncIterator[bytes]:
        for i in range(50):
            yield b"s%d" % i

    reply = await channel.stream_unary(CLIENT_STREAM, None, None)(requests(), timeout=CALL_TIMEOUT)
    assert reply == f"a:50:{sum(len(b's%d' % i) for i in range(50))}".encode()

    # Ping-pong: each reply must come back before the next request is sent,
    # so the proxy may not wait for the end of the request stream.
    bidi = channel.stream_stream(BIDI, None, None)(None, timeout=CALL_TIMEOUT)
    for i in range(5):
        await bidi.write(b"ping%d" % i)
        assert await bidi.read() == b"ping%d" % i
    await bidi.done_writing()
    assert await bidi.read() is grpc.aio.EOF  # type: ignore[attr-defined]
    assert await bidi.code() is grpc.StatusCode.OK


async def test_bidi_stream_whose_server_speaks_first_does_not_deadlock(rig: Rig) -> None:
    """The client sends nothing until the server's greeting arrives: the proxy
    must open the backend call without waiting for a request message."""
    a = await rig.backend("a")
    channel = await rig.start([a.entry()])
    call = channel.stream_stream(SERVER_FIRST, None, None)(None, timeout=CALL_TIMEOUT)
    async with asyncio.timeout(2):
        assert await call.read() == b"hello from a"
    await call.write(b"then this")
    assert await call.read() == b"then this"
    await call.done_writing()
    assert await call.code() is grpc.StatusCode.OK


async def test_stop_lets_running_calls_finish_within_the_grace(rig: Rig) -> None:
    a = await rig.backend("a")
    channel = await rig.start([a.entry()])
    call = channel.stream_stream(BIDI, None, None)(None, timeout=CALL_TIMEOUT)
    await call.write(b"before")
    assert await call.read() == b"before"
    assert rig.server is not None
    stopping = asyncio.create_task(rig.server.stop(grace=5))
    proxy = rig.proxy
    assert proxy is not None
    await eventually(
        lambda: proxy.clients and all(c.goaway_sent for c in proxy.clients), "the GOAWAY"
    )
    await call.write(b"during the grace")
    assert await call.read() == b"during the grace"
    await call.done_writing()
    assert await call.code() is grpc.StatusCode.OK
    await stopping
    with pytest.raises(grpc.aio.AioRpcError) as info:  # no new calls once stopped
        await channel.unary_unary(UNARY, None, None)(b"x", timeout=2)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("code", "details"),
    [
        ("INVALID_ARGUMENT", "segment too large"),
        ("RESOURCE_EXHAUSTED", "slow down"),
        ("PERMISSION_DENIED", "bad authentication token"),
        ("NOT_FOUND", ""),
    ],
)
async def test_status_details_and_trailing_metadata_pass_through(
    rig: Rig, code: str, details: str
) -> None:
    a = await rig.backend("a")
    channel = await rig.start([a.entry()])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(FAIL, None, None)(
            f"{code}:{details}".encode(), timeout=CALL_TIMEOUT
        )
    assert info.value.code() is grpc.StatusCode[code]
    assert info.value.details() == details
    assert _md(info.value.trailing_metadata())["x-why"] == details
    assert len(a.calls) == 1  # a status from a backend that took the call is never replayed


async def test_unavailable_from_an_accepting_backend_is_passed_not_replayed(rig: Rig) -> None:
    a, b = await rig.backend("a"), await rig.backend("b")
    channel = await rig.start([a.entry(), b.entry()])
    for _ in range(4):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            # Response headers first: the backend took the call.
            await channel.unary_unary(FAIL, None, None)(
                b"!UNAVAILABLE:overloaded", timeout=CALL_TIMEOUT
            )
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "overloaded"
        assert _md(info.value.initial_metadata())["x-init"] in ("a", "b")
    assert len(a.calls) + len(b.calls) == 4
    assert rig.proxy is not None and rig.proxy.replays == 0


async def test_trailers_only_unavailable_is_retried_then_passed_through(rig: Rig) -> None:
    """UNAVAILABLE with no response headers means the backend did not take the
    call (as for gRPC's own retries): it is tried elsewhere, a bounded number
    of times, and then the last backend's status reaches the caller."""
    a, b = await rig.backend("a"), await rig.backend("b")
    channel = await rig.start([a.entry(), b.entry()], no_backend_wait=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(FAIL, None, None)(b"UNAVAILABLE:overloaded", timeout=CALL_TIMEOUT)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "overloaded"
    assert _md(info.value.trailing_metadata())["x-why"] == "overloaded"
    assert len(a.calls) >= 1 and len(b.calls) >= 1
    assert len(a.calls) + len(b.calls) == MAX_ATTEMPTS


async def test_large_messages_pass(rig: Rig) -> None:
    a = await rig.backend("a")
    channel = await rig.start([a.entry()])
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB, above gRPC's default 4 MiB limit
    reply = await channel.unary_unary(UNARY, None, None)(big, timeout=CALL_TIMEOUT)
    assert reply == b"a:" + big


# ---- deadlines and cancellation ------------------------------------------------------------


async def test_deadline_reaches_the_backend_and_expires_there(rig: Rig) -> None:
    a = await rig.backend("a")
    channel = await rig.start([a.entry()])
    await channel.unary_unary(UNARY, None, None)(b"x", timeout=3.0)
    remaining = a.calls[0].time_remaining
    assert remaining is not None and 2.0 < remaining <= 3.1  # grpc-timeout rounds up

    await channel.unary_unary(UNARY, None, None)(b"x")  # no deadline: none upstream
    assert a.calls[1].time_remaining is None

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(SLOW, None, None)(b"x", timeout=0.5)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    await eventually(lambda: a.calls[2].cancelled)


async def test_client_cancellation_cancels_the_backend_call(rig: Rig) -> None:
    a = await rig.backend("a")
    channel = await rig.start([a.entry()])
    call = channel.unary_unary(SLOW, None, None)(b"x", timeout=CALL_TIMEOUT)
    await a.wait_calls(1)
    call.cancel()
    await eventually(lambda: a.calls[0].cancelled)

    bidi = channel.stream_stream(BIDI, None, None)(None, timeout=CALL_TIMEOUT)
    await bidi.write(b"one")
    assert await bidi.read() == b"one"
    bidi.cancel()
    await eventually(lambda: a.calls[1].cancelled)


# ---- balancing, tokens, drops -----------------------------------------------------------


async def test_calls_are_spread_per_call_by_list_weight(rig: Rig) -> None:
    a, b = await rig.backend("a"), await rig.backend("b")
    channel = await rig.start([a.entry(), b.entry(), b.entry()])
    stub = channel.unary_unary(UNARY, None, None)
    for _ in range(90):  # all on one client connection
        await stub(b"x", timeout=CALL_TIMEOUT)
    assert (len(a.calls), len(b.calls)) == (30, 60)
    assert {c.value("lb-token") for c in b.calls} == {"b"}


async def test_drop_entries_fail_with_unavailable(rig: Rig) -> None:
    a = await rig.backend("a")
    channel = await rig.start([DROP])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(UNARY, None, None)(b"x", timeout=CALL_TIMEOUT)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "drop" in (info.value.details() or "")
    assert not a.calls


async def test_empty_list_fails_with_unavailable_after_waiting(rig: Rig) -> None:
    channel = await rig.start([], no_backend_wait=0.3)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(UNARY, None, None)(b"x", timeout=CALL_TIMEOUT)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert 0.25 < time.monotonic() - started < 3


async def test_a_call_waits_for_a_backend_to_appear(rig: Rig) -> None:
    a = await rig.backend("a")
    channel = await rig.start([], no_backend_wait=5)
    call = channel.unary_unary(UNARY, None, None)(b"x", timeout=CALL_TIMEOUT)
    proxy = rig.proxy
    assert proxy is not None
    await eventually(lambda: proxy.active, "the call waiting at the proxy")
    rig.balancer.set_list([a.entry()])
    assert await call == b"a:x"


# ---- replay of calls a backend did not accept ----------------------------------------------


async def _segments(n: int, size: int = 100) -> AsyncIterator[bytes]:
    for i in range(n):
        yield b"%06d" % i + b"." * (size - 6)


async def test_client_stream_is_replayed_when_the_backend_refuses_it(rig: Rig) -> None:
    refuser = await rig.backend("refuser", refuse=True)
    good = await rig.backend("good")
    channel = await rig.start([refuser.entry(), good.entry()])
    stub = channel.stream_unary(CLIENT_STREAM, None, None)
    for _ in range(6):
        assert await stub(_segments(20), timeout=CALL_TIMEOUT) == b"good:20:2000"
    # Every stream the refuser got (it read it all) was replayed in full on
    # `good`; after a refusal the selector skips the refuser for a while.
    assert len(refuser.calls) >= 1
    assert all(len(c.messages) == 20 for c in refuser.calls)
    assert len(good.calls) == 6
    assert all(len(c.messages) == 20 for c in good.calls)
    assert rig.proxy is not None and rig.proxy.replays == len(refuser.calls)


async def test_call_to_a_dead_backend_is_replayed(rig: Rig) -> None:
    good = await rig.backend("good")
    dead_port = free_port()  # nothing listens there
    channel = await rig.start([("127.0.0.1", dead_port, "dead"), good.entry()])
    stub = channel.stream_unary(CLIENT_STREAM, None, None)
    unary = channel.unary_unary(UNARY, None, None)
    for _ in range(5):
        assert await stub(_segments(10), timeout=CALL_TIMEOUT) == b"good:10:1000"
        assert await unary(b"u", timeout=CALL_TIMEOUT) == b"good:u"
    assert len(good.calls) == 10


async def test_replay_waits_for_a_stream_still_being_written(rig: Rig) -> None:
    """The first backend fails while the client is still streaming: what was
    sent is replayed on the next backend, then the rest follows."""
    refuser = await rig.backend("refuser", refuse=True)
    good = await rig.backend("good")
    channel = await rig.start([refuser.entry()])
    call = channel.stream_stream(BIDI, None, None)(None, timeout=CALL_TIMEOUT)
    await call.write(b"m0")
    await call.write(b"m1")
    await refuser.wait_calls(1)
    rig.balancer.set_list([good.entry()])
    selector = rig.selector
    assert selector is not None
    await eventually(partial(_picks, selector, "good"), "the selector on the new list")
    await call.done_writing()  # the refuser answers UNAVAILABLE now: replay on good
    assert [m async for m in call] == [b"m0", b"m1"]
    assert good.messages() == [b"m0", b"m1"]


async def test_concurrent_streams_survive_a_backend_crash(rig: Rig) -> None:
    """40 client streams in flight, segments trickling in, when one of three
    backends goes away (it stays listed, as a crashed pod whose sidecar still
    heartbeats): every stream still completes with all its messages."""
    backends = [await rig.backend(name) for name in ("a", "b", "c")]
    channel = await rig.start([b.entry() for b in backends])
    stub = channel.stream_unary(CLIENT_STREAM, None, None)

    async def trickle(n: int) -> AsyncIterator[bytes]:
        for i in range(n):
            yield b"%04d" % i
            await asyncio.sleep(0.01)

    async def one_stream() -> bytes:
        reply: bytes = await stub(trickle(30), timeout=CALL_TIMEOUT)
        return reply

    calls = [asyncio.create_task(one_stream()) for _ in range(40)]
    await eventually(lambda: sum(len(b.calls) for b in backends) >= 40, "40 streams started")
    assert backends[0].calls, "the crash should hit streams in flight"
    await backends[0].stop(None)
    replies = await asyncio.gather(*calls)
    assert all(r.endswith(b":30:120") for r in replies), replies
    assert sum(r.startswith(b"a:") for r in replies) < len(backends[0].calls)
    assert rig.proxy is not None and rig.proxy.replays >= 1


async def test_stream_over_the_bound_is_not_replayed_and_gets_the_error(rig: Rig) -> None:
    refuser = await rig.backend("refuser", refuse=True)
    channel = await rig.start([refuser.entry()], max_buffer_bytes=1000)
    stub = channel.stream_unary(CLIENT_STREAM, None, None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(_segments(20), timeout=CALL_TIMEOUT)  # 2000 bytes > 1000
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "refuser refuses"
    assert len(refuser.calls) == 1
    assert len(refuser.calls[0].messages) == 20  # every message still reached it


async def test_stream_within_the_bound_is_replayed(rig: Rig) -> None:
    refuser = await rig.backend("refuser", refuse_calls=1)
    channel = await rig.start([refuser.entry()], max_buffer_bytes=1000)
    stub = channel.stream_unary(CLIENT_STREAM, None, None)
    # 900 bytes: kept, refused once, replayed on the same (only) backend.
    assert await stub(_segments(9), timeout=CALL_TIMEOUT) == b"refuser:9:900"
    assert [len(c.messages) for c in refuser.calls] == [9, 9]


async def test_long_stream_over_the_bound_flows_with_bounded_memory(rig: Rig) -> None:
    a = await rig.backend("a")
    channel = await rig.start([a.entry()], max_buffer_bytes=64 * 1024)
    stub = channel.stream_unary(CLIENT_STREAM, None, None)
    reply = await stub(_segments(2000, size=1000), timeout=CALL_TIMEOUT)  # 2 MB
    assert reply == b"a:2000:2000000"
    assert a.messages()[:3] == [m async for m in _segments(3, size=1000)]


# ---- the real process -------------------------------------------------------------------


def _proxy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_shim.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["proxy"],
        ["proxy", "--listen", "nope", "--balancer", "127.0.0.1:1", "--service", "oap"],
        ["proxy", "--listen", "127.0.0.1:0", "--balancer", "x:y", "--service", "oap"],
        ["proxy", "--listen", "127.0.0.1:0", "--balancer", "127.0.0.1:1", "--service", ""],
        [
            *("proxy", "--listen", "127.0.0.1:0", "--balancer", "127.0.0.1:1"),
            *("--service", "oap", "--max-buffer-bytes", "lots"),
        ],
        [
            *("proxy", "--listen", "127.0.0.1:0", "--balancer", "127.0.0.1:1"),
            *("--service", "oap", "--fallback-timeout", "-1"),
        ],
    ],
)
def test_cli_rejects_bad_options_with_exit_2(args: list[str]) -> None:
    result = _proxy_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "error" in result.stderr


def test_cli_help_describes_every_option() -> None:
    result = _proxy_cli("proxy", "--help")
    assert result.returncode == 0
    for option in (
        "--listen",
        "--balancer",
        "--service",
        "--fallback",
        "--max-buffer-bytes",
        "--fallback-timeout",
        "--no-backend-wait",
        "--shutdown-grace",
        "--log-level",
        "--log-format",
    ):
        assert option in result.stdout


@contextlib.contextmanager
def _port_in_use() -> Iterator[int]:
    """A loopback port held by a listening socket, so the proxy cannot bind it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_cli_exits_1_when_it_cannot_listen(processes: ProcessManager) -> None:
    with _port_in_use() as port:
        proc = start_proxy(
            processes, balancers=["127.0.0.1:1"], service="oap", port=port, wait=False
        )
        assert proc.wait(20) == 1
        assert "cannot listen" in proc.logs()


def test_cli_process_forwards_with_fallback_and_stops_on_sigterm(
    processes: ProcessManager,
) -> None:
    """A real `agent-shim proxy` whose balancer is unreachable uses its
    fallback address after --fallback-timeout, then exits 0 on SIGTERM."""
    with CountingBackend(name="fallback") as backend:
        proc = start_proxy(
            processes,
            balancers=[f"127.0.0.1:{free_port()}"],
            service="oap",
            args=["--fallback", backend.address, "--fallback-timeout", "0.5"],
        )
        with grpc.insecure_channel(proc.address) as channel:
            stub = call_stub(channel)
            for _ in range(3):
                assert stub(b"x", timeout=CALL_TIMEOUT) == b"fallback"
        assert backend.tokens() == {None: 3}  # fallback calls carry no lb-token
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "agent-shim proxy stopped" in proc.logs()
