"""Which backends each service has, driven by heartbeats, TTLs and drains."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache

from lbserver.domain.model import Backend, IPAddress, Registration, format_address
from lbserver.domain.weights import LoadWeightSettings, update_capacity

TOKEN_BYTES = 10  # 16 base32 characters: far under grpclb's 50-byte limit


@lru_cache(maxsize=65_536)  # asked again on every heartbeat of the backend
def backend_token(service: str, instance_id: str, address: str) -> str:
    """Stable across heartbeats and identical on every replica (no shared
    store needed), unique per backend instance, printable, short."""
    digest = hashlib.blake2b(
        f"{service}\0{instance_id}\0{address}".encode(), digest_size=TOKEN_BYTES
    ).digest()
    return base64.b32encode(digest).decode().rstrip("=").lower()


@lru_cache(maxsize=65_536)
def _token_at(service: str, instance_id: str, ip: IPAddress, port: int) -> str:
    # Formatting the address is most of a token lookup's cost; a heartbeat
    # names its address as (ip, port).
    return backend_token(service, instance_id, format_address(ip, port))


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
        # Per service: the instance at each address (at most one, since a new
        # instance at an address replaces the old one), and the instance ids
        # in backends() order, or None when it must be sorted again.
        self._by_address: dict[str, dict[tuple[IPAddress, int], str]] = {}
        self._order: dict[str, list[str] | None] = {}
        # Bumped whenever a service appears or vanishes.
        self.services_generation = 0

    def heartbeat(
        self,
        registration: Registration,
        now: float,
        wall_now: float,
        ttl: float | None = None,
    ) -> Backend:
        """Registers or refreshes a backend; `ttl` overrides the granted TTL
        (inf for members that come from Kubernetes, not heartbeats)."""
        members = self._services.get(registration.service)
        if members is None:
            members = self._services[registration.service] = {}
            self._by_address[registration.service] = {}
            self.services_generation += 1
        if ttl is None:
            ttl = self.ttl_policy.grant(registration.requested_ttl)
        previous = members.get(registration.instance_id)
        if (
            previous is not None
            and previous.registration.port == registration.port
            and previous.registration.ip == registration.ip
        ):
            # The common case, a backend heartbeating from where it was: the
            # address index and the token stay as they are.
            token = previous.token
            first_seen = previous.first_seen
        else:
            self._place(registration, previous)
            previous = None  # new, or a new process at a new address
            token = _token_at(
                registration.service, registration.instance_id, registration.ip, registration.port
            )
            first_seen = now
        backend = Backend(
            registration=registration,
            token=token,
            last_heartbeat=now,
            expires_at=now + ttl,
            last_heartbeat_wall=wall_now,
            ttl=ttl,
            first_seen=first_seen,
            capacity=update_capacity(
                None if previous is None else previous.capacity,
                registration.load,
                now,
                self.load_settings,
            ),
        )
        members[registration.instance_id] = backend
        return backend

    def _place(self, registration: Registration, previous: Backend | None) -> None:
        """Index upkeep for a backend that is new or at a new address: a new
        instance at an address replaces the old one there at once (a
        restarted backend must not wait for its predecessor's TTL), and the
        same id at a new address is a new process as far as load goes."""
        service = registration.service
        members, addresses = self._services[service], self._by_address[service]
        address = (registration.ip, registration.port)
        other = addresses.get(address)
        if other is not None and other != registration.instance_id:
            del members[other]
        if previous is not None:
            old_address = (previous.registration.ip, previous.registration.port)
            if addresses.get(old_address) == registration.instance_id:
                del addresses[old_address]
        addresses[address] = registration.instance_id
        self._order[service] = None

    def _forget(self, service: str, backend: Backend) -> None:
        """Index upkeep after `backend` left `service`'s members."""
        addresses = self._by_address[service]
        address = (backend.registration.ip, backend.registration.port)
        if addresses.get(address) == backend.instance_id:
            del addresses[address]
        self._order[service] = None
        if not self._services[service]:
            del self._services[service]
            del self._by_address[service]
            del self._order[service]
            self.services_generation += 1

    def deregister(self, service: str, instance_id: str) -> bool:
        members = self._services.get(service)
        if members is None or instance_id not in members:
            return False
        self._forget(service, members.pop(instance_id))
        return True

    def expire(self, now: float) -> list[Backend]:
        """Drops backends whose TTL ran out and returns them."""
        expired: list[Backend] = []
        for service, members in list(self._services.items()):
            for instance_id, backend in list(members.items()):
                if backend.expires_at <= now:
                    del members[instance_id]
                    expired.append(backend)
                    self._forget(service, backend)
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
        members = self._services.get(service)
        if not members:
            return []
        order = self._order.get(service)
        if order is None:
            ordered = sorted(
                members.values(), key=lambda b: (b.registration.address, b.instance_id)
            )
            self._order[service] = [b.instance_id for b in ordered]
            return ordered
        return [members[instance_id] for instance_id in order]

    def services(self) -> list[str]:
        return sorted(self._services)

    def __contains__(self, service: object) -> bool:
        return service in self._services

    def __iter__(self) -> Iterator[Backend]:
        for members in self._services.values():
            yield from members.values()
