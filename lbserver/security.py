"""Who may register backends and read the balancer's state.

A registered backend receives every agent's traces, so Registry and Admin can
require a bearer token (compared in constant time) and, with TLS, a client
certificate; BalanceLoad stays open to clients unless TLS requires client
certificates on the whole port.

The token file (auth_token_file) holds one or more tokens, one a line (blank
lines and whitespace around a token ignored): the first is the current token,
the others previous ones still accepted while a rotation is in progress. The
balancer re-reads it when it changes (RegistrationTokens.watch), so a rotated
Kubernetes Secret is picked up without a restart.

Also here: what guards every request before a handler sees it
(`request_decoder`, `serve_decoded`): a message larger than
max_message_bytes, or one that does not decode, becomes a RefusedMessage that
the handler answers with RESOURCE_EXHAUSTED or INVALID_ARGUMENT naming the
limit or the message type, instead of grpcio's UNKNOWN "Unexpected
DecodeError".
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from lbserver.errors import ConfigError, InvalidValueError
from lbserver.logs import LogLimiter, clip

log = structlog.get_logger("lbserver.security")

# How often the balancer reads auth_token_file again to see whether it changed.
TOKEN_FILE_CHECK_SECONDS = 1.0
# A token file larger than this is refused (at start) or ignored (on a reload):
# tokens are short, and the file is read every TOKEN_FILE_CHECK_SECONDS.
MAX_TOKEN_FILE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Denial:
    code: grpc.StatusCode
    message: str
    reason: str  # metric label


class RegistrationTokens:
    """The registration tokens Registry and Admin accept, the current one
    first, then previous ones still accepted during a rotation.

    Made from auth_token_file (`from_file`), `refresh()` reads the file again
    and takes its tokens if they changed; `watch()` does that every
    TOKEN_FILE_CHECK_SECONDS. The path is opened anew each time, so symlinks
    are followed and kubelet's atomic swap of a mounted Secret's `..data`
    link is seen. A file that has become unreadable, empty or that holds a
    token a client cannot send changes nothing: the last good tokens stay
    (never none, which would let anyone in) and one error is logged until the
    file is good again. `generation` counts the changes."""

    def __init__(self, tokens: Sequence[str], path: str | None = None) -> None:
        if not tokens:
            raise InvalidValueError("RegistrationTokens needs at least one token")
        self._path = path
        self._tokens = tuple(tokens)
        self._digests = _digests(self._tokens)
        self._raw: bytes | None = None
        self._failing = False
        self.generation = 0

    @classmethod
    def from_file(cls, path: str) -> RegistrationTokens:
        """The tokens of auth_token_file; ConfigError (naming the file and
        the line, never a token) if it is unreadable or holds no usable
        token."""
        raw = _read_token_file(path)
        tokens = cls(_file_tokens(path, raw), path)
        tokens._raw = raw
        return tokens

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def tokens(self) -> tuple[str, ...]:
        return self._tokens

    def match(self, presented: bytes) -> int | None:
        """The index of the token `presented` is (0: the current one), or
        None. Every token is compared, each in constant time and over SHA-256
        digests, so the time taken shows neither which token matched nor
        their lengths."""
        digest = hashlib.sha256(presented).digest()
        found: int | None = None
        for index, expected in enumerate(self._digests):
            if hmac.compare_digest(digest, expected) and found is None:
                found = index
        return found

    def refresh(self) -> bool:
        """Reads the token file again; True if its tokens changed (and were
        taken). Without a file, nothing to do."""
        if self._path is None:
            return False
        try:
            raw = _read_token_file(self._path)
            tokens = self._tokens if raw == self._raw else _file_tokens(self._path, raw)
        except ConfigError as err:
            if not self._failing:
                self._failing = True
                log.error(
                    "registration token file unusable; keeping the last good tokens",
                    path=self._path,
                    tokens=len(self._tokens),
                    error=str(err),
                )
            return False
        self._raw = raw
        if self._failing:
            self._failing = False
            if tokens == self._tokens:
                log.info("registration token file usable again", path=self._path)
        if tokens == self._tokens:
            return False
        # On the event loop, between two calls' checks: a check sees the old
        # tokens or the new ones, never a mix.
        self._digests = _digests(tokens)
        self._tokens = tokens
        self.generation += 1
        # The number of tokens, never the tokens.
        log.info("registration tokens reloaded", path=self._path, tokens=len(tokens))
        return True

    async def watch(self, every: float = TOKEN_FILE_CHECK_SECONDS) -> None:
        """Refreshes every `every` seconds until cancelled."""
        while True:
            await asyncio.sleep(every)
            try:
                self.refresh()
            except Exception:  # never let a surprise end the reloading
                log.exception("registration token file check failed", path=self._path)


def _digests(tokens: Sequence[str]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(token.encode()).digest() for token in tokens)


def _read_token_file(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"auth_token_file: cannot read {path}: {err.strerror}") from None
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(
            f"auth_token_file: {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes; it should "
            "hold a few tokens, one a line"
        )
    return raw


def _file_tokens(path: str, raw: bytes) -> tuple[str, ...]:
    tokens = parse_tokens(
        f"auth_token_file: the token in {path}",
        raw.decode("utf-8", errors="replace"),
        name_every_line=True,
    )
    if not tokens:
        raise ConfigError(f"auth_token_file: {path} is empty or only whitespace")
    return tokens


def parse_tokens(what: str, text: str, *, name_every_line: bool = False) -> tuple[str, ...]:
    """The tokens of `text`, one a line, in order and without duplicates;
    blank lines and whitespace around a token are ignored. ConfigError
    (check_token's, naming `what` and the line: every line, or those past
    the first) for a token a client cannot send. An empty tuple when there
    is none."""
    tokens: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        token = line.strip()
        if not token:
            continue
        named = name_every_line or number > 1
        check_token(f"{what}, line {number}" if named else what, token)
        if token not in tokens:
            tokens.append(token)
    return tuple(tokens)


class Authorizer:
    """Checks one call's credentials for Registry and Admin."""

    def __init__(
        self,
        token: str | RegistrationTokens | None = None,
        require_client_cert: bool = False,
        *,
        log_limiter: LogLimiter | None = None,
    ) -> None:
        self._tokens = RegistrationTokens([token]) if isinstance(token, str) else token
        self._require_client_cert = require_client_cert
        # Auth failures are logged through it: a client can cause them at will.
        self.log_limiter = log_limiter or LogLimiter()

    @property
    def enabled(self) -> bool:
        return self._tokens is not None or self._require_client_cert

    @property
    def generation(self) -> int:
        """Changes whenever the accepted tokens do: a stream authenticated
        before checks its credentials again."""
        return 0 if self._tokens is None else self._tokens.generation

    def check(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Denial | None:
        verdict = self.verify(metadata, auth_context)
        return verdict if isinstance(verdict, Denial) else None

    def verify(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Denial | int:
        """A Denial, or the index of the token the call presented: 0 for the
        current one (and when no token is required), more for a previous one."""
        if (
            self._require_client_cert
            and not auth_context.get("x509_common_name")
            and not (auth_context.get("x509_subject_alternative_name"))
        ):
            return Denial(
                grpc.StatusCode.UNAUTHENTICATED,
                "a client certificate signed by the balancer's client CA is required",
                "no_client_certificate",
            )
        if self._tokens is None:
            return 0
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return Denial(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing 'authorization: Bearer <token>' metadata: this balancer requires "
                "the registration token",
                "missing_token",
            )
        value = values[0].encode() if isinstance(values[0], str) else values[0]
        scheme, _, presented = value.partition(b" ")
        if scheme.lower() != b"bearer" or not presented:
            return Denial(
                grpc.StatusCode.UNAUTHENTICATED,
                "the authorization metadata must be 'Bearer <token>'",
                "malformed_token",
            )
        index = self._tokens.match(presented.strip())
        if index is None:
            return Denial(
                grpc.StatusCode.PERMISSION_DENIED,
                "the registration token is wrong",
                "wrong_token",
            )
        return index


def load_tokens(token: str, token_file: str) -> RegistrationTokens | None:
    """The configured tokens: from `token_file` if given (re-readable), else
    from `token` (one token, or several on separate lines); None when neither
    is set. Surrounding whitespace (a file's final newline) is dropped; no
    token at all, or one with a character a client cannot send in an
    `authorization: Bearer <token>` header, is a ConfigError (it would lock
    out every registrar)."""
    if token_file:
        return RegistrationTokens.from_file(token_file)
    if not token:
        return None
    tokens = parse_tokens("auth_token", token)
    if not tokens:
        raise ConfigError("auth_token: is only whitespace; set a token, or leave it empty for none")
    return RegistrationTokens(tokens)


def load_token(token: str, token_file: str) -> str | None:
    """The current token of load_tokens (the first), or None."""
    tokens = load_tokens(token, token_file)
    return None if tokens is None else tokens.tokens[0]


def check_token(what: str, token: str) -> None:
    """ConfigError unless every character of `token` can travel in an
    `authorization: Bearer <token>` header: printable ASCII, no whitespace.
    The message names the position and kind of character, never the token."""
    for index, char in enumerate(token):
        if "!" <= char <= "~":
            continue
        if char.isspace():
            kind = "whitespace"
        elif not char.isascii():
            kind = "a non-ASCII character"
        else:
            kind = "a control character"
        raise ConfigError(
            f"{what}: character {index + 1} is {kind} (U+{ord(char):04X}); a token must be "
            "printable ASCII without spaces to be sent as 'authorization: Bearer <token>'"
        )


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str, require_client_cert_everywhere: bool
) -> grpc.ServerCredentials | None:
    """TLS credentials, or None without a certificate. grpcio either requires
    and verifies client certificates for every call on a port or does not ask
    for them at all. Config has checked that the files go together."""
    if not cert_file:
        return None

    def read(option: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise ConfigError(f"{option}: cannot read {path}: {err.strerror}") from None

    return grpc.ssl_server_credentials(
        [(read("tls_key_file", key_file), read("tls_cert_file", cert_file))],
        root_certificates=read("tls_client_ca_file", client_ca_file) if client_ca_file else None,
        require_client_auth=bool(client_ca_file) and require_client_cert_everywhere,
    )


class PeerRateLimiter:
    """A token bucket per peer IP: `rate` calls per second, bursts of
    `burst`. Idle peers are forgotten so the table stays small."""

    def __init__(self, rate: float, burst: float | None = None, max_peers: int = 100_000) -> None:
        self._rate = rate
        self._burst = burst if burst is not None else max(rate, 1.0)
        self._max_peers = max_peers
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def rate(self) -> float:
        """Calls per second per peer IP; 0: no limit."""
        return self._rate

    def allow(self, peer: str, now: float | None = None) -> bool:
        if self._rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        key = peer_ip(peer)
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self._max_peers:
            self._forget_idle(now)
        return allowed

    def _forget_idle(self, now: float) -> None:
        refill = self._burst / self._rate
        for key, (_, last) in list(self._buckets.items()):
            if now - last > refill:
                del self._buckets[key]


def peer_ip(peer: str) -> str:
    """'ipv4:10.0.0.1:5555' → '10.0.0.1'; 'ipv6:[::1]:5555' → '::1'."""
    _, _, address = peer.partition(":")
    if address.startswith("["):
        return address[1 : address.find("]")]
    return address.rpartition(":")[0] or address


async def require(
    authorizer: Authorizer,
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    what: str,
    *,
    stream: bool = False,
    again: bool = False,
) -> int:
    """Aborts the call unless its credentials pass; logs and counts failures.
    Returns the index of the token the call presented (0: the current one, or
    no token required). A call with a previous token is counted here, unless
    it is a `stream`, whose caller counts its messages instead. `again`: a
    stream checked anew because the accepted tokens changed."""
    if not authorizer.enabled:
        return 0
    verdict = authorizer.verify(context.invocation_metadata() or (), context.auth_context())
    if not isinstance(verdict, Denial):
        if verdict and not stream:
            from lbserver import metrics

            metrics.AUTH_PREVIOUS_TOKEN.labels(what).inc()
        return verdict
    from lbserver import metrics

    metrics.AUTH_FAILURES.labels(what, verdict.reason).inc()
    limiter = authorizer.log_limiter
    if again:
        limiter.warning(
            log,
            "auth failure: the stream's token is no longer accepted",
            peer=context.peer(),
            call=what,
            reason=verdict.reason,
        )
    else:
        limiter.warning(log, "auth failure", peer=context.peer(), call=what, reason=verdict.reason)
    await context.abort(verdict.code, verdict.message)


# ---------------------------------------------------------------------------
# Request messages: size and decoding


@dataclass(frozen=True, slots=True)
class RefusedMessage:
    """What a request deserializer of `request_decoder` returns instead of a
    message it refuses: the handler ends the call with `code` and `details`
    (abort_refused). Returned, not raised: grpcio would turn an exception in
    a deserializer into UNKNOWN "Unexpected DecodeError"."""

    method: str  # "/grpc.lb.v1.LoadBalancer/BalanceLoad"
    reason: str  # metric label: "too_large" or "undecodable"
    code: grpc.StatusCode
    details: str
    size: int


def request_decoder(
    message_type: Any, method: str, max_message_bytes: int
) -> Callable[[bytes], Any]:
    """A request deserializer for `message_type` that returns a RefusedMessage
    for a message larger than `max_message_bytes` (RESOURCE_EXHAUSTED naming
    max_message_bytes and its value; gRPC's own limit, set higher, stops
    larger ones before they are read) or one that does not decode
    (INVALID_ARGUMENT naming the message type)."""
    name = message_type.DESCRIPTOR.full_name
    parse = message_type.FromString

    def decode(data: bytes) -> Any:
        size = len(data)
        if size > max_message_bytes:
            return RefusedMessage(
                method,
                "too_large",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a {name} of {size} bytes is larger than max_message_bytes={max_message_bytes}",
                size,
            )
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, and anything else the parser raises
            return RefusedMessage(
                method,
                "undecodable",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cannot decode the request as {name} ({size} bytes): {clip(exc, 200)}",
                size,
            )

    return decode


async def abort_refused(
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    refused: RefusedMessage,
    limiter: LogLimiter,
) -> None:
    """Counts, logs (rate-limited) and ends the call for a RefusedMessage."""
    from lbserver import metrics

    metrics.REQUESTS_REFUSED.labels(refused.method, refused.reason).inc()
    limiter.warning(
        log,
        "request message refused",
        peer=context.peer(),
        method=refused.method,
        reason=refused.reason,
        bytes=refused.size,
    )
    await context.abort(refused.code, refused.details)


# Before a unary call with a RefusedMessage is ended: checks what every call
# of the method is checked for first (credentials, rate), so that a refused
# message tells no more than any other call would.
UnaryGate = Callable[[grpc.aio.ServicerContext, str], Awaitable[object]]  # type: ignore[type-arg]


class _HandlerCapture:
    """Stands in for a server to a generated add_*Servicer_to_server, to get
    its method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service = service
        self.handlers = dict(handlers)


def serve_decoded(
    server: grpc.aio.Server,
    add_servicer: Callable[[Any, Any], None],
    servicer: object,
    *,
    max_message_bytes: int,
    limiter: LogLimiter,
    gate: UnaryGate | None = None,
) -> None:
    """Registers `servicer` as `add_servicer` (a generated
    add_*Servicer_to_server) would, with every request deserializer wrapped
    by request_decoder. A unary call whose message is refused passes `gate`
    (called with the context and the method's name), then ends with the
    refusal; a streaming handler gets RefusedMessage from context.read() and
    ends the call itself (abort_refused)."""
    capture = _HandlerCapture()
    add_servicer(servicer, capture)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, handler in capture.handlers.items():
        method = f"/{capture.service}/{name}"
        message_type = handler.request_deserializer.__self__  # type: ignore[union-attr]
        changes: dict[str, Any] = {
            "request_deserializer": request_decoder(message_type, method, max_message_bytes)
        }
        if handler.unary_stream is not None:
            # No such method yet: its refusal would need a generator wrapper.
            raise NotImplementedError(f"{method}: unary-stream methods are not wrapped")
        if handler.unary_unary is not None:
            changes["unary_unary"] = _refusing(handler.unary_unary, name, limiter, gate)
        handlers[name] = handler._replace(**changes)  # type: ignore[attr-defined]
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(capture.service, handlers),)
    )
    server.add_registered_method_handlers(capture.service, handlers)  # type: ignore[attr-defined]


def _refusing(
    behaviour: Any, name: str, limiter: LogLimiter, gate: UnaryGate | None
) -> Callable[..., Any]:
    async def refusing(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        if type(request) is RefusedMessage:
            if gate is not None:
                await gate(context, name)
            await abort_refused(context, request, limiter)
        return await behaviour(request, context)

    return refusing
