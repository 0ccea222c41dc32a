"""agent_shim: per-call balancing for gRPC clients that cannot use the grpclb
policy themselves (SkyWalking agents): a Python channel and a sidecar proxy.

    channel = agent_shim.balanced_channel("lbserver:11810", "oap", fallback=["oap:11800"])
    stub = MyServiceStub(channel)          # any generated stub
    reply = stub.Method(request, timeout=5)

`aio_balanced_channel` is the same for grpc.aio. `Selector` is the grpclb
client underneath, for code that makes its own calls (the proxy).

Logs go to the standard `logging` module (loggers `agent_shim.*`), so the
application's logging configuration decides what is shown; an application
that configured structlog gets them through structlog instead. Nothing is
printed to stdout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent_shim._errors import AlreadyStartedError, DroppedCallError, NoBackendError, ShimError
from agent_shim._selector import LB_TOKEN_METADATA_KEY, Choice, Selector

# One version for the project, lbserver's (pyproject reads it from there).
from lbserver import __version__ as __version__

if TYPE_CHECKING:
    from agent_shim._aio_channel import aio_balanced_channel
    from agent_shim._channel import balanced_channel


def __getattr__(name: str) -> Any:
    # The channels need grpcio; `agent-shim proxy` imports this package and
    # must not load it (a sidecar's memory), so they are imported when used.
    if name == "balanced_channel":
        from agent_shim._channel import balanced_channel

        return balanced_channel
    if name == "aio_balanced_channel":
        from agent_shim._aio_channel import aio_balanced_channel

        return aio_balanced_channel
    raise AttributeError(f"module 'agent_shim' has no attribute {name!r}")


__all__ = [
    "LB_TOKEN_METADATA_KEY",
    "AlreadyStartedError",
    "Choice",
    "DroppedCallError",
    "NoBackendError",
    "Selector",
    "ShimError",
    "__version__",
    "aio_balanced_channel",
    "balanced_channel",
]
