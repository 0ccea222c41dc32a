"""What the service tests of the sync and the asyncio balanced channel share:
an lbserver listing two echo backends by weight, or a scripted balancer with
a fixed list (to put an unreachable backend first), and channel arguments
that make a fresh channel start at that list's first entry."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from lbserver.server import RunningServer
from tests.support.scripted_lb import Named, ScriptedBalancer
from tests.support.shim_echo import EchoBackend
from tests.support.shim_lb import register

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
) -> ScriptedBalancer:
    """A scripted balancer listing `backends` in exactly `order` ("drop"
    places a drop entry with the next token of `drops`)."""
    balancer = await ScriptedBalancer().serve(order, backends, drops=drops).start()
    # The harness stops what it holds when the test ends, calling only
    # stop(grace=0), which the scripted balancer has too.
    harness.servers.append(cast(RunningServer, balancer))
    return balancer


def share(echoes: list[EchoBackend], method: str) -> list[int]:
    return [e.counts()[method] for e in echoes]


def from_first_entry(**selector_options: Any) -> dict[str, Any]:
    """Channel arguments: its own connections (none shared with earlier
    channels), and a Selector that starts at the list's first entry."""
    return {
        "options": [("grpc.use_local_subchannel_pool", 1)],
        "selector_options": {"rng": FirstEntry(), **selector_options},
    }
