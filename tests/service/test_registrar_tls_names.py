"""A registrar given a balancer by DNS name (the balancer's headless
Service) connects to every address the name resolves to, and with TLS must
verify each balancer's certificate against that name: a headless Service's
pod IPs are in no certificate. Found by the cluster harness with the chart's
ci/tls-values.yaml: every heartbeat failed "Hostname Verification Check
failed"."""

from __future__ import annotations

from pathlib import Path

import grpc
import trustme

from lbserver.registrar import Registrar
from tests.support.eventually import eventually

from .harness import Harness

NAME = "lbserver-headless.skywalking.svc"


async def test_tls_to_resolved_addresses_verifies_the_name_they_came_from(
    harness: Harness, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert(NAME)  # the name only, no IP
    chain, key = tmp_path / "server.pem", tmp_path / "server.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key))
    running = await harness.start(tls_cert_file=str(chain), tls_key_file=str(key))
    resolved: list[str] = []

    async def resolve(host: str) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    registrar = Registrar(
        [f"{NAME}:{running.port}"],
        "oap",
        "10.0.0.7",
        11800,
        interval=0.2,
        resolve=resolve,
        credentials=grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes()),
    )
    async with registrar:
        await eventually(lambda: running.balancer.membership.count("oap") == 1, "registered")
        assert running.balancer.membership.count("oap") == 1
    assert resolved and resolved[0] == NAME


async def test_an_ip_literal_is_verified_as_the_ip(harness: Harness, tmp_path: Path) -> None:
    """No name to verify against: the certificate must carry the IP."""
    ca = trustme.CA()
    server = ca.issue_cert(NAME)
    chain, key = tmp_path / "server.pem", tmp_path / "server.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key))
    running = await harness.start(tls_cert_file=str(chain), tls_key_file=str(key))
    registrar = Registrar(
        [f"127.0.0.1:{running.port}"],
        "oap",
        "10.0.0.7",
        11800,
        interval=0.2,
        credentials=grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes()),
    )
    async with registrar:
        # The handshake was tried and failed (not merely "not yet").
        await eventually(
            lambda: registrar._links and registrar._links[0].status == "unreachable",
            "the failed handshake",
        )
        assert registrar._links[0].status == "unreachable"
        assert running.balancer.membership.count("oap") == 0
