"""The base of both sides of the relay's connections (see `agent_shim.proxy`):
clients' connections to the proxy and the proxy's to backends. The bottom of
the relay's modules: `proxy` -> `_relay_stream` -> `_relay_backends` -> here."""

from __future__ import annotations

from typing import Generic, TypeVar

from agent_shim import _h2

# A side's stream: the proxy's `Stream`, or what a backend connection needs of one.
StreamT = TypeVar("StreamT")


class StreamConnection(_h2.Connection, Generic[StreamT]):
    """What both sides of the relay do with their streams' send windows: a
    WINDOW_UPDATE or a new SETTINGS_INITIAL_WINDOW_SIZE grows them, and
    streams blocked on a window or a full transport are pumped again when
    it opens. A side says which window is its (`_grow`), which way its
    streams' bytes flow (`_pump`) and what a stream's end means for the
    connection (`stream_done`)."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[int, StreamT] = {}
        self.blocked: dict[int, StreamT] = {}

    def _grow(self, stream: StreamT, amount: int) -> None:
        raise NotImplementedError

    def _pump(self, stream: StreamT) -> None:
        raise NotImplementedError

    def stream_done(self) -> None:
        """One of its streams ended (a draining connection may close)."""
        raise NotImplementedError

    def on_window_update(self, stream_id: int, increment: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._grow(stream, increment)
            self._pump(stream)

    def on_initial_window_change(self, delta: int) -> None:
        for stream in self.streams.values():
            self._grow(stream, delta)
        self.on_writable()

    def on_writable(self) -> None:
        if self.blocked and not self.paused:
            blocked = list(self.blocked.values())
            self.blocked.clear()
            for stream in blocked:
                self._pump(stream)
