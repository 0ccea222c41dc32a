"""Names grpcio has but its type stubs (grpc-stubs) lack."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health as _health
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

# Returned by ServicerContext.read() / Call.read() once the peer half-closed.
EOF_MARKER: object = grpc.aio.EOF  # type: ignore[attr-defined]
AsyncHealthServicer: Any = _health.aio.HealthServicer  # type: ignore[attr-defined]
# The generated grpc.health.v1 servicer: every method answers UNIMPLEMENTED.
HealthServicerBase: Any = _health_pb2_grpc.HealthServicer
