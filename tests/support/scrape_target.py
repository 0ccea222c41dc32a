"""An OAP stand-in's Prometheus telemetry on a real socket, for the load
scraper's tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from lbserver.discovery.scrape import Scraper
from tests.support.telemetry import counters_page

PORT = 19234  # the same port on every target, as OAP's telemetry port is


class Target:
    """An OAP stand-in's telemetry: counters growing at fixed rates, or
    failing (HTTP 500) while `broken`."""

    def __init__(self, ip: str, cpu: float, rps: float = 100.0, *, port: int = PORT) -> None:
        self.ip, self.cpu, self.rps, self.port = ip, cpu, rps, port
        self.started = time.monotonic()
        self.broken = False
        self.scrapes = 0
        self._server: asyncio.Server | None = None

    def page(self) -> bytes:
        elapsed = time.monotonic() - self.started
        return counters_page(self.cpu * elapsed, self.rps * elapsed)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.scrapes += 1
        if self.broken:
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        else:
            body = self.page()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
        await writer.drain()
        writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.ip, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@asynccontextmanager
async def running(scraper: Scraper) -> AsyncIterator[Scraper]:
    """The scraper running (a fast tick) until the block ends."""
    task = asyncio.create_task(scraper.run(tick=0.05))
    try:
        yield scraper
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
