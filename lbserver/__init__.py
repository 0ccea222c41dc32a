"""lbserver: a lookaside gRPC load balancer speaking the grpclb protocol.

Importing this package loads nothing else (no grpcio): the Python API lives
in its subpackages and modules, imported where they are used.

- `lbserver.registrar`: the backend side (`Registrar`, `PrometheusLoadProbe`,
  the backend probes), for backends written in Python;
- `lbserver.errors`: the exceptions lbserver raises;
- `lbserver.addresses`: HOST:PORT parsing and joining.

The client side is the separate package `agent_shim`.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
