"""What the sync and asyncio balanced channels share: argument handling,
metadata, deadlines and the rule for retrying a call on another backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypedDict, TypeVar

import grpc

from agent_shim._selector import LB_TOKEN_METADATA_KEY, Choice, Selector
from lbserver.errors import InvalidArgumentError

# Requests of a client-streaming call kept to replay it on another backend
# when its first backend could not be reached; beyond this it is not retried.
DEFAULT_RETRY_BUFFER_MESSAGES = 1000

MetadataPairs = tuple[tuple[str, str | bytes], ...]
ChannelOptions = Sequence[tuple[str, Any]]
Serializer = Callable[[Any], bytes] | None
Deserializer = Callable[[bytes], Any] | None

ChannelT = TypeVar("ChannelT")
# Starts one attempt of a call on the chosen backend, with the time left.
StartCall = Callable[[Choice[ChannelT], float | None], Any]

NO_LIST_BEFORE_DEADLINE = "deadline exceeded while waiting for a server list from the balancer"


def balancer_addresses(balancer: str | Sequence[str]) -> tuple[str, ...]:
    """`"a:1,b:2"`, `"a:1"` or `["a:1", "b:2"]` as a tuple of addresses."""
    parts = [balancer] if isinstance(balancer, str) else list(balancer)
    addresses = tuple(a.strip() for part in parts for a in part.split(",") if a.strip())
    if not addresses:
        raise InvalidArgumentError("balancer", "at least one balancer address is needed")
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
        raise InvalidArgumentError("retry_buffer_messages", "must not be negative")
    return retry_buffer_messages


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


class ChannelArguments(TypedDict, total=False):
    """The keyword arguments of both balanced channels (see `balanced_channel`)."""

    fallback: Sequence[str]
    fallback_timeout: float
    options: ChannelOptions
    credentials: grpc.ChannelCredentials | None
    retry_buffer_messages: int
    selector_options: Mapping[str, Any] | None


class ChannelFactories:
    """grpc.Channel's and grpc.aio.Channel's four multicallable factories,
    with grpc's fixed signatures. A channel names the classes they make, in
    this order; each is made as cls(channel, kind, method, request_serializer,
    response_deserializer, registered)."""

    multicallables: ClassVar[tuple[type[Any], type[Any], type[Any], type[Any]]]

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        args = (method, request_serializer, response_deserializer, _registered_method)
        return self.multicallables[0](self, "unary_unary", *args)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        args = (method, request_serializer, response_deserializer, _registered_method)
        return self.multicallables[1](self, "unary_stream", *args)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        args = (method, request_serializer, response_deserializer, _registered_method)
        return self.multicallables[2](self, "stream_unary", *args)

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        args = (method, request_serializer, response_deserializer, _registered_method)
        return self.multicallables[3](self, "stream_stream", *args)
