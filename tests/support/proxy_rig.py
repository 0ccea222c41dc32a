"""An in-process `agent-shim proxy` for the proxy tests: a scripted grpclb
balancer (`FakeBalancer`) giving a server list, the real Selector and the
relay (`Proxy`, `ProxyServer`) on 127.0.0.1. Subclasses add their clients
and backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent_shim._selector import Selector
from agent_shim.proxy import BackendPool, Proxy, ProxyServer, attach_selector
from tests.support.probe import FakeBalancer


class ProxyRig:
    def __init__(self) -> None:
        self.balancer = FakeBalancer()
        self.selector: Selector[BackendPool] | None = None
        self.proxy: Proxy | None = None
        self.server: ProxyServer | None = None

    async def start_proxy(
        self, servers: Sequence[tuple[str, int, str]], service: str, **options: Any
    ) -> int:
        """Balancer with `servers` as its list, then the proxy once the
        selector has it; returns the proxy's port. `options` go to Proxy."""
        await self.balancer.start()
        self.balancer.set_list(servers)
        self.proxy = Proxy(**options)
        self.selector = attach_selector(self.proxy, [self.balancer.address], service)
        await self.selector.start()
        assert await self.selector.wait_ready(5)
        self.server = ProxyServer(self.proxy, "127.0.0.1:0")
        return await self.server.start()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
        if self.selector is not None:
            await self.selector.close()
        await self.balancer.stop()
