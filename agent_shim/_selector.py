"""The shim's grpclb client core, shared by the Python channels and the proxy.

A Selector keeps a BalanceLoad stream to the balancer, applies every server
list it receives, reports client stats at the interval the balancer asks for,
and chooses a backend for each call (weighted round robin over the list in
order, skipping backends whose connection is failing). It falls back to the
configured fallback addresses only when it never got a list (after a timeout)
or when the balancer sends `fallback_response`.

API CONTRACT (the proxy and the channels are written against it):

    selector = Selector(balancers=["10.0.0.5:11810"], service="oap",
                        fallback=["oap:11800"], channel_factory=...)
    await selector.start()
    await selector.wait_ready(timeout=10)      # a list or fallback is in force
    choice = selector.choose(exclude=())       # raises NoBackendError / DroppedCallError
    ... make the call on choice.channel with ("lb-token", choice.token) metadata ...
    selector.finished(choice, reached_backend=True)   # for client stats
    await selector.close()
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

ChannelT = TypeVar("ChannelT")

LB_TOKEN_METADATA_KEY = "lb-token"


class ShimError(Exception):
    """Base of the errors agent_shim raises."""


class NoBackendError(ShimError):
    """No backend can take a call now (empty list, all failing, no fallback).
    Maps to UNAVAILABLE."""


class DroppedCallError(ShimError):
    """The balancer's list said to drop this call (load shedding). Maps to
    UNAVAILABLE; counted per token in client stats."""

    def __init__(self, token: str) -> None:
        super().__init__(f"call dropped by the load balancer (token {token!r})")
        self.token = token


@dataclass(frozen=True, slots=True)
class Choice(Generic[ChannelT]):
    """The backend chosen for one call."""

    address: str  # "ip:port" or "[v6]:port"
    token: str  # "" in fallback mode
    channel: ChannelT  # cached per address, reused across list updates

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((LB_TOKEN_METADATA_KEY, self.token),) if self.token else ()


def aio_insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


class Selector(Generic[ChannelT]):
    """See the module docstring. All methods are safe to call from any thread
    except start()/close(), which run on the selector's event loop."""

    def __init__(
        self,
        balancers: Sequence[str],
        service: str,
        *,
        fallback: Sequence[str] = (),
        channel_factory: Callable[[str], ChannelT],
        close_channel: Callable[[ChannelT], object] | None = None,
        fallback_timeout: float = 10.0,
    ) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def wait_ready(self, timeout: float | None = None) -> bool:
        raise NotImplementedError

    def choose(self, exclude: Collection[str] = ()) -> Choice[ChannelT]:
        raise NotImplementedError

    def finished(
        self, choice: Choice[ChannelT], *, reached_backend: bool, failed: bool = False
    ) -> None:
        """Counts the call for client stats; a call that did not reach its
        backend marks that backend as failing for a while."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
