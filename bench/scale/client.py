"""`python -m bench.scale.client --target HOST:PORT --name NAME [--protocol
grpclb|xds]`: one client process holding many balancer streams, each on its
own channel (and so its own TCP connection: `grpc.use_local_subchannel_pool`
keeps channels from sharing a subchannel).

`grpclb` (the default): BalanceLoad streams; each sends an initial_request
and then keeps its request side open (a half-close would end the stream).
`xds`: ADS streams (StreamAggregatedResources, state of the world), each
subscribing to LDS for NAME, then CDS and EDS as the responses name them,
and ACKing every response (bench/scale/xds.py). A stream's "server list" is
then its ClusterLoadAssignment: EDS responses are what the fan-out waits for.

Every stream records the CLOCK_MONOTONIC time of every message it receives
(system-wide on Linux, so comparable with the orchestrator's). Responses
are kept as raw bytes and interned per process; each distinct payload is
decoded once (and each distinct xDS request serialized once).

The orchestrator drives the process with JSON lines on stdin and reads one
JSON line per command on stdout:

- `{"cmd": "open", "count": K}`: opens K more streams, answers once each has
  received its first server list or ClusterLoadAssignment (or failed):
  `{"live", "ready", "failed"}`.
- `{"cmd": "expect", "ports": [...], "since": T, "timeout": S}`: answers once
  every live stream has received a server list whose set of ports is `ports`
  at or after T: `{"latencies": [arrival - T, ...], "missing": n}`.
- `{"cmd": "stats"}`: `{"live", "ready", "failed", "errors", "rss_kib"}`.
- `{"cmd": "quit"}`: closes every channel and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import grpc

from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb_pb2

from . import xds
from .procinfo import raise_fd_limit, status_kib

METHOD = "/grpc.lb.v1.LoadBalancer/BalanceLoad"
PROTOCOLS = ("grpclb", "xds")
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_http_proxy", 0),
)
# Streams being set up at once (connect + initial request) per process.
OPEN_CONCURRENCY = 128

Summary = tuple[int, ...] | str


def summarize(payload: bytes) -> Summary:
    """The sorted distinct ports of a server list, or the response's kind."""
    response = lb_pb2.LoadBalanceResponse.FromString(payload)
    kind = response.WhichOneof("load_balance_response_type")
    if kind == "server_list":
        return tuple(sorted({server.port for server in response.server_list.servers}))
    return str(kind)


class Stream:
    __slots__ = ("arrivals", "channel", "index", "ready", "subscribed", "task")

    def __init__(self, index: int) -> None:
        self.index = index
        self.arrivals: list[tuple[float, int]] = []
        self.ready = asyncio.get_running_loop().create_future()
        self.channel: grpc.aio.Channel | None = None
        self.task: asyncio.Task[None] | None = None
        # xDS: the names this stream subscribed to, per type URL.
        self.subscribed: dict[str, xds.Names] = {}


class Expectation:
    def __init__(self, summary: Summary, since: float, waiting: set[int]) -> None:
        self.summary = summary
        self.since = since
        self.latencies: dict[int, float] = {}
        # Live streams that have not received the expected list yet.
        self.waiting = waiting
        self.done = asyncio.Event()

    def settle(self, index: int) -> None:
        """`index` got the list, or ended: it is no longer waited for."""
        self.waiting.discard(index)
        if not self.waiting:
            self.done.set()


class Client:
    def __init__(self, target: str, name: str, protocol: str = "grpclb") -> None:
        self.target = target
        self.protocol = protocol
        if protocol == "xds":
            self.method = xds.METHOD
            self.initial = xds.request(xds.LISTENER, (name,), node_id=f"bench-scale-{os.getpid()}")
            self.first_names: xds.Names = (name,)
        else:
            self.method = METHOD
            self.initial = lb_pb2.LoadBalanceRequest(
                initial_request=lb_pb2.InitialLoadBalanceRequest(name=name)
            ).SerializeToString()
        # xDS: each distinct response decoded once, each distinct request
        # (ACKs by payload and names; subscriptions by type and names)
        # serialized once.
        self.decoded: list[xds.Decoded] = []
        self.acks: dict[tuple[int, xds.Names], bytes] = {}
        self.subscriptions: dict[tuple[str, xds.Names], bytes] = {}
        self.streams: list[Stream] = []
        self.live: set[int] = set()
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.payload_ids: dict[bytes, int] = {}
        self.summaries: list[Summary] = []
        self.expectation: Expectation | None = None
        self._opening = asyncio.Semaphore(OPEN_CONCURRENCY)

    def _intern(self, payload: bytes) -> int:
        pid = self.payload_ids.get(payload)
        if pid is None:
            pid = self.payload_ids[payload] = len(self.summaries)
            if self.protocol == "xds":
                decoded = xds.decode(payload)
                self.decoded.append(decoded)
                self.summaries.append(decoded.summary)
            else:
                self.summaries.append(summarize(payload))
        return pid

    async def _received(self, stream: Stream, call: Any, payload: bytes) -> None:
        """A response arrived: recorded; on xDS, ACKed, and followed by the
        subscription it names (LDS -> CDS -> EDS) the first time."""
        at = time.monotonic()
        pid = self._intern(payload)
        self._arrived(stream, at, pid)
        if self.protocol != "xds":
            return
        decoded = self.decoded[pid]
        if isinstance(decoded.summary, str) and decoded.summary.startswith("error:"):
            raise RuntimeError(f"{xds.SHORT_NAMES.get(decoded.type_url)} {decoded.summary}")
        names = stream.subscribed.get(decoded.type_url, ())
        ack = self.acks.get((pid, names))
        if ack is None:
            ack = self.acks[(pid, names)] = xds.request(
                decoded.type_url, names, version=decoded.version, nonce=decoded.nonce
            )
        await call.write(ack)
        if decoded.follow is not None:
            type_url, wanted = decoded.follow
            if stream.subscribed.get(type_url) != wanted:
                subscription = self.subscriptions.get(decoded.follow)
                if subscription is None:
                    subscription = self.subscriptions[decoded.follow] = xds.request(
                        type_url, wanted
                    )
                stream.subscribed[type_url] = wanted
                await call.write(subscription)

    def _arrived(self, stream: Stream, at: float, pid: int) -> None:
        stream.arrivals.append((at, pid))
        summary = self.summaries[pid]
        if not stream.ready.done() and isinstance(summary, tuple):
            stream.ready.set_result(None)
        expectation = self.expectation
        if (
            expectation is not None
            and summary == expectation.summary
            and at >= expectation.since
            and stream.index not in expectation.latencies
        ):
            expectation.latencies[stream.index] = at - expectation.since
            expectation.settle(stream.index)

    async def _run(self, stream: Stream) -> None:
        try:
            async with self._opening:
                channel = stream.channel = grpc.aio.insecure_channel(
                    self.target, options=CHANNEL_OPTIONS
                )
                call = channel.stream_stream(self.method, None, None)(None, wait_for_ready=True)
                if self.protocol == "xds":
                    stream.subscribed[xds.LISTENER] = self.first_names
                await call.write(self.initial)
                self.live.add(stream.index)
                # Up to the first list (grpclb: initial_response, then the
                # list; xDS: LDS, CDS, then EDS), within the open limit.
                while not stream.ready.done():
                    payload = await call.read()
                    if not isinstance(payload, bytes):
                        raise RuntimeError("stream ended before its first list")
                    await self._received(stream, call, payload)
            while True:
                payload = await call.read()
                if not isinstance(payload, bytes):
                    self.errors["ended by server"] += 1
                    break
                await self._received(stream, call, payload)
        except grpc.aio.AioRpcError as exc:
            self.errors[exc.code().name] += 1
        except Exception as exc:
            self.errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
        finally:
            # Ended (by the server, an error, or our own close at quit).
            self.live.discard(stream.index)
            self.failed += 1
            if not stream.ready.done():
                stream.ready.set_result(None)
            if self.expectation is not None:
                self.expectation.settle(stream.index)

    async def open(self, count: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        new = []
        for _ in range(count):
            stream = Stream(len(self.streams))
            self.streams.append(stream)
            stream.task = loop.create_task(self._run(stream))
            new.append(stream.ready)
        await asyncio.wait_for(asyncio.gather(*new), timeout=300)
        # The streams' objects live until the end: keep this process's
        # collector from walking them again and again (its pauses would
        # show up as fan-out latency that is not the balancer's).
        gc.collect()
        gc.freeze()
        return self.stats()

    async def expect(self, ports: list[int], since: float, wait: float) -> dict[str, Any]:
        expectation = Expectation(tuple(sorted(ports)), since, set(self.live))
        for stream in self.streams:
            if stream.index not in self.live:
                continue
            for at, pid in stream.arrivals:
                if self.summaries[pid] == expectation.summary and at >= since:
                    expectation.latencies[stream.index] = at - since
                    expectation.waiting.discard(stream.index)
                    break
        if not expectation.waiting:
            expectation.done.set()
        self.expectation = expectation
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(expectation.done.wait(), wait)
        self.expectation = None
        missing = len(self.live - expectation.latencies.keys())
        return {"latencies": list(expectation.latencies.values()), "missing": missing}

    def stats(self) -> dict[str, Any]:
        return {
            "live": len(self.live),
            "ready": sum(1 for s in self.streams if s.ready.done() and s.index in self.live),
            "failed": self.failed,
            "errors": dict(self.errors),
            "rss_kib": status_kib(os.getpid(), "VmRSS"),
        }

    async def close(self) -> None:
        for stream in self.streams:
            if stream.task is not None:
                stream.task.cancel()
        await asyncio.gather(*(s.task for s in self.streams if s.task), return_exceptions=True)
        await asyncio.gather(
            *(s.channel.close(None) for s in self.streams if s.channel), return_exceptions=True
        )


async def serve(client: Client) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        kind = command["cmd"]
        if kind == "quit":
            break
        if kind == "open":
            reply = await client.open(int(command["count"]))
        elif kind == "expect":
            reply = await client.expect(
                command["ports"], float(command["since"]), float(command["timeout"])
            )
        else:
            reply = client.stats()
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--name", default="oap")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpclb")
    args = parser.parse_args()
    raise_fd_limit()
    gc.set_threshold(50_000, 50, 1000)
    asyncio.run(serve(Client(args.target, args.name, args.protocol)))


if __name__ == "__main__":
    main()
