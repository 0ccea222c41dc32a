"""Who may register: bearer tokens, mTLS and limits on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import trustme
from prometheus_client import REGISTRY

from lbserver.errors import ConfigError
from lbserver.proto.grpclb.v1 import load_balancer_pb2 as lb
from lbserver.proto.grpclb.v1 import load_balancer_pb2_grpc as lb_grpc
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from tests.service.harness import Harness

TOKEN = "s3cret-token"
HEARTBEAT = pb.HeartbeatRequest(service="oap", instance_id="a", ip="10.0.0.1", port=11800)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def auth_failures(call: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "lbserver_auth_failures_total", {"call": call, "reason": reason}
    )
    return value or 0.0


async def backends(channel: grpc.aio.Channel) -> list[str]:
    state = await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest(), metadata=bearer(TOKEN))
    return [b.instance_id for s in state.services for b in s.backends]


@pytest.mark.parametrize(
    ("metadata", "code", "reason"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "missing_token"),
        ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED, "malformed_token"),
        (bearer("wrong"), grpc.StatusCode.PERMISSION_DENIED, "wrong_token"),
    ],
)
async def test_registry_requires_the_token(
    harness: Harness,
    metadata: tuple[tuple[str, str], ...],
    code: grpc.StatusCode,
    reason: str,
) -> None:
    running = await harness.start(auth_token=TOKEN)
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    before = auth_failures("heartbeat", reason)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await registry.Heartbeat(HEARTBEAT, metadata=metadata)
    assert error.value.code() == code
    assert "token" in (error.value.details() or "")
    assert auth_failures("heartbeat", reason) == before + 1
    assert await backends(channel) == []  # the rejected heartbeat changed nothing
    await registry.Heartbeat(HEARTBEAT, metadata=bearer(TOKEN))
    assert await backends(channel) == ["a"]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await registry.Deregister(
            pb.DeregisterRequest(service="oap", instance_id="a"), metadata=metadata
        )
    assert error.value.code() == code
    assert await backends(channel) == ["a"]


async def test_admin_requires_the_token_but_balance_load_is_open(
    harness: Harness, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    running = await harness.start(auth_token_file=str(token_file))
    channel = harness.channel(running)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pb_grpc.AdminStub(channel).GetState(pb.GetStateRequest())
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    call = lb_grpc.LoadBalancerStub(channel).BalanceLoad(
        iter([lb.LoadBalanceRequest(initial_request=lb.InitialLoadBalanceRequest(name="oap"))])
    )
    first = await asyncio.wait_for(call.read(), 5)
    assert isinstance(first, lb.LoadBalanceResponse) and first.HasField("initial_response")
    call.cancel()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    client_ca = trustme.CA()
    folder = tmp_path_factory.mktemp("pki")
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = client_ca.issue_cert("registrar.oap.svc")
    stranger = trustme.CA().issue_cert("intruder")
    files = {
        "ca": folder / "ca.pem",
        "client_ca": folder / "client-ca.pem",
        "server_chain": folder / "server.pem",
        "server_key": folder / "server.key",
        "client_chain": folder / "client.pem",
        "client_key": folder / "client.key",
        "stranger_chain": folder / "stranger.pem",
        "stranger_key": folder / "stranger.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    client_ca.cert_pem.write_to_path(str(files["client_ca"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    stranger.private_key_pem.write_to_path(str(files["stranger_key"]))
    for name, cert in (("server", server), ("client", client), ("stranger", stranger)):
        with files[f"{name}_chain"].open("wb") as out:
            for blob in cert.cert_chain_pems:
                out.write(blob.bytes())
    return files


def tls_channel(port: int, pki: dict[str, Path], client: str | None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{client}_key"].read_bytes() if client else None,
        certificate_chain=pki[f"{client}_chain"].read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


async def open_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:  # type: ignore[type-arg]
    """A BalanceLoad stream that stays open (its requests never end)."""

    async def requests() -> AsyncIterator[lb.LoadBalanceRequest]:
        yield lb.LoadBalanceRequest(initial_request=lb.InitialLoadBalanceRequest(name="oap"))
        await asyncio.Event().wait()

    return lb_grpc.LoadBalancerStub(channel).BalanceLoad(requests())


async def test_mtls_guards_registry_while_balance_load_stays_open(
    harness: Harness, pki: dict[str, Path]
) -> None:
    running = await harness.start(
        tls_cert_file=str(pki["server_chain"]),
        tls_key_file=str(pki["server_key"]),
        tls_client_ca_file=str(pki["client_ca"]),
        registry_listen="127.0.0.1:0",
    )
    assert running.registry_port != running.port
    anonymous = tls_channel(running.port, pki, None)
    anonymous_registry = tls_channel(running.registry_port, pki, None)
    stranger = tls_channel(running.registry_port, pki, "stranger")
    trusted = tls_channel(running.registry_port, pki, "client")
    try:
        # Registry is not on the open port at all.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await pb_grpc.RegistryStub(anonymous).Heartbeat(HEARTBEAT)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # On its own port, no certificate or one from another CA fails the handshake.
        for channel in (anonymous_registry, stranger):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await pb_grpc.RegistryStub(channel).Heartbeat(HEARTBEAT, timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        reply = await pb_grpc.RegistryStub(trusted).Heartbeat(HEARTBEAT)
        assert reply.granted_ttl.seconds > 0
        call = await open_stream(anonymous)
        await asyncio.wait_for(call.read(), 5)
        servers = await asyncio.wait_for(call.read(), 5)
        assert isinstance(servers, lb.LoadBalanceResponse)
        assert len(servers.server_list.servers) == 1
        call.cancel()
    finally:
        for channel in (anonymous, anonymous_registry, trusted, stranger):
            await channel.close(None)


async def test_mtls_everywhere_refuses_clients_without_certificates(
    harness: Harness, pki: dict[str, Path]
) -> None:
    running = await harness.start(
        tls_cert_file=str(pki["server_chain"]),
        tls_key_file=str(pki["server_key"]),
        tls_client_ca_file=str(pki["client_ca"]),
        tls_client_auth="all",
    )
    anonymous = tls_channel(running.port, pki, None)
    trusted = tls_channel(running.port, pki, "client")
    try:
        call = await open_stream(anonymous)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(call.read(), 5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        await pb_grpc.RegistryStub(trusted).Heartbeat(HEARTBEAT)
    finally:
        for channel in (anonymous, trusted):
            await channel.close(None)


async def test_registry_port_without_client_ca_is_a_config_error(harness: Harness) -> None:
    with pytest.raises(ConfigError, match="registry_listen"):
        await harness.start(registry_listen="127.0.0.1:0")


async def test_limits_refuse_with_resource_exhausted(harness: Harness) -> None:
    running = await harness.start(max_services=1, max_backends_per_service=2, max_streams=1)
    channel = harness.channel(running)
    registry = pb_grpc.RegistryStub(channel)
    await registry.Heartbeat(HEARTBEAT)
    await registry.Heartbeat(
        pb.HeartbeatRequest(service="oap", instance_id="b", ip="10.0.0.2", port=1)
    )
    for request, limit in (
        (
            pb.HeartbeatRequest(service="oap", instance_id="c", ip="10.0.0.3", port=1),
            "max_backends_per_service",
        ),
        (
            pb.HeartbeatRequest(service="other", instance_id="d", ip="10.0.0.4", port=1),
            "max_services",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await registry.Heartbeat(request)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert limit in (error.value.details() or "")
    # Refreshing a known backend is never refused.
    await registry.Heartbeat(HEARTBEAT)

    first = await open_stream(channel)
    await asyncio.wait_for(first.read(), 5)
    second = await open_stream(channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(second.read(), 5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams" in (error.value.details() or "")
    first.cancel()


async def test_heartbeats_per_peer_are_rate_limited(harness: Harness) -> None:
    running = await harness.start(heartbeat_rate_per_peer=3.0)
    registry = pb_grpc.RegistryStub(harness.channel(running))
    codes = []
    for _ in range(10):
        try:
            await registry.Heartbeat(HEARTBEAT)
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes.append(error.code())
    assert codes[:3] == [grpc.StatusCode.OK] * 3
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
