"""The backend of bench/proxy, run as its own process.

    python -m bench.proxy.backend --listen 127.0.0.1:PORT

A grpc.aio server with two raw-bytes methods:

- `/bench.Echo/Unary` (unary-unary): replies with the request;
- `/bench.Echo/Upload` (stream-unary, like SkyWalking's
  `TraceSegmentReportService/collect`): reads the whole request stream
  (at most `--read-mb-per-s` MB/s if given) and replies with the number of
  bytes it got, in ASCII digits.

SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
UPLOAD = f"/{SERVICE}/Upload"

SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.so_reuseport", 0),
)


async def _unary(request: bytes, context: Any) -> bytes:
    return request


# Bytes per second the Upload handler reads at most (0: as fast as it can);
# the slow-backend case of bench/proxy sets it.
READ_RATE = 0.0


async def _upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
    size = 0
    began = time.monotonic()
    async for message in requests:
        size += len(message)
        if READ_RATE:
            ahead = size / READ_RATE - (time.monotonic() - began)
            if ahead > 0:
                await asyncio.sleep(ahead)
    return b"%08d" % size


def handler() -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Upload": grpc.stream_unary_rpc_method_handler(_upload),
        },
    )


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler(),))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"bench backend listening on port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bench/proxy echo backend")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--read-mb-per-s",
        type=float,
        default=0.0,
        help="read uploads at most this fast (MB/s; default: unlimited)",
    )
    args = parser.parse_args(argv)
    global READ_RATE
    READ_RATE = args.read_mb_per_s * 1e6
    asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
