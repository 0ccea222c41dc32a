"""Which backends each service has, driven by heartbeats, TTLs and drains."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

from lbserver.domain.model import Backend, Registration
from lbserver.domain.weights import LoadWeightSettings, update_capacity

TOKEN_BYTES = 10  # 16 base32 characters: far under grpclb's 50-byte limit


def backend_token(service: str, instance_id: str, address: str) -> str:
    """Stable across heartbeats and identical on every replica (no shared
    store needed), unique per backend instance, printable, short."""
    digest = hashlib.blake2b(
        f"{service}\0{instance_id}\0{address}".encode(), digest_size=TOKEN_BYTES
    ).digest()
    return base64.b32encode(digest).decode().rstrip("=").lower()


@dataclass(frozen=True, slots=True)
class TtlPolicy:
    default: float = 10.0
    minimum: float = 1.0
    maximum: float = 60.0

    def grant(self, requested: float | None) -> float:
        if requested is None:
            return self.default
        return min(max(requested, self.minimum), self.maximum)


class Membership:
    """Backends per service, keyed by instance id. Callers rebuild a service's
    list after changing it and push only when the list differs."""

    def __init__(
        self,
        ttl_policy: TtlPolicy | None = None,
        load_settings: LoadWeightSettings | None = None,
    ) -> None:
        self.ttl_policy = ttl_policy or TtlPolicy()
        self.load_settings = load_settings or LoadWeightSettings()
        self._services: dict[str, dict[str, Backend]] = {}

    def heartbeat(
        self,
        registration: Registration,
        now: float,
        wall_now: float,
        ttl: float | None = None,
    ) -> Backend:
        """Registers or refreshes a backend; `ttl` overrides the granted TTL
        (inf for members that come from Kubernetes, not heartbeats)."""
        members = self._services.setdefault(registration.service, {})
        # A new instance at an address replaces the old one there at once (a
        # restarted backend must not wait for its predecessor's TTL).
        for other in list(members.values()):
            if (
                other.instance_id != registration.instance_id
                and other.registration.address == registration.address
            ):
                del members[other.instance_id]
        if ttl is None:
            ttl = self.ttl_policy.grant(registration.requested_ttl)
        previous = members.get(registration.instance_id)
        if previous is not None and previous.registration.address != registration.address:
            previous = None  # same id, new address: a new process as far as load goes
        backend = Backend(
            registration=registration,
            token=backend_token(
                registration.service, registration.instance_id, registration.address
            ),
            last_heartbeat=now,
            expires_at=now + ttl,
            last_heartbeat_wall=wall_now,
            ttl=ttl,
            first_seen=now if previous is None else previous.first_seen,
            capacity=update_capacity(
                None if previous is None else previous.capacity,
                registration.load,
                now,
                self.load_settings,
            ),
        )
        members[registration.instance_id] = backend
        return backend

    def deregister(self, service: str, instance_id: str) -> bool:
        members = self._services.get(service)
        if members is None or instance_id not in members:
            return False
        del members[instance_id]
        if not members:
            del self._services[service]
        return True

    def expire(self, now: float) -> list[Backend]:
        """Drops backends whose TTL ran out and returns them."""
        expired: list[Backend] = []
        for service, members in list(self._services.items()):
            for instance_id, backend in list(members.items()):
                if backend.expires_at <= now:
                    del members[instance_id]
                    expired.append(backend)
            if not members:
                del self._services[service]
        return expired

    def extend_expiries(self, seconds: float) -> None:
        """Pushes every expiry back, after a pause of the balancer itself."""
        for members in self._services.values():
            for instance_id, backend in members.items():
                members[instance_id] = replace(backend, expires_at=backend.expires_at + seconds)

    def count(self, service: str) -> int:
        return len(self._services.get(service, {}))

    def get(self, service: str, instance_id: str) -> Backend | None:
        return self._services.get(service, {}).get(instance_id)

    def backends(self, service: str) -> list[Backend]:
        """In a stable order (by address) so replicas build the same lists."""
        members = self._services.get(service, {})
        return sorted(members.values(), key=lambda b: (b.registration.address, b.instance_id))

    def services(self) -> list[str]:
        return sorted(self._services)

    def __contains__(self, service: object) -> bool:
        return service in self._services

    def __iter__(self) -> Iterator[Backend]:
        for members in self._services.values():
            yield from members.values()
