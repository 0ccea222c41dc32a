"""What the sync and asyncio balanced channels share: argument handling,
metadata, deadlines and the rule for retrying a call on another backend."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import grpc

from agent_shim._selector import LB_TOKEN_METADATA_KEY, Choice, Selector

# Requests of a client-streaming call kept to replay it on another backend
# when its first backend could not be reached; beyond this it is not retried.
DEFAULT_RETRY_BUFFER_MESSAGES = 1000

MetadataPairs = tuple[tuple[str, str | bytes], ...]
ChannelOptions = Sequence[tuple[str, Any]]
Serializer = Callable[[Any], bytes] | None
Deserializer = Callable[[bytes], Any] | None

ChannelT = TypeVar("ChannelT")
OwnerT = TypeVar("OwnerT")
# Starts one attempt of a call on the chosen backend, with the time left.
StartCall = Callable[[Choice[ChannelT], float | None], Any]

NO_LIST_BEFORE_DEADLINE = "deadline exceeded while waiting for a server list from the balancer"


def balancer_addresses(balancer: str | Sequence[str]) -> tuple[str, ...]:
    """`"a:1,b:2"`, `"a:1"` or `["a:1", "b:2"]` as a tuple of addresses."""
    parts = [balancer] if isinstance(balancer, str) else list(balancer)
    addresses = tuple(a.strip() for part in parts for a in part.split(",") if a.strip())
    if not addresses:
        raise ValueError("at least one balancer address is needed")
    return addresses


def with_token(
    metadata: Iterable[tuple[str, str | bytes]] | None, choice: Choice[Any]
) -> MetadataPairs:
    """The caller's metadata plus the chosen entry's lb-token (which replaces
    any the caller set: the token belongs to the backend actually called)."""
    kept = tuple(
        (key, value) for key, value in (metadata or ()) if key.lower() != LB_TOKEN_METADATA_KEY
    )
    return kept + choice.metadata


def failed_before_backend(code: grpc.StatusCode | None, initial_metadata: object) -> bool:
    """UNAVAILABLE before any response (no initial metadata): the call did
    not reach a backend (connection refused, reset, no connection), so it is
    safe to send it to another one."""
    return code is grpc.StatusCode.UNAVAILABLE and not initial_metadata


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def check_retry_buffer(retry_buffer_messages: int) -> int:
    if retry_buffer_messages < 0:
        raise ValueError("retry_buffer_messages must not be negative")
    return retry_buffer_messages


def backend_channel_factory(
    insecure_channel: Callable[..., ChannelT],
    secure_channel: Callable[..., ChannelT],
    credentials: grpc.ChannelCredentials | None,
    options: ChannelOptions,
) -> Callable[[str], ChannelT]:
    """How the Selector opens a channel to a backend address."""
    backend_options = tuple(options)

    # A plain closure, not a bound method: the Selector (on the sync channel,
    # its loop thread) must not keep the balanced channel alive, so that an
    # unclosed channel can still be collected.
    def backend_channel(address: str) -> ChannelT:
        if credentials is None:
            return insecure_channel(address, options=backend_options)
        return secure_channel(address, credentials, options=backend_options)

    return backend_channel


def start_attempt(
    selector: Selector[ChannelT],
    start: StartCall[ChannelT],
    choice: Choice[ChannelT],
    deadline: float | None,
) -> Any:
    """grpcio's call object of a new attempt on `choice`; one that could not
    even be started counts as not having reached its backend."""
    try:
        return start(choice, remaining(deadline))
    except BaseException:
        selector.finished(choice, reached_backend=False, failed=True)
        raise


def attempt_ended(
    selector: Selector[ChannelT],
    choice: Choice[ChannelT],
    code: grpc.StatusCode | None,
    initial_metadata: object,
) -> bool:
    """Counts an ended attempt; True when it failed before reaching its
    backend (and may therefore be retried on another one)."""
    early = failed_before_backend(code, initial_metadata)
    selector.finished(choice, reached_backend=not early, failed=code is not grpc.StatusCode.OK)
    return early


class MultiCallableBase(Generic[OwnerT, ChannelT]):
    """What the multicallables of both balanced channels share: grpcio's
    multicallable of the same method on each backend channel, and starting an
    attempt there. `kind` is the grpc.Channel factory of the call type."""

    kind: ClassVar[str]

    def __init__(
        self,
        owner: OwnerT,
        method: str,
        request_serializer: Serializer,
        response_deserializer: Deserializer,
        registered: bool | None,
    ) -> None:
        self._owner = owner
        self._method = method
        self._serializer = request_serializer
        self._deserializer = response_deserializer
        self._registered = registered
        # One multicallable per backend channel, made on first use: creating
        # one costs about as much as a small call.
        self._per_channel: weakref.WeakKeyDictionary[ChannelT, Any] = weakref.WeakKeyDictionary()

    def _on(self, channel: ChannelT) -> Any:
        multicallable = self._per_channel.get(channel)
        if multicallable is None:
            multicallable = getattr(channel, self.kind)(
                self._method,
                request_serializer=self._serializer,
                response_deserializer=self._deserializer,
                _registered_method=self._registered,
            )
            self._per_channel[channel] = multicallable
        return multicallable

    def _starter(
        self,
        requests: Callable[[], Any],
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        *,
        via: str | None = None,
    ) -> StartCall[ChannelT]:
        """Starts an attempt with `requests()` (read anew for each attempt),
        by calling the backend's multicallable or its method `via`."""

        def start(choice: Choice[ChannelT], left: float | None) -> Any:
            multicallable = self._on(choice.channel)
            if via is not None:
                multicallable = getattr(multicallable, via)
            return multicallable(
                requests(),
                timeout=left,
                metadata=with_token(metadata, choice),
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )

        return start


class ChannelFactories:
    """grpc.Channel's and grpc.aio.Channel's four multicallable factories;
    a channel names the class each one makes."""

    unary_unary_class: ClassVar[type[Any]]
    unary_stream_class: ClassVar[type[Any]]
    stream_unary_class: ClassVar[type[Any]]
    stream_stream_class: ClassVar[type[Any]]

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return self.unary_unary_class(
            self, method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return self.unary_stream_class(
            self, method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return self.stream_unary_class(
            self, method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return self.stream_stream_class(
            self, method, request_serializer, response_deserializer, _registered_method
        )
