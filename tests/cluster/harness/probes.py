"""The kubelet's network probes, made from the node's network namespace:
gRPC (grpc.health.v1 Check over HTTP/2, as kubelet's prober does), HTTP GET
and TCP connect. Each returns (success, message)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import h2.config
import h2.connection
import h2.events
from grpc_health.v1 import health_pb2

from tests.cluster.harness.netns import socket_in

ProbeResult = tuple[bool, str]


async def _connect(
    netns: str, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket_in(netns)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def tcp_probe(netns: str, host: str, port: int, seconds: float) -> ProbeResult:
    try:
        async with asyncio.timeout(seconds):
            _, writer = await _connect(netns, host, port)
    except (OSError, TimeoutError) as err:
        return False, f"dial tcp {host}:{port}: {err}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, ""


async def http_probe(
    netns: str,
    host: str,
    port: int,
    path: str,
    seconds: float,
    headers: list[tuple[str, str]] | None = None,
) -> ProbeResult:
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await _connect(netns, host, port)
            try:
                lines = [f"GET {path or '/'} HTTP/1.1", f"Host: {host}:{port}"]
                lines += [f"{k}: {v}" for k, v in headers or []]
                lines += ["User-Agent: kube-probe/1.31", "Connection: close", "", ""]
                writer.write("\r\n".join(lines).encode())
                status_line = (await reader.readline()).decode(errors="replace")
            finally:
                writer.close()
    except (OSError, TimeoutError) as err:
        return False, f"Get http://{host}:{port}{path}: {err}"
    parts = status_line.split()
    if len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {status_line.strip()}"


async def grpc_probe(netns: str, host: str, port: int, service: str, seconds: float) -> ProbeResult:
    """grpc.health.v1.Health/Check(service): success only for SERVING."""
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await _connect(netns, host, port)
            try:
                return await _health_check(reader, writer, host, port, service, seconds)
            finally:
                writer.close()
    except (OSError, TimeoutError) as err:
        return False, f"failed to connect service {host}:{port} within {seconds}s: {err!r}"


async def _health_check(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    port: int,
    service: str,
    seconds: float,
) -> ProbeResult:
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", f"{host}:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", f"{max(1, int(seconds * 1000))}m"),
            ("user-agent", "kube-probe/1.31"),
        ],
    )
    body = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    conn.send_data(stream_id, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
    writer.write(conn.data_to_send())
    message = b""
    status: dict[str, str] = {}
    while True:
        data = await reader.read(65536)
        if not data:
            return False, "connection closed before the response ended"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                message += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                for key, value in event.headers:
                    status[str(key)] = str(value)
            elif isinstance(event, h2.events.StreamReset):
                return False, f"stream reset (error {event.error_code})"
            elif isinstance(event, h2.events.ConnectionTerminated):
                return False, f"connection terminated (error {event.error_code})"
            elif isinstance(event, h2.events.StreamEnded):
                return _verdict(status, message)
        writer.write(conn.data_to_send())


def _verdict(headers: dict[str, str], message: bytes) -> ProbeResult:
    code = headers.get("grpc-status", "")
    if code != "0":
        return False, f"rpc error: code = {code} desc = {headers.get('grpc-message', '')}"
    if len(message) < 5:
        return False, "empty health response"
    reply = health_pb2.HealthCheckResponse.FromString(message[5:])
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return False, f"service unhealthy (responded with {name})"
    return True, ""


def resolve_port(port: int | str, containers: list[dict[str, object]]) -> int:
    """A probe's or Service's port: a number, or the name of a container port."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for container in containers:
        for p in container.get("ports") or []:  # type: ignore[attr-defined]
            if p.get("name") == port:
                return int(p["containerPort"])
    raise LookupError(f"port {port!r} is not a named port of the container")


__all__ = ["grpc_probe", "http_probe", "resolve_port", "socket", "tcp_probe"]
