"""Service tests: the real grpc.aio server on 127.0.0.1:0, driven by raw stubs
and by grpcio's own grpclb client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.service.grpclb_client import Client
from tests.service.harness import TEST_CONFIG, Harness
from tests.support.backends import BackendFleet, CountingBackend
from tests.support.dns import DnsServer
from tests.support.shim_echo import EchoBackend

__all__ = ["TEST_CONFIG", "Harness"]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def fleet() -> Iterator[BackendFleet]:
    with BackendFleet(3) as backends:
        yield backends


@pytest.fixture
def fallback_backend() -> Iterator[CountingBackend]:
    with CountingBackend("fallback") as backend:
        yield backend


@pytest.fixture
def echoes() -> Iterator[list[EchoBackend]]:
    """Two echo backends for the balanced-channel tests."""
    backends = [EchoBackend(f"e{i}").start() for i in range(2)]
    try:
        yield backends
    finally:
        for backend in backends:
            backend.stop()


@pytest.fixture
async def client(dns: DnsServer, fallback_backend: CountingBackend) -> AsyncIterator[Client]:
    c = Client(dns, fallback_backend)
    try:
        yield c
    finally:
        await c.channel.close(None)
