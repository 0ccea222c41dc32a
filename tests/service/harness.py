"""The in-process service-test harness: real grpc.aio balancers on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from lbserver.balancer import Balancer
from lbserver.config import Config
from lbserver.server import RunningServer, build_balancer, start

TEST_CONFIG = Config(
    listen="127.0.0.1:0",
    metrics_listen="off",
    startup_grace=0.0,
    client_stats_interval=1.0,
    shutdown_grace=1.0,
    log_level="warning",
)

BalancerFactory = Callable[[Config], Balancer]


class Harness:
    """Starts balancers and opens channels to them; cleans up everything."""

    def __init__(self) -> None:
        self.servers: list[RunningServer] = []
        self.channels: list[grpc.aio.Channel] = []

    async def start(self, balancer: Balancer | None = None, **changes: Any) -> RunningServer:
        config = TEST_CONFIG.replace(**changes)
        running = await start(config, balancer or build_balancer(config))
        self.servers.append(running)
        return running

    def channel(self, running: RunningServer) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        self.channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)
        for running in self.servers:
            await running.stop(grace=0)
