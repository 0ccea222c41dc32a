"""What the service tests of the sync and the asyncio balanced channel share:
an lbserver listing two echo backends by weight, or a fixed list (to put an
unreachable backend first), and channel arguments that make a fresh channel
start at that list's first entry."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lbserver.balancer import Balancer
from lbserver.server import RunningServer
from tests.support.shim_echo import EchoBackend
from tests.support.shim_lb import Named, ordered_list, register

if TYPE_CHECKING:
    from tests.service.harness import Harness

CALL_TIMEOUT = 10.0


class FirstEntry(random.Random):
    """Makes a Selector start at the first entry of every list."""

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        return 0


async def weighted(harness: Harness, echoes: list[EchoBackend]) -> RunningServer:
    running = await harness.start()
    admin = harness.channel(running)
    await register(admin, echoes[0], weight=1)
    await register(admin, echoes[1], weight=2)
    return running


async def ordered(
    harness: Harness, order: Sequence[str], *backends: Named, drops: Sequence[str] = ()
) -> RunningServer:
    """A balancer listing `backends` (registered here) in exactly `order`."""
    running = await harness.start(
        balancer=Balancer(list_builder=ordered_list(order, drops=drops), startup_grace=0)
    )
    admin = harness.channel(running)
    for backend in backends:
        await register(admin, backend)
    return running


def share(echoes: list[EchoBackend], method: str) -> list[int]:
    return [e.counts()[method] for e in echoes]


def from_first_entry(**selector_options: Any) -> dict[str, Any]:
    """Channel arguments: its own connections (none shared with earlier
    channels), and a Selector that starts at the list's first entry."""
    return {
        "options": [("grpc.use_local_subchannel_pool", 1)],
        "selector_options": {"rng": FirstEntry(), **selector_options},
    }
