"""A raw xDS ADS (state of the world) client driven by hand, for tests that
look at what lbserver sends: requests go out as the test writes them,
responses are read one by one and decoded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from lbserver.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE

MESSAGES: dict[str, Any] = {
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
}
# How long read_nothing() looks: a glance; the marker that must come next is
# the proof (the balancer answers in order).
QUIET = 0.05


def decoded(response: discovery_pb2.DiscoveryResponse) -> dict[str, Any]:
    """The response's resources by name."""
    found = {}
    for packed in response.resources:
        assert packed.type_url == response.type_url
        message = MESSAGES[response.type_url].FromString(packed.value)
        name = getattr(message, "name", "") or message.cluster_name
        found[name] = message
    return found


def endpoint_weights(response: discovery_pb2.DiscoveryResponse, name: str) -> dict[int, int]:
    """Backend port -> locality weight in ClusterLoadAssignment `name`."""
    weights = {}
    for locality in decoded(response)[name].endpoints:
        for lb_endpoint in locality.lb_endpoints:
            port = lb_endpoint.endpoint.address.socket_address.port_value
            weights[port] = locality.load_balancing_weight.value
    return weights


class AdsStream:
    def __init__(self, channel: grpc.aio.Channel, node_id: str = "test-node") -> None:
        self.node_id = node_id
        self._requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.call = stub.StreamAggregatedResources(self._iterate())
        self._pending: asyncio.Future[Any] | None = None

    async def _iterate(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def send(
        self,
        type_url: str,
        names: Iterable[str],
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
        )
        request.node.id = self.node_id
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self._requests.put(request)

    async def ack(
        self, response: discovery_pb2.DiscoveryResponse, names: Iterable[str] | None = None
    ) -> None:
        """ACKs `response` for the names it carried (or `names`)."""
        wanted = list(decoded(response)) if names is None else list(names)
        await self.send(
            response.type_url, wanted, version=response.version_info, nonce=response.nonce
        )

    def _read(self) -> asyncio.Future[Any]:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.call.read())
        return self._pending

    async def read(self, within: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(asyncio.shield(self._read()), within)
        self._pending = None
        assert isinstance(response, discovery_pb2.DiscoveryResponse), response
        return response

    async def read_nothing(self) -> None:
        """Nothing is waiting to be read (a glance: follow it with a marker)."""
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._read()), QUIET)

    async def subscribe(
        self, type_url: str, names: Iterable[str]
    ) -> discovery_pb2.DiscoveryResponse:
        """Sends a first request for `names` and returns its response, ACKed."""
        await self.send(type_url, names)
        response = await self.read()
        assert response.type_url == type_url
        await self.ack(response, names)
        return response

    async def close(self) -> None:
        await self._requests.put(None)
        self.call.cancel()
