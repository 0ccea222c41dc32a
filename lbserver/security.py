"""Who may register backends and read the balancer's state.

A registered backend receives every agent's traces, so Registry and Admin can
require a bearer token (compared in constant time) and, with TLS, a client
certificate; BalanceLoad stays open to clients unless TLS requires client
certificates on the whole port.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from lbserver.errors import ConfigError

log = structlog.get_logger("lbserver.security")


@dataclass(frozen=True, slots=True)
class Denial:
    code: grpc.StatusCode
    message: str
    reason: str  # metric label


class Authorizer:
    """Checks one call's credentials for Registry and Admin."""

    def __init__(self, token: str | None = None, require_client_cert: bool = False) -> None:
        self._token = token.encode() if token else None
        self._require_client_cert = require_client_cert

    @property
    def enabled(self) -> bool:
        return self._token is not None or self._require_client_cert

    def check(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Denial | None:
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
        if self._token is None:
            return None
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
        if not hmac.compare_digest(presented.strip(), self._token):
            return Denial(
                grpc.StatusCode.PERMISSION_DENIED,
                "the registration token is wrong",
                "wrong_token",
            )
        return None


def load_token(token: str, token_file: str) -> str | None:
    """The configured token: from `token_file` if given, else `token`."""
    if token_file:
        try:
            value = Path(token_file).read_text().strip()
        except OSError as err:
            raise ConfigError(
                f"auth_token_file: cannot read {token_file}: {err.strerror}"
            ) from None
        if not value:
            raise ConfigError(f"auth_token_file: {token_file} is empty")
        return value
    return token or None


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str, require_client_cert_everywhere: bool
) -> grpc.ServerCredentials | None:
    """TLS credentials, or None without a certificate. grpcio either requires
    and verifies client certificates for every call on a port or does not ask
    for them at all."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise ConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if not cert_file or not key_file:
        raise ConfigError("tls_cert_file and tls_key_file go together")

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
) -> None:
    """Aborts the call unless its credentials pass; logs and counts failures."""
    if not authorizer.enabled:
        return
    denial = authorizer.check(context.invocation_metadata() or (), context.auth_context())
    if denial is None:
        return
    from lbserver import metrics

    metrics.AUTH_FAILURES.labels(what, denial.reason).inc()
    log.warning("auth failure", peer=context.peer(), call=what, reason=denial.reason)
    await context.abort(denial.code, denial.message)
