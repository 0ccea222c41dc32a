"""One ADS stream's state-of-the-world bookkeeping, per resource type.

Pure: no gRPC, no clock. The stream handler feeds it each DiscoveryRequest
(`receive`) and asks it whether the resources it would send now make a
response (`respond`). The rules, from the xDS protocol and gRFC A27:

- A response carries every subscribed resource that exists (state of the
  world), a version and a nonce. The version is a hash of the resources, so
  equal content has an equal version on every replica and after a restart.
- A request whose `response_nonce` is the last one sent is the client's
  verdict on that response: an ACK (no `error_detail`; its `version_info` is
  now the client's) or a NACK (the client keeps its previous version; the
  rejected content is not sent again, only a change is). A request with an
  older nonce is stale (a response crossed it) and ignored whole, as
  go-control-plane does: the client answers the newer response anyway.
- The first request of a type (also on a new stream after a reconnect, with
  the client's cached version) and a request that changes the subscribed
  names are answered even when nothing changed, so the client learns what
  exists. Otherwise a response is sent only when the content changed.
- A resource that does not exist is left out. For listeners and clusters a
  client treats a resource it had and no longer gets as deleted; one it
  never had it reports missing after its does-not-exist timer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

ReceivedKind = Literal["first", "ack", "nack", "stale", "update"]


@dataclass(frozen=True, slots=True)
class Received:
    kind: ReceivedKind
    # The version the request's verdict was about (ack and nack).
    version: str = ""
    names_changed: bool = False


@dataclass(frozen=True, slots=True)
class Response:
    type_url: str
    version: str
    nonce: str
    # (name, serialized resource) in name order.
    resources: tuple[tuple[str, bytes], ...]


@dataclass(slots=True)
class Subscription:
    """What one stream asked for, of one type, and what it was sent."""

    names: frozenset[str] = frozenset()
    version: str = ""  # of the last response ("": none yet)
    nonce: str = ""  # of the last response
    # The last response's resources, by name: a resource whose answer is
    # pending (startup grace, `hold`) is sent again as it was.
    sent: dict[str, bytes] = field(default_factory=dict)
    accepted: str = ""  # the version the client last ACKed
    rejected: str = ""  # the version the client last NACKed
    # The last nonce's verdict came already: another request with it is not
    # an ACK (the rate limit counts it).
    answered: bool = False
    # Answer at the next respond() even if nothing changed.
    due: bool = True
    # The stream's first request of this type carried a version: the client
    # holds resources from an earlier stream (a reconnect).
    resumed: bool = False


def version_of(resources: Iterable[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, value in resources:
        digest.update(len(name).to_bytes(4, "big"))
        digest.update(name.encode())
        digest.update(len(value).to_bytes(4, "big"))
        digest.update(value)
    return digest.hexdigest()[:16]


class AdsState:
    """The subscriptions of one ADS stream, by type URL."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, Subscription] = {}
        self._nonces = 0

    def names(self) -> set[str]:
        """Every name subscribed to, of any type."""
        names: set[str] = set()
        for subscription in self.subscriptions.values():
            names.update(subscription.names)
        return names

    def receive(
        self, type_url: str, version_info: str, nonce: str, names: Iterable[str], nack: bool
    ) -> Received:
        wanted = frozenset(names)
        subscription = self.subscriptions.get(type_url)
        if subscription is None:
            # A new stream's first request of this type: whatever version the
            # client cached before (a reconnect), it gets the state now.
            self.subscriptions[type_url] = Subscription(names=wanted, resumed=bool(version_info))
            return Received("first", names_changed=True)
        if nonce != subscription.nonce:
            return Received("stale")
        changed = wanted != subscription.names
        subscription.names = wanted
        if changed:
            subscription.due = True
        if subscription.answered or not subscription.version:
            return Received("update", names_changed=changed)
        subscription.answered = True
        if nack:
            subscription.rejected = subscription.version
            return Received("nack", subscription.version, changed)
        subscription.accepted = version_info
        return Received("ack", version_info, changed)

    def respond(self, type_url: str, resources: Mapping[str, bytes]) -> Response | None:
        """The response to send for `resources` (the subscribed ones that
        exist now), or None when the client has this content already or
        rejected it, and nothing asks for an answer regardless."""
        subscription = self.subscriptions.get(type_url)
        if subscription is None:
            return None
        ordered = tuple(sorted(resources.items()))
        version = version_of(ordered)
        if not subscription.due and version in (subscription.version, subscription.rejected):
            return None
        self._nonces += 1
        nonce = str(self._nonces)
        subscription.version = version
        subscription.nonce = nonce
        subscription.sent = dict(ordered)
        subscription.answered = False
        subscription.due = False
        return Response(type_url, version, nonce, ordered)
