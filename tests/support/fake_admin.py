"""A stand-in lbserver.v1.Admin on 127.0.0.1 for tests of `lbserver status`."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc

from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc


def serve_admin(servicer: pb_grpc.AdminServicer) -> Iterator[str]:
    """Serves `servicer` on a free loopback port; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
